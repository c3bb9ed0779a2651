"""Many-shot linear probe: ours vs Ericsson et al.'s scikit-learn loop, on the same features, in one run.

    python benchmarks/bench_linear.py --features FILE.npz [--device cuda] [--search early_stop]

``FILE.npz`` holds ``train_x, train_y, test_x, test_y`` (float32 features, integer labels). A seeded
20 % of train becomes the validation split (Ericsson et al.'s rule for datasets without an official
val). Without ``--features`` a stand-in is built and the output says so: 512 random ReLU features of
the real CIFAR-10 pixels in ``$SELFSUP_DATA/cifar10.zip`` (default ../shared/data), i.e. 40,000 train
× 512 after the val split, 10 classes — the shape of ResNet-18 CIFAR-10 features, not their quality.

Baseline (their code): ``LogisticRegression(C=1/wd, solver="lbfgs", max_iter=100, warm_start=True)``
fitted for each ``wd`` in ``logspace(-6, 5, 45)`` in that order, best val kept (strict ``>``), then a
refit on train+val with the chosen C, warm-started from the last fit. Prints the time of each, their
ratio, the chosen ``wd`` of each, test accuracies and their difference, then one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfsup.evaluate.linear import DEFAULT_STRENGTHS, linear_probe  # noqa: E402


def _cifar_zip() -> Path:
    root = Path(os.environ.get("SELFSUP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return root / "cifar10.zip"


def cifar10_pixels(path: Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """uint8 images (N, 32, 32, 3) and labels of both splits of an ImageFolder zip (entries in place)."""
    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".png")))
        classes = sorted({n.split("/")[1] for n in names})
        out: dict[str, np.ndarray] = {}
        for split in ("train", "test"):
            members = [n for n in names if n.startswith(split + "/")]
            if limit is not None:
                members = members[:: max(1, len(members) // limit)][:limit]
            out[f"{split}_img"] = np.stack(
                [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in members]
            )
            out[f"{split}_y"] = np.array([classes.index(n.split("/")[1]) for n in members], dtype=np.int64)
    return out


def random_relu_features(pixels: dict[str, np.ndarray], dim: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """ReLU(standardised pixels @ Gaussian projection): non-negative, like pooled ResNet features."""
    rng = np.random.default_rng(seed)
    train = pixels["train_img"].reshape(len(pixels["train_img"]), -1).astype(np.float32) / 255
    test = pixels["test_img"].reshape(len(pixels["test_img"]), -1).astype(np.float32) / 255
    mean, std = train.mean(0), train.std(0) + 1e-3
    proj = (rng.standard_normal((train.shape[1], dim)) / np.sqrt(train.shape[1])).astype(np.float32)

    def feats(a: np.ndarray) -> np.ndarray:
        return np.maximum((a - mean) / std @ proj, 0).astype(np.float32)

    return {"train_x": feats(train), "train_y": pixels["train_y"], "test_x": feats(test), "test_y": pixels["test_y"]}


def load_features(path: str | None, dim: int = 512) -> tuple[dict[str, np.ndarray], str]:
    if path:
        with np.load(path) as f:
            data = {key: f[key] for key in ("train_x", "train_y", "test_x", "test_y")}
        return data, f"features from {path}"
    zip_path = _cifar_zip()
    if not zip_path.exists():
        raise SystemExit(f"no --features given and no {zip_path} to build a stand-in from; set SELFSUP_DATA")
    data = random_relu_features(cifar10_pixels(zip_path), dim)
    return data, f"STAND-IN: {dim} random ReLU features of real CIFAR-10 pixels ({zip_path.name})"


def split_val(x: np.ndarray, y: np.ndarray, fraction: float = 0.2, seed: int = 0):
    """Seeded val split as in their code: shuffle indices with np.random.seed(seed), first 20 % are val."""
    idx = np.random.RandomState(seed).permutation(len(x))
    cut = int(np.floor(fraction * len(x)))
    return x[idx[cut:]], y[idx[cut:]], x[idx[:cut]], y[idx[:cut]]


def sklearn_loop(xtr, ytr, xva, yva, xte, yte) -> dict:
    """Ericsson et al.'s LinearTester.validate + evaluate, with the top-1 metric."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    clf = LogisticRegression(solver="lbfgs", max_iter=100, warm_start=True)
    best, best_c, val, iters = 0.0, None, {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for wd in DEFAULT_STRENGTHS:
            clf.set_params(C=1.0 / wd)
            clf.fit(xtr, ytr)
            s = 100.0 * clf.score(xva, yva)
            val[wd], iters[wd] = s, int(clf.n_iter_[0])
            if s > best:
                best, best_c = s, 1.0 / wd
        clf.set_params(C=best_c)
        clf.fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    test = 100.0 * clf.score(xte, yte)
    return {
        "seconds": time.perf_counter() - t0,
        "best_wd": 1.0 / best_c,
        "test": test,
        "val": val,
        "iterations": iters,
        "refit_iterations": int(clf.n_iter_[0]),
    }


def sklearn_converged(xtr, ytr, xte, yte, wd: float, max_iter: int = 20000) -> dict:
    """scikit-learn at one strength, iterated to its tolerance: the optimum both solvers aim at."""
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    clf = LogisticRegression(C=1.0 / wd, solver="lbfgs", max_iter=max_iter).fit(xtr, ytr)
    return {"seconds": time.perf_counter() - t0, "test": 100.0 * clf.score(xte, yte), "iterations": int(clf.n_iter_[0])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", help="npz with train_x, train_y, test_x, test_y")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--search", default="auto", choices=["auto", "path", "early_stop", "batched"])
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--skip-baseline", action="store_true", help="only time ours")
    ap.add_argument("--repeats", type=int, default=1, help="time ours this many times, report the best")
    ap.add_argument("--reference", action="store_true",
                    help="also refit scikit-learn to convergence (max_iter 20000) at our chosen wd on train+val: "
                         "checks that ours reaches the same optimum when their 100-iteration loop does not")
    args = ap.parse_args(argv)

    data, source = load_features(args.features)
    xtr, ytr, xva, yva = split_val(data["train_x"].astype(np.float32), data["train_y"].astype(np.int64))
    xte, yte = data["test_x"].astype(np.float32), data["test_y"].astype(np.int64)
    k = int(max(ytr.max(), yva.max(), yte.max())) + 1
    print(source)
    print(f"train {xtr.shape}, val {xva.shape}, test {xte.shape}, {k} classes; torch threads "
          f"{torch.get_num_threads()}, device {args.device}")

    tensors = [torch.from_numpy(a) for a in (xtr, ytr, xva, yva, xte, yte)]
    if args.device.startswith("cuda"):
        tensors = [t.to(args.device) for t in tensors]
        linear_probe(*tensors, num_classes=k, device=args.device, search=args.search, max_iter=3)  # warm-up
        torch.cuda.synchronize()
    ours = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = linear_probe(*tensors, num_classes=k, device=args.device, search=args.search, max_iter=args.max_iter)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if ours is None or seconds < ours[1]:
            ours = (r, seconds)
    r, ours_s = ours
    n_conv = sum(r.converged.values())
    best_of = f" (best of {args.repeats})" if args.repeats > 1 else ""
    print(f"ours  ({r.search}, {args.device}){best_of}: {ours_s:7.2f} s  wd={r.best_wd:.4g}  test={r.test_score:.2f}  "
          f"fitted {len(r.val_scores)}/{len(DEFAULT_STRENGTHS)} strengths, {n_conv} converged, "
          f"{sum(r.iterations.values())} iterations, refit {r.refit_iterations} it "
          f"(converged={r.refit_converged}); skipped {len(r.skipped)}")
    for note in r.notes:
        print("   ", note)

    out = {
        "source": source, "device": args.device, "search": r.search,
        "ours_s": round(ours_s, 3), "ours_wd": r.best_wd, "ours_test": round(r.test_score, 3),
        "ours_fitted": len(r.val_scores), "ours_skipped": len(r.skipped),
        "ours_iterations": sum(r.iterations.values()), "ours_refit_converged": r.refit_converged,
    }
    if not args.skip_baseline:
        base = sklearn_loop(xtr, ytr, xva, yva, xte, yte)
        print(f"sklearn loop (cpu):        {base['seconds']:7.2f} s  wd={base['best_wd']:.4g}  "
              f"test={base['test']:.2f}  {sum(base['iterations'].values())} iterations, "
              f"refit {base['refit_iterations']} it")
        ratio = base["seconds"] / ours_s
        diff = r.test_score - base["test"]
        print(f"speed-up {ratio:.1f}x; test accuracy ours - sklearn = {diff:+.2f} points; "
              f"same wd: {np.isclose(r.best_wd, base['best_wd'])}")
        print("wd        sklearn-val  ours-val   sk-it ours-it conv")
        for wd in DEFAULT_STRENGTHS:
            ov = f"{r.val_scores[wd]:8.2f}" if wd in r.val_scores else "  skipped"
            oi = f"{r.iterations[wd]:6d}  {r.converged[wd]!s:5}" if wd in r.iterations else ""
            print(f"{wd:9.3g} {base['val'][wd]:9.2f} {ov}   {base['iterations'][wd]:5d} {oi}")
        out.update({
            "sklearn_s": round(base["seconds"], 3), "sklearn_wd": base["best_wd"],
            "sklearn_test": round(base["test"], 3), "speedup": round(ratio, 2), "test_diff": round(diff, 3),
        })
    if args.reference:
        ref = sklearn_converged(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), xte, yte, r.best_wd)
        print(f"sklearn converged at wd={r.best_wd:.4g}: test={ref['test']:.2f} after {ref['iterations']} iterations "
              f"({ref['seconds']:.1f} s); ours - converged sklearn = {r.test_score - ref['test']:+.2f} points")
        out.update({"reference_test": round(ref["test"], 3), "reference_iterations": ref["iterations"],
                    "reference_diff": round(r.test_score - ref["test"], 3)})
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
