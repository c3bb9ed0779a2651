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
