"""Where selfsup reads data and keeps its caches and results.

- ``SELFSUP_DATA``: the data root holding named datasets (``cifar10.zip`` or a ``cifar10/`` folder, ...).
- ``SELFSUP_HOME``: caches (decoded images, features) and the results store; default ``~/.selfsup``.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    path = Path(os.environ.get("SELFSUP_HOME", Path.home() / ".selfsup")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(kind: str) -> Path:
    """A subfolder of the cache, e.g. ``cache_dir("images")`` or ``cache_dir("features")``."""
    path = home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_root() -> Path | None:
    value = os.environ.get("SELFSUP_DATA")
    return Path(value).expanduser() if value else None


def default_store() -> Path:
    return Path(os.environ.get("SELFSUP_STORE", home() / "results.sqlite")).expanduser()
