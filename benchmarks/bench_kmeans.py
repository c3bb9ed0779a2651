"""Spherical k-means (``selfsup.nn.kmeans``) against scikit-learn's KMeans (Lloyd): time and peak memory.

    python benchmarks/bench_kmeans.py [--n 50000] [--d 128] [--k 3000] [--iterations 10] [--chunk-size 4096]
                                      [--also-chunk 256] [--threads 1] [--small] [--timeout 300]

``--small`` is N = 10,000, k = 500 (seconds); the default, N = 50,000 × d = 128 and k = 3,000 (a DeepCluster v2
memory on one GPU's share), takes about a minute on one thread.

The data: N unit rows, noisy copies of k random unit directions (float32), the same file for all runs. The initial
centroids: k of its rows, drawn as ``spherical_kmeans`` draws them (``randperm(N, seed)[:k]``), passed to every
run as ``init``. All do the same amount of work: ours ``iterations`` M steps and ``iterations + 1`` E steps;
scikit-learn ``KMeans(k, init=…, n_init=1, max_iter=iterations, tol=0, algorithm="lloyd", copy_x=False)``, whose
``iterations`` Lloyd steps are each an E and an M step, then one more E step (it stops earlier only if the labels
stop changing: its iteration count is printed). They are not the same algorithm past the first step
(scikit-learn's centroids are unnormalised means, ranked by Euclidean distance; tests/nn/test_kmeans.py shows
where they agree), so the adjusted Rand index between the final partitions is printed only as a description.
``copy_x=False``: scikit-learn centres X in place (and restores it) instead of copying it, so no figure counts a
copy of the data. Ours runs twice: at ``--chunk-size`` (4096 rows, DeepCluster-sized blocks meant for a GPU) and
at ``--also-chunk`` (256 rows, the chunk scikit-learn's Lloyd step uses; 0 skips this run).

How it is measured: each figure comes from a fresh Python process (``--child``) that imports its library, loads X
and the init from ``.npy`` files and warms the library up on a 512-row, 16-cluster problem (one-time set-up,
kernels and BLAS and OpenMP state, is not the clustering's memory); then it records its resident set (``VmRSS``)
as the baseline and resets the kernel's high-water mark of the resident set (``VmHWM``) to it by writing 5 to
``/proc/self/clear_refs`` (Linux >= 4.0; where that is refused, the lifetime peak ``ru_maxrss`` is used, and what
it already was before the run is printed as a floor under the figures). It runs the clustering once, timed with
``time.perf_counter``; its peak is ``VmHWM`` after it minus the baseline: the most memory the clustering held
resident at once above the data and the libraries, whatever allocated it (torch, numpy, OpenMP buffers).

That counts pages, not live objects: blocks freed to glibc's heap stay resident (its mmap threshold adapts
upwards to the largest block freed, and the heap is trimmed only past twice that), so with the default allocator
a loop that allocates and frees a B-byte block each chunk shows up to ~2-3 B. Hence two runs of each:

- "time" and "RSS peak": ``iterations`` iterations with the default allocator, what a user gets;
- "live peak": 1 iteration (every iteration allocates the same blocks) with ``MALLOC_MMAP_THRESHOLD_=131072``,
  which fixes glibc's threshold so every block over 128 KiB is mapped and unmapped, and the resident set follows
  what is allocated. (Page faults on every block make this run slower: its time is not used.)

Threads: torch's ``set_num_threads`` and threadpoolctl's limit (OpenMP and BLAS, what scikit-learn uses) are both
set to ``--threads``. Ratios are ours / scikit-learn (below 1: ours is faster / smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MB = 2**20


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(impl: str, folder: Path, args: argparse.Namespace) -> None:
    from threadpoolctl import threadpool_limits

    if impl.startswith("ours"):
        import torch

        from selfsup.nn.kmeans import spherical_kmeans

        torch.set_num_threads(args.threads)
    else:
        from sklearn.cluster import KMeans
    x, init = np.load(folder / "x.npy"), np.load(folder / "init.npy")
    with threadpool_limits(args.threads):
        small, few = x[:512], min(16, args.k, len(x))  # warm-up: lazy library set-up outside the measure
        if impl.startswith("ours"):
            spherical_kmeans(torch.from_numpy(small), few, 1, seed=0, chunk_size=64)
        else:
            KMeans(few, init=small[:few], n_init=1, max_iter=1, algorithm="lloyd").fit(small)
        baseline = _status_bytes("VmRSS")
        reset = _reset_peak()
        floor = (_status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        floor -= baseline
        start = time.perf_counter()
        if impl.startswith("ours"):
            chunk = args.chunk_size if impl == "ours" else args.also_chunk
            result = spherical_kmeans(torch.from_numpy(x), args.k, args.iterations, seed=args.seed,
                                      chunk_size=chunk, init=torch.from_numpy(init))
            labels, steps = result.assignments.numpy(), args.iterations
        else:
            km = KMeans(args.k, init=init, n_init=1, max_iter=args.iterations, tol=0.0, algorithm="lloyd",
                        copy_x=False).fit(x)
            labels, steps = km.labels_, int(km.n_iter_)
        seconds = time.perf_counter() - start
        peak = (_status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        peak -= baseline
    if not args.live:
        np.save(folder / f"labels_{impl}.npy", labels)
    print(json.dumps(dict(seconds=seconds, peak=max(peak, 0), floor=max(floor, 0), steps=steps,
                          baseline=baseline, reset=reset)))


def _data(n: int, d: int, k: int, seed: int, folder: Path) -> None:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    x = torch.randn(n, d, generator=g).mul_(0.08).add_(centres[torch.randint(k, (n,), generator=g)])
    x = F.normalize(x, dim=1)
    init = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]]   # spherical_kmeans's draw
    np.save(folder / "x.npy", x.numpy())
    np.save(folder / "init.npy", init.numpy())


def _run_child(impl: str, folder: Path, extra: list[str], env: dict[str, str], timeout: float) -> dict | None:
    command = [sys.executable, __file__, *sys.argv[1:], *extra, "--child", impl, "--folder", str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True,
                              env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        print(f"{impl}: did not finish within --timeout {timeout:g} s; stopped")
        return None
    except subprocess.CalledProcessError as e:
        print(f"{impl}: failed\n{e.stderr}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=3_000)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--also-chunk", type=int, default=256, help="ours again at this chunk size (0: not)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="N = 10,000, k = 500")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed to each implementation")
    parser.add_argument("--child", choices=["ours", "ours_also", "sklearn"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.n, args.k = 10_000, 500
    if args.child:
        _child(args.child, args.folder, args)
        return

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"N = {args.n:,} × d = {args.d}, k = {args.k:,}, {args.iterations} iterations, chunk {args.chunk_size}"
          + (f" (and {args.also_chunk})" if args.also_chunk else "") + f", {args.threads} thread(s), float32")
    impls = ("ours", "ours_also", "sklearn") if args.also_chunk else ("ours", "sklearn")
    names = {"ours": f"ours@{args.chunk_size}", "ours_also": f"ours@{args.also_chunk}", "sklearn": "sklearn"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _data(args.n, args.d, args.k, args.seed, folder)
        runs: dict[str, dict] = {}
        for impl in impls:
            timed = _run_child(impl, folder, [], {}, args.timeout)
            if timed is None:
                continue
            live = _run_child(impl, folder, ["--iterations", "1", "--live"], {"MALLOC_MMAP_THRESHOLD_": "131072"},
                              args.timeout)
            runs[impl] = dict(timed, live=live["peak"] if live else float("nan"))
        blocks = " / ".join(f"{min(c, args.n) * args.k * 4 / MB:.1f}" for c in (args.chunk_size, args.also_chunk) if c)
        print(f"X itself: {args.n * args.d * 4 / MB:.1f} MB (not counted); ours' similarity block, chunk × k float32: "
              f"{blocks} MB (N × k would be {args.n * args.k * 4 / MB:.1f} MB)")
        print(f"{'':11}{'seconds':>9}{'s / iteration':>15}{'iterations':>12}{'RSS peak MB':>13}{'live peak MB':>14}")
        for impl, r in runs.items():
            print(f"{names[impl]:11}{r['seconds']:9.2f}{r['seconds'] / max(r['steps'], 1):15.3f}{r['steps']:12d}"
                  f"{r['peak'] / MB:13.1f}{r['live'] / MB:14.1f}")
            if not r["reset"]:
                print(f"{'':11}VmHWM could not be reset: lifetime ru_maxrss used, floor {r['floor'] / MB:.1f} MB")
        if "sklearn" in runs:
            from sklearn.metrics import adjusted_rand_score

            theirs = runs["sklearn"]
            for impl in ("ours", "ours_also"):
                if impl not in runs:
                    continue
                ours = runs[impl]
                mine, other = np.load(folder / f"labels_{impl}.npy"), np.load(folder / "labels_sklearn.npy")
                print(f"ratio {names[impl]} / sklearn: time {ours['seconds'] / theirs['seconds']:.2f}, RSS peak "
                      f"{ours['peak'] / max(theirs['peak'], 1):.2f}, live peak "
                      f"{ours['live'] / max(theirs['live'], 1):.2f};  adjusted Rand index of the final partitions "
                      f"(different algorithms): "
                      f"{adjusted_rand_score(mine, other):.4f}")


if __name__ == "__main__":
    main()
