"""The figures docs/REPRODUCTIONS.md quotes for PIRL's claims (Misra & van der Maaten 2020), read from a results
store filled by a PIRL study (``selfsup sweep pirl/cpu_study``, then ``selfsup invariance`` and
``selfsup evaluate --protocol semisup`` on its runs). Prints one block per claim:

1. PIRL beats NPID++ and Jigsaw on the linear probe (Table 2), and on kNN;
2. PIRL's best layer is the last stage, Jigsaw's an earlier one (Fig. 4, right);
3. PIRL's invariance histogram sits left of Jigsaw's (Fig. 4, left): mean, median and quartiles of the
   unit-l2 distances between f(v_I) and g(v_I^t) on held-out images;
4. lambda = 0.5 is at least as good as 0 and 1 (Fig. 6; NPID++ stands for 0 when no pirl cell has lambda = 0);
5. more negatives help (Fig. 7), and top-1 against the number of jigsaw permutations (Fig. 8);
6. semi-supervised fine-tuning (Table 3), when in the store.

Usage: python benchmarks/pirl_claims.py --store docs/results/pirl_cpu_study.sqlite [--dataset tinyimagenet100]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from selfsup.results.store import Store

TAP_ORDER = ["after_root", "block1", "block2", "block3", "block4", "fc6", "pooled", "pre_logits"]


def histogram_quantiles(counts: list[int], edges: list[float], qs=(0.25, 0.5, 0.75)) -> list[float]:
    """Quantiles of a histogram, linear within a bin."""
    cum = np.concatenate([[0], np.cumsum(counts)]) / max(sum(counts), 1)
    return [float(np.interp(q, cum, edges)) for q in qs]


def label(cell: dict) -> str:
    name = cell["method"]
    for key in ("method.lam", "method.num_negatives", "method.num_permutations"):
        if key in cell:
            name += f" {key.split('.')[1]}={cell[key]:g}"
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="results store (default $SELFSUP_STORE)")
    parser.add_argument("--dataset", default="tinyimagenet100")
    args = parser.parse_args()
    rows = Store(args.store).query(dataset=args.dataset)
    cell = {r.model: r.extra["cell"] for r in rows if "cell" in r.extra}
    value = {(r.model, r.protocol, r.tap, r.metric): r.value for r in rows}

    def top1(model, protocol="linear", tap="pre_logits"):
        return value.get((model, protocol, tap, "top1"))

    main_cells = {m: c for m, c in cell.items() if c["method"] in ("npid++", "jigsaw") or
                  (c["method"] == "pirl" and c.get("method.lam") == 0.5 and c.get("method.num_negatives") == 4096
                   and "method.num_permutations" not in c)}
    print("1. top-1 on the pre-logits (linear, kNN)")
    for m, c in sorted(main_cells.items(), key=lambda kv: -(top1(kv[0]) or 0)):
        print(f"   {label(c):34} linear {top1(m) or float('nan'):6.2f}   kNN {top1(m, 'knn') or float('nan'):6.2f}")

    print("2. linear top-1 by layer (best tap marked *); then the gain over the random-init floor of the same network")
    floor = next((m for m, p, _, _ in value if m.startswith("random-init") and p == "linear"), None)
    layered = dict(main_cells)
    if floor:
        layered[floor] = {"method": "random-init"}
    for m, c in sorted(layered.items(), key=lambda kv: kv[1]["method"]):
        taps = sorted(((t, v) for (mm, p, t, k), v in value.items() if mm == m and p == "linear" and k == "top1"),
                      key=lambda tv: TAP_ORDER.index(tv[0]) if tv[0] in TAP_ORDER else 99)
        if len(taps) > 2:
            best = max(v for _, v in taps)
            print(f"   {label(c):34} " + "  ".join(f"{t}{'*' if v == best else ''} {v:.2f}" for t, v in taps))
            gains = [(t, v - top1(floor, tap=t)) for t, v in taps if floor and top1(floor, tap=t) is not None]
            if gains and m != floor:
                most = max(v for _, v in gains)
                print(f"   {'   over random-init':34} "
                      + "  ".join(f"{t}{'*' if v == most else ''} {v:+.2f}" for t, v in gains))

    print("3. invariance: unit-l2 distance between f(v_I) and g(v_I^t) on held-out images")
    for r in sorted((r for r in rows if r.protocol == "invariance"), key=lambda r: (r.config.get("bn", ""), r.value)):
        q1, med, q3 = histogram_quantiles(r.extra["counts"], r.extra["edges"])
        print(f"   {label(cell.get(r.model, {'method': r.extra.get('method', r.model)})):34} {r.tap:5} "
              f"BN {r.config.get('bn', 'running'):7}  mean {r.value:.3f}  median {med:.3f}  "
              f"quartiles {q1:.3f}-{q3:.3f}  n={sum(r.extra['counts']):.0f}")

    print("4-5. ablations (linear top-1, pre-logits; kNN in brackets)")
    series = defaultdict(list)
    for m, c in cell.items():
        if c["method"] != "pirl" or top1(m) is None:
            continue
        lam, neg = c.get("method.lam", 0.5), c.get("method.num_negatives", 4096)
        perms = c.get("method.num_permutations")
        if neg == 4096 and perms is None:
            series["lambda"].append((lam, m))
        if lam == 0.5 and perms is None:
            series["negatives"].append((neg, m))
        if lam == 0.5 and neg == 4096:
            series["permutations (0 = all 9!)"].append((perms or 0, m))
    npid_pp = [m for m, c in cell.items() if c["method"] == "npid++" and top1(m) is not None]
    if npid_pp and series["lambda"] and not any(x == 0 for x, _ in series["lambda"]):
        series["lambda"].append((0.0, npid_pp[0]))   # NPID++ is PIRL at lambda = 0 (§4.2); printed as 0
    for name, pts in series.items():
        if len(pts) > 1:
            print(f"   {name:26} " + "  ".join(f"{x:g}: {top1(m):.2f} ({top1(m, 'knn') or float('nan'):.2f})"
                                               for x, m in sorted(pts)))

    semi = [r for r in rows if r.protocol == "semisup"]
    if semi:
        print("6. semi-supervised fine-tuning (PIRL §3.3)")
        for r in sorted(semi, key=lambda r: (r.model, r.config.get("fraction", 0), r.metric)):
            name = "random-init" if r.model.startswith("random-init") else label(cell.get(r.model, {"method": r.model}))
            print(f"   {name:34} {r.config.get('fraction', 0):>4.0%} labels "
                  f"{r.metric} {r.value:.2f}")


if __name__ == "__main__":
    main()
