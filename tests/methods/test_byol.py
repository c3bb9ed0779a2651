"""BYOL: the paper's defaults, the symmetrised loss (eq. 2) against a hand computation, the τ schedule and the
target's EMA, stop-gradient and asymmetric views, learning on the bundled CIFAR-10 sample without collapsing,
exact resume, and a run of the training loop."""

import copy
import csv
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from selfsup import backbones, methods
from selfsup.config import OptimConfig, build
from selfsup.data import load
from selfsup.errors import UserError
from selfsup.methods.base import StepInfo
from selfsup.methods.byol import BYOL
from selfsup.nn.momentum import byol_tau
from selfsup.train import checkpoint
from selfsup.train.loop import pretrain
from selfsup.train.optim import build_optimizer
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD, PRESETS

SMALL = dict(proj_hidden=64, proj_dim=32, pred_hidden=64, size=16)   # CPU-sized heads and views
INFO = StepInfo.at(0, total=10)


def _byol(num_images=64, width=0.125, **params):
    torch.manual_seed(0)
    net = backbones.build("resnet18", width=width, cifar_stem=True)
    return BYOL(net, BYOL.make_config({**SMALL, **params}), num_images)


def _random_images(n, size=32, seed=0, low=0):
    return torch.randint(low, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _views(method, images, seed=0, info=INFO):
    return method.views(images, torch.arange(len(images)), torch.Generator().manual_seed(seed), info)


def test_defaults_are_the_papers_recipe():
    cfg = BYOL.Config()
    assert (cfg.tau_base, cfg.proj_hidden, cfg.proj_dim, cfg.pred_hidden) == (0.996, 4096, 256, 4096)
    assert (cfg.view1, cfg.view2, cfg.size) == ("byol_1", "byol_2", None)
    recipe = OptimConfig(**BYOL.optim_defaults)
    assert (recipe.name, recipe.lr, recipe.scale_lr, recipe.weight_decay) == ("lars", 0.2, True, 1.5e-6)
    assert recipe.exclude_norm_and_bias and recipe.schedule == "cosine" and recipe.warmup_epochs == 10
    assert (recipe.momentum, recipe.lars_eta) == (0.9, 1e-3)
    assert BYOL.input_stats(cfg) == (IMAGENET_MEAN, IMAGENET_STD, False)
    m = BYOL(backbones.build("resnet18", width=0.125, cifar_stem=True), cfg, num_images=10)
    d = m.backbone.out_dim
    assert [type(x).__name__ for x in m.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (m.projector[0].in_features, m.projector[0].out_features, m.projector[3].out_features) == (d, 4096, 256)
    assert (m.predictor[0].in_features, m.predictor[0].out_features, m.predictor[3].out_features) == (256, 4096, 256)
    assert not hasattr(m.target_projector.target, "predictor") and len(m.target_projector.target) == 4
    # the target starts as a copy of the online network
    for (name, a), b in zip(m.backbone.state_dict().items(), m.target_backbone.target.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="view2"):
        BYOL.make_config({"view2": "nope"})
    with pytest.raises(UserError, match="tau_base"):
        BYOL.make_config({"tau_base": 1.5})


def _pair_loss(p, t):
    """Eq. 2 as the paper writes it: ‖q̄ − z̄′‖² per example, x̄ = x / ‖x‖₂."""
    return (p / p.norm(dim=1, keepdim=True) - t / t.norm(dim=1, keepdim=True)).pow(2).sum(1)


def test_loss_is_the_symmetrised_eq2_of_predictions_and_target_projections():
    m = _byol()
    with torch.no_grad():   # an online network that has moved away from its target
        for p in [*m.backbone.parameters(), *m.projector.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    views = _views(m, _random_images(16))
    out = m(views, INFO)
    with torch.no_grad():   # train-mode BN over the same batches: the forward's own numbers, recomputed apart
        q1, q2 = (m.predictor(m.projector(m.backbone(views[k])["pre_logits"])) for k in ("x1", "x2"))
        t1, t2 = (m.target_projector.target(m.target_backbone.target(views[k])["pre_logits"]) for k in ("x1", "x2"))
    expected = (_pair_loss(q1, t2) + _pair_loss(q2, t1)).mean()          # L + L̃, averaged over the batch
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    assert 0 <= float(out["loss"].detach()) <= 8
    # the test tells the loss from one whose target is the online network itself (no momentum copy);
    # (at init both directions give the same loss to 1e-5, so a one-sided loss cannot be told apart here)
    z1, z2 = (m.projector(m.backbone(views[k])["pre_logits"]).detach() for k in ("x1", "x2"))
    assert abs(float(expected) - float((_pair_loss(q1, z2) + _pair_loss(q2, z1)).mean())) > 1e-3
    assert float(out["tau"]) == pytest.approx(0.996)
    assert 0 < float(out["z_std"]) < 1


def test_tau_follows_the_cosine_schedule_and_the_target_is_the_ema_of_the_online_weights():
    m = _byol()
    K = 1000
    for k in (0, K // 2, K - 1):
        assert m.tau(StepInfo.at(k, total=K)) == pytest.approx(1 - (1 - 0.996) * (math.cos(math.pi * k / K) + 1) / 2)
    assert m.tau(StepInfo.at(0, total=K)) == pytest.approx(0.996)
    assert m.tau(StepInfo.at(K // 2, total=K)) == pytest.approx(0.998)
    constant = _byol(tau_base=0.99, tau_schedule="constant")       # lightly's CIFAR-10 benchmark
    assert [constant.tau(StepInfo.at(k, total=K)) for k in (0, K // 2, K - 1)] == [0.99] * 3
    with pytest.raises(UserError, match="tau_schedule"):
        BYOL.make_config({"tau_schedule": "linear"})

    m = _byol(tau_base=0.9)
    images, steps = _random_images(16), 3
    opt = build_optimizer(m, OptimConfig(name="sgd", lr=0.1), 0.1)
    online = lambda: [p.detach().clone() for p in [*m.backbone.parameters(), *m.projector.parameters()]]  # noqa: E731
    target = lambda: [p.detach().clone() for p in [*m.target_backbone.parameters(),  # noqa: E731
                                                   *m.target_projector.parameters()]]
    xi = online()                                                     # ξ_0 = θ_0
    taus = []
    for s in range(steps):
        info = StepInfo.at(s, total=steps)
        out = m(_views(m, images, seed=s, info=info), info)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        theta = online()                                              # θ after the optimiser step of step s
        m.after_step(out["state"], info)
        tau = 1 - (1 - 0.9) * (math.cos(math.pi * s / steps) + 1) / 2
        taus.append(float(out["tau"]))
        xi = [tau * a + (1 - tau) * b for a, b in zip(xi, theta, strict=True)]
        for a, b in zip(target(), xi, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert taus == pytest.approx([0.9, 0.925, 0.975])                 # logged τ_k = the τ after_step used
    assert not torch.equal(target()[0], online()[0])
    # the target's BN statistics are its own (from its own passes), not copied from the online network
    t_bn, o_bn = m.target_backbone.target.state_dict(), m.backbone.state_dict()
    stats = [k for k in t_bn if k.endswith("running_mean")]
    assert stats and any(not torch.equal(t_bn[k], o_bn[k]) for k in stats)


def test_no_gradient_reaches_the_target_and_the_views_are_asymmetric():
    m = _byol()
    out = m(_views(m, _random_images(16)), INFO)
    out["loss"].backward()
    target = [*m.target_backbone.parameters(), *m.target_projector.parameters()]
    assert target and all(p.grad is None and not p.requires_grad for p in target)
    for part in (m.backbone, m.projector, m.predictor):
        assert all(p.grad is not None for p in part.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in m.backbone.parameters())
    assert m.target_projection(torch.randn(4, 3, 16, 16)).grad_fn is None

    # view 1: blur p 1.0, never solarized; view 2: blur p 0.1, solarized with p 0.2
    assert m.view_cfgs == (PRESETS["byol_1"], PRESETS["byol_2"])
    assert (m.view_cfgs[0].solarize_p, m.view_cfgs[1].solarize_p) == (0.0, 0.2)
    # bright images (every pixel >= 230/255) stay above 0.5 through crop and jitter; solarizing (x >= 0.5 -> 1 - x)
    # leaves every pixel at or below 0.5
    views = _views(m, _random_images(400, size=16, low=230), seed=7)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    solarized = {k: ((v * std + mean).amax((1, 2, 3)) <= 0.5 + 1e-5) for k, v in views.items()}
    assert views["x1"].shape == views["x2"].shape == (400, 3, 16, 16)
    assert int(solarized["x1"].sum()) == 0
    assert 40 < int(solarized["x2"].sum()) < 120                      # 400 × 0.2 = 80
    assert _views(_byol(size=None), _random_images(2))["x1"].shape[-1] == 32   # size None: the images' own


def _state(method):
    return {k: v.clone() for k, v in method.state_dict().items()}


def test_kill_and_resume_equals_the_uninterrupted_run():
    images, N = _random_images(32), 6
    cfg = dataclasses.replace(OptimConfig(**BYOL.optim_defaults), lr=1.0)   # LARS with its momentum buffers

    def step(method, opt, s, info_step=None):
        info = StepInfo.at(s if info_step is None else info_step, steps_per_epoch=3, total=N)
        g = torch.Generator().manual_seed(s)
        index = torch.randperm(32, generator=g)[:16]
        out = method(method.views(images[index], index, g, info), info)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(out["state"], info)
        return float(out["loss"].detach()), float(out["tau"])

    straight = _byol(tau_base=0.9)
    opt = build_optimizer(straight, cfg, cfg.lr)
    first = [step(straight, opt, s) for s in range(N // 2)]
    saved, saved_opt = _state(straight), copy.deepcopy(opt.state_dict())
    second = [step(straight, opt, s) for s in range(N // 2, N)]
    taus = [t for _, t in first + second]
    assert taus == pytest.approx([byol_tau(s, N, 0.9) for s in range(N)]) and len(set(taus)) == N

    resumed = _byol(tau_base=0.9)
    resumed.load_state_dict(saved)
    opt2 = build_optimizer(resumed, cfg, cfg.lr)
    opt2.load_state_dict(saved_opt)
    assert [step(resumed, opt2, s) for s in range(N // 2, N)] == second
    final = straight.state_dict()
    for key, value in resumed.state_dict().items():                   # online, target and BN statistics
        assert torch.equal(value, final[key]), key
    assert any(k.startswith("target_backbone.") for k in final)

    # a resume that restarted the τ schedule at step 0 would end elsewhere: the schedule is in the test's reach
    wrong = _byol(tau_base=0.9)
    wrong.load_state_dict(saved)
    opt3 = build_optimizer(wrong, cfg, cfg.lr)
    opt3.load_state_dict(copy.deepcopy(saved_opt))
    for s in range(N // 2, N):
        step(wrong, opt3, s, info_step=s - N // 2)
    key = next(k for k in final if k.startswith("target_backbone.target.") and k.endswith("weight"))
    assert not torch.equal(wrong.state_dict()[key], final[key])


# ---------------------------------------------------------------------------------------- learning
def _sample(split, n):
    data = load("sample", split)
    pick = torch.linspace(0, len(data.labels) - 1, n).long().numpy()     # the sample is sorted by class
    return torch.from_numpy(data.images[pick].copy()).permute(0, 3, 1, 2)


def _own_rank(a, b):
    """How often row i of ``a`` is closer (cosine) to its own partner b_i than to another image's b_j: 0.5 for
    embeddings that do not know which image they came from, 0 for collapsed (all equal) ones."""
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    own = sim.diagonal()
    return float(((sim < own[:, None]).float().sum(1) / (len(a) - 1)).mean())


def _spread(z):
    """Per-dimension std of the ℓ2-normalised embeddings over the images, averaged over dimensions."""
    return float(F.normalize(z, dim=1).std(0).mean())


@torch.no_grad()
def _held_out(m, images):
    """On held-out images, eval-mode BN, the same augmentation draws each time: BYOL's loss, how often the
    prediction q(z_1) picks its own image's target z′_2, the same for the backbone's features of the two views,
    and the spread of the online projections and of the features."""
    m.eval()
    v = _views(m, images, seed=123)
    loss = float(m(v, INFO)["loss"])
    f1, f2 = (m.backbone(v[k])["pre_logits"] for k in ("x1", "x2"))
    z1 = m.projector(f1)
    result = dict(loss=loss, pred=_own_rank(m.predictor(z1), m.target_projection(v["x2"])), feat=_own_rank(f1, f2),
                  z_std=_spread(z1), f_std=_spread(f1))
    m.train()
    return result


def test_byol_learns_on_held_out_images_without_collapsing():
    # 512 sample images at 16 px views, a ResNet-18 of width 1/8 with 256-64 heads, 120 steps of 64 (15 epochs)
    # with the shipped LARS (biases and BN excluded) at a CPU-sized lr 2.0 and τ_base 0.96, so that the target
    # follows within the run. When written: held-out loss 4.01 → 1.73; q(z_1) picks its own image's z′_2 over
    # another's 0.508 → 0.607 (chance 0.5; seeds 1–3: 0.646, 0.633, 0.624); the backbone's view-to-view rank
    # 0.570 → 0.666; spread of the projections 0.026 → 0.097 (the random init is the more collapsed one)
    train, held_out = _sample("train", 512), _sample("test", 256)
    m = _byol(num_images=512, proj_hidden=256, proj_dim=64, pred_hidden=256, tau_base=0.96)
    before = _held_out(m, held_out)
    steps, batch = 120, 64
    optim = dataclasses.replace(OptimConfig(**BYOL.optim_defaults), lr=2.0)
    opt = build_optimizer(m, optim, optim.lr)
    per_epoch = len(train) // batch
    for step in range(steps):                      # as the loop: seeded epoch orders, the step's generator
        info = StepInfo.at(step, per_epoch, steps)
        index = torch.randperm(len(train), generator=torch.Generator().manual_seed(info.epoch))
        index = index[info.within * batch:(info.within + 1) * batch]
        out = m(m.views(train[index], index, torch.Generator().manual_seed(step), info), info)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.after_step(out["state"], info)
    after = _held_out(m, held_out)
    assert after["loss"] < before["loss"] - 1.5, (before, after)
    assert after["pred"] > max(0.56, before["pred"] + 0.05), (before, after)
    assert after["feat"] > before["feat"] + 0.04, (before, after)
    # not collapsed: a network that maps every image to one point would reach a low loss with ranks and spreads
    # of 0 (isotropic 64-d embeddings spread 1/8)
    assert after["z_std"] > 0.06 and after["f_std"] > 0.035, (before, after)


# ---------------------------------------------------------------------------------------- the loop
def test_the_loop_runs_the_shipped_defaults_and_exports_the_online_backbone(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "byol", BYOL)
    cfg = build({"optim": BYOL.optim_defaults},
                {"method": {"name": "byol"}, "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "train": {"steps": 5, "batch_size": 32, "log_every": 1, "progress": False}})
    run = pretrain(cfg, tmp_path / "run")
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["tau"]) for r in rows] == pytest.approx([byol_tau(s, 5, 0.996) for s in range(5)])
    assert all(0 <= float(r["loss"]) <= 8 and float(r["z_std"]) > 0 for r in rows)
    exported = load_file(str(run / "backbone.safetensors"))
    state = checkpoint.load_model_state(checkpoint.latest(run))
    online = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    assert exported.keys() == online.keys() == backbones.build("resnet18", width=0.125,
                                                               cifar_stem=True).state_dict().keys()
    assert all(torch.equal(exported[k], online[k]) for k in online)
    target = {k.removeprefix("target_backbone.target."): v for k, v in state.items()
              if k.startswith("target_backbone.target.")}
    assert target.keys() == online.keys() and any(not torch.equal(target[k], online[k]) for k in online)
