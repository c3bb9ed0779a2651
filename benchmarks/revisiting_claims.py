"""The figures docs/REPRODUCTIONS.md quotes for Kolesnikov et al. 2019's claims, read from a results store
filled by a Revisiting sweep (e.g. ``selfsup sweep revisiting/cpu_study``). Prints one block per claim:

1. wider networks give better representations, for every task;
2. ResNet's last layer is as good as or better than earlier ones, while VGG's degrades towards the top;
3. the ranking of the tasks changes with the architecture;
4. linear and MLP probes rank the models the same way (Spearman's rho over all models);
5. representation size alone (the bottleneck study) raises accuracy.

Usage: python benchmarks/revisiting_claims.py [--store results.sqlite] [--dataset tinyimagenet100]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from selfsup.results.store import Store


def ranks(values: list[float]) -> list[float]:
    """1 = smallest; ties get their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="results store (default $SELFSUP_STORE)")
    parser.add_argument("--dataset", default="tinyimagenet100")
    args = parser.parse_args()
    rows = [r for r in Store(args.store).query(dataset=args.dataset) if "cell" in r.extra]
    value = {(r.model, r.protocol, r.tap): r.value for r in rows}
    cell = {r.model: r.extra["cell"] for r in rows}
    plain = {m: c for m, c in cell.items() if "representation_dim" not in c}

    print("1. top-1 against width (pre-logits)")
    for protocol in ("linear", "mlp"):
        by = defaultdict(list)
        for m, c in plain.items():
            if (m, protocol, "pre_logits") in value:
                by[(c["backbone"], c["method"])].append((c["width"], value[(m, protocol, "pre_logits")]))
        for (backbone, method), pts in sorted(by.items()):
            if len(pts) > 1:
                pts.sort()
                rising = all(b[1] > a[1] for a, b in zip(pts, pts[1:], strict=False))
                print(f"   {protocol:6} {backbone:9} {method:15} " + "  ".join(f"w{w:g}: {v:5.2f}" for w, v in pts)
                      + ("   rises with width" if rising else "   NOT monotone"))

    print("2. linear top-1 by layer (best tap marked *)")
    for m, c in sorted(plain.items(), key=lambda kv: (kv[1]["backbone"], kv[1]["width"], kv[1]["method"])):
        taps = [(t, v) for (mm, p, t), v in value.items() if mm == m and p == "linear"]
        if len(taps) > 2 and "pre_logits" in dict(taps):
            order = ["after_root", "block1", "block2", "block3", "block4", "fc6", "pooled", "pre_logits"]
            taps.sort(key=lambda tv: order.index(tv[0]) if tv[0] in order else 99)
            best = max(v for _, v in taps)
            last = dict(taps)["pre_logits"]
            verdict = "last >= earlier" if last >= best else f"last {best - last:.2f} below the best"
            print(f"   {c['backbone']:9} w{c['width']:<6g} {c['method']:15} "
                  + " ".join(f"{t}{'*' if v == best else ''} {v:.2f}" for t, v in taps) + f"   [{verdict}]")

    print("3. task ranking per architecture (linear, pre-logits; same width)")
    ranking = defaultdict(dict)
    for m, c in plain.items():
        if (m, "linear", "pre_logits") in value:
            ranking[(c["width"], c["backbone"])][c["method"]] = value[(m, "linear", "pre_logits")]
    for (width, backbone), tasks in sorted(ranking.items()):
        if len(tasks) > 2:
            print(f"   w{width:g} {backbone:9} " + " > ".join(f"{t} {v:.2f}" for t, v in
                                                              sorted(tasks.items(), key=lambda kv: -kv[1])))

    print("4. linear against MLP (pre-logits), every model")
    pairs = [(value[(m, "linear", "pre_logits")], value[(m, "mlp", "pre_logits")]) for m in cell
             if (m, "linear", "pre_logits") in value and (m, "mlp", "pre_logits") in value]
    if len(pairs) > 2:
        print(f"   {len(pairs)} models, Spearman rho = {spearman(*map(list, zip(*pairs, strict=True))):.3f}")

    print("5. representation size at a fixed width (pre-logits)")
    sized = defaultdict(list)
    for r in rows:
        if r.tap == "pre_logits" and "pre_logits_dim" in r.extra:
            c = r.extra["cell"]
            sized[(c["method"], c["backbone"], c["width"], r.protocol)].append((r.extra["pre_logits_dim"], r.value))
    for (method, backbone, width, protocol), pts in sorted(sized.items()):
        if len({d for d, _ in pts}) > 1:
            print(f"   {protocol:6} {method} {backbone} w{width:g}: "
                  + "  ".join(f"{d} dims: {v:.2f}" for d, v in sorted(pts)))

    floors = [r for r in Store(args.store).query(dataset=args.dataset) if r.model.startswith("random-init")]
    if floors:
        print("random-init floors")
        for r in sorted(floors, key=lambda r: (r.model, r.protocol, r.tap)):
            print(f"   {r.model} {r.protocol} {r.tap}: {r.value:.2f}")


if __name__ == "__main__":
    main()
