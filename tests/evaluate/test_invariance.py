"""PIRL's invariance analysis (§4.1, Fig. 4): the distance is the paper's formula, identical branches give zero,
t is seeded, the model comes back from a run directory unchanged, and the histogram is numpy's."""

import copy
import math

import numpy as np
import pytest
import torch

from selfsup import backbones, methods
from selfsup.evaluate import invariance
from selfsup.evaluate.invariance import histogram, invariance_distances, unit_distances
from selfsup.train import checkpoint


def _method(name, **params):
    torch.manual_seed(0)
    net = backbones.build("resnet18", width=0.125, cifar_stem=True)
    return methods.build(name, net, {"name": name, **params}, num_images=16)


def _images(n=12, side=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _bn_state(method):
    return {k: v.clone() for k, v in method.state_dict().items() if "running" in k or "num_batches" in k}


def test_distance_is_the_l2_norm_between_unit_vectors():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([[6.0, 8.0], [0.0, 5.0], [-1.0, -1.0]])
    torch.testing.assert_close(unit_distances(a, b), torch.tensor([0.0, math.sqrt(2), 2.0]))
    x, y = np.random.default_rng(0).normal(size=(2, 7, 5))
    xn, yn = (v / np.sqrt((v**2).sum(1, keepdims=True)) for v in (x, y))
    np.testing.assert_allclose(unit_distances(torch.tensor(x), torch.tensor(y)).numpy(),
                               np.sqrt(((xn - yn) ** 2).sum(1)), rtol=1e-5)


def test_pirl_with_g_made_equal_to_f_gives_zero_distances_in_eval_mode(monkeypatch):
    method = _method("pirl").train()
    bn = _bn_state(method)
    # the transformed view is the image itself and g is f: every distance must vanish, image by image
    monkeypatch.setattr(invariance, "pirl_tiles", lambda x, size, scale, g: (
        invariance.normalize(x, invariance.IMAGENET_MEAN, invariance.IMAGENET_STD), None))
    monkeypatch.setattr(method, "jigsaw_embedding", method.embed)
    d = invariance_distances(method, _images(10), batch_size=4)
    assert d.shape == (10,) and d.abs().max() < 1e-5
    assert method.training                                   # the caller's mode is restored ...
    for k, v in _bn_state(method).items():                   # ... and no BN statistic moved (eval mode)
        assert torch.equal(v, bn[k]), k


def test_batch_statistics_mode_is_the_training_passes_and_leaves_the_running_statistics_alone():
    method, images = _method("pirl").eval(), _images(8)
    with torch.no_grad():                                   # running statistics far from any batch's
        for name, buf in method.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(3.0)
    bn = _bn_state(method)
    d = invariance_distances(method, images, seed=2, batch_size=8, bn="batch")
    assert not method.training
    for k, v in _bn_state(method).items():
        assert torch.equal(v, bn[k]), k
    twin = copy.deepcopy(method).train()                    # the same two passes, each on its own batch statistics
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        f, g = invariance.pirl_pair(twin, x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(d, unit_distances(f, g))
    assert not torch.allclose(d, invariance_distances(method, images, seed=2, batch_size=8))   # running differs
    with pytest.raises(ValueError, match="bn"):
        invariance_distances(method, images, bn="frozen")


def test_pirl_distances_are_seeded_and_lie_on_the_unit_sphere_scale():
    method, images = _method("pirl"), _images(12)
    a, b = invariance_distances(method, images, seed=3, batch_size=5), invariance_distances(method, images, seed=3,
                                                                                            batch_size=5)
    c = invariance_distances(method, images, seed=4, batch_size=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (12,) and bool(((a >= 0) & (a <= 2)).all()) and a.std() > 0
    trunk = invariance_distances(method, images, seed=3, representation="trunk")
    assert trunk.shape == (12,) and not torch.allclose(trunk, a)
    with pytest.raises(ValueError, match="representation"):
        invariance_distances(method, images, representation="head")


def test_jigsaw_head_mode_is_zero_for_the_identity_shuffle_and_positive_otherwise():
    method, images = _method("jigsaw", num_permutations=10), _images(8)
    positive = invariance_distances(method, images, seed=0, representation="head")
    assert positive.min() > 0                                 # every drawn permutation moves fc7
    method.permutations = torch.arange(9)[None]              # T = {identity}: f and g see the same order
    assert invariance_distances(method, images, seed=0, representation="head").abs().max() < 1e-5
    trunk = invariance_distances(method, images, seed=0)    # the default: whole image vs mean over tiles
    assert trunk.shape == (8,) and bool(((trunk > 0) & (trunk <= 2)).all())


def test_loads_the_method_from_a_run_directory(tmp_path):
    method = _method("pirl")
    with torch.no_grad():                                    # move the heads off their init, to be sure they load
        method.jigsaw_head.weight.mul_(-1)
    (tmp_path / "config.yaml").write_text(
        "backbone: {name: resnet18, width: 0.125, cifar_stem: true, options: {}}\nmethod: {name: pirl}\n")
    checkpoint.save(tmp_path, 5, method, None)
    images = _images(6)
    expected = invariance_distances(method, images, seed=1)
    torch.testing.assert_close(invariance_distances(tmp_path, images, seed=1), expected)
    torch.testing.assert_close(invariance_distances(tmp_path / "checkpoints" / "step-00000005", images, seed=1),
                               expected)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        invariance_distances(tmp_path / "nothing", images)


def test_histogram_matches_numpy_and_counts_every_image():
    d = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 2
    d[:3] = torch.tensor([0.0, 2.0, 1.0])                   # both ends of the range are counted
    h = histogram(d, bins=20)
    counts, edges = np.histogram(d.numpy().astype(np.float64), bins=20, range=(0.0, 2.0))
    assert h["counts"] == counts.tolist() and h["edges"] == pytest.approx(edges.tolist())
    assert sum(h["counts"]) == 200 and len(h["edges"]) == 21
    assert all(isinstance(v, float) for v in h["counts"] + h["edges"])
