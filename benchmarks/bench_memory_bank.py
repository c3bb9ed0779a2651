"""The NCE step against a memory bank: ours (``nn.memory_bank``) vs a naive bank that copies itself every step.

    python benchmarks/bench_memory_bank.py [--sizes 100000 1000000] [--negatives 4096] [--batch 32] [--device cpu]

One step = draw N negatives per sample, read the positive and negative rows, score them (PIRL eq. 3),
the NCE loss (eq. 4), backward to the embeddings, and the bank write m ← normalise(0.5 m + 0.5 f).

- ours: ``MemoryBank.lookup`` reads only the B × (1 + N) requested rows and ``update`` writes B rows in
  place (with several processes, only those rows cross the network: see the module).
- naive (the named baseline): the whole |D| × 128 bank is copied each step, then indexed and updated in the
  copy, which becomes the bank, as a design that all-gathers the bank to every rank before sampling pays.

Both run in this process, interleaved per size, on the same seeds, and must give the same loss and the
same bank (checked). Reported: median ms per step over ``--steps`` timed steps (after one warm-up step) and
the step's peak memory above the memory held before it (CUDA: ``max_memory_allocated``; CPU: each case runs
in a fresh subprocess and reports its peak RSS, ``ru_maxrss``, minus the RSS before its first step).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfsup.losses import nce_from_scores, nce_scores  # noqa: E402
from selfsup.nn.memory_bank import MemoryBank, sample_negatives  # noqa: E402

DIM, TAU = 128, 0.07


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _step(impl: str, bank: MemoryBank, emb: torch.Tensor, step: int, size: int, negatives: int) -> float:
    g = torch.Generator().manual_seed(step)
    index = torch.randperm(size, generator=g)[: emb.shape[0]]
    neg = sample_negatives(index, negatives, size, g)
    requested = torch.cat([index[:, None], neg], 1).to(bank.memory.device)
    q = F.normalize(emb, dim=1)
    if impl == "ours":
        rows = bank.lookup(requested)
    else:
        full = bank.memory.clone()                                  # the per-step copy of the whole bank
        rows = full[requested]
    loss = nce_from_scores(nce_scores(q, rows[:, 0], rows[:, 1:], TAU), size, z=float(size))
    loss.backward()
    if impl == "ours":
        bank.update(index, q.detach())
    else:
        at = index.to(full.device)
        full[at] = F.normalize(0.5 * full[at] + 0.5 * q.detach(), dim=1)
        bank.memory = full
    return float(loss.detach())


def _case(impl: str, size: int, negatives: int, batch: int, steps: int, device: str, out=None) -> dict:
    """Time ``steps`` steps of one implementation; memory as the module docstring says."""
    torch.set_num_threads(torch.get_num_threads())
    bank = MemoryBank(size, DIM, seed=0).to(device)
    emb = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
    cuda = device.startswith("cuda")
    losses = [_step(impl, bank, emb, 0, size, negatives)]           # warm-up (not timed)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times = []
    for s in range(1, steps + 1):
        t0 = time.perf_counter()
        losses.append(_step(impl, bank, emb, s, size, negatives))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"ms": 1e3 * statistics.median(times), "peak_mib": max(0, peak - before) / 2**20, "losses": losses,
              "checksum": float(bank.memory.double().sum())}
    if out is not None:
        out.put(result)
    return result


def run_case(impl, size, negatives, batch, steps, device) -> dict:
    if device.startswith("cuda"):
        return _case(impl, size, negatives, batch, steps, device)
    ctx = mp.get_context("spawn")                                   # a fresh process: its own peak RSS
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(impl, size, negatives, batch, steps, device, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--negatives", type=int, nargs="+", default=[4096])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    print(f"device {args.device}, batch {args.batch}, dim {DIM}, {args.steps} timed steps, "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    header = (f"{'|D|':>9} {'N':>6} {'bank MiB':>8} | {'ours ms':>8} {'naive ms':>9} {'time ×':>7} | "
              f"{'ours peak MiB':>13} {'naive peak MiB':>14} {'mem ×':>6}")
    print(header + "\n" + "-" * len(header))
    for size in args.sizes:
        for n in args.negatives:
            ours = run_case("ours", size, n, args.batch, args.steps, args.device)
            naive = run_case("naive", size, n, args.batch, args.steps, args.device)
            same = ours["losses"] == naive["losses"] and abs(ours["checksum"] - naive["checksum"]) < 1e-6 * size
            row = {"size": size, "negatives": n, "ours": ours, "naive": naive, "same_result": same}
            rows.append(row)
            print(f"{size:>9} {n:>6} {size * DIM * 4 / 2**20:>8.0f} | {ours['ms']:>8.1f} {naive['ms']:>9.1f} "
                  f"{naive['ms'] / ours['ms']:>7.1f} | {ours['peak_mib']:>13.1f} {naive['peak_mib']:>14.1f} "
                  f"{naive['peak_mib'] / max(ours['peak_mib'], 1e-9):>6.1f}" + ("" if same else "  RESULTS DIFFER"))
    return rows


if __name__ == "__main__":
    main()
