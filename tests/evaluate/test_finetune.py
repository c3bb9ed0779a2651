"""Semi-supervised fine-tuning (PIRL §3.3): class-balanced seeded label subsets, top-5 as defined, a planted rule
learnt by the whole network, the caller's backbone untouched, and a reproducible curve."""

import re

import numpy as np
import pytest
import torch

from selfsup import backbones
from selfsup.evaluate.features import Encoder
from selfsup.evaluate.finetune import FinetuneConfig, finetune, label_subset, lr_at, topk_accuracy

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder(backbones.build("resnet18", width=0.125, cifar_stem=True), "tiny", f"random-{seed}", MEAN, STD)


def _planted(n, seed, classes=4, side=12):
    """Each class has its own colour under per-pixel noise: it survives any crop and flip."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[:classes]
    y = np.repeat(np.arange(classes), n // classes)
    x = colours[y][:, None, None, :] + rng.normal(0, 40, (len(y), side, side, 3))
    return x.clip(0, 255).astype(np.uint8), y


def test_label_subset_is_class_balanced_seeded_and_the_requested_fraction():
    labels = np.repeat(np.arange(10), 200)                       # 2,000 images, 10 classes
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    for fraction, per_class in ((0.01, 2), (0.1, 20)):
        idx = label_subset(labels, fraction, seed=0)
        assert len(idx) == fraction * len(labels) and len(set(idx.tolist())) == len(idx)
        assert np.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
        assert np.array_equal(idx, label_subset(labels, fraction, seed=0))
        assert not np.array_equal(idx, label_subset(labels, fraction, seed=1))
    assert np.bincount(labels[label_subset(labels, 1e-4)], minlength=10).tolist() == [1] * 10  # never an empty class
    with pytest.raises(ValueError, match="fraction"):
        label_subset(labels, 0.0)


def test_top5_against_counting_the_logits_above_the_label():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(300, 20, generator=g), torch.randint(0, 20, (300,), generator=g)
    above = (logits > logits.gather(1, labels[:, None])).sum(1)          # rank of the true class, 0 = best
    assert topk_accuracy(logits, labels, 5) == pytest.approx(100.0 * (above < 5).double().mean().item())
    assert topk_accuracy(logits, labels, 1) == pytest.approx(100.0 * (logits.argmax(1) == labels).double().mean())
    assert topk_accuracy(logits[:, :3], labels.clamp(max=2), 5) == 100.0   # k capped at the number of classes


def test_lr_schedule_is_the_vissl_pirl_recipe():
    cfg = FinetuneConfig()
    assert (cfg.epochs, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.batch_size) == (70, 0.9, True, 0.0, 256)
    assert [lr_at(e, cfg) for e in (0, 29, 30, 69)] == pytest.approx([0.01, 0.01, 0.001, 0.001])


def test_learns_a_planted_colour_rule_on_a_fraction_and_leaves_the_callers_backbone_alone():
    encoder = _encoder()
    encoder.backbone.train()
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    (xtr, ytr), (xte, yte) = _planted(400, 0), _planted(96, 1)
    lines = []
    cfg = FinetuneConfig(epochs=6, milestones=[4], batch_size=20, lr=0.25)
    out = finetune(encoder, xtr, ytr, xte, yte, 4, cfg, fraction=0.25, log=lines.append)
    assert out["train_images"] == 100
    assert out["top1"] > 90 and out["top5"] == 100.0 and out["value"] == out["top1"]   # chance is 25 %
    assert [e for e, _, _ in out["curve"]] == list(range(1, 7)) and out["curve"][-1][1] == out["top1"]
    for k, v in encoder.backbone.state_dict().items():         # weights and BN statistics: unchanged
        assert torch.equal(v, before[k]), k
    assert encoder.backbone.training
    lrs = [float(re.search(r" lr ([\d.e-]+) ", line).group(1)) for line in lines]
    assert lrs == pytest.approx([0.25 * 20 / 256] * 4 + [0.025 * 20 / 256] * 2, rel=1e-3)   # logged to 4 digits


def test_same_seed_same_run_whatever_the_global_rng():
    (xtr, ytr), (xte, yte) = _planted(80, 0), _planted(16, 1)
    cfg = FinetuneConfig(epochs=2, milestones=[1], batch_size=8, lr=0.2)
    runs = []
    for seed, global_seed in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(global_seed)
        lines = []
        out = finetune(_encoder(), xtr, ytr, xte, yte, 4, cfg, fraction=0.5, seed=seed, log=lines.append)
        runs.append((out["curve"], [re.search(r"loss \S+", line).group() for line in lines]))
    assert runs[0] == runs[1]
    assert runs[0][1] != runs[2][1]          # another seed: another subset, head, order and crops
