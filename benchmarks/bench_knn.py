"""Weighted kNN (Wu et al. 2018): ours vs scikit-learn's KNeighborsClassifier on the same features.

    python benchmarks/bench_knn.py --features FILE.npz [--device cuda] [--k 200] [--temperature 0.1]

Features as for bench_linear.py (``train_x, train_y, test_x, test_y``; without ``--features`` the same
CIFAR-10 random-ReLU stand-in, and the output says so). The whole train split is the memory, as in
InstDisc's evaluation. Compared, in one run:

- ours (``knn_predict``) vs ``KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
  weights=w)`` with ``w(dist) = exp((1 - dist) / T)``, i.e. InstDisc's weighting (cosine distance is
  ``1 - s``): time of each, the ratio, accuracies and the share of identical predictions;
- scikit-learn's built-in ``weights="distance"`` (``1 / dist``) for reference: a different weighting,
  so a (slightly) different accuracy is expected;
- neighbour sets: the share of test rows whose k neighbours (as sets) equal ``kneighbors``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_linear import load_features  # noqa: E402

from selfsup.evaluate.knn import knn_neighbors, knn_predict  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", help="npz with train_x, train_y, test_x, test_y")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--test-limit", type=int, default=None, help="use only the first N test rows")
    args = ap.parse_args(argv)

    data, source = load_features(args.features)
    xtr, ytr = data["train_x"].astype(np.float32), data["train_y"].astype(np.int64)
    xte, yte = data["test_x"][: args.test_limit].astype(np.float32), data["test_y"][: args.test_limit].astype(np.int64)
    k_classes = int(max(ytr.max(), yte.max())) + 1
    print(source)
    print(f"memory {xtr.shape}, queries {xte.shape}, k={args.k}, T={args.temperature}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")

    train, labels, test = (torch.from_numpy(a).to(args.device) for a in (xtr, ytr, xte))
    cuda = args.device.startswith("cuda")
    knn_predict(train, labels, test[:16], k_classes, k=args.k, temperature=args.temperature)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours = knn_predict(train, labels, test, k_classes, k=args.k, temperature=args.temperature)
    if cuda:
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - t0
    ours = ours.cpu().numpy()
    ours_acc = 100.0 * float((ours == yte).mean())

    from sklearn.neighbors import KNeighborsClassifier

    temperature = args.temperature

    def instdisc_weights(dist: np.ndarray) -> np.ndarray:
        return np.exp((1.0 - dist) / temperature)

    t0 = time.perf_counter()
    sk = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute", weights=instdisc_weights)
    sk_pred = sk.fit(xtr, ytr).predict(xte)
    sk_s = time.perf_counter() - t0
    sk_acc = 100.0 * float((sk_pred == yte).mean())
    agree = 100.0 * float((sk_pred == ours).mean())

    t0 = time.perf_counter()
    sk_dist = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute", weights="distance")
    dist_acc = 100.0 * float((sk_dist.fit(xtr, ytr).predict(xte) == yte).mean())
    dist_s = time.perf_counter() - t0

    # Neighbour sets: ours (top-k of cosine similarity) vs sklearn's kneighbors, on up to 1000 queries.
    m = min(1000, len(xte))
    _, idx = knn_neighbors(train, test[:m], k=args.k)
    sk_idx = sk.kneighbors(xte[:m], return_distance=False)
    same = [set(a) == set(b) for a, b in zip(idx.cpu().numpy(), sk_idx, strict=True)]
    overlap = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(idx.cpu().numpy(), sk_idx, strict=True)])

    print(f"ours:                          {ours_s:7.2f} s  top-1 {ours_acc:.2f}")
    print(f"sklearn, InstDisc weights:     {sk_s:7.2f} s  top-1 {sk_acc:.2f}  (same prediction on {agree:.2f} %)")
    print(f"sklearn, weights='distance':   {dist_s:7.2f} s  top-1 {dist_acc:.2f}  (1/dist weighting: differs)")
    print(f"speed-up {sk_s / ours_s:.1f}x; neighbour sets identical on {100 * np.mean(same):.2f} % of {m} "
          f"queries (mean overlap {100 * overlap:.3f} %; float32 ties at the k-th neighbour explain the rest)")
    out = {
        "source": source, "device": args.device, "k": args.k, "temperature": args.temperature,
        "ours_s": round(ours_s, 3), "sklearn_s": round(sk_s, 3), "speedup": round(sk_s / ours_s, 2),
        "ours_top1": round(ours_acc, 3), "sklearn_instdisc_top1": round(sk_acc, 3),
        "sklearn_distance_top1": round(dist_acc, 3), "prediction_agreement": round(agree, 3),
        "neighbour_sets_identical": round(100 * float(np.mean(same)), 3),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
