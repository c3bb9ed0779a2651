"""Named datasets: where each lives under the data root, its splits, and how it is scored.

A name resolves to a :class:`DatasetSpec` whose ``path`` points at the data. Named datasets are looked
up under ``SELFSUP_DATA`` (:func:`selfsup.paths.data_root`) as ``<root>/<file>`` (``cifar10.zip``),
an extracted folder ``<root>/<name>/``, or (CIFAR-10) the official ``cifar-10-batches-py/`` or
``cifar-10-python.tar.gz``. ``"sample"`` is the bundled CIFAR-10 subset and needs no data root.
Any path to a zip, folder or CIFAR pickles resolves too; its splits are discovered.

Split roles (Ericsson et al. 2021, §3): models are fit on ``train_split`` and scored on
``test_split``; hyperparameters are chosen on ``val_split`` when the dataset has an official one
(Flowers-102), otherwise on a seeded 20% of train (:func:`train_val_split`). Tiny ImageNet's
official ``val`` set is the only labelled held-out set it has (its test labels were never
published), so for ``tinyimagenet100`` ``val`` plays the **test** role and validation is carved from
train, like every dataset without an official val split.

Metrics follow Ericsson et al.: mean per-class accuracy for Flowers-102 and Caltech-101, top-1 for
the rest. ISIC 2018 (their cross-domain few-shot set) is heavily imbalanced (72% one class), so it is
scored by mean per-class accuracy: top-1 would reward predicting ``nv`` everywhere.

Example::

    spec = resolve("flowers102")      # DatasetSpec(name='flowers102', ..., val_split='val', metric='mean_per_class')
    tr, va = train_val_split(labels)  # when spec.val_split is None
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.errors import UnknownName, UserError
from selfsup.paths import data_root

from .sources import open_source

SAMPLE_PATH = Path(__file__).resolve().parent / "sample" / "cifar10_sample.zip"
METRICS = ("top1", "mean_per_class")


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: where, which splits play which role, and how it is scored.

    ``file`` is the name looked for under the data root (or the full path for path datasets);
    ``also`` lists other accepted forms under the root; ``path`` is filled in by :func:`resolve`.
    ``resolution`` is the native image side in pixels (``None`` when unknown or mixed).
    ``test_split`` is ``None`` for a path dataset with neither ``test`` nor ``val``.
    """

    name: str
    file: str
    num_classes: int
    splits: tuple[str, ...]
    train_split: str
    test_split: str | None
    val_split: str | None
    metric: str
    resolution: int | None
    description: str = ""
    also: tuple[str, ...] = ()
    path: Path | None = None


_NAMED: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "cifar10", "cifar10.zip", 10, ("train", "test"), "train", "test", None, "top1", 32,
            "CIFAR-10: 50k train / 10k test, 32x32, 10 classes (top-1)",
            also=("cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ),
        DatasetSpec(
            "tinyimagenet100", "tinyimagenet100.zip", 100, ("train", "val"), "train", "val", None, "top1", 64,
            "Tiny ImageNet, 100 classes: 30k train / 5k val (val is the test role), 64x64 (top-1)",
        ),
        DatasetSpec(
            "eurosat", "eurosat.zip", 10, ("train", "test"), "train", "test", None, "top1", 64,
            "EuroSAT RGB satellite tiles: 4.8k train / 1.2k test, 64x64, 10 classes (top-1)",
        ),
        DatasetSpec(
            "flowers102", "flowers102.zip", 102, ("train", "val", "test"), "train", "test", "val",
            "mean_per_class", 96,
            "Oxford Flowers-102, official split 1020/1020/6149, 96x96 (mean per-class accuracy)",
        ),
        DatasetSpec(
            "caltech101", "caltech101.zip", 102, ("train", "test"), "train", "test", None, "mean_per_class",
            96, "Caltech-101 + background: 3060 train / 6084 test, 96x96 (mean per-class accuracy)",
        ),
        DatasetSpec(
            "isic2018", "isic2018.zip", 7, ("train", "test"), "train", "test", None, "mean_per_class", 96,
            "ISIC 2018 Task 3 dermoscopy: 5,984 train / 1,512 test, 96x96, 7 classes, nv is 72% of train "
            "(mean per-class accuracy)",
        ),
        DatasetSpec(
            "sample", SAMPLE_PATH.name, 10, ("train", "test"), "train", "test", None, "top1", 32,
            "bundled CIFAR-10 subset: 4,800 train / 960 test, class-balanced, always available (top-1)",
        ),
    )
}


def names() -> dict[str, str]:
    """Named datasets and a one-line description of each, for ``selfsup list datasets``."""
    return {name: spec.description for name, spec in _NAMED.items()}


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".zip", ".tar.gz", ".tgz")) or value in (".", "..")


def resolve(name_or_path: str | os.PathLike) -> DatasetSpec:
    """The spec of a named dataset (located under the data root) or of a path to data.

    A registered name wins over a same-named folder in the working directory; write ``./cifar10``
    to mean the folder.
    """
    value = os.fspath(name_or_path)
    if not value.strip():
        raise UserError("the dataset is an empty string; pass a registered name (see `selfsup list datasets`) or "
                        "a path to a zip, an ImageFolder folder or CIFAR pickles")
    if value in _NAMED and not isinstance(name_or_path, Path):
        return _resolve_named(_NAMED[value])
    path = Path(value).expanduser()
    if path.exists():
        return _resolve_path(path)
    if _looks_like_path(value) or isinstance(name_or_path, Path):
        raise FileNotFoundError(
            f"dataset path {path.resolve()} does not exist; pass an existing zip, ImageFolder folder or "
            f"CIFAR pickles, or one of the names {sorted(_NAMED)}"
        )
    raise UnknownName(
        f"unknown dataset {value!r}: not a registered name ({', '.join(sorted(_NAMED))}) and no file or "
        f"folder of that name in {Path.cwd()}; pass a registered name or a path"
    )


def _resolve_named(spec: DatasetSpec) -> DatasetSpec:
    if spec.name == "sample":
        if not SAMPLE_PATH.is_file():
            raise FileNotFoundError(
                f"the bundled sample {SAMPLE_PATH} is missing; rebuild it with "
                f"python -m selfsup.data.make_sample /path/to/cifar10.zip {SAMPLE_PATH}"
            )
        return dataclasses.replace(spec, path=SAMPLE_PATH)
    root = data_root()
    candidates = (spec.file, spec.name, *spec.also)
    if root is None:
        raise FileNotFoundError(
            f"dataset {spec.name!r} is looked for under the data root, but SELFSUP_DATA is not set; "
            f"set SELFSUP_DATA=/path/to/data (a folder holding {' or '.join(candidates)}) or pass a path"
        )
    for candidate in candidates:
        path = root / candidate
        if path.exists():
            return dataclasses.replace(spec, path=path.resolve())
    raise FileNotFoundError(
        f"dataset {spec.name!r} not found: looked for {', '.join(str(root / c) for c in candidates)} "
        f"(SELFSUP_DATA={root}); set SELFSUP_DATA=/path/to/data where {spec.file} is, or pass a path"
    )


def _resolve_path(path: Path) -> DatasetSpec:
    path = path.resolve()
    with open_source(path) as source:
        splits = tuple(source.splits())
        num_classes = len(source.classes)
    train, test, val = split_roles(splits)
    return DatasetSpec(
        name=path_name(path), file=str(path), num_classes=num_classes, splits=splits, train_split=train,
        test_split=test, val_split=val, metric="top1", resolution=None,
        description=f"{path} ({num_classes} classes, splits {', '.join(splits)})", path=path,
    )


def split_roles(splits: tuple[str, ...] | list[str]) -> tuple[str, str | None, str | None]:
    """(train, test, val) roles of discovered splits: test is ``test``, else ``val``; val is ``val``
    only when ``test`` also exists; train is ``train``, else the first split left."""
    test = "test" if "test" in splits else "val" if "val" in splits else None
    val = "val" if test == "test" and "val" in splits else None
    train = "train" if "train" in splits else next((s for s in splits if s not in (test, val)), splits[0])
    return train, test, val


def path_name(path: Path) -> str:
    """A dataset name for a path: its file name without .zip / .tar.gz."""
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".zip"):
        name = name.removesuffix(suffix)
    return name


def train_val_split(
    n_or_labels: int | np.ndarray | list[int], seed: int = 0, fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``fraction`` of train held out for validation, when there is no official val split.

    Ericsson et al. (2021, §3) select hyperparameters on a 20% validation split of the training set.
    Given labels, the split is **stratified**: each class keeps ``round(fraction · count)`` images
    for val (at least one when the class has two or more), so rare classes are represented. Given an
    int ``n``, it is a plain random subset of ``round(fraction · n)``. Returns sorted int64 index
    arrays ``(train_idx, val_idx)``; the same (labels, seed, fraction) always gives the same split.
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    if isinstance(n_or_labels, (int, np.integer)):
        n = int(n_or_labels)
        val = rng.permutation(n)[: int(round(fraction * n))]
    else:
        labels = np.asarray(n_or_labels).reshape(-1)
        n = len(labels)
        picks = []
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            k = int(round(fraction * len(members)))
            if k == 0 and len(members) >= 2:
                k = 1
            picks.append(rng.permutation(members)[:k])
        val = np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def per_class_subset(labels: np.ndarray | list[int], per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random ``per_class`` images of every class (all of a class that has
    fewer). For probing on a fixed number of labelled images per class: CPU-sized studies, few-shot."""
    if per_class < 1:
        raise UserError(f"per_class must be a positive int, got {per_class!r}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.empty(0, dtype=np.int64)
