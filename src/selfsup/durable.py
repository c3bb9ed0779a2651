"""Durable writes: what a run or a cache writes survives a kill at any instant.

Pattern used across selfsup: write into a temporary path beside the target, fsync the files and the
directory, then rename into place (atomic on POSIX), and fsync the parent.
"""

from __future__ import annotations

import json
import os
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
