"""Image sources and decoding: where pixels come from, and how any image becomes uint8 RGB.

A *source* lists the images of each split as ``Item(name, label, data)``: ``name`` is the image's
relative name (``"train/cat/0001.jpg"``, or ``"data_batch_1#17"`` for a CIFAR row), ``label`` the class
index into ``source.classes`` and ``data`` the encoded file bytes or an ``H×W×3`` uint8 array.
Four forms are read, all in place (nothing is extracted to disk):

- :class:`FolderSource` — an ImageFolder directory ``<root>/<split>/<class>/<file>``; a directory
  with no split level (``<root>/<class>/<file>``) is one split named ``"all"``.
- :class:`ZipSource` — the same tree inside a zip (the form of ``../shared/data/*.zip``), read
  member by member with :mod:`zipfile`; one extra top-level folder (``cifar10/train/...``) is allowed.
- :class:`CifarSource` — the official CIFAR-10/100 python pickles (``cifar-10-batches-py/``,
  ``cifar-100-python/`` — fine labels — or their ``.tar.gz`` archives read with :mod:`tarfile`;
  only members of the exact official names are read).
- :class:`ArraySource` — in-memory ``uint8`` arrays ``N×H×W×3`` (or ``N×H×W`` grey) plus labels.

Zip members that would leave their folder — named with ``..``, an absolute path, a drive letter or
empty components (backslashes counted as separators) — are never read: :meth:`Source.unsafe` lists
them with the reason, and the cache refuses the dataset naming the first (:func:`unsafe_error`), or
skips and counts them.

:func:`decode` turns any of these payloads into ``H×W×3`` uint8 RGB, with one policy for every
Pillow mode (see :func:`to_rgb`) and, when asked, Ericsson et al.'s resize (shorter side to ``size``,
bicubic, centre crop ``size×size``; see :func:`resize_center_crop`).

Example::

    src = open_source("/data/cifar10.zip")
    src.splits()                      # ['test', 'train']
    name, label, data = next(src.items("train"))
    rgb = decode(data)                # 32×32×3 uint8
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from selfsup.errors import UnknownName, UserError

#: File extensions treated as images (lower case); anything else in a tree (README, .csv) is ignored.
IMG_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif",
)
#: Top-level folder names recognised as splits (used to tell a split level from a wrapper folder).
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test", "all", "unlabeled", "extra"})
#: Background that transparent pixels are composited onto (white: see :func:`to_rgb`).
ALPHA_BACKGROUND = 255

SKIP_HINT = "remove the file or pass on_error='skip'"


class Item(NamedTuple):
    """One image of a split: relative name, class index, encoded bytes or an H×W×3 uint8 array."""

    name: str
    label: int
    data: bytes | np.ndarray


class DecodeError(UserError):
    """An image could not be read or decoded, or an entry is refused; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------------
# decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to mode ``RGB`` with one documented policy.

    - ``L``, ``1``, ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV``, palette ``P`` without transparency:
      Pillow's own conversion (grey is replicated to R=G=B, ``1`` becomes 0/255).
    - 16/32-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I``): treated as unsigned 16-bit samples (how
      Pillow returns 16-bit PNG/TIFF), clipped to [0, 65535] and scaled by 255/65535 with rounding.
      Pillow's ``convert("L")`` would clip at 255 instead, turning most 16-bit images white.
    - ``F`` (float grey): clipped to [0, 255] and rounded.
    - Anything with alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, ``P`` with a
      transparency entry): composited onto **white**
      (``out = (rgb·a + 255·(255 − a) + 127) // 255``). White because a transparent background is
      meant to show the page, and because dropping alpha (what ``convert("RGB")`` does) exposes
      whatever colour the encoder left under transparent pixels, which is arbitrary.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I"):  # I, I;16, I;16L, I;16B, I;16N
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        out = (rgb * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127) // 255
        return Image.fromarray(out.astype(np.uint8), "RGB")
    if mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` with bicubic, then the centre ``size×size`` crop.

    This is Ericsson et al.'s evaluation preprocessing (``Resize(size)`` + ``CenterCrop(size)``), with
    torchvision's exact arithmetic: long side ``int(size·long/short)``, crop offset
    ``round((new − size)/2)``. Pillow's bicubic antialiases when shrinking, as torchvision's PIL path.
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, got {arr.dtype}; convert with arr.astype(np.uint8)")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    raise UserError(f"image arrays must be H×W×3 or H×W uint8, got shape {arr.shape}")


def decode(data: bytes | np.ndarray, size: int | None = None) -> np.ndarray:
    """Decode encoded bytes (JPEG, PNG, ...) or take an array, and return ``H×W×3`` uint8 RGB.

    With ``size``, the image is resized by :func:`resize_center_crop` to ``size×size``; without, it
    keeps its native size. Raises whatever Pillow raises on a bad file; callers add the file name.
    EXIF orientation is not applied and multi-frame files give their first frame, as torchvision's
    ImageFolder loader does, so pixels match the published pipelines.
    """
    if isinstance(data, np.ndarray):
        arr = _array_to_rgb(data)
        if size is None or arr.shape[:2] == (size, size):
            return arr
        img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    else:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # decode now, inside the with, so errors surface here and the file closes
            img = to_rgb(opened)
    if size is not None:
        img = resize_center_crop(img, size)
    return np.asarray(img, dtype=np.uint8)


class ChunkResult(NamedTuple):
    """What :func:`decode_chunk` sends back: decoded images and (position, error text) failures."""

    positions: list[int]
    images: list[np.ndarray]
    errors: list[tuple[int, str]]


def decode_chunk(chunk: Sequence[bytes | np.ndarray], size: int | None) -> ChunkResult:
    """Decode a list of payloads, catching per-image failures (module level so a process pool can run it)."""
    positions, images, errors = [], [], []
    for pos, data in enumerate(chunk):
        try:
            images.append(decode(data, size))
            positions.append(pos)
        except Exception as exc:  # any Pillow failure (truncated, unidentified, bomb) is a bad file
            errors.append((pos, f"{type(exc).__name__}: {exc}"))
    return ChunkResult(positions, images, errors)


# --------------------------------------------------------------------------------------------------
# sources


class Source(ABC):
    """A dataset on disk or in memory: splits, class names, and the items of each split."""

    #: Where it lives (``None`` for in-memory arrays).
    path: Path | None
    #: Class names; ``label`` indexes into this list. Shared by all splits.
    classes: list[str]

    @abstractmethod
    def splits(self) -> list[str]:
        """Split names, sorted."""

    @abstractmethod
    def count(self, split: str) -> int:
        """Number of images in ``split``."""

    @abstractmethod
    def items(self, split: str, select: Sequence[int] | None = None) -> Iterator[Item]:
        """Yield the split's items in a fixed order (or only positions ``select`` of that order)."""

    @abstractmethod
    def identity(self) -> dict:
        """What the decoded cache depends on: absolute path, sizes, modification times."""

    def describe(self, name: str) -> str:
        """A human pointer to one item, for error messages."""
        return f"{name!r} in {self.path}"

    def unsafe(self) -> dict[str, str]:
        """Entries left out of the listing because they leave their folder: ``{name: why}``, never read."""
        return {}

    def labels(self, split: str) -> np.ndarray:
        """Labels of ``split`` without reading image data where the source allows it."""
        return np.array([item.label for item in self.items(split)], dtype=np.int64)

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise UnknownName(
                f"split {split!r} not found in {self.path or 'arrays'}; it has {self.splits()}. "
                f"Pass one of those."
            )

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold no handle
        """Release open file handles (zip)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_image(path: str) -> bool:
    base = path.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _leaves_folder(name: str) -> str | None:
    """Why a zip member name would leave the folder it is joined to, or ``None`` if it stays inside.

    Backslashes count as separators, as Windows tools read them, so ``train\\..\\..\\x.png`` cannot
    hide its ``..``; a harmless backslash (``train\\cat\\x.png``) is left as it was.
    """
    posix = name.replace("\\", "/")
    parts = posix.split("/")
    why = None
    if posix.startswith("/"):
        why = "an absolute path"
    elif re.match(r"[A-Za-z]:", posix):
        why = "a drive letter"
    elif ".." in parts:
        why = "a '..' component"
    elif "" in parts:
        why = "an empty path component"
    if why and "\\" in name:
        why += " (with backslash separators)"
    return why


def unsafe_error(source: Source, unsafe: dict[str, str]) -> DecodeError:
    """The refusal of a source with entries that leave their folder, naming the first and the fix."""
    name, why = next(iter(unsafe.items()))
    more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
    fix = getattr(source, "unsafe_fix", "remove it")
    return DecodeError(
        f"refusing {source.describe(name)}: it leaves its split folder ({why}){more}; "
        f"{fix}, or pass data.on_error=skip to skip and count it"
    )


def _layout(paths: Sequence[str], where: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Turn relative image paths into (classes, {split: [(path, label)]}), ImageFolder style.

    ``<split>/<class>/<file>`` gives splits; ``<class>/<file>`` alone is the one split ``"all"``.
    One wrapper folder around the whole tree (``name/<split>/<class>/<file>`` or
    ``name/<class>/<file>``) is skipped, unless its name is a split name (then it *is* the split).
    Files deeper than ``<split>/<class>/`` belong to that class (torchvision walks class folders too).
    Files at the very top have no class and are ignored. Returned paths are the input paths.
    """
    parts = [(p, p.split("/")) for p in paths if "/" in p]
    if not parts:
        raise UserError(
            f"no images found in {where}; expected <split>/<class>/<file> or <class>/<file> "
            f"with extensions {', '.join(IMG_EXTENSIONS)}"
        )
    tops = {q[0] for _, q in parts}
    if len(tops) == 1 and min(len(q) for _, q in parts) >= 3 and next(iter(tops)) not in SPLIT_NAMES:
        parts = [(p, q[1:]) for p, q in parts]  # a wrapper folder, e.g. "cifar10/train/cat/0001.jpg"
        tops = {q[0] for _, q in parts}
    has_split_level = min(len(q) for _, q in parts) >= 3
    if not has_split_level and tops & SPLIT_NAMES and max(len(q) for _, q in parts) >= 3:
        shallow = next(p for p, q in parts if len(q) == 2)
        deep = next(p for p, q in parts if len(q) >= 3)
        raise UserError(
            f"mixed layout in {where}: {shallow!r} sits at <class>/<file> but {deep!r} at "
            f"<split>/<class>/<file>; move the stray files into a class folder of a split"
        )
    by_split: dict[str, list[tuple[str, str]]] = {}
    for p, q in parts:
        split, cls = (q[0], q[1]) if has_split_level else ("all", q[0])
        by_split.setdefault(split, []).append((cls, p))
    classes = sorted({cls for entries in by_split.values() for cls, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    return classes, {
        split: [(p, index[cls]) for cls, p in sorted(entries)] for split, entries in by_split.items()
    }


class _TreeSource(Source):
    """Shared logic of folder and zip trees: a listing of relative paths, read one by one.

    The listing is built on first use, so a cache hit (which needs only :meth:`identity`) never
    parses a 60,000-entry zip directory.
    """

    _tree: tuple[list[str], dict[str, list[tuple[str, int]]]] | None = None

    @abstractmethod
    def _list(self) -> list[str]:
        """Relative paths of all image files that stay inside the tree; sets ``self._unsafe``."""

    @property
    def _entries(self) -> dict[str, list[tuple[str, int]]]:
        if self._tree is None:
            paths = self._list()
            if self._unsafe and not any("/" in p for p in paths):  # nothing else to load: say why
                raise unsafe_error(self, self._unsafe)
            self._tree = _layout(paths, str(self.path))
        return self._tree[1]

    def unsafe(self) -> dict[str, str]:
        self._entries  # noqa: B018 - builds the listing, which finds them
        return dict(self._unsafe)

    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        self._entries  # noqa: B018 - builds the listing
        assert self._tree is not None
        return self._tree[0]

    def splits(self) -> list[str]:
        return sorted(self._entries)

    def count(self, split: str) -> int:
        self._check_split(split)
        return len(self._entries[split])

    def names(self, split: str) -> list[str]:
        """Relative names of the split's images, in item order."""
        self._check_split(split)
        return [name for name, _ in self._entries[split]]

    def labels(self, split: str) -> np.ndarray:
        self._check_split(split)
        return np.array([lab for _, lab in self._entries[split]], dtype=np.int64)

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The encoded bytes of one image, by relative name."""

    def items(self, split: str, select: Sequence[int] | None = None) -> Iterator[Item]:
        self._check_split(split)
        entries = self._entries[split]
        for i in range(len(entries)) if select is None else select:
            name, label = entries[i]
            try:
                data = self.read(name)
            except OSError as exc:  # unreadable file (permissions, I/O): same contract as a bad decode
                raise DecodeError(f"cannot read {self.describe(name)} ({exc}); {SKIP_HINT}") from exc
            yield Item(name, label, data)


class FolderSource(_TreeSource):
    """An ImageFolder directory: ``<root>/<split>/<class>/<file>`` or ``<root>/<class>/<file>``.

    Hidden files and folders and non-image files are ignored. Symlinks are followed wherever they
    point (``train -> /mnt/big/train`` is a common layout, and reading through a link writes nothing).
    The cache identity is the folder's absolute path with its image count, total bytes and newest
    modification time, so adding, removing or editing an image invalidates the cache.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root).resolve()
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a directory")
        rel, total, newest = [], 0, 0
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            base = Path(dirpath).relative_to(self.path).as_posix()
            for f in filenames:
                name = f if base == "." else f"{base}/{f}"
                if _is_image(name):
                    st = os.stat(os.path.join(dirpath, f))
                    rel.append(name)
                    total += st.st_size
                    newest = max(newest, st.st_mtime_ns)
        self._identity = {
            "kind": "folder", "path": str(self.path), "files": len(rel), "bytes": total, "mtime_ns": newest,
        }
        self._rel, self._unsafe = rel, {}

    def _list(self) -> list[str]:
        return self._rel

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def describe(self, name: str) -> str:
        return f"file {self.path / name}"

    def identity(self) -> dict:
        return dict(self._identity)


class ZipSource(_TreeSource):
    """An ImageFolder tree inside a zip, read in place (stored or deflated members).

    ``__MACOSX/`` entries, hidden files and non-images are ignored. Members whose name leaves the
    tree (see :func:`_leaves_folder`) are unsafe entries (:meth:`unsafe`), never read.
    """

    unsafe_fix = "remove the entry from the zip"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        if not zipfile.is_zipfile(self.path):
            raise UserError(f"{self.path} is not a zip file; pass an ImageFolder zip")
        self._zip: zipfile.ZipFile | None = None

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def _list(self) -> list[str]:
        names = [
            n for n in self._open().namelist()
            if not n.endswith("/") and not n.startswith("__MACOSX/") and _is_image(n)
        ]
        # "train/../../x.png" would otherwise be an image of class ".."; refuse such names at listing
        self._unsafe = {n: why for n in names if (why := _leaves_folder(n))}
        return [n for n in names if n not in self._unsafe]

    def read(self, name: str) -> bytes:
        return self._open().read(name)

    def describe(self, name: str) -> str:
        return f"zip member {name!r} of {self.path}"

    def identity(self) -> dict:
        st = self.path.stat()
        return {"kind": "zip", "path": str(self.path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


# ---- CIFAR pickles ---------------------------------------------------------------------------------

_CIFAR = {
    # layout folder: (split -> batch files, label key, meta file, class-names key)
    "cifar-10-batches-py": (
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "labels", "batches.meta", "label_names",
    ),
    "cifar-100-python": ({"train": ["train"], "test": ["test"]}, "fine_labels", "meta", "fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays and builtins: a CIFAR file cannot run code on load."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2, as the official pickles are read
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a CIFAR pickle")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.split(".", 2)[2]  # numpy 2 renamed core; avoids its warning
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DecodeError(
            f"cannot read CIFAR pickle {where} ({exc}); replace it with the official file"
        ) from exc
    if not isinstance(obj, dict):
        raise DecodeError(f"CIFAR pickle {where} holds {type(obj).__name__}, expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_layout(path: Path) -> tuple[str, Path | None, str] | None:
    """(layout name, directory or None, tar member prefix) if ``path`` is a CIFAR dir/archive."""
    if path.is_dir():
        for layout, (files, *_rest) in _CIFAR.items():
            if all((path / f).is_file() for fs in files.values() for f in fs):
                return layout, path, ""
            if (path / layout).is_dir():
                return layout, path / layout, ""
        return None
    if path.name.endswith((".tar.gz", ".tgz", ".tar")) and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            first = tar.next()  # the official archives start with their folder; no full scan needed
            top = first.name.split("/", 1)[0] if first is not None else ""
            if top in _CIFAR:
                return top, None, top + "/"
    return None


class CifarSource(Source):
    """Official CIFAR-10 / CIFAR-100 python pickles (CIFAR-100 with its 100 fine labels).

    ``path`` is ``cifar-10-batches-py/`` or ``cifar-100-python/`` (or a folder holding one), or the
    official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` read in place. Each pickle row is
    3072 bytes: the 1024 red, then green, then blue values of a 32×32 image in row-major order.
    Item names are ``"<batch file>#<row>"``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        found = _cifar_layout(self.path)
        if found is None:
            raise UserError(
                f"{self.path} is not a CIFAR pickle folder or archive; expected cifar-10-batches-py/ "
                f"(data_batch_1..5, test_batch) or cifar-100-python/ (train, test) or their .tar.gz"
            )
        self._layout, self._dir, self._prefix = found
        self._files, self._label_key, self._meta_file, self._names_key = _CIFAR[self._layout]
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        self._tar_files: dict[str, dict] | None = None
        self._classes: list[str] | None = None

    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        if self._classes is None:  # read on first use: a cache hit needs only identity()
            meta = self._read_files([self._meta_file], missing_ok=True).get(self._meta_file)
            if meta is not None and self._names_key in meta:
                self._classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[self._names_key]]
            else:
                self._classes = [str(i) for i in range(10 if self._layout == "cifar-10-batches-py" else 100)]
        return self._classes

    def _read_files(self, names: list[str], missing_ok: bool = False) -> dict[str, dict]:
        if self._dir is not None:
            out = {}
            for n in names:
                f = self._dir / n
                if f.is_file():
                    out[n] = _unpickle(f.read_bytes(), str(f))
                elif not missing_ok:
                    raise FileNotFoundError(f"CIFAR file {f} is missing; restore the official archive")
            return out
        if self._tar_files is None:
            # one sequential pass reads every pickle (gzip cannot seek back cheaply; CIFAR is ~180 MB)
            self._tar_files = {}
            known = {self._meta_file, *(f for fs in self._files.values() for f in fs)}  # not readme.html
            with tarfile.open(self.path) as tar:
                for member in tar:
                    base = member.name.removeprefix(self._prefix)
                    if member.isfile() and member.name.startswith(self._prefix) and base in known:
                        fobj = tar.extractfile(member)
                        assert fobj is not None
                        self._tar_files[base] = _unpickle(fobj.read(), f"{self.path}:{member.name}")
        missing = [n for n in names if n not in self._tar_files]
        if missing and not missing_ok:
            raise FileNotFoundError(f"{self.path} lacks {missing}; restore the official archive")
        return {n: self._tar_files[n] for n in names if n in self._tar_files}

    def _split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        self._check_split(split)
        if split not in self._cache:
            files = self._files[split]
            batches = self._read_files(files)
            images, labels, names = [], [], []
            for f in files:
                b = batches[f]
                data = np.asarray(b["data"], dtype=np.uint8)
                if data.ndim != 2 or data.shape[1] != 3072:
                    raise DecodeError(f"CIFAR file {f} has data of shape {data.shape}, expected N×3072")
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(b[self._label_key], dtype=np.int64))
                names += [f"{f}#{i}" for i in range(len(data))]
            self._cache[split] = (np.concatenate(images), np.concatenate(labels), names)
        return self._cache[split]

    def splits(self) -> list[str]:
        return sorted(self._files)

    def count(self, split: str) -> int:
        return len(self._split_arrays(split)[1])

    def labels(self, split: str) -> np.ndarray:
        return self._split_arrays(split)[1].copy()

    def items(self, split: str, select: Sequence[int] | None = None) -> Iterator[Item]:
        images, labels, names = self._split_arrays(split)
        for i in range(len(labels)) if select is None else select:
            yield Item(names[i], int(labels[i]), images[i])

    def identity(self) -> dict:
        if self._dir is None:
            st = self.path.stat()
            return {
                "kind": "cifar-tar", "path": str(self.path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            }
        stats = {f: (self._dir / f).stat() for fs in self._files.values() for f in fs}
        return {
            "kind": "cifar-dir", "path": str(self._dir),
            "files": {f: [s.st_size, s.st_mtime_ns] for f, s in sorted(stats.items())},
        }

    def describe(self, name: str) -> str:
        return f"row {name!r} of {self._dir or self.path}"


class ArraySource(Source):
    """In-memory images: ``uint8`` ``N×H×W×3`` (or ``N×H×W`` grey) and ``N`` integer labels, one split."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str] | None = None,
        split: str = "all",
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)
        if images.dtype != np.uint8 or not channels_ok:
            raise UserError(
                f"images must be uint8 N×H×W×3 or N×H×W, got {images.dtype} {images.shape}; "
                f"convert with images.astype(np.uint8) and channels last"
            )
        if len(labels) != len(images):
            raise UserError(f"{len(images)} images but {len(labels)} labels; pass one label per image")
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise UserError(
                f"labels span [{labels.min()}, {labels.max()}] but there are {len(self.classes)} classes; "
                f"pass classes= with one name per label"
            )
        self.path = None
        self._images, self._labels, self._split = images, labels, split

    def splits(self) -> list[str]:
        return [self._split]

    def count(self, split: str) -> int:
        self._check_split(split)
        return len(self._labels)

    def labels(self, split: str) -> np.ndarray:
        self._check_split(split)
        return self._labels.copy()

    def items(self, split: str, select: Sequence[int] | None = None) -> Iterator[Item]:
        self._check_split(split)
        for i in range(len(self._labels)) if select is None else select:
            yield Item(f"{split}#{i}", int(self._labels[i]), self._images[i])

    def identity(self) -> dict:
        return {"kind": "arrays", "shape": list(self._images.shape)}

    def describe(self, name: str) -> str:
        return f"array row {name!r}"


def open_source(path: str | os.PathLike) -> Source:
    """Open a zip, an ImageFolder directory, or CIFAR pickles (dir or .tar.gz) by looking at ``path``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a zip, an ImageFolder folder or CIFAR pickles")
    if p.is_file() and zipfile.is_zipfile(p):
        return ZipSource(p)
    if _cifar_layout(p) is not None:
        return CifarSource(p)
    if p.is_dir():
        return FolderSource(p)
    raise UserError(
        f"cannot read {p}: expected an ImageFolder zip or folder (<split>/<class>/<file>), "
        f"or CIFAR python pickles (cifar-10-batches-py/, cifar-100-python/ or their .tar.gz)"
    )
