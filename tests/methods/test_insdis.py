"""InsDis (PyContrast's recipe, methods/npid.py): its defaults, the softmax over the own bank entry and the drawn
ones against the formula by hand, NPID's bank update, learning on the bundled CIFAR-10 sample, and a run of the
loop with the shipped defaults on that sample (65,536 negatives for 4,800 images: one warning, then it trains)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from selfsup import backbones, methods
from selfsup.config import OptimConfig, build
from selfsup.data import load
from selfsup.errors import UserError
from selfsup.methods.base import StepInfo, TrainSet
from selfsup.methods.npid import INSDIS_VIEW, NPID, InsDis
from selfsup.train.optim import build_optimizer

INFO = StepInfo.at(0)


def _insdis(num_images=64, width=0.125, **params):
    torch.manual_seed(0)
    net = backbones.build("resnet18", width=width, cifar_stem=True)
    return InsDis(net, InsDis.make_config(params), num_images)


def _random_images(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _sample(split, n):
    data = load("sample", split)
    pick = torch.linspace(0, len(data.labels) - 1, n).long().numpy()     # the sample is sorted by class
    return torch.from_numpy(data.images[pick].copy()).permute(0, 3, 1, 2)


def _train_set(n, rank=0):
    return TrainSet(n, torch.zeros(n, dtype=torch.long), 1, None, torch.device("cpu"), rank, 1, "'toy' (train split)")


def test_defaults_are_pycontrasts_insdis():
    cfg = InsDis.Config()
    assert (cfg.num_negatives, cfg.temperature, cfg.momentum, cfg.embed_dim) == (65_536, 0.07, 0.5, 128)
    assert cfg.view == "insdis" and INSDIS_VIEW.crop_scale == (0.08, 1.0) and INSDIS_VIEW.jitter == (0.4,) * 4
    assert INSDIS_VIEW.jitter_p == 1.0 and INSDIS_VIEW.gray_p == 0.2
    recipe = InsDis.optim_defaults
    assert (recipe["name"], recipe["lr"], recipe["weight_decay"], recipe["schedule"]) == ("sgd", 0.03, 1e-4, "step")
    assert recipe["milestones"] == [120, 160] and recipe["gamma"] == 0.1
    assert not recipe.get("exclude_norm_and_bias", False)     # PyContrast decays every parameter
    method = _insdis()
    assert isinstance(method, NPID) and method.name == "insdis"
    assert not any(k.startswith("z.") for k in method.state_dict())   # a softmax has no normalising constant
    assert method.head.in_features == method.backbone.out_dim and method.head.out_features == 128
    with pytest.raises(UserError, match="norm_constant"):   # not an option of a softmax
        InsDis.make_config({"norm_constant": "every_step"})


@pytest.mark.parametrize("shared", [False, True])
def test_loss_is_the_softmax_over_the_own_entry_and_the_drawn_ones(shared):
    n, b, tau = 40, 6, 0.07
    method = _insdis(num_images=n, num_negatives=9, shared_negatives=shared, size=16)
    memory = F.normalize(torch.randn(n, 128, generator=torch.Generator().manual_seed(1)), dim=1)
    method.bank.memory.copy_(memory)
    index = torch.tensor([3, 17, 0, 25, 39, 8])
    views = method.views(_random_images(b, 16), index, torch.Generator().manual_seed(2), INFO)
    negatives = views["negatives"]
    assert negatives.shape == ((9,) if shared else (b, 9))
    out = method(views, INFO)
    f = out["state"]["f"].double()
    assert torch.allclose(f.norm(dim=1), torch.ones(b, dtype=torch.double))
    expected = []
    for i in range(b):           # −log exp(m_I·f/τ) / (exp(m_I·f/τ) + Σ_k exp(m_k·f/τ)), one sample at a time
        drawn = negatives if shared else negatives[i]
        pos = math.exp(float(f[i] @ memory[index[i]].double()) / tau)
        neg = sum(math.exp(float(f[i] @ memory[k].double()) / tau) for k in drawn.tolist())
        expected.append(-math.log(pos / (pos + neg)))
    assert float(out["loss"].detach()) == pytest.approx(sum(expected) / b, rel=1e-5)
    assert set(out) == {"loss", "pretext_acc", "state"}
    assert 0.0 <= float(out["pretext_acc"]) <= 1.0


def test_bank_update_is_npids():
    n = 32
    insdis, npid = _insdis(num_images=n, size=16), NPID(backbones.build("resnet18", width=0.125, cifar_stem=True),
                                                        NPID.make_config({"size": 16}), n)
    npid.bank.memory.copy_(insdis.bank.memory)
    before = insdis.bank.memory.clone()
    index = torch.tensor([5, 1, 30, 12])
    out = insdis(insdis.views(_random_images(4, 16), index, torch.Generator().manual_seed(0), INFO), INFO)
    insdis.after_step(out["state"], INFO)
    npid.after_step(out["state"], INFO)
    f = out["state"]["f"]
    expected = before.clone()
    expected[index] = F.normalize(0.5 * before[index] + 0.5 * f, dim=1)   # m_I <- normalise(0.5 m_I + 0.5 f)
    torch.testing.assert_close(insdis.bank.memory, expected)
    assert torch.equal(insdis.bank.memory, npid.bank.memory)


def test_a_bank_as_large_as_the_data_warns_once_naming_the_fix():
    for method in (_insdis(num_images=64), NPID(backbones.build("resnet18", width=0.125, cifar_stem=True),
                                                NPID.make_config({}), 64)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method.setup(_train_set(64))
            method.setup(_train_set(64, rank=1))          # other ranks stay quiet
        assert len(caught) == 1, [str(w.message) for w in caught]
        message = str(caught[0].message)
        assert "'toy'" in message and "method.num_negatives=32" in message and "63" in message
    quiet = _insdis(num_images=64, num_negatives=62)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.setup(_train_set(64))


# ---------------------------------------------------------------------------------------- learning
@torch.no_grad()
def _margins(method, images, held_out):
    """How much closer each f is to its own image's reference than to the other images' (mean cosine, own minus
    others): f(v_I) of the training images against the bank, and one view of a held-out image against another."""

    def own_margin(query, reference):
        s, k = query @ reference.T, len(query)
        own = s.diagonal()
        return float((own - (s.sum(1) - own) / (k - 1)).mean())

    method.eval()
    f = [method.embed(method.views(x, torch.arange(len(x)), torch.Generator().manual_seed(s), INFO)["x"])
         for x, s in ((images, 1), (held_out, 1), (held_out, 2))]
    method.train()
    return own_margin(f[0], method.bank.memory), own_margin(f[1], f[2])


def test_insdis_learns_instances_on_the_sample():
    # 128 training images at 16 px, ResNet-18 of width 1/8, batches of 32 for 10 epochs; N capped at 127. When
    # written: bank margin 0.002 → 0.069, held-out view-to-view margin 0.012 → 0.070
    images, held_out = _sample("train", 128), _sample("test", 128)
    method = _insdis(num_images=128, size=16)
    before = _margins(method, images, held_out)
    opt = build_optimizer(method, OptimConfig(name="adamw", lr=3e-3, weight_decay=1e-6), 3e-3)
    for step in range(40):
        epoch, within = divmod(step, 4)
        index = torch.randperm(128, generator=torch.Generator().manual_seed(epoch))[within * 32:(within + 1) * 32]
        g = torch.Generator().manual_seed(step)
        out = method(method.views(images[index], index, g, INFO), INFO)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(out["state"], StepInfo.at(step))
    after = _margins(method, images, held_out)
    assert after[0] > before[0] + 0.03 and after[1] > before[1] + 0.03, (before, after)


def test_the_loop_runs_the_shipped_defaults_on_the_sample_with_one_warning(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from selfsup.train.loop import pretrain

    monkeypatch.setitem(methods.METHODS, "insdis", InsDis)
    cfg = build({"optim": InsDis.optim_defaults},
                {"method": {"name": "insdis", "size": 16},
                 "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "train": {"steps": 5, "batch_size": 16, "checkpoint_every": 5, "progress": False}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = pretrain(cfg, tmp_path / "run")
    bank = [w for w in caught if "num_negatives" in str(w.message)]
    assert len(bank) == 1 and "65536" in str(bank[0].message) and "4799" in str(bank[0].message)
    weights = load_file(run / "backbone.safetensors")
    assert weights and not any(k.startswith(("head", "bank")) for k in weights)
    model = load_file(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors")
    assert model["bank.memory"].shape == (4800, 128)
    assert "pretext_acc" in (run / "metrics.csv").read_text().splitlines()[0]
