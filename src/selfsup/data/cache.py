"""Decode once: a split becomes a memory-mapped uint8 ``N×H×W×3`` array on disk, reused forever after.

Layout under ``cache_dir("images")`` (``$SELFSUP_HOME/cache/images``)::

    <key>/images.u8    raw uint8 N×H×W×3, C order (read back with np.memmap)
          labels.npy   int64 N
          meta.json    classes, shape, skipped files, unsafe entries, source identity, decode time

``key`` hashes the source identity (absolute path, size and mtime — for folders the image count,
total bytes and newest mtime), the split, the requested ``size`` and :data:`FORMAT_VERSION`, so
editing the data or asking another size builds a new cache, and nothing else does.

A cache is built in ``.tmp-<random>/`` beside the final folder, fsynced, then renamed into place in
one ``os.rename``: a killed decode leaves only a tmp folder, never a half cache, and the next
:func:`load` removes tmp folders whose owning process is gone. Two processes racing to build the
same key both finish; the second rename fails harmlessly and the first cache is used.

Decoding runs in a process pool over chunks (``SELFSUP_DECODE_WORKERS``, default: the CPUs this
process may use, at most 16) once a split has at least :data:`POOL_MIN_ITEMS` images; smaller splits
decode in-process, where a pool's start-up would cost more than it saves.

Example::

    ds = load("cifar10", "train")            # decodes once (~seconds), then memory-maps
    ds.images.shape, ds.labels[:5], ds.classes[0]
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selfsup.durable import fsync_dir, fsync_path, write_json
from selfsup.errors import UnknownName, UserError
from selfsup.paths import cache_dir

from . import sources
from .registry import names, path_name, resolve, split_roles
from .sources import SKIP_HINT, ArraySource, CifarSource, DecodeError, Item, Source, open_source

log = logging.getLogger("selfsup.data")

#: Bump when the decoded bytes for the same input would change (decode policy, layout).
FORMAT_VERSION = 1
#: Images per chunk sent to a decode worker.
CHUNK = 256
#: Splits smaller than this decode in-process (a pool costs ~1 s to start).
POOL_MIN_ITEMS = 4096
#: A tmp folder whose owner cannot be checked (another host, no owner file) is removed after this.
STALE_TMP_SECONDS = 24 * 3600


@dataclass
class ImageSet:
    """A decoded split: uint8 ``N×H×W×3`` images (read-only memmap), int64 labels, class names.

    ``metric`` is how the dataset is scored (``"top1"`` or ``"mean_per_class"``); ``skipped`` names
    the files left out under ``on_error="skip"``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    split: str
    metric: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ImageSet({self.name!r}, split={self.split!r}, images={tuple(self.images.shape)}, "
            f"classes={len(self.classes)}, metric={self.metric!r}, skipped={len(self.skipped)})"
        )


# --------------------------------------------------------------------------------------------------
# public entry points


def load(name_or_path: str, split: str, size: int | None = None, on_error: str = "raise") -> ImageSet:
    """Decoded images of one split of a named dataset or a path, from the cache (built on first use).

    ``size``: resize every image (shorter side to ``size``, bicubic, centre crop ``size×size``);
    ``None`` keeps the native size, which requires all images of the split to share one size.
    ``on_error``: ``"raise"`` stops at the first undecodable file, naming it; ``"skip"`` leaves such
    files out, logs them and lists them in ``ImageSet.skipped``. Entries that leave their folder
    (:meth:`Source.unsafe`: a zip member ``train/../../x.png``) are never
    read: ``"raise"`` refuses the dataset before any cache is written, ``"skip"`` lists them in
    ``skipped`` too — for every split, as such an entry belongs to none.
    ``split`` ``"train"``/``"test"`` also select the dataset's train/test role when no split of that
    name exists (e.g. ``"test"`` is ``"val"`` for tinyimagenet100).
    """
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if size is not None and (int(size) != size or size < 1):
        raise UserError(f"size must be a positive int or None, got {size!r}")
    name, path, metric, roles = _locate(name_or_path)
    split = roles.get(split, split)
    with open_source(path) as source:
        root = cache_dir("images")
        _remove_stale_tmp(root)
        identity = source.identity()  # cheap (stat) for zips and CIFAR: a cache hit never lists the data
        final = root / cache_key(identity, split, size, name)
        meta = _read_meta(final)
        if meta is None and split not in source.splits():  # a role of a path dataset ("test" -> "val")
            train, test, _ = split_roles(source.splits())
            split = _role_split(source, split, train, test)
            final = root / cache_key(identity, split, size, name)
            meta = _read_meta(final)
        if meta is None:
            if final.exists():  # damaged (files deleted by hand): rebuild it
                shutil.rmtree(final, ignore_errors=True)
            meta = _build(source, split, size, on_error, final)
    if on_error == "raise" and meta.get("unsafe"):  # a cache built under skip does not hide them
        raise sources.unsafe_error(source, meta["unsafe"])
    if on_error == "raise" and meta["skipped"]:
        raise DecodeError(
            f"{len(meta['skipped'])} files of {name}/{split} could not be decoded (cached at {final}), "
            f"e.g. {meta['skipped'][0]}; {SKIP_HINT}"
        )
    images = np.memmap(final / "images.u8", dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    labels = np.load(final / "labels.npy")
    labels.setflags(write=False)
    return ImageSet(images, labels, list(meta["classes"]), name, split, metric, list(meta["skipped"]))


def from_arrays(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str] | None = None,
    name: str = "arrays",
    split: str = "all",
    size: int | None = None,
) -> ImageSet:
    """An :class:`ImageSet` from in-memory uint8 arrays (``N×H×W×3`` or grey ``N×H×W``), not cached.

    With ``size`` the images are resized as in :func:`load`; otherwise they are used as they are.
    """
    source = ArraySource(images, labels, classes, split)
    if size is not None:
        data = np.stack([sources.decode(it.data, size) for it in source.items(split)])
    elif np.ndim(images) == 3:  # grey N×H×W: replicate to RGB
        data = np.repeat(np.asarray(images)[..., None], 3, axis=3)
    else:
        data = np.array(images, dtype=np.uint8)  # a copy, so the caller's array stays theirs
    data.setflags(write=False)
    return ImageSet(data, source.labels(split), source.classes, name, split, "top1", [])


def cache_key(identity: dict, split: str, size: int | None, name: str = "data") -> str:
    """Folder name of a cache: readable prefix + hash of everything the decoded bytes depend on."""
    blob = json.dumps(
        {"source": identity, "split": split, "size": size, "format": FORMAT_VERSION}, sort_keys=True
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    def safe(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]

    return f"{safe(name)}-{safe(split)}-{size or 'native'}-{digest}"


# --------------------------------------------------------------------------------------------------
# building


def _locate(name_or_path: str | os.PathLike) -> tuple[str, Path, str, dict[str, str]]:
    """(name, path, metric, role aliases) without listing the data (a path is only stat-ed)."""
    value = os.fspath(name_or_path)
    if value in names() and not isinstance(name_or_path, Path):
        spec = resolve(value)
        assert spec.path is not None
        roles = {r: s for r, s in (("train", spec.train_split), ("test", spec.test_split))
                 if s is not None and r not in spec.splits}
        return spec.name, spec.path, spec.metric, roles
    path = Path(value).expanduser()
    if not path.exists():
        resolve(value)  # raises the error that names what was looked for and the fix
    return path_name(path), path.resolve(), "top1", {}


def _role_split(source: Source, split: str, train: str, test: str | None) -> str:
    available = source.splits()
    if split in available:
        return split
    role = {"train": train, "test": test}.get(split)
    if role in available:
        return role
    raise UnknownName(f"split {split!r} not found in {source.path}; it has {available}. Pass one of those.")


def _workers() -> int:
    env = os.environ.get("SELFSUP_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def _chunks(items: Iterator[Item], n: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decoded(
    source: Source, split: str, size: int | None, workers: int
) -> Iterator[tuple[list[Item], sources.ChunkResult]]:
    """Yield (chunk items, decode result) in source order, in-process or through a process pool.

    The main process reads the encoded bytes (sequential I/O, one open zip) and the workers only
    decode; at most ``2·workers`` chunks are in flight, so memory stays bounded on huge splits. If
    the pool breaks (a worker killed, or a script without an ``if __name__ == "__main__":`` guard,
    which spawned workers re-import), decoding continues in this process with a warning.
    """
    chunks = _chunks(source.items(split), CHUNK)
    arrays_as_is = size is None and isinstance(source, (CifarSource, ArraySource))  # nothing to decode
    if workers <= 1 or arrays_as_is or source.count(split) < POOL_MIN_ITEMS:
        for chunk in chunks:
            yield chunk, sources.decode_chunk([it.data for it in chunk], size)
        return
    # spawn, not fork: the parent may hold torch/CUDA threads, which a forked child can deadlock on
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[tuple[list[Item], Future | None]] = deque()
    broken = False

    def give_up(exc: BaseException) -> None:
        nonlocal broken
        if not broken:
            broken = True
            log.warning("decode workers failed (%s); decoding in this process. Scripts that call "
                        "load() must guard their entry point with if __name__ == '__main__':", exc)

    def finish(chunk: list[Item], fut: Future | None) -> sources.ChunkResult:
        if fut is not None and not broken:
            try:
                return fut.result()
            except BrokenProcessPool as exc:
                give_up(exc)
        return sources.decode_chunk([it.data for it in chunk], size)

    try:
        for chunk in chunks:
            fut = None
            if not broken:
                try:
                    fut = pool.submit(sources.decode_chunk, [it.data for it in chunk], size)
                except BrokenProcessPool as exc:
                    give_up(exc)
            pending.append((chunk, fut))
            if len(pending) >= 2 * workers:
                yield pending[0][0], finish(*pending.popleft())
        while pending:
            yield pending[0][0], finish(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _build(source: Source, split: str, size: int | None, on_error: str, final: Path) -> dict:
    """Decode ``split`` into a tmp folder beside ``final`` and rename it into place; return its meta."""
    if on_error == "raise" and source.unsafe():  # refuse before writing anything
        raise sources.unsafe_error(source, source.unsafe())
    tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    (tmp / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        meta = _write(source, split, size, on_error, tmp)
        meta["key"] = final.name
        write_json(tmp / "meta.json", meta)  # last: its presence marks a finished cache
        (tmp / "owner.json").unlink()
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            if _read_meta(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return _read_meta(final) or meta
        fsync_dir(final.parent)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(source: Source, split: str, size: int | None, on_error: str, out: Path) -> dict:
    n = source.count(split)
    workers = _workers()
    start = time.perf_counter()
    labels = np.empty(n, dtype=np.int64)
    unsafe = source.unsafe()  # left out at listing (on_error is "skip" here): counted as skipped
    skipped: list[str] = list(unsafe)
    images: np.memmap | None = None
    first = ("", (0, 0))
    pos = 0
    for chunk, result in _decoded(source, split, size, workers):
        for p, message in result.errors:
            name = chunk[p].name
            if on_error == "raise":
                raise DecodeError(f"cannot decode {source.describe(name)} ({message}); {SKIP_HINT}")
            skipped.append(name)
        for p, img in zip(result.positions, result.images, strict=True):
            if images is None:  # the first image fixes H×W (known up front only when size is given)
                first = (chunk[p].name, img.shape[:2])
                images = np.memmap(out / "images.u8", dtype=np.uint8, mode="w+", shape=(n, *img.shape[:2], 3))
            if img.shape[:2] != images.shape[1:3]:
                (h0, w0), (h1, w1) = first[1], img.shape[:2]
                raise UserError(
                    f"images of split {split!r} in {source.path} differ in size: {first[0]} is {w0}x{h0} "
                    f"but {source.describe(chunk[p].name)} is {w1}x{h1}; pass size=N to resize the "
                    f"shorter side to N and centre-crop NxN (e.g. size={min(h0, w0)})"
                )
            images[pos] = img
            labels[pos] = chunk[p].label
            pos += 1
    if images is None:
        why = "has no images" if n == 0 else f"has no decodable image ({len(skipped)} skipped)"
        raise DecodeError(f"split {split!r} of {source.path} {why}; check the data or pick another split")
    shape = (pos, *images.shape[1:])
    images.flush()
    del images  # unmap before truncating
    path = out / "images.u8"
    if pos < n:  # skipped files: drop the unused tail
        os.truncate(path, int(np.prod(shape)))
    fsync_path(path)
    with open(out / "labels.npy", "wb") as f:
        np.save(f, labels[:pos])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    if unsafe:
        log.warning("skipped %d entries of %s that leave their split folder: %s%s", len(unsafe), source.path,
                    ", ".join(list(unsafe)[:5]), " ..." if len(unsafe) > 5 else "")
    if bad := skipped[len(unsafe):]:
        log.warning("skipped %d undecodable images of %s split %r: %s%s", len(bad), source.path, split,
                    ", ".join(bad[:5]), " ..." if len(bad) > 5 else "")
    log.info("decoded %d images of %s split %r to %s in %.1fs (%.0f img/s, %d workers)", pos, source.path,
             split, shape, seconds, pos / max(seconds, 1e-9), workers)
    return {
        "format": FORMAT_VERSION, "shape": list(shape), "classes": list(source.classes), "split": split,
        "size": size, "skipped": skipped, "unsafe": unsafe, "source": source.identity(),
        "decode_seconds": round(seconds, 3), "workers": workers, "created": time.time(),
    }


# --------------------------------------------------------------------------------------------------
# files


def _read_meta(folder: Path) -> dict | None:
    """The meta of a complete cache folder, or None if it is missing or damaged."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        size = (folder / "images.u8").stat().st_size
        if meta.get("format") != FORMAT_VERSION or size != int(np.prod(meta["shape"])):
            return None
        if not (folder / "labels.npy").is_file():
            return None
        return meta
    except (OSError, ValueError, KeyError):
        return None


def _remove_stale_tmp(root: Path) -> None:
    """Remove tmp folders left by killed builds: owner process gone (same host), or very old."""
    host = socket.gethostname()
    for tmp in root.glob(".tmp-*"):
        try:
            age = time.time() - tmp.stat().st_mtime
        except OSError:  # removed meanwhile by its owner
            continue
        try:
            owner = json.loads((tmp / "owner.json").read_text())
            stale = owner["host"] == host and not _pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            stale = age > 3600  # no readable owner (killed while creating it, or renaming): give it an hour
        if stale or age > STALE_TMP_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
