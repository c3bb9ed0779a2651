"""Write a model's cached features of a dataset's train and test splits to an .npz for the probe benchmarks.

    python benchmarks/dump_features.py --model random:resnet18 --data cifar10 --out r18_cifar10.npz
    python benchmarks/dump_features.py --model runs/bench --data sample --out bench_sample.npz

``--model`` is a run directory / backbone .safetensors, or ``random:NAME`` for a random-init copy of a
backbone (CIFAR stem, width 1, seed 0). Features go through selfsup's feature cache, so a second dump
of the same thing costs nothing. The npz holds train_x, train_y, test_x, test_y.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from selfsup.config import BackboneConfig
from selfsup.data import load
from selfsup.data.registry import resolve
from selfsup.evaluate.features import features, load_encoder, random_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.model.startswith("random:"):
        encoder = random_encoder(BackboneConfig(args.model.split(":", 1)[1], 1.0, True), seed=0)
    else:
        encoder = load_encoder(args.model)
    spec = resolve(args.data)
    start = time.perf_counter()
    xtr, ytr = features(encoder, load(args.data, spec.train_split), device=args.device)
    xte, yte = features(encoder, load(args.data, spec.test_split), device=args.device)
    print(f"{encoder.label} on {args.data}: train {tuple(xtr.shape)}, test {tuple(xte.shape)} "
          f"in {time.perf_counter() - start:.1f} s")
    np.savez(args.out, train_x=xtr.numpy(), train_y=ytr.numpy(), test_x=xte.numpy(), test_y=yte.numpy())


if __name__ == "__main__":
    main()
