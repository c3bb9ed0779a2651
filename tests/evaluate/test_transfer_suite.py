"""The transfer suite (Ericsson et al. 2021): every protocol lands rows of the report's contracts, once; features are
encoded once and few-shot pools every split; the CLI runs a suite and the feature analyses end to end."""

import base64
import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from selfsup.cli import main
from selfsup.config import BackboneConfig
from selfsup.evaluate import features as features_module
from selfsup.evaluate import transfer_suite
from selfsup.evaluate.features import random_encoder, tap_features
from selfsup.evaluate.fewshot import FewShotConfig, fewshot
from selfsup.evaluate.suite import evaluate_model
from selfsup.evaluate.transfer_suite import load_suite, run_suite
from selfsup.results.store import Store
from selfsup.results.transfer_report import PERTURBATIONS

TINY = BackboneConfig("resnet18", 0.0625, True)
SPLITS = {"train": 6, "val": 4, "test": 6}   # per class: no split alone holds shots + queries = 15 images
CLASSES = 5


def _folder_zip(path):
    """A 5-class ImageFolder zip with official train/val/test splits: 16 px PNGs, a colour per class plus noise."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for split, n in SPLITS.items():
            for c in range(CLASSES):
                for i in range(n):
                    colour = np.array([50 * c, 255 - 50 * c, 120])
                    pixels = np.clip(colour + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, "PNG")
                    z.writestr(f"{split}/class{c}/{i}.png", buf.getvalue())
    return path


def _suite(tmp, folder):
    suite = {
        "name": "tiny",
        "datasets": [
            {"name": "sample", "protocols": ["linear", "knn", "fewshot", "calibration", "finetune"]},
            {"path": folder.name, "metric": "mean_per_class", "resolution": 16,
             "protocols": ["linear", "knn", "fewshot", "calibration"],
             "settings": {"fewshot": {"shots": [5], "queries": 10}}},
        ],
        "protocols": {
            "linear": {"strengths": [0.01, 1.0, 100.0], "max_iter": 30},
            "knn": {"k": 10},
            "fewshot": {"shots": [1, 5], "queries": 5, "episodes": 20},
            "calibration": {"folds": 5},
            "finetune": {"lrs": [0.1, 0.01], "wds": [0.0], "steps": 3, "batch_size": 32, "search": "halving",
                         "epochs_cap": None},
        },
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    folder = _folder_zip(tmp / "toy.zip")
    suite = _suite(tmp, folder)
    store = Store(tmp / "r.sqlite")
    encoder = random_encoder(TINY)
    out = run_suite([encoder], suite, store, log=None)
    return {"tmp": tmp, "suite": suite, "store": store, "encoder": encoder, "out": out}


def _png_ok(data):
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return im.size[0] > 0


def test_every_protocol_lands_rows_of_the_report_contracts(ran):
    rows = ran["out"].rows
    by = {(r.dataset, r.protocol, r.metric, r.config.get("shots")): r for r in rows}
    assert len(rows) == len(by) == 2 + 2 + 2 + 1 + (2 + 1 + 2)   # sample: 5 protocols; toy: 4, one shot count
    for dataset, metric in (("sample", "top1"), ("toy", "mean_per_class")):
        for protocol in ("linear", "knn"):
            r = by[(dataset, protocol, metric, None)]
            assert r.split == "test" and r.tap == "pre_logits" and 0 <= r.value <= 100
            assert r.seconds >= 0 and r.extra["encode_seconds"] > 0
        cal = {m: by[(dataset, "calibration", m, None)] for m in ("ece", "ece_scaled")}
        for r in cal.values():
            assert r.split == "test" and 0 <= r.value <= 100
            assert isinstance(r.extra["temperature"], float) and r.extra["temperature"] > 0
            assert {"confidence", "accuracy", "count"} <= set(r.extra["reliability"])
            assert len(r.extra["reliability"]["count"]) == 15 and r.extra["fit"] == "cv"
        # raw bins on "ece", bins of the scaled probabilities on "ece_scaled"
        assert cal["ece"].extra["reliability"] != cal["ece_scaled"].extra["reliability"]
        assert cal["ece"].extra["temperature"] == cal["ece_scaled"].extra["temperature"]
    assert by[("sample", "linear", "top1", None)].extra["best_wd"] in (0.01, 1.0, 100.0)
    for shots in (1, 5):
        r = by[("sample", "fewshot", "accuracy", shots)]
        assert r.split == "all" and r.config["ways"] == 5 and r.config["queries"] == 5
        assert r.config["episodes"] == 20 and r.config["shots"] == shots
        assert math.isclose(r.ci, 1.96 * r.extra["std"] / math.sqrt(20))
    ft = by[("sample", "finetune", "top1", None)]
    assert ft.split == "test" and ft.extra["best_lr"] in (0.1, 0.01) and ft.extra["best_wd"] == 0.0
    assert [row[:2] for row in ft.extra["grid"]] == [[0.1, 0.0], [0.01, 0.0]]   # halving: 2 runs, then the final
    # the figures are the store's: nothing was returned that is not stored, with the same key
    assert len(ran["store"].query()) == len(rows)
    timings = {(t.dataset, t.protocol) for t in ran["out"].timings}
    assert ("sample", "features") in timings and ("toy", "fewshot") in timings


def test_second_run_encodes_nothing_and_fits_nothing(ran, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("computed again")

    for name in ("linear_probe", "fewshot", "transfer_finetune", "calibration_cv", "run_knn", "load", "load_splits"):
        monkeypatch.setattr(transfer_suite, name, forbidden)
    monkeypatch.setattr(features_module, "encode", forbidden)
    again = run_suite([ran["encoder"]], ran["suite"], ran["store"], log=None)
    assert [(r.config_hash, r.metric, r.value) for r in again.rows] == \
        [(r.config_hash, r.metric, r.value) for r in ran["out"].rows]
    assert not any(t.computed for t in again.timings)
    # the suite's linear and kNN rows are `selfsup evaluate`'s: same key, so that one does not redo the other
    settings = yaml.safe_load(ran["suite"].read_text())["protocols"]
    plain = evaluate_model(ran["encoder"], "sample", ["knn", "linear"], ran["store"],
                           overrides={"knn": settings["knn"], "linear": settings["linear"]})
    assert {r.config_hash for r in plain} <= {r.config_hash for r in ran["out"].rows}


def test_fewshot_pools_the_features_of_every_split(ran, monkeypatch):
    r = next(r for r in ran["out"].rows if r.dataset == "toy" and r.protocol == "fewshot")
    assert r.extra["pool"] == {s: n * CLASSES for s, n in SPLITS.items()} and r.extra["pool_size"] == 80
    assert r.extra["classes"] == CLASSES and r.extra["skipped_classes"] == 0   # 15 a class only when pooled
    # the same figure from the cached features of the three splits (read back: nothing is encoded)
    monkeypatch.setattr(features_module, "encode", lambda *a, **k: pytest.fail("encoded again"))
    from selfsup.data import load

    zip_path = str(ran["tmp"] / "toy.zip")
    parts = [tap_features(ran["encoder"], load(zip_path, s, size=16), ("pre_logits",), 16)["pre_logits"]
             for s in SPLITS]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    direct = fewshot(x, y, FewShotConfig(shots=[5], queries=10, episodes=20))[5]
    assert direct["value"] == r.value and direct["ci"] == r.ci
    with pytest.raises(ValueError, match="only 0 of 5 classes"):   # train alone cannot make these episodes
        fewshot(parts[0][0], parts[0][1], FewShotConfig(shots=[5], queries=10, episodes=20))


def test_calibration_alone_refits_the_probe_only_at_the_stored_strength(ran, monkeypatch, tmp_path):
    suite = yaml.safe_load(ran["suite"].read_text())
    suite["datasets"] = [{"name": "sample", "protocols": ["linear", "calibration"]}]
    suite["protocols"]["calibration"] = {"folds": 4}           # a new calibration row; the linear row is stored
    calls = []
    real = transfer_suite.linear_probe
    monkeypatch.setattr(transfer_suite, "linear_probe", lambda *a, **k: calls.append(k["strengths"]) or real(*a, **k))
    monkeypatch.setattr(features_module, "encode", lambda *a, **k: pytest.fail("encoded again"))
    out = run_suite([ran["encoder"]], suite, ran["store"], log=None)
    stored_wd = next(r for r in out.rows if r.protocol == "linear").extra["best_wd"]
    assert calls == [[stored_wd]]
    assert {r.metric for r in out.rows if r.protocol == "calibration"} == {"ece", "ece_scaled"}


def test_suite_files_are_checked_and_the_shipped_ones_load(tmp_path):
    for name, steps in (("transfer", 100), ("transfer_paper", 5000)):
        suite = load_suite(name)
        assert [d.name for d in suite.datasets] == ["tinyimagenet100", "cifar10", "eurosat", "flowers102",
                                                    "caltech101"]
        assert suite.config("finetune", suite.datasets[1]).steps == steps
        assert suite.config("fewshot", suite.datasets[1]).shots == [5, 20, 50]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": [{"name": "sample", "protocols": ["linear", "mlp"]}]}))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown protocol.*mlp"):
        load_suite(bad)
    bad.write_text(yaml.safe_dump({"datasets": ["sample"], "protocols": {"fewshot": {"way": 5}}}))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown fewshot setting fewshot.way .*ways"):
        load_suite(bad)
    with pytest.raises(FileNotFoundError, match="transfer_paper"):
        load_suite("no-such-suite")


def _backbone_file(path, seed=1):
    encoder = random_encoder(TINY, seed=seed)
    meta = {"backbone": json.dumps(encoder.architecture)}
    save_file({k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}, str(path), metadata=meta)
    return path


def test_cli_suite_runs_end_to_end_into_the_store(tmp_path, capsys):
    model = _backbone_file(tmp_path / "tiny.safetensors")
    suite = tmp_path / "one.yaml"
    suite.write_text(yaml.safe_dump({"name": "one", "datasets": [
        {"name": "sample", "protocols": ["linear", "knn", "fewshot", "calibration", "finetune"]}],
        "protocols": {"linear": {"strengths": [1.0], "max_iter": 20}, "knn": {"k": 10},
                      "fewshot": {"shots": [5], "episodes": 10},
                      "finetune": {"lrs": [0.1], "wds": [0.0], "steps": 5, "batch_size": 32}}}))
    store = str(tmp_path / "r.sqlite")
    assert main(["evaluate", str(model), "--suite", str(suite), "--store", store, "finetune.steps=2"]) == 0
    text = capsys.readouterr().out
    assert "suite one: 6 figures" in text
    rows = Store(store).query()
    assert {(r.protocol, r.metric) for r in rows} == {("linear", "top1"), ("knn", "top1"), ("fewshot", "accuracy"),
                                                      ("calibration", "ece"), ("calibration", "ece_scaled"),
                                                      ("finetune", "top1")}
    assert next(r for r in rows if r.protocol == "finetune").config["steps"] == 2   # the override reached it
    assert main(["evaluate", str(model), "--suite", str(suite), "--data", "cifar10", "--store", store]) == 2
    assert "drop --data" in capsys.readouterr().err


def test_analyse_stores_sensitivity_saliency_and_inversion_rows(tmp_path, monkeypatch):
    model = _backbone_file(tmp_path / "tiny.safetensors", seed=2)
    store = str(tmp_path / "r.sqlite")
    assert main(["analyse", str(model), "--data", "sample", "--images", "3", "--steps", "5", "--store", store]) == 0
    rows = Store(store).query()
    sens = {r.metric: r for r in rows if r.protocol == "sensitivity"}
    assert set(sens) == {"colour", "spatial"} and all(r.tap == "pre_logits" for r in sens.values())
    assert set(sens["colour"].extra["per_perturbation"]) == set(PERTURBATIONS)   # rotate90 stored as "rotation"
    (sal,) = [r for r in rows if r.protocol == "saliency"]
    assert sal.metric == "attentive_diffusion" and 0 < sal.value < 100
    assert len(sal.extra["maps"]) == len(sal.extra["images"]) == 3 and all(map(_png_ok, sal.extra["images"]))
    (inv,) = [r for r in rows if r.protocol == "inversion"]
    assert inv.metric == "colour_error" and len(inv.extra["per_channel"]) == 3
    assert math.isclose(inv.value, float(np.mean(inv.extra["per_channel"])))
    assert _png_ok(inv.extra["original"]) and _png_ok(inv.extra["inverted"])
    monkeypatch.setattr(transfer_suite, "load", lambda *a, **k: pytest.fail("computed again"))
    assert main(["analyse", str(model), "--data", "sample", "--images", "3", "--steps", "5", "--store", store]) == 0
    assert len(Store(store).query()) == 4
