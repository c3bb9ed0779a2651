"""Sources and decoding: every Pillow mode to RGB with exact values, ImageFolder trees, CIFAR pickles."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.data import load
from selfsup.data.sources import (
    ArraySource,
    CifarSource,
    DecodeError,
    FolderSource,
    ZipSource,
    _leaves_folder,
    decode,
    open_source,
    resize_center_crop,
)
from selfsup.errors import UserError
from selfsup.paths import cache_dir

DATA = os.environ.get("SELFSUP_DATA")


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


# ---- modes -------------------------------------------------------------------------------------


def test_grayscale_replicates_to_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = decode(_png(Image.fromarray(grey, "L")))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_bilevel_becomes_0_or_255():
    img = Image.new("1", (4, 4), 0)
    img.putpixel((1, 2), 1)
    out = decode(_png(img))
    assert out[2, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_16bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)  # mode I;16
    assert img.mode.startswith("I")
    out = decode(_png(img))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert expected.tolist() == [[0, 1, 128, 255]]


def test_32bit_integer_mode_treated_as_16bit():
    img = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32), "I")
    out = decode(_tiff(img))
    assert out[0, :, 0].tolist() == [0, 255, 255, 0]


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    return buf.getvalue()


def test_cmyk_matches_pillow_conversion():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=100)
    out = decode(buf.getvalue())
    assert out.shape == (4, 4, 3)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(out, ref)
    assert out[..., 0].min() > 200 and out[..., 1].max() < 60


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    out = decode(_png(img, transparency=0))  # index 0 transparent
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 100, 50]


def test_palette_without_transparency():
    img = Image.new("P", (1, 1))
    img.putpalette([10, 20, 30] + [0] * 765)
    assert decode(_png(img))[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("alpha", [0, 128, 255])
def test_rgba_alpha_composited_on_white(alpha):
    img = Image.new("RGBA", (3, 3), (100, 0, 200, alpha))
    out = decode(_png(img))
    expected = [(v * alpha + 255 * (255 - alpha) + 127) // 255 for v in (100, 0, 200)]
    assert out[1, 1].tolist() == expected


def test_la_composited_on_white():
    img = Image.new("LA", (2, 2), (40, 128))
    out = decode(_png(img))
    v = (40 * 128 + 255 * 127 + 127) // 255
    assert out[0, 0].tolist() == [v, v, v]


def test_corrupt_bytes_raise():
    with pytest.raises(Exception):  # noqa: B017 - Pillow raises several types; callers name the file
        decode(b"not an image at all")


# ---- resize ------------------------------------------------------------------------------------


def test_resize_shorter_side_then_centre_crop():
    arr = np.zeros((48, 64, 3), dtype=np.uint8)
    arr[:, :32] = 255  # left half white, right half black
    out = resize_center_crop(Image.fromarray(arr), 32)
    assert out.size == (32, 32)
    # torchvision arithmetic: 64x48 -> 42x32, crop left = round((42-32)/2) = 5; edge at 21-5 = 16
    ref = Image.fromarray(arr).resize((42, 32), Image.Resampling.BICUBIC).crop((5, 0, 37, 32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert decode(arr, 32).shape == (32, 32, 3)


def test_resize_keeps_constant_colour_and_native_without_size():
    arr = np.full((20, 30, 3), (12, 34, 56), dtype=np.uint8)
    assert decode(_png(Image.fromarray(arr))).shape == (20, 30, 3)
    out = decode(_png(Image.fromarray(arr)), 16)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [12, 34, 56]).max() <= 1


# ---- trees -------------------------------------------------------------------------------------


def _write_tree(root: Path, spec: dict[str, dict[str, int]], size=(8, 8)) -> None:
    for split, classes in spec.items():
        for cls, n in classes.items():
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", size, (i * 20, 0, 0)).save(d / f"{i:03d}.png")


def test_folder_with_splits(tmp_path):
    _write_tree(tmp_path, {"train": {"b": 2, "a": 3}, "test": {"a": 1, "c": 1}})
    (tmp_path / "train" / "a" / "notes.txt").write_text("ignored")
    (tmp_path / "train" / "a" / ".hidden.png").write_bytes(b"ignored")
    src = FolderSource(tmp_path)
    assert src.splits() == ["test", "train"]
    assert src.classes == ["a", "b", "c"]  # union over splits: labels agree between train and test
    items = list(src.items("train"))
    assert [(it.name, it.label) for it in items][:3] == [("train/a/000.png", 0), ("train/a/001.png", 0),
                                                         ("train/a/002.png", 0)]
    assert [it.label for it in src.items("test")] == [0, 2]
    assert decode(items[1].data)[0, 0].tolist() == [20, 0, 0]
    assert src.count("train") == 5 and src.labels("train").tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(KeyError, match="val.*test.*train"):
        src.count("val")


def test_folder_without_split_level_is_one_split(tmp_path):
    _write_tree(tmp_path, {"": {"dog": 2, "cat": 1}})
    src = open_source(tmp_path)
    assert isinstance(src, FolderSource)
    assert src.splits() == ["all"] and src.classes == ["cat", "dog"]


def test_zip_with_wrapper_folder(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name in ["mydata/train/x/0.png", "mydata/train/y/0.png", "mydata/val/x/1.png"]:
            z.writestr(name, _png(Image.new("RGB", (4, 4), (1, 2, 3))))
        z.writestr("mydata/README.txt", "hi")
        z.writestr("__MACOSX/mydata/train/x/._0.png", "junk")
    with open_source(path) as src:
        assert isinstance(src, ZipSource)
        assert src.splits() == ["train", "val"] and src.classes == ["x", "y"]
        it = next(src.items("val"))
        assert it.name == "mydata/val/x/1.png" and it.label == 0
        assert decode(it.data)[0, 0].tolist() == [1, 2, 3]
        assert "zip member 'mydata/val/x/1.png'" in src.describe(it.name)


def test_zip_single_split_named_train_is_a_split(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train/x/0.png", _png(Image.new("RGB", (4, 4))))
    with ZipSource(path) as src:
        assert src.splits() == ["train"] and src.classes == ["x"]


# ---- entries that leave their folder -------------------------------------------------------------

UNSAFE_MEMBERS = ["train/../../x.png", "/abs/cat/x.png", "C:/win/cat/x.png", "train\\..\\..\\x.png",
                  "C:\\win\\cat\\x.png", "train//x.png", "train/cat/../../../x.png"]


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _unsafe_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train/cat/0.png", _png(Image.new("RGB", (4, 4), (10, 20, 30))))
        z.writestr("train/dog/0.jpg", _jpeg((200, 100, 50)))
        z.writestr("test/cat/1.png", _png(Image.new("RGB", (4, 4), (1, 2, 3))))
        for name in UNSAFE_MEMBERS:
            z.writestr(name, _png(Image.new("RGB", (4, 4), (255, 0, 0))))
    return path


def test_zip_member_leaving_its_split_is_refused_by_name(tmp_path):
    path = _unsafe_zip(tmp_path / "evil.zip")
    with ZipSource(path) as src:  # the listing leaves them out: no class ".." or "" or "abs"
        assert src.classes == ["cat", "dog"] and src.splits() == ["test", "train"]
        assert set(src.unsafe()) == set(UNSAFE_MEMBERS) and src.count("train") == 2
        assert "'..'" in src.unsafe()["train/../../x.png"]
        assert "backslash" in src.unsafe()["train\\..\\..\\x.png"]
        assert "absolute" in src.unsafe()["/abs/cat/x.png"] and "drive" in src.unsafe()["C:/win/cat/x.png"]
    caches = cache_dir("images")
    before = set(caches.iterdir())
    with pytest.raises(DecodeError) as err:
        load(str(path), "train")
    message = str(err.value)
    assert isinstance(err.value, UserError)
    assert "zip member 'train/../../x.png'" in message and str(path) in message
    assert "leaves its split folder" in message and "(and 6 more" in message
    assert "remove the entry from the zip, or pass data.on_error=skip" in message
    assert set(caches.iterdir()) == before  # refused before any cache (or tmp folder) was written


def test_zip_member_leaving_its_split_skipped_and_counted(tmp_path):
    path = _unsafe_zip(tmp_path / "evil.zip")
    ds = load(str(path), "train", on_error="skip")
    assert ds.classes == ["cat", "dog"] and len(ds) == 2 and ds.labels.tolist() == [0, 1]
    assert ds.images[0, 0, 0].tolist() == [10, 20, 30]
    assert sorted(ds.skipped) == sorted(UNSAFE_MEMBERS)
    assert sorted(load(str(path), "train", on_error="skip").skipped) == sorted(UNSAFE_MEMBERS)  # cache hit
    assert sorted(load(str(path), "test", on_error="skip").skipped) == sorted(UNSAFE_MEMBERS)
    with pytest.raises(DecodeError, match=r"zip member 'train/\.\./\.\./x\.png'.*on_error=skip"):
        load(str(path), "train")  # the cached skip does not hide them from raise


def test_zip_with_only_unsafe_members_names_them(tmp_path):
    path = tmp_path / "only.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("../cat/x.png", _png(Image.new("RGB", (4, 4))))
    with ZipSource(path) as src, pytest.raises(DecodeError, match=r"'\.\./cat/x\.png'.*leaves its split"):
        src.splits()


def test_safe_names_are_not_unsafe():
    for name in ["train/cat/0.png", "wrap/train/cat/x.png", "./train/cat/x.png", "train/c..at/x..png",
                 "train/cat\\x.png"]:
        assert _leaves_folder(name) is None, name


def test_folder_follows_symlinks_out_of_the_root(tmp_path):
    # train -> /mnt/big/train is a common layout; reading through a link writes nothing, so it is followed
    root = tmp_path / "d"
    _write_tree(root, {"train": {"a": 2}})
    outside = tmp_path / "elsewhere"
    _write_tree(outside, {"": {"z": 2}})
    (root / "train" / "linked").symlink_to(outside / "z", target_is_directory=True)
    src = FolderSource(root)
    assert src.classes == ["a", "linked"] and src.count("train") == 4 and src.unsafe() == {}


def test_array_source():
    imgs = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    src = ArraySource(imgs, [0, 1, 0, 1, 1], classes=["a", "b"])
    items = list(src.items("all"))
    assert len(items) == 5 and items[1].label == 1
    np.testing.assert_array_equal(decode(items[2].data), imgs[2])
    with pytest.raises(ValueError, match="labels"):
        ArraySource(imgs, [0, 1])


# ---- CIFAR ---------------------------------------------------------------------------------------


def _cifar_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random images (N×32×32×3) and their official rows: 1024 R, 1024 G, 1024 B, row-major."""
    imgs = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    rows = np.concatenate([imgs[..., c].reshape(n, 1024) for c in range(3)], axis=1)
    return imgs, rows


def _write_cifar10(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    truth = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        imgs, rows = _cifar_rows(n, i)
        truth[name] = imgs
        batch = {b"batch_label": name.encode(), b"labels": [(i + j) % 10 for j in range(n)], b"data": rows,
                 b"filenames": [f"{j}.png".encode() for j in range(n)]}
        blob = pickle.dumps(batch, protocol=2)
        # the official files were written by Python 2 numpy, whose module is numpy.core (numpy 2: _core)
        (d / name).write_bytes(blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return truth


def test_cifar10_pickles_pixel_layout(tmp_path):
    truth = _write_cifar10(tmp_path)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        src = open_source(path)
        assert isinstance(src, CifarSource)
        assert src.splits() == ["test", "train"] and src.classes[0] == "airplane"
        train = list(src.items("train"))
        assert len(train) == 15 and train[4].name == "data_batch_2#1"
        np.testing.assert_array_equal(decode(train[4].data), truth["data_batch_2"][1])
        assert [it.label for it in train[:4]] == [0, 1, 2, 1]
        test = list(src.items("test"))
        np.testing.assert_array_equal(test[2].data, truth["test_batch"][2])


def test_cifar100_tar_gz_fine_labels(tmp_path):
    staging = tmp_path / "cifar-100-python"
    staging.mkdir()
    truth = {}
    for split, n in (("train", 4), ("test", 2)):
        imgs, rows = _cifar_rows(n, n)
        truth[split] = imgs
        batch = {b"data": rows, b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [0] * n}
        (staging / split).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"c{i}".encode() for i in range(100)]
    (staging / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging, arcname="cifar-100-python")
    src = open_source(archive)
    assert isinstance(src, CifarSource) and len(src.classes) == 100 and src.classes[93] == "c93"
    items = list(src.items("train"))
    assert [it.label for it in items] == [90, 91, 92, 93]
    np.testing.assert_array_equal(items[3].data, truth["train"][3])


def test_cifar_tar_reads_only_exact_member_names(tmp_path):
    _write_cifar10(tmp_path / "staging")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        for name in ("cifar-10-batches-py/../test_batch", "/cifar-10-batches-py/test_batch",
                     "cifar-10-batches-py/sub/../test_batch"):  # after the real one: would override it
            info = tarfile.TarInfo(name)
            info.size = 7
            tar.addfile(info, io.BytesIO(b"garbage"))
    with tarfile.open(archive) as tar:
        assert "/cifar-10-batches-py/test_batch" in tar.getnames()
    assert len(list(CifarSource(archive).items("test"))) == 3  # a garbage pickle would raise DecodeError


def test_cifar_pickle_cannot_run_code(tmp_path):
    _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DecodeError, match="refusing"):
        list(CifarSource(tmp_path).items("test"))


# ---- real data (only when SELFSUP_DATA is set) ---------------------------------------------------


@pytest.mark.skipif(not DATA, reason="SELFSUP_DATA not set")
def test_real_zips_match_manifest():
    root = Path(DATA)
    manifest = json.loads((root / "manifest.json").read_text())
    for name in ("cifar10", "flowers102"):
        entry = manifest[name]
        with ZipSource(root / entry["file"]) as src:
            assert len(src.classes) == entry["classes"]
            assert {s: src.count(s) for s in src.splits()} == entry["splits"]
            n = src.count("train")
            side = {"cifar10": 32, "flowers102": 96}[name]
            for it in src.items("train", select=[0, n // 2, n - 1]):  # a few members, not the whole set
                assert decode(it.data).shape == (side, side, 3)
