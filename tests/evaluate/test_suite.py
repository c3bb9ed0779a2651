"""Evaluation plumbing: encoders load from run directories, features are encoded once, figures land in
the store once."""

import pytest
import torch

from selfsup.config import BackboneConfig, build
from selfsup.evaluate import features as features_module
from selfsup.evaluate.features import load_encoder, random_copy, random_encoder
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
    floor = random_copy(encoder)                   # the random-init baseline of the same network
    assert floor.label == "random-init run" and floor.mean == encoder.mean
    assert floor.weights_hash != encoder.weights_hash
    assert floor.architecture == from_ckpt.architecture == encoder.architecture
    trained, fresh = encoder.backbone.state_dict(), floor.backbone.state_dict()
    assert trained.keys() == fresh.keys() and not all(torch.equal(trained[k], fresh[k]) for k in trained)


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


def test_tiles_view_is_the_mean_of_the_nine_eval_tiles_per_tap():
    from selfsup.evaluate.features import encode, pool_to_dims
    from selfsup.views.augment import to_float
    from selfsup.views.patches import eval_patches, standardize_patches

    encoder = random_encoder(BackboneConfig("resnet18", 0.125, True), seed=0)
    encoder.standardize = True                               # as a patch-trained model
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = encode(encoder, images.numpy(), ("block2", "pre_logits"), view="tiles", max_dims=64)
    # independently: nine tiles per image, each tile's tap pooled on its own, then averaged
    tiles = eval_patches(to_float(images.permute(0, 3, 1, 2)), 64)         # 3 × 9 × 3 × 14 × 14
    net = encoder.backbone.eval()
    with torch.no_grad():
        maps = net(standardize_patches(tiles.flatten(0, 1)).contiguous(memory_format=torch.channels_last),
                   taps=("block2", "pre_logits"))
    for tap in ("block2", "pre_logits"):
        want = pool_to_dims(maps[tap].float(), 64).view(3, 9, -1).mean(1)
        assert got[tap].shape == want.shape
        torch.testing.assert_close(got[tap], want, rtol=1e-4, atol=1e-5)
    whole = encode(encoder, images.numpy(), ("pre_logits",))["pre_logits"]
    assert not torch.allclose(whole, got["pre_logits"])     # the image view is another representation
    with pytest.raises(ValueError, match="view must be one of"):
        encode(encoder, images.numpy(), view="patches")


def test_probe_settings_subset_pool_and_view_are_part_of_the_stored_key(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    encoder = random_encoder(BackboneConfig("resnet18", 0.125, True), seed=0)
    full = evaluate_model(encoder, "sample", ["knn"], store, taps=("block3",))[0]
    assert "train_per_class" not in full.config and "max_dims" not in full.config   # default keys unchanged
    few = evaluate_model(encoder, "sample", ["knn"], store, taps=("block3",), train_per_class=20, max_dims=512)[0]
    assert few.config["train_per_class"] == 20 and few.config["max_dims"] == 512
    assert few.config_hash != full.config_hash and few.value != full.value
    tiles = evaluate_model(encoder, "sample", ["knn"], store, view="tiles")[0]
    assert tiles.config["view"] == "tiles"
    assert len(store.query()) == 3


def test_sgd_probe_runs_through_the_suite_with_its_curve_stored(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    encoder = random_encoder(BackboneConfig("resnet18", 0.125, True), seed=0)
    settings = {"sgd": {"epochs": 3, "milestones": [2], "batch_size": 64}}
    rows = evaluate_model(encoder, "sample", ["sgd", "knn"], store, taps=("block3", "pre_logits"),
                          train_per_class=30, overrides=settings)
    sgd = {r.tap: r for r in rows if r.protocol == "sgd"}
    assert set(sgd) == {"block3", "pre_logits"}
    for r in sgd.values():
        assert [e for e, _ in r.extra["curve"]] == [1, 2, 3] and r.value == r.extra["curve"][-1][1]
        assert r.value > 10                                  # above chance on the CIFAR-10 sample
        assert r.config["epochs"] == 3 and r.config["train_per_class"] == 30
        assert r.seconds > 0 and "seconds" not in r.extra        # the probe's own time, not the loop's
    assert len(store.query(protocol="sgd")) == 2
    with pytest.raises(ValueError, match="unknown sgd setting"):
        evaluate_model(encoder, "sample", ["sgd"], store, overrides={"sgd": {"epoch": 3}})
    with pytest.raises(ValueError, match="unknown protocol 'svm'"):
        evaluate_model(encoder, "sample", ["knn"], store, overrides={"svm": {}})


def test_semisup_finetunes_on_a_label_fraction_and_stores_top5_and_top1(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    encoder = random_encoder(BackboneConfig("resnet18", 0.0625, True), seed=0)
    settings = {"semisup": {"fraction": 0.1, "epochs": 1, "milestones": [], "batch_size": 64}}
    rows = evaluate_model(encoder, "sample", ["semisup"], store, overrides=settings)
    by_metric = {r.metric: r for r in rows}
    assert set(by_metric) == {"top5", "top1"} and all(r.protocol == "semisup" for r in rows)
    top5, top1 = by_metric["top5"], by_metric["top1"]
    assert top5.value >= top1.value and top1.value == top5.extra["top1"]
    assert top5.extra["train_images"] == 480                     # 10 % of the 4,800 sample images, 48 a class
    assert top5.config["fraction"] == 0.1 and top5.config_hash == top1.config_hash
    again = evaluate_model(encoder, "sample", ["semisup"], store, overrides=settings)
    assert {r.created for r in again} == {r.created for r in rows}   # stored: not fine-tuned twice
    with pytest.raises(ValueError, match="pre-logits"):
        evaluate_model(encoder, "sample", ["semisup"], store, taps=("block3",))


def test_invariance_analysis_lands_one_row_with_its_histogram_in_the_store_and_report(tmp_path):
    from selfsup.evaluate.suite import evaluate_invariance
    from selfsup.results.report import build_report

    cfg = build({"method": {"name": "pirl", "size": 32, "num_negatives": 64},
                 "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "train": {"steps": 2, "batch_size": 16, "progress": False}})
    run = pretrain(cfg, tmp_path / "pirl-run")
    store = Store(tmp_path / "r.sqlite")
    row = evaluate_invariance(str(run), "sample", store, bins=20)
    assert (row.protocol, row.tap, row.metric) == ("invariance", "heads", "l2_unit")
    assert sum(row.extra["counts"]) == 960 and len(row.extra["edges"]) == 21    # every held-out image, once
    assert 0 < row.value < 2 and row.extra["method"] == "pirl"
    assert evaluate_invariance(str(run), "sample", store, bins=20).created == row.created   # from the store
    assert "Invariance to the jigsaw transformation" in build_report(store, tmp_path / "report.html").read_text()


def test_invariance_analysis_decodes_the_held_out_images_at_the_runs_training_size(tmp_path, monkeypatch):
    from selfsup.evaluate import invariance, suite

    cfg = build({"method": {"name": "pirl", "num_negatives": 64},
                 "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "data": {"size": 24}, "train": {"steps": 1, "batch_size": 16, "progress": False}})
    run = pretrain(cfg, tmp_path / "pirl-24px")
    seen = []
    real = invariance.invariance_distances

    def spy(method, images, **kw):
        seen.append(images.shape[1:3])
        return real(method, images[:8], **kw)

    monkeypatch.setattr(invariance, "invariance_distances", spy)
    store = Store(tmp_path / "r.sqlite")
    row = suite.evaluate_invariance(str(run), "sample", store, bins=10)
    assert seen == [(24, 24)] and row.config["resolution"] == 24      # the sample's 32 px images, as trained
    suite.evaluate_invariance(str(run), "sample", store, bins=10, resolution=32)
    assert seen[-1] == (32, 32)                                          # an explicit size wins
