"""Ericsson et al. 2021's fine-tuning protocol: the grid picks the best val configuration and the network learns a
planted rule; weight decay divided by lr (their code) or not; the cosine schedule of CosineAnnealingLR; the step
rule; successive halving spends fewer steps and finds the grid's winner; the frozen protocols' test view."""

import math

import numpy as np
import pytest
import torch

from selfsup import backbones
from selfsup.evaluate import transfer_finetune as tf
from selfsup.evaluate.features import Encoder, encode
from selfsup.evaluate.finetune import linear_head
from selfsup.evaluate.transfer_finetune import (
    TransferFinetuneConfig,
    cosine_lr,
    eval_view,
    halving_rounds,
    make_optimizer,
    select,
    steps_for,
    transfer_finetune,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder(backbones.build("resnet18", width=0.0625, cifar_stem=True), "tiny", f"random-{seed}", MEAN, STD)


def _planted(n, seed, classes=4, side=8):
    """Each class has its own colour under per-pixel noise: it survives any crop and flip."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[:classes]
    y = np.repeat(np.arange(classes), n // classes)
    x = colours[y][:, None, None, :] + rng.normal(0, 30, (len(y), side, side, 3))
    return x.clip(0, 255).astype(np.uint8), y


def test_grid_picks_the_best_val_lr_and_the_winner_learns_the_planted_rule():
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    (xtr, ytr), (xva, yva), (xte, yte) = _planted(64, 0), _planted(32, 1), _planted(48, 2)
    cfg = TransferFinetuneConfig(lrs=(1e-6, 0.02), wds=(0.0,), steps=32, batch_size=16, eval_batch=64)
    lines = []
    out = transfer_finetune(encoder, xtr, ytr, xva, yva, xte, yte, 4, "top1", cfg, log=lines.append)
    (lr_a, _, val_a, steps_a), (lr_b, _, val_b, steps_b) = out["grid"]
    assert (lr_a, lr_b, steps_a, steps_b) == (1e-6, 0.02, 32, 32)
    assert val_a <= 50 < 90 <= val_b                       # lr 1e-6 cannot move in 32 steps; 0.02 can
    assert (out["best_lr"], out["best_wd"], out["best_val"]) == (0.02, 0.0, val_b)
    assert out["value"] > 90 and out["metric"] == "top1"  # chance is 25 %
    assert (out["train_images"], out["val_images"], out["trainval_images"]) == (64, 32, 96)   # official val
    assert (out["steps"], out["steps_spent"]) == (32, 3 * 32)
    assert len(lines) == 3 and all("img/s" in line and "ETA" in line for line in lines)
    assert "lr 0.02 wd 0 32 steps" in lines[-1] and "test top1" in lines[-1]
    for k, v in encoder.backbone.state_dict().items():     # every run fine-tunes a copy
        assert torch.equal(v, before[k]), k


def test_without_a_val_split_a_stratified_fifth_of_train_is_held_out():
    (xtr, ytr), (xte, yte) = _planted(40, 0), _planted(8, 1)
    cfg = TransferFinetuneConfig(lrs=(0.03, 1e-6), wds=(0.0,), steps=2, batch_size=16, eval_batch=64)
    out = transfer_finetune(_encoder(), xtr, ytr, None, None, xte, yte, 4, "mean_per_class", cfg)
    assert (out["train_images"], out["val_images"], out["trainval_images"]) == (32, 8, 40)
    assert out["metric"] == "mean_per_class" and len(out["grid"]) == 2


@pytest.mark.parametrize("mode", ["divide_by_lr", "plain"])
def test_weight_decay_is_divided_by_lr_as_their_code_or_passed_plain(mode):
    cfg = TransferFinetuneConfig(wd_mode=mode)
    net, head = _encoder().backbone, linear_head(8, 3, torch.Generator().manual_seed(0))
    opt = make_optimizer(net, head, 1e-2, 1e-4, cfg)
    (group,) = opt.param_groups                             # one group: BN and biases decay too, as their code
    assert {id(p) for p in group["params"]} == {id(p) for p in [*net.parameters(), *head.parameters()]}
    assert group["weight_decay"] == pytest.approx(1e-4 / 1e-2 if mode == "divide_by_lr" else 1e-4)
    assert (group["lr"], group["momentum"], group["nesterov"]) == (1e-2, 0.9, True)
    assert TransferFinetuneConfig().wd_mode == "divide_by_lr"


def test_unknown_wd_mode_or_search_fail_before_training():
    (x, y) = _planted(8, 0)
    for bad in ({"wd_mode": "bogus"}, {"search": "random"}):
        with pytest.raises(ValueError, match="wd_mode|search"):
            transfer_finetune(_encoder(), x, y, None, None, x, y, 4, "top1", TransferFinetuneConfig(**bad))


def test_cosine_schedule_is_cosine_annealing_lr_and_the_run_follows_it(monkeypatch):
    steps, lr = 40, 0.1
    assert [cosine_lr(t, steps, lr) for t in (0, 10, 20, 30)] == pytest.approx(
        [lr * (1 + math.cos(math.pi * t / steps)) / 2 for t in (0, 10, 20, 30)])
    assert cosine_lr(20, steps, lr) == pytest.approx(lr / 2)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)   # their scheduler, stepped every step
    torch_lrs = []
    for _ in range(steps):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [cosine_lr(t, steps, lr) for t in range(steps)] == pytest.approx(torch_lrs, abs=1e-12)

    seen = []                                              # what the optimiser holds at every step of a real run
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"])), real_step(self, *a, **k))[1])
    (x, y) = _planted(24, 0)
    cfg = TransferFinetuneConfig(lrs=(0.05,), wds=(1e-4,), steps=7, batch_size=8, eval_batch=64)
    out = transfer_finetune(_encoder(), x, y, None, None, x, y, 4, "top1", cfg)
    assert out["grid"] == [] and out["steps_spent"] == 7   # a single configuration needs no search
    assert [s[0] for s in seen] == pytest.approx([cosine_lr(t, 7, 0.05) for t in range(7)])
    assert [s[1] for s in seen] == pytest.approx([1e-4 / 0.05] * 7)


def test_step_rule_keeps_5000_on_the_papers_datasets_and_caps_the_epochs_of_small_sets():
    cfg = TransferFinetuneConfig()
    assert (cfg.steps, cfg.batch_size, cfg.momentum, cfg.nesterov) == (5000, 64, 0.9, True)
    assert len(cfg.lrs) * len(cfg.wds) == 20
    for n in (1020, 1880, 3060, 40000):                   # Flowers, DTD, Caltech-101 train; 80 % of CIFAR
        assert steps_for(n, cfg) == 5000
    assert steps_for(500, cfg) == math.ceil(314 * 500 / 64)
    assert steps_for(500, TransferFinetuneConfig(epochs_cap=10)) == math.ceil(10 * 500 / 64)
    assert steps_for(500, TransferFinetuneConfig(epochs_cap=None, steps=123)) == 123


def test_halving_rounds_and_selection_on_a_known_score_surface():
    assert halving_rounds(20, 1600) == [(20, 100), (10, 200), (5, 400), (3, 800), (2, 1600)]
    assert halving_rounds(1, 100) == [] and halving_rounds(2, 100) == [(2, 100)]
    cfg = TransferFinetuneConfig()
    configs = [(lr, wd) for lr in cfg.lrs for wd in cfg.wds]

    def val(lr, wd, steps):                               # best at lr 1e-2, wd 1e-5; longer runs score higher
        return 90 - 10 * abs(math.log10(lr) + 2) - abs(math.log10(wd + 1e-9) + 5) + steps / 1000

    best_grid, grid_rows = select(configs, 1600, val, "grid")
    best_halving, halving_rows = select(configs, 1600, val, "halving")
    assert best_grid == best_halving == (1e-2, 1e-5)
    assert sum(r[3] for r in grid_rows) == 20 * 1600
    assert sum(r[3] for r in halving_rows) == 1600 * (20 / 16 + 10 / 8 + 5 / 4 + 3 / 2 + 2) < 20 * 1600 / 2
    assert [sum(r[3] == s for r in halving_rows) for s in (100, 200, 400, 800, 1600)] == [20, 10, 5, 3, 2]
    flat = lambda lr, wd, steps: 50.0                      # noqa: E731 -- ties go to grid order in both
    assert select(configs, 16, flat, "grid")[0] == select(configs, 16, flat, "halving")[0] == configs[0]


def test_halving_spends_fewer_steps_and_finds_the_grids_winner_on_a_planted_task():
    (xtr, ytr), (xte, yte) = _planted(80, 0), _planted(16, 1)
    # only lr 0.02 without weight decay learns: lr 1e-6 cannot move, wd ≥ 0.2 (÷ lr) shrinks the weights by
    # ≥ 20 % a step. The winner is the last configuration in grid order, so halving must keep it on merit.
    common = dict(lrs=(1e-6, 0.02), wds=(0.5, 0.2, 0.0), steps=32, batch_size=16, eval_batch=64)
    grid = transfer_finetune(_encoder(), xtr, ytr, None, None, xte, yte, 4, "top1",
                             TransferFinetuneConfig(**common, search="grid"))
    halving = transfer_finetune(_encoder(), xtr, ytr, None, None, xte, yte, 4, "top1",
                                TransferFinetuneConfig(**common, search="halving"))
    assert (grid["best_lr"], grid["best_wd"]) == (halving["best_lr"], halving["best_wd"]) == (0.02, 0.0)
    assert grid["search_steps_spent"] == 6 * 32 and halving["search_steps_spent"] == 6 * 8 + 3 * 16 + 2 * 32
    assert halving["steps_spent"] < grid["steps_spent"]
    assert halving["value"] == grid["value"] > 90          # the same final run: same seed, same config
    finalists = [r for r in halving["grid"] if r[3] == 32]  # the last round repeats the grid's runs exactly
    assert len(finalists) == 2 and all(r in grid["grid"] for r in finalists)


def test_eval_view_is_resize_and_centre_crop_and_matches_the_frozen_features():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    enc = _encoder()
    x = eval_view(enc, wide, 10, "cpu")
    ref = torch.nn.functional.interpolate(torch.from_numpy(wide).permute(0, 3, 1, 2).float() / 255, size=(10, 15),
                                          mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    ref = (ref[..., :, 2:12] - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert x.shape == (3, 3, 10, 10) and torch.allclose(x, ref, atol=1e-6)
    square = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    enc.backbone.eval()
    with torch.no_grad():
        mine = enc.backbone(eval_view(enc, square, 16, "cpu"))["pre_logits"]
    assert torch.allclose(mine, encode(enc, square, resolution=16)["pre_logits"], atol=1e-5)


def test_train_and_val_are_joined_without_copying_in_sorted_index_order():
    a, b = np.arange(5 * 2).reshape(5, 2), 100 + np.arange(3 * 2).reshape(3, 2)
    joined = tf._Joined(a, b)
    assert len(joined) == 8
    assert np.array_equal(joined[np.array([0, 4, 5, 7])], np.stack([a[0], a[4], b[0], b[2]]))
