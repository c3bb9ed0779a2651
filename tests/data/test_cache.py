"""Decode-once cache: contents, reuse without decoding, invalidation, bad files, sizes, atomicity."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.data import DecodeError, ImageSet, from_arrays, load
from selfsup.data import cache as cache_mod
from selfsup.data import sources as sources_mod

DATA = os.environ.get("SELFSUP_DATA")
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Caches go to a fresh tmp home; decoding stays in-process unless a test asks for the pool."""
    monkeypatch.setenv("SELFSUP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "1")
    return tmp_path / "home" / "cache" / "images"


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts calls of the per-image decoder."""
    calls: list[int] = []
    real = sources_mod.decode

    def counting(data, size=None):
        calls.append(1)
        return real(data, size)

    monkeypatch.setattr(sources_mod, "decode", counting)
    return calls


def _folder(root: Path, n_per_class: int = 3, sizes=((8, 8),), split: str = "train") -> Path:
    for c, cls in enumerate(("a", "b")):
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            w, h = sizes[i % len(sizes)]
            Image.new("RGB", (w, h), (c * 100, i * 10, 7)).save(d / f"{i}.png")
    return root


def test_sample_loads_balanced_readonly(decodes):
    ds = load("sample", "train")
    assert isinstance(ds, ImageSet) and isinstance(ds.images, np.memmap)
    assert ds.images.shape == (4800, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and np.bincount(ds.labels).tolist() == [480] * 10
    assert ds.classes == CIFAR10 and (ds.name, ds.split, ds.metric, ds.skipped) == ("sample", "train", "top1", [])
    assert not ds.images.flags.writeable
    assert 60 < ds.images.mean() < 200  # real photos, not zeros
    assert len(decodes) == 4800


def test_second_load_does_not_decode(home, decodes):
    first = load("sample", "test")
    assert len(decodes) == 960
    (folder,) = [p for p in home.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in folder.iterdir()) == ["images.u8", "labels.npy", "meta.json"]
    assert folder.joinpath("images.u8").stat().st_size == 960 * 32 * 32 * 3
    stamp = folder.joinpath("images.u8").stat().st_mtime_ns
    again = load("sample", "test")
    assert len(decodes) == 960  # no decoder call at all
    assert folder.joinpath("images.u8").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.images, again.images)
    meta = json.loads(folder.joinpath("meta.json").read_text())
    assert meta["shape"] == [960, 32, 32, 3] and meta["classes"] == CIFAR10


def test_size_is_part_of_the_key(home):
    small = load("sample", "test", size=16)
    assert small.images.shape == (960, 16, 16, 3)
    assert load("sample", "test").images.shape == (960, 32, 32, 3)
    assert len([p for p in home.iterdir() if not p.name.startswith(".")]) == 2


def test_folder_cache_invalidated_by_new_file(tmp_path, decodes):
    root = _folder(tmp_path / "d")
    assert len(load(str(root), "train")) == 6
    load(str(root), "train")
    assert len(decodes) == 6
    Image.new("RGB", (8, 8)).save(root / "train" / "b" / "new.png")
    assert len(load(str(root), "train")) == 7
    assert len(decodes) == 13


def test_corrupt_file_named_in_error_and_skip_counts_it(tmp_path):
    root = _folder(tmp_path / "d")
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DecodeError) as err:
        load(str(root), "train")
    message = str(err.value)
    assert str(bad) in message and "on_error='skip'" in message and "remove the file" in message
    ds = load(str(root), "train", on_error="skip")
    assert ds.skipped == ["train/a/1.png"] and len(ds) == 5 and ds.images.shape == (5, 8, 8, 3)
    assert ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert ds.images[1, 0, 0].tolist() == [0, 20, 7]  # the image after the bad one moved up
    with pytest.raises(DecodeError, match="train/a/1.png"):  # the cached skip does not hide it from raise
        load(str(root), "train")


def test_corrupt_zip_member_named(tmp_path):
    import zipfile

    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train/a/ok.png", _png_bytes())
        z.writestr("train/a/broken.jpg", b"\xff\xd8\xff garbage")
    with pytest.raises(DecodeError, match=r"zip member 'train/a/broken.jpg' of .*z.zip.*on_error='skip'"):
        load(str(path), "train")


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    return buf.getvalue()


def test_mixed_sizes_need_a_size(tmp_path):
    root = _folder(tmp_path / "d", sizes=((8, 8), (12, 6), (5, 9)))
    with pytest.raises(ValueError, match="differ in size.*size="):
        load(str(root), "train")
    ds = load(str(root), "train", size=6)
    assert ds.images.shape == (6, 6, 6, 3)
    # a constant-colour image stays that colour through resize + crop
    assert np.abs(ds.images[1].astype(int) - [0, 10, 7]).max() <= 1


def test_role_alias_and_unknown_split(tmp_path):
    root = tmp_path / "d"
    _folder(root, split="train")
    _folder(root, split="val")
    assert load(str(root), "test").split == "val"  # no "test": the test role is "val"
    with pytest.raises(KeyError, match="nope.*train.*val"):
        load(str(root), "nope")


def test_cifar_pickles_through_the_cache(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    imgs = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        imgs[name] = x
        rows = x.transpose(0, 3, 1, 2).reshape(2, 3072)  # R plane, G plane, B plane, each row-major
        (d / name).write_bytes(pickle.dumps({b"data": rows, b"labels": [1, 2]}, protocol=2))
    ds = load(str(d), "train")
    assert ds.images.shape == (10, 32, 32, 3) and ds.labels.tolist() == [1, 2] * 5
    np.testing.assert_array_equal(ds.images[3], imgs["data_batch_2"][1])
    assert ds.classes == [str(i) for i in range(10)]  # no batches.meta: indices as names
    assert load(str(d), "test", size=16).images.shape == (2, 16, 16, 3)


def test_leftover_tmp_dirs(home):
    load("sample", "test")  # creates the cache root
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = home / ".tmp-killed"
    stale.mkdir()
    (stale / "images.u8").write_bytes(b"\0" * 100)  # half-written images of a killed build
    (stale / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    live = home / ".tmp-other-host"
    live.mkdir()
    (live / "owner.json").write_text(json.dumps({"host": "elsewhere.invalid", "pid": 1}))
    ds = load("sample", "test")
    assert len(ds) == 960
    assert not stale.exists()  # its owner is gone: removed
    assert live.exists()  # maybe still building on another machine: left alone


def test_killed_decode_leaves_no_half_cache(home, monkeypatch):
    calls = []
    real = sources_mod.decode

    def dies(data, size=None):
        calls.append(1)
        if len(calls) == 100:
            raise KeyboardInterrupt  # stands in for a kill in the middle of decoding
        return real(data, size)

    monkeypatch.setattr(sources_mod, "decode", dies)
    with pytest.raises(KeyboardInterrupt):
        load("sample", "test")
    assert list(home.iterdir()) == []  # no cache folder, no tmp folder
    monkeypatch.setattr(sources_mod, "decode", real)
    assert len(load("sample", "test")) == 960


def test_damaged_cache_is_rebuilt(home, decodes):
    load("sample", "test")
    (folder,) = list(home.iterdir())
    (folder / "images.u8").write_bytes(b"short")
    assert load("sample", "test").images.shape == (960, 32, 32, 3)
    assert len(decodes) == 2 * 960


def test_process_pool_matches_in_process(tmp_path, monkeypatch):
    root = _folder(tmp_path / "d", n_per_class=12)
    (root / "train" / "b" / "bad.png").write_bytes(b"broken")
    serial = load(str(root), "train", on_error="skip")
    monkeypatch.setenv("SELFSUP_HOME", str(tmp_path / "home2"))
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "2")
    monkeypatch.setattr(cache_mod, "POOL_MIN_ITEMS", 0)
    monkeypatch.setattr(cache_mod, "CHUNK", 5)
    pooled = load(str(root), "train", on_error="skip")
    np.testing.assert_array_equal(np.asarray(serial.images), np.asarray(pooled.images))
    np.testing.assert_array_equal(serial.labels, pooled.labels)
    assert pooled.skipped == serial.skipped == ["train/b/bad.png"]


def test_broken_pool_falls_back_to_in_process(tmp_path, monkeypatch):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class DeadPool:  # what a pool whose workers died (or never bootstrapped) does
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, *args):
            fut: Future = Future()
            fut.set_exception(BrokenProcessPool("worker died"))
            return fut

        def shutdown(self, **kwargs):
            pass

    root = _folder(tmp_path / "d", n_per_class=6)
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "2")
    monkeypatch.setattr(cache_mod, "POOL_MIN_ITEMS", 0)
    monkeypatch.setattr(cache_mod, "CHUNK", 5)
    monkeypatch.setattr(cache_mod, "ProcessPoolExecutor", DeadPool)
    ds = load(str(root), "train")
    assert len(ds) == 12 and ds.labels.tolist() == [0] * 6 + [1] * 6


def test_from_arrays():
    x = np.random.default_rng(0).integers(0, 256, (4, 10, 6, 3), dtype=np.uint8)
    ds = from_arrays(x, [0, 1, 1, 0], classes=["u", "v"])
    np.testing.assert_array_equal(ds.images, x)
    assert ds.classes == ["u", "v"] and not ds.images.flags.writeable
    assert from_arrays(x, [0, 1, 1, 0], size=4).images.shape == (4, 4, 4, 3)
    grey = from_arrays(x[..., 0], [0, 0, 0, 0])
    np.testing.assert_array_equal(grey.images[..., 2], x[..., 0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_error"):
        load("sample", "test", on_error="ignore")
    with pytest.raises(ValueError, match="size"):
        load("sample", "test", size=0)


@pytest.mark.skipif(not DATA, reason="SELFSUP_DATA not set")
def test_real_flowers_train_split():
    ds = load("flowers102", "train")
    assert ds.images.shape == (1020, 96, 96, 3) and ds.metric == "mean_per_class"
    assert np.bincount(ds.labels).tolist() == [10] * 102 and ds.classes[0] == "001"
