"""SwAV: the batch-256 recipe's defaults, the swapped prediction written out by hand, the forward against a hand
computation with and without the queue, the queue's FIFO and its checkpoint across process counts, prototype
freezing and renormalisation, exact resume, learning on the bundled sample, and the loop (its 2-process run is in
tests/train/test_ddp.py)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from selfsup import backbones, methods
from selfsup.config import OptimConfig, build
from selfsup.data import load
from selfsup.errors import UserError
from selfsup.losses import swapped_prediction
from selfsup.methods.base import StepInfo, TrainSet
from selfsup.methods.swav import SwAV
from selfsup.nn.queue import LocalQueue
from selfsup.nn.sinkhorn import sinkhorn
from selfsup.train.optim import build_optimizer


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(num_prototypes=20, proj_hidden=32, crops=[[2, 16, [0.14, 1.0]], [2, 8, [0.05, 0.14]]])


def _method(num_images=64, seed=0, width=0.125, **params):
    torch.manual_seed(seed)
    return SwAV(backbones.build("resnet18", width=width, cifar_stem=True), SwAV.make_config(params), num_images)


def _train_set(n, batch, world=1, rank=0):
    return TrainSet(n, torch.zeros(n, dtype=torch.long), 10, None, torch.device("cpu"), rank, world, "'x'", batch)


def _images(n, seed=0, size=16):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_defaults_are_the_batch_256_recipe():
    cfg = SwAV.Config()
    assert (cfg.embed_dim, cfg.proj_hidden, cfg.num_prototypes, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations,
            tuple(cfg.crops_for_assign), cfg.queue_length, cfg.epoch_queue_starts, cfg.freeze_prototypes_niters,
            cfg.multicrop) == (128, 2048, 3000, 0.1, 0.05, 3, (0, 1), 3840, 15, 5005, "swav")
    assert SwAV.optim_defaults == dict(name="lars", lr=0.6, scale_lr=True, momentum=0.9, lars_eta=1e-3,
                                       weight_decay=1e-6, exclude_norm_and_bias=False, warmup_epochs=0,
                                       schedule="cosine", final_lr_ratio=1e-3)
    assert methods.get("swav") is SwAV
    m = _method(num_images=4000)
    d = m.backbone.out_dim
    assert [(type(x), getattr(x, "out_features", None)) for x in m.head] == [
        (torch.nn.Linear, 2048), (torch.nn.BatchNorm1d, None), (torch.nn.ReLU, None), (torch.nn.Linear, 128)]
    assert m.head[0].in_features == d and m.prototypes.bias is None and m.prototypes.weight.shape == (3000, 128)
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(3000))
    assert [g.size for g in m.crops(32).groups] == [32, 14] and [g.count for g in m.crops(32).groups] == [2, 6]
    views = m.views(_images(3, size=32), torch.arange(3), torch.Generator().manual_seed(0), StepInfo.at(0))
    assert views["crops_0"].shape == (6, 3, 32, 32) and views["crops_1"].shape == (18, 3, 14, 14)


def test_a_view_preset_replaces_the_colour_part_and_the_input_normalisation():
    from selfsup.views.augment import IMAGENET_STD, PRESETS

    m = _method(num_prototypes=20, view="simclr_cifar")
    assert m.crops(32).view == PRESETS["simclr_cifar"] and m.crops(32).groups == _method(num_prototypes=20).crops(
        32).groups
    assert _method(num_prototypes=20, view="simclr_cifar", crops=[[2, 16, [0.14, 1]]]).crops(32).view == PRESETS[
        "simclr_cifar"]
    assert methods.input_normalization({"name": "swav", "view": "simclr_cifar"})[1] == IMAGENET_STD
    assert methods.input_normalization({"name": "swav"})[1] == (0.228, 0.224, 0.225)


def test_bad_settings_name_the_option_and_the_fix():
    with pytest.raises(UserError, match=r"num_prototypes=3000 is more than the 100 training images.*at most 100"):
        _method(num_images=100)
    with pytest.raises(UserError, match=r"crops_for_assign=\[0, 2\] must name global crops, 0 … 1"):
        _method(crops_for_assign=[0, 2], **{k: v for k, v in SMALL.items()})
    with pytest.raises(UserError, match=r"method.crops: multicrop groups\[1\].size = 20 is larger than the global"):
        _method(num_prototypes=20, crops=[[2, 16, [0.14, 1]], [2, 20, [0.05, 0.14]]])
    with pytest.raises(UserError, match="method.multicrop"):
        SwAV.make_config({"multicrop": "dino"})
    with pytest.raises(UserError, match=r"queue_length=8 is shorter than the global batch 16"):
        _method(queue_length=8, **SMALL).setup(_train_set(64, 16))
    with pytest.raises(UserError, match="larger than the 16×16 images"):
        _method(num_prototypes=20, crops=[[2, 24, [0.14, 1]]]).views(_images(2), torch.arange(2), torch.Generator(),
                                                                     StepInfo.at(0))


def test_swapped_prediction_is_eq_2_written_out():
    g = torch.Generator().manual_seed(0)
    B, K, V, tau = 4, 5, 4, 0.1
    scores = [torch.randn(B, K, generator=g) for _ in range(V)]
    codes = [torch.softmax(torch.randn(B, K, generator=g), 1) for _ in range(2)]
    total = 0.0
    for i, crop in enumerate((0, 1)):
        sub = 0.0
        for v in range(V):
            if v == crop:
                continue
            for b in range(B):
                logits = [float(scores[v][b, k]) / tau for k in range(K)]
                log_z = math.log(sum(math.exp(s) for s in logits))
                sub -= sum(float(codes[i][b, k]) * (logits[k] - log_z) for k in range(K)) / B
        total += sub / (V - 1)
    assert float(swapped_prediction(scores, codes, (0, 1), tau)) == pytest.approx(total / 2, rel=1e-5)


def _by_hand(method, views, queue=None):
    """SwAV's training forward written out: z per crop, scores against unit prototypes, codes of crops 0 and 1
    (with the queue's scores stacked above when given), the swapped prediction."""
    groups = [views["crops_0"], views["crops_1"]]
    z = F.normalize(torch.cat([method.head(method.backbone(x)["pre_logits"]) for x in groups]), dim=1)
    c = F.normalize(method.prototypes.weight, dim=1)
    b = len(groups[0]) // 2
    crops = [z[i * b:(i + 1) * b] @ c.T for i in range(len(z) // b)]
    codes = []
    for i in (0, 1):
        out = crops[i].detach()
        if queue is not None:
            out = torch.cat([queue[i] @ c.T, out])
        codes.append(sinkhorn(out, 0.05, 3)[-b:])
    loss = 0.0
    for i in (0, 1):
        others = [v for v in range(len(crops)) if v != i]
        loss += sum(-(codes[i] * F.log_softmax(crops[v] / 0.1, 1)).sum(1).mean() for v in others) / len(others)
    return loss / 2, z


def test_forward_and_queue_match_the_hand_computation():
    method = _method(queue_length=16, epoch_queue_starts=1, **SMALL)
    method.setup(_train_set(64, 8))
    assert method.queue.queue.shape == (2, 16, 128) and not method.queue.full(0)
    opt = build_optimizer(method, OptimConfig(name="sgd", lr=0.1, momentum=0.9), 0.1)
    images = _images(8)
    pushed = []
    for step in range(4):                         # 2 steps an epoch: the queue is written from step 2 (epoch 1)
        info = StepInfo.at(step, steps_per_epoch=2, total=6)
        views = method.views(images, torch.arange(8), torch.Generator().manual_seed(step), info)
        out = method(views, info)
        with torch.no_grad():
            loss, z = _by_hand(method, views)
        torch.testing.assert_close(out["loss"].detach(), loss, rtol=1e-5, atol=1e-6)   # the queue is not full yet
        opt.zero_grad()
        out["loss"].backward()
        method.before_optimizer_step(info)
        opt.step()
        method.after_step(out["state"], info)
        if step >= 2:
            pushed.append(z[:16].view(2, 8, -1))
    # newest first: the step-3 rows above the step-2 rows, per assigned crop
    torch.testing.assert_close(method.queue.queue, torch.cat([pushed[1], pushed[0]], 1))
    assert method.queue.full(0) and method.queue.full(1)
    info = StepInfo.at(4, steps_per_epoch=2, total=6)
    views = method.views(images, torch.arange(8), torch.Generator().manual_seed(4), info)
    queue = method.queue.queue.clone()
    out = method(views, info)
    with torch.no_grad():
        loss, _ = _by_hand(method, views, queue)
    torch.testing.assert_close(out["loss"].detach(), loss, rtol=1e-5, atol=1e-6)           # queue prepended


def test_prototypes_are_frozen_for_the_first_steps_and_renormalised_after_each():
    method = _method(freeze_prototypes_niters=2, queue_length=0, **SMALL)
    opt = build_optimizer(method, OptimConfig(name="sgd", lr=0.5, momentum=0.9), 0.5)
    images = _images(8)
    history = [method.prototypes.weight.detach().clone()]
    for step in range(4):
        info = StepInfo.at(step, total=4)
        out = method(method.views(images, torch.arange(8), torch.Generator().manual_seed(step), info), info)
        opt.zero_grad()
        out["loss"].backward()
        assert method.prototypes.weight.grad is not None
        method.before_optimizer_step(info)
        assert (method.prototypes.weight.grad is None) == (step < 2)
        opt.step()
        method.after_step(out["state"], info)
        history.append(method.prototypes.weight.detach().clone())
        torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(20))
    for k in (1, 2):            # frozen for 2 steps (renormalising unit rows moves them by rounding only)
        torch.testing.assert_close(history[k], history[0], rtol=0, atol=1e-6)
    assert (history[3] - history[2]).abs().max() > 1e-3                                   # then learned


def test_local_queue_checkpoint_holds_every_rank_and_resplits_for_another_world(monkeypatch):
    q = LocalQueue(2, 4, 3)
    for v in range(3):
        q.push(0, torch.full((2, 3), float(v + 1)))
    assert q.queue[0, :, 0].tolist() == [3, 3, 2, 2] and q.full(0) and not q.full(1)
    whole = q.full_state()["queue"]
    assert whole.shape == (1, 2, 4, 3)
    back = LocalQueue(2, 4, 3)
    back.load_state_dict({"queue": whole})
    assert torch.equal(back.queue, q.queue)
    two = torch.arange(2 * 2 * 4 * 3, dtype=torch.float).view(2, 2, 4, 3)    # a 2-process checkpoint
    one = LocalQueue(2, 8, 3)
    one.load_state_dict({"queue": two})                                      # on one process: rank 0's rows first
    assert torch.equal(one.queue, torch.cat([two[0], two[1]], 1))
    monkeypatch.setattr("selfsup.nn.queue.rank_and_world", lambda: (1, 2))
    mine = LocalQueue(2, 4, 3)
    mine.load_state_dict({"queue": two})
    assert torch.equal(mine.queue, two[1])


def test_kill_and_resume_equals_the_uninterrupted_run():
    images = _images(32)
    cfg = OptimConfig(name="lars", lr=0.3, momentum=0.9, weight_decay=1e-6)

    def make(seed=0):
        m = _method(num_images=32, seed=seed, queue_length=16, epoch_queue_starts=1, freeze_prototypes_niters=1,
                    **SMALL)
        m.setup(_train_set(32, 8))
        return m, build_optimizer(m, cfg, cfg.lr)

    def step(method, opt, s):
        info = StepInfo.at(s, steps_per_epoch=2, total=6, seed=1)
        g = torch.Generator().manual_seed(s)
        index = torch.randperm(32, generator=g)[:8]
        out = method(method.views(images[index], index, g, info), info)
        opt.zero_grad()
        out["loss"].backward()
        method.before_optimizer_step(info)
        opt.step()
        method.after_step(out["state"], info)
        return float(out["loss"].detach())

    straight, opt = make()
    for s in range(3):
        step(straight, opt, s)
    saved, saved_opt = copy.deepcopy(straight.state_dict()), copy.deepcopy(opt.state_dict())
    losses = [step(straight, opt, s) for s in (3, 4, 5)]
    resumed, opt2 = make(seed=1)
    resumed.load_state_dict(saved)
    opt2.load_state_dict(saved_opt)
    assert [step(resumed, opt2, s) for s in (3, 4, 5)] == losses
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, straight.state_dict()[key]), key


def _sample(split, n):
    data = load("sample", split)
    pick = torch.linspace(0, len(data.labels) - 1, n).long().numpy()
    return torch.from_numpy(data.images[pick].copy()).permute(0, 3, 1, 2)


@torch.no_grad()
def _held_out_margin(method, images):
    """Batch statistics, fixed draws: how much closer each held-out image's first global crop embedding is to its
    second crop's than to the other images' (mean cosine, own minus others)."""
    method = copy.deepcopy(method)
    v = method.views(images, torch.arange(len(images)), torch.Generator().manual_seed(123), StepInfo.at(0))
    n = len(images)
    z = F.normalize(method.head(method.backbone(v["crops_0"])["pre_logits"]), dim=1)
    s = z[:n] @ z[n:].T
    own = s.diagonal()
    return float((own - (s.sum(1) - own) / (n - 1)).mean())


def test_swav_learns_to_tell_held_out_images_apart():
    # ResNet-18 of width 1/4, 2 × 16 px + 2 × 8 px crops, 100 prototypes, no queue, 512 images in batches of 32
    images, held_out = _sample("train", 512), _sample("test", 128)
    method = _method(num_images=512, width=0.25, num_prototypes=100, proj_hidden=128, queue_length=0,
                     freeze_prototypes_niters=20, crops=[[2, 16, [0.14, 1.0]], [2, 8, [0.05, 0.14]]])
    before = _held_out_margin(method, held_out)
    opt = build_optimizer(method, OptimConfig(name="adamw", lr=5e-3, weight_decay=1e-5), 5e-3)
    steps = 150
    for step in range(steps):
        epoch, within = divmod(step, 16)
        index = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))[within * 32:(within + 1) * 32]
        info = StepInfo.at(step, 16, steps)
        out = method(method.views(images[index], index, torch.Generator().manual_seed(step), info), info)
        opt.zero_grad()
        out["loss"].backward()
        method.before_optimizer_step(info)
        opt.step()
        method.after_step(out["state"], info)
    after = _held_out_margin(method, held_out)
    # when written: −0.013 → 0.006, codes spread over 40 of the 100 prototypes in the last batch (not collapsed)
    assert after > before + 0.012, (before, after)
    assert float(out["prototypes_used"]) > 10


def test_the_loop_runs_the_shipped_defaults(tmp_path):
    from selfsup.train.loop import pretrain

    cfg = build({"optim": SwAV.optim_defaults},
                {"method": {"name": "swav"}, "data": {"name": "sample"},
                 "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "train": {"steps": 5, "batch_size": 32, "progress": False}})
    run = pretrain(cfg, tmp_path / "run")
    state = load_file(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors")
    assert state["prototypes.weight"].shape == (3000, 128)
    assert state["queue.queue"].shape == (1, 2, 3840, 128)       # the 3,840-row queue, zeros until epoch 15
    assert (run / "backbone.safetensors").exists()
