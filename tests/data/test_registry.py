"""Registry: named datasets, path datasets, split roles, metrics, and the seeded train/val split."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.data import DatasetSpec, names, resolve, train_val_split
from selfsup.data.registry import SAMPLE_PATH

DATA = os.environ.get("SELFSUP_DATA")
NAMED = ("cifar10", "tinyimagenet100", "eurosat", "flowers102", "caltech101", "sample")


def test_names_cover_the_datasets():
    listing = names()
    assert set(NAMED) <= set(listing)
    assert all(isinstance(v, str) and v and "\n" not in v for v in listing.values())


def test_sample_is_always_available(monkeypatch):
    monkeypatch.delenv("SELFSUP_DATA", raising=False)
    spec = resolve("sample")
    assert spec.path == SAMPLE_PATH and spec.path.is_file()
    assert (spec.num_classes, spec.train_split, spec.test_split, spec.metric) == (10, "train", "test", "top1")


def test_roles_and_metrics(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    for name in NAMED[:-1]:
        (tmp_path / f"{name}.zip").write_bytes(b"")  # only existence is checked by resolve
    specs = {n: resolve(n) for n in NAMED}
    assert {n for n, s in specs.items() if s.metric == "mean_per_class"} == {"flowers102", "caltech101"}
    assert specs["flowers102"].val_split == "val" and specs["flowers102"].test_split == "test"
    tiny = specs["tinyimagenet100"]
    assert (tiny.test_split, tiny.val_split) == ("val", None)  # val is its test; val is carved from train
    assert specs["cifar10"].resolution == 32 and specs["caltech101"].num_classes == 102
    with pytest.raises(dataclasses.FrozenInstanceError):
        specs["cifar10"].name = "x"  # type: ignore[misc]


def test_extracted_folder_is_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    (tmp_path / "eurosat").mkdir()
    assert resolve("eurosat").path == (tmp_path / "eurosat").resolve()


def test_missing_data_root_error_names_the_fix(monkeypatch):
    monkeypatch.delenv("SELFSUP_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="SELFSUP_DATA=/path/to/data.*cifar10.zip"):
        resolve("cifar10")


def test_missing_file_error_names_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        resolve("flowers102")
    assert str(tmp_path / "flowers102.zip") in str(err.value) and "SELFSUP_DATA" in str(err.value)


def test_unknown_name_and_missing_path():
    with pytest.raises(KeyError, match="cifar10"):
        resolve("no_such_dataset")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve("/no/such/place.zip")


def _tree(root: Path, splits: tuple[str, ...]) -> None:
    for split in splits:
        for cls in ("a", "b", "c"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(root / split / cls / "0.png")


@pytest.mark.parametrize(
    "splits, roles",
    [
        (("train", "val", "test"), ("train", "test", "val")),
        (("train", "val"), ("train", "val", None)),
        (("train", "test"), ("train", "test", None)),
        (("all",), ("all", None, None)),
    ],
)
def test_path_dataset_discovers_splits(tmp_path, splits, roles):
    root = tmp_path / "mine"
    if splits == ("all",):
        for cls in ("a", "b", "c"):
            (root / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(root / cls / "0.png")
    else:
        _tree(root, splits)
    spec = resolve(str(root))
    assert isinstance(spec, DatasetSpec)
    assert (spec.train_split, spec.test_split, spec.val_split) == roles
    assert spec.name == "mine" and spec.num_classes == 3 and spec.metric == "top1"
    assert set(spec.splits) == set(splits)


def test_path_zip(tmp_path):
    path = tmp_path / "pets.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name in ("train/cat/0.jpg", "train/dog/0.jpg", "test/cat/1.jpg"):
            z.writestr(name, b"x")
    spec = resolve(path)
    assert spec.name == "pets" and spec.splits == ("test", "train") and spec.num_classes == 2


def test_train_val_split_plain():
    tr, va = train_val_split(100, seed=3)
    assert len(va) == 20 and len(tr) == 80
    assert np.intersect1d(tr, va).size == 0 and np.union1d(tr, va).tolist() == list(range(100))
    assert np.array_equal(va, np.sort(va)) and tr.dtype == np.int64
    assert np.array_equal(train_val_split(100, seed=3)[1], va)
    assert not np.array_equal(train_val_split(100, seed=4)[1], va)


def test_train_val_split_stratified():
    labels = np.repeat(np.arange(5), [10, 20, 30, 5, 2])
    tr, va = train_val_split(labels, seed=0, fraction=0.2)
    per_class = np.bincount(labels[va], minlength=5).tolist()
    assert per_class == [2, 4, 6, 1, 1]  # round(20%), at least one of a class with >= 2 images
    assert len(tr) + len(va) == len(labels) and np.intersect1d(tr, va).size == 0
    with pytest.raises(ValueError, match="fraction"):
        train_val_split(labels, fraction=1.5)


@pytest.mark.skipif(not DATA, reason="SELFSUP_DATA not set")
def test_named_specs_match_the_shared_manifest():
    manifest = json.loads((Path(DATA) / "manifest.json").read_text())
    for name, entry in manifest.items():
        spec = resolve(name)
        assert spec.path is not None and spec.path.is_file()
        assert spec.num_classes == entry["classes"]
        assert set(spec.splits) == set(entry["splits"])


def test_per_class_subset_is_seeded_balanced_and_keeps_small_classes_whole():
    from selfsup.data import per_class_subset

    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    keep = per_class_subset(labels, 5, seed=1)
    assert np.bincount(labels[keep]).tolist() == [5, 3, 5]
    assert np.all(np.diff(keep) > 0)                                  # sorted, no repeats
    assert np.array_equal(keep, per_class_subset(labels, 5, seed=1))
    assert not np.array_equal(keep, per_class_subset(labels, 5, seed=2))
    with pytest.raises(ValueError, match="positive"):
        per_class_subset(labels, 0)
