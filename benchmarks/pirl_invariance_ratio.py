"""PIRL's invariance figure (Fig. 4) set against how far apart different images are: for a PIRL or Jigsaw run,
the mean unit-l2 distance between f(v_I) and g(v_I^t) of the same image ("own", the histogram's mean) and
between f(v_I) and g(v_I'^t) of different images ("other"), and their ratio. A network that has not learned
maps every image close to every other, so a small own distance alone can mean collapse as much as
invariance; a ratio well below 1 means the transformed image stays nearest its own original.

Usage: python benchmarks/pirl_invariance_ratio.py RUN_DIR... [--data tinyimagenet100] [--images 1024]
(the images are the held-out split decoded at the run's data.size, as ``selfsup invariance``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from selfsup.config import read_yaml
from selfsup.data import load
from selfsup.data.registry import resolve
from selfsup.evaluate import invariance


def own_and_other(method, images: np.ndarray, representation: str, bn: str, seed: int = 0) -> tuple[float, float]:
    f, g = invariance.invariance_pairs(method, images, seed, representation=representation, bn=bn)
    d = torch.cdist(f, g)
    n = len(d)
    own = d.diagonal().mean().item()
    return own, (d.sum().item() - d.diagonal().sum().item()) / (n * (n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data", default="tinyimagenet100")
    parser.add_argument("--images", type=int, default=1024)
    args = parser.parse_args()
    spec = resolve(args.data)
    for run in args.runs:
        method = invariance.load_method(run)
        size = (read_yaml(f"{run}/config.yaml").get("data") or {}).get("size")
        images = load(args.data, spec.test_split, size=size).images[:args.images]
        for representation in invariance.REPRESENTATIONS[method.name]:
            for bn in invariance.BN_MODES:
                own, other = own_and_other(method, images, representation, bn)
                print(f"{method.name:7} {representation:5} BN {bn:7} own {own:.3f}  other {other:.3f}  "
                      f"ratio {own / other:.3f}", flush=True)


if __name__ == "__main__":
    main()
