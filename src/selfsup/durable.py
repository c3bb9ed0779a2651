"""Durable writes: what a run or a cache writes survives a kill at any instant.

Pattern used across selfsup: write into a temporary path beside the target, fsync the files and the
directory, then rename into place (atomic on POSIX), and fsync the parent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename still holds
        pass


def write_json(path: Path, obj: dict) -> None:
    """Write JSON and fsync it (the caller renames the enclosing temporary directory into place)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str, fix: str) -> None:
    """Refuse, before any work, an output ``path`` that could not be written: under a file, or on a read-only
    or permission-denied folder. Nothing is created (a probe file is written beside and removed)."""
    from selfsup.errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; {fix}")
    base = nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{what} {path} cannot be created: {base} is a file, not a folder; {fix}")
    try:  # os.access says yes to root even on a read-only mount; only a write tells
        fd, probe = tempfile.mkstemp(prefix=".selfsup-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{what} {path} cannot be written ({err.strerror} in {base}); {fix}") from err


def check_free_space(path: Path, need_bytes: int, what: str, fix: str) -> None:
    """Refuse, before any work, an output whose filesystem has less than ``need_bytes`` free."""
    from selfsup.errors import UserError

    base = nearest_existing(Path(path))
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise UserError(f"{what} {path}: {free / 2**20:,.0f} MiB free on its disk, {need_bytes / 2**20:,.0f} MiB "
                        f"needed; {fix}")
