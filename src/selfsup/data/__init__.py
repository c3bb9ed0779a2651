"""Data: sources (folder, zip, CIFAR pickles, arrays) -> decode once to a uint8 memmap -> device batches.

Example::

    from selfsup.data import load, DeviceImages
    train = load("cifar10", "train")                   # ImageSet: uint8 N×H×W×3 memmap + labels
    batches = DeviceImages(train, device="cuda")       # GPU-resident when it fits
    x = batches.get(torch.arange(256))                 # uint8 256×3×32×32, channels_last

``DeviceImages`` is imported lazily: decode workers import this package and need no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cache import ImageSet, from_arrays, load
from .registry import DatasetSpec, names, per_class_subset, resolve, train_val_split
from .sources import (
    ArraySource,
    CifarSource,
    DecodeError,
    FolderSource,
    Item,
    Source,
    ZipSource,
    decode,
    open_source,
)

if TYPE_CHECKING:
    from .loader import DeviceImages

__all__ = [
    "ArraySource", "CifarSource", "DatasetSpec", "DecodeError", "DeviceImages", "FolderSource", "ImageSet",
    "Item", "Source", "ZipSource", "decode", "from_arrays", "load", "names", "open_source", "resolve",
    "per_class_subset",
    "train_val_split",
]


def __getattr__(name: str) -> Any:
    if name == "DeviceImages":  # torch is heavy; only the training side needs it
        from .loader import DeviceImages

        return DeviceImages
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
