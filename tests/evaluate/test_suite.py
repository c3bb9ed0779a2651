"""Evaluation plumbing: encoders load from run directories, features are encoded once, figures land in
the store once."""

import pytest
import torch

from selfsup.config import BackboneConfig, build
from selfsup.evaluate import features as features_module
from selfsup.evaluate.features import load_encoder, random_encoder
from selfsup.evaluate.suite import evaluate_model
from selfsup.results.store import Store
from selfsup.train.loop import pretrain


def test_run_directory_exports_a_loadable_backbone(tmp_path):
    cfg = build({"method": {"name": "simclr", "view": "simclr_cifar", "size": 16},
                 "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "train": {"steps": 2, "batch_size": 16, "progress": False}})
    run = pretrain(cfg, tmp_path / "run")
    encoder = load_encoder(run)
    assert encoder.label == "run"
    assert encoder.mean == (0.485, 0.456, 0.406)  # SimCLR's views are ImageNet-normalised
    from_ckpt = load_encoder(run / "checkpoints" / "step-00000002")  # an unfinished run loads too
    for a, b in zip(encoder.backbone.state_dict().values(), from_ckpt.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        load_encoder(tmp_path / "missing.pt")


def test_figures_are_stored_once_and_features_encoded_once(tmp_path, monkeypatch):
    store = Store(tmp_path / "r.sqlite")
    encoder = random_encoder(BackboneConfig("resnet18", 0.125, True), seed=0)
    rows = evaluate_model(encoder, "sample", ["knn", "linear"], store)
    assert [r.protocol for r in rows] == ["knn", "linear"]
    assert all(10 < r.value < 60 for r in rows)  # a random network is above chance (10 %) on CIFAR-10
    assert rows[1].extra["best_wd"] > 0 and "converged" in rows[1].extra

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(features_module, "encode", no_encoding)
    again = evaluate_model(encoder, "sample", ["knn", "linear"], store)          # from the store
    assert [r.value for r in again] == [r.value for r in rows]
    forced = evaluate_model(encoder, "sample", ["knn"], store, force=True)      # recomputed from cached features
    assert forced[0].value == rows[0].value
    assert len(store.query()) == 2


def test_taps_pooled_to_9000_dims_like_the_papers_code():
    from selfsup.evaluate.features import pool_to_dims

    fmap = torch.randn(2, 256, 56, 56)                  # ResNet-50 block1 at 224 px: 802,816 values
    pooled = pool_to_dims(fmap)                         # kernel = stride = ceil(sqrt(802816 / 9000)) = 10
    assert pooled.shape == (2, 256 * 5 * 5)
    assert torch.equal(pooled[0, :25], fmap[0, 0, :50, :50].reshape(5, 10, 5, 10).amax(dim=(1, 3)).flatten())
    small = torch.randn(2, 512, 4, 4)                   # 8,192 values: under the cap, flattened as is
    assert torch.equal(pool_to_dims(small), small.flatten(1))


def test_all_taps_come_from_one_forward_pass_and_the_cache():
    import numpy as np

    from selfsup.data import from_arrays
    from selfsup.evaluate.features import tap_features

    encoder = random_encoder(BackboneConfig("resnet18", 0.25, True), seed=1)   # block1: 16 × 32 × 32
    data = from_arrays(np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
                       np.arange(20) % 2)
    calls = []
    encoder.backbone.register_forward_hook(lambda *a: calls.append(1))
    taps = tuple(encoder.backbone.taps)
    first = tap_features(encoder, data, taps)
    assert len(calls) == 1 and set(first) == set(taps)
    assert first["block1"][0].shape[1] == 16 * 32 * 32 // 4   # 16,384 values -> 2×2 max pool -> 4,096
    second = tap_features(encoder, data, taps)
    assert len(calls) == 1                                     # everything from the cache
    assert all(torch.equal(first[t][0], second[t][0]) for t in taps)
