"""Relative Patch Location and Jigsaw: the tuples their heads classify are the papers' (checked against a
hand-built concatenation), and both learn their pretext task on the real sample."""

import torch
import torch.nn.functional as F
from test_learns import _images, fit

from selfsup import backbones, methods
from selfsup.config import OptimConfig
from selfsup.methods.base import StepInfo
from selfsup.views.permutations import hamming_permutations

INFO = StepInfo.at(0)   # the step these calls stand for (no schedule depends on it here)


def _method(name, **params):
    torch.manual_seed(0)
    return methods.build(name, backbones.build("resnet18", width=0.125, cifar_stem=True), {"name": name, **params},
                         num_images=100)


def _head_input_and_loss(method, images):
    views = method.views(images, torch.arange(len(images)), torch.Generator().manual_seed(0), INFO)
    seen = []
    method.head[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    method.eval()
    with torch.no_grad():
        out = method(views, INFO)
        e = method.embed(method.backbone(views["patches"].flatten(0, 1))["pre_logits"]).view(len(images), 9, -1)
        logits = method.head(seen[0])
    return views, seen[0], e, out["loss"], logits


def test_relative_patch_pairs_are_neighbour_then_centre():
    method = _method("relative_patch")
    images = _images("train", 4)
    views, head_in, e, loss, logits = _head_input_and_loss(method, images)
    expected = torch.stack([torch.cat([e[b, i], e[b, 4]]) for b in range(4) for i in (0, 1, 2, 3, 5, 6, 7, 8)])
    torch.testing.assert_close(head_in, expected)
    assert torch.equal(views["labels"], torch.arange(8))
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(8).repeat(4)))


def test_jigsaw_tuples_follow_the_drawn_permutations():
    method = _method("jigsaw")
    images = _images("train", 3)
    views, head_in, e, loss, logits = _head_input_and_loss(method, images)
    labels = views["labels"]
    assert len(labels) == 8 and len(set(labels.tolist())) == 8      # a subset of 8 of the 100 per batch
    perms = hamming_permutations(100, seed=0)
    expected = torch.stack([e[b, perms[k]].flatten() for b in range(3) for k in labels.tolist()])
    torch.testing.assert_close(head_in, expected)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels.repeat(3)))


def _learn(name, steps, batch, **params):
    method = _method(name, size=64, **params)     # the sample's 32 px images resized: 14 px patches
    train, test = _images("train", 1024), _images("test", 64)

    @torch.no_grad()
    def held_out():  # batch statistics (the head's BN running stats move slowly, momentum 0.003)
        views = method.views(test, torch.arange(len(test)), torch.Generator().manual_seed(123), INFO)
        torch.manual_seed(0)  # the same dropout mask before and after
        out = method(views, INFO)
        return float(out["loss"]), float(out["pretext_acc"])

    before = held_out()
    fit(method, train, steps, batch, OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4))
    return before, held_out()


def test_relative_patch_learns_neighbour_positions():
    (loss0, acc0), (loss1, acc1) = _learn("relative_patch", steps=60, batch=32)
    # 64 held-out images × 8 pairs; chance is 1/8 (a 0.03 gain is about 2 standard errors)
    assert loss1 < loss0 - 0.05 and acc1 > acc0 + 0.03


def test_jigsaw_learns_permutations():
    # A 10-permutation set (Noroozi & Favaro vary the set size) so that 40 CPU steps show learning.
    (loss0, acc0), (loss1, acc1) = _learn("jigsaw", steps=40, batch=32, num_permutations=10, perm_subset_size=10)
    assert loss1 < loss0 - 0.5 and acc1 > 0.3 > acc0 + 0.1   # chance is 0.1
