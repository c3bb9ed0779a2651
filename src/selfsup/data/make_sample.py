"""Build the bundled sample: a class-balanced, seeded CIFAR-10 subset as a small ImageFolder zip.

Usage::

    python -m selfsup.data.make_sample /path/to/cifar10.zip src/selfsup/data/sample/cifar10_sample.zip

Each class keeps ``train`` (default 500) train and ``test`` (default 100) test images, chosen by
``random.Random(seed)`` from the sorted member names, and copied byte for byte (the original JPEGs,
no re-encoding) into a zip of stored entries ``<split>/<class>/<file>`` with fixed timestamps, so the
same input and seed give the same bytes. If the zip would exceed ``max_bytes`` (6,000,000), both
counts shrink together in their 5:1 ratio until it fits, and the reduction is printed. Subsets are
nested: a smaller sample is a prefix of each class's seeded order.

The committed ``cifar10_sample.zip`` was built from ``../shared/data/cifar10.zip`` with the defaults:
500/100 per class would be ~6.25 MB, so it holds 480 train + 96 test per class (4,800 + 960 images,
5,970,450 bytes). The registry name ``"sample"`` points at it; it is what tests, quickstarts and the CPU
configs run on when no data root is set.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import zipfile
from pathlib import Path

from selfsup.errors import UserError

from .sources import ZipSource

MAX_BYTES = 6_000_000
_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the zip is reproducible byte for byte


def _seeded_orders(source: ZipSource, seed: int) -> dict[str, dict[int, list[str]]]:
    """Per split, per class: the member names in a seeded random order."""
    orders: dict[str, dict[int, list[str]]] = {}
    for split in ("train", "test"):
        by_class: dict[int, list[str]] = {}
        for name, label in zip(source.names(split), source.labels(split), strict=True):
            by_class.setdefault(int(label), []).append(name)
        rng = random.Random(f"{seed}/{split}")
        orders[split] = {c: rng.sample(sorted(names), len(names)) for c, names in sorted(by_class.items())}
    return orders


def _zip_bytes(source: ZipSource, orders: dict[str, dict[int, list[str]]], counts: dict[str, int]) -> bytes:
    buf = io.BytesIO()
    members = sorted(
        name for split, by_class in orders.items() for names in by_class.values() for name in names[: counts[split]]
    )
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as out:
        for name in members:
            # <split>/<class>/<file>, dropping any wrapper folder of the source zip
            info = zipfile.ZipInfo("/".join(name.split("/")[-3:]), date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            out.writestr(info, source.read(name))
    return buf.getvalue()


def make_sample(
    src: str | Path, dst: str | Path, train: int = 500, test: int = 100, seed: int = 0,
    max_bytes: int = MAX_BYTES,
) -> dict[str, int]:
    """Write the sample zip to ``dst``; return the per-class counts used, the totals and the size in bytes."""
    with ZipSource(src) as source:
        missing = {"train", "test"} - set(source.splits())
        if missing:
            raise UserError(f"{src} lacks split(s) {sorted(missing)}; pass the CIFAR-10 ImageFolder zip")
        orders = _seeded_orders(source, seed)

        def counts_for(t: int) -> dict[str, int]:  # t test images per class, train in the asked ratio
            return {"train": max(1, round(t * train / test)), "test": t}

        data = _zip_bytes(source, orders, counts_for(test))
        best = test
        if len(data) > max_bytes:
            # the size grows with t (subsets are nested): binary-search the largest t that fits
            lo, hi, data = 0, test, b""
            while lo < hi:
                mid = (lo + hi + 1) // 2
                candidate = _zip_bytes(source, orders, counts_for(mid))
                if len(candidate) <= max_bytes:
                    lo, data = mid, candidate
                else:
                    hi = mid - 1
            if lo == 0:
                raise UserError(f"even one image per class exceeds max_bytes={max_bytes:,}")
            best = lo
            counts = counts_for(best)
            print(f"{train}/{test} images per class would exceed {max_bytes:,} bytes; reduced evenly to "
                  f"{counts['train']}/{counts['test']} per class", file=sys.stderr)
        counts = counts_for(best)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(data)
    n_classes = len(orders["train"])
    return {
        "train_per_class": counts["train"], "test_per_class": counts["test"],
        "train": counts["train"] * n_classes, "test": counts["test"] * n_classes, "bytes": len(data),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfsup.data.make_sample", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("src", help="CIFAR-10 ImageFolder zip (e.g. ../shared/data/cifar10.zip)")
    parser.add_argument("dst", help="output zip (src/selfsup/data/sample/cifar10_sample.zip)")
    parser.add_argument("--train", type=int, default=500, help="train images per class (default 500)")
    parser.add_argument("--test", type=int, default=100, help="test images per class (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    args = parser.parse_args(argv)
    info = make_sample(args.src, args.dst, args.train, args.test, args.seed, args.max_bytes)
    print(f"wrote {args.dst}: {info['train']} train + {info['test']} test images "
          f"({info['train_per_class']}/{info['test_per_class']} per class), {info['bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
