"""The figures docs/REPRODUCTIONS.md quotes for Ericsson et al. 2021's claims, read from a results store filled
by the transfer suite (e.g. ``selfsup sweep transfer/cpu_study``). Prints:

1. the models × datasets figures per protocol (pre-logits; few-shot per shot count, mean ± 95 % interval);
2. the correlation of logit(source linear top-1) with each downstream figure (``analysis.correlation``):
   Pearson r and Spearman rho per (protocol, dataset), and their mean per protocol;
3. where supervised stands: for every (protocol, dataset), the best self-supervised model against the
   supervised one (models whose name starts with ``supervised``; ``random-init`` ones are not self-supervised).

Usage: python benchmarks/transfer_claims.py --store results.sqlite [--source tinyimagenet100]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

from selfsup.analysis.correlation import correlations
from selfsup.results.store import Store

FIGURES = ("linear", "knn", "fewshot", "finetune", "calibration")


def short(model: str) -> str:
    return model.split("-resnet")[0] if not model.startswith("random-init") else "random-init"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--source", default="tinyimagenet100")
    args = ap.parse_args()
    rows = [r for r in Store(args.store).query() if r.tap == "pre_logits" and r.protocol in FIGURES]

    print("1. figures (pre-logits)")
    table: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        key = (r.protocol, r.metric, r.config.get("shots"), r.dataset)
        table[key][short(r.model)] = r
    for (protocol, metric, shots, dataset), by_model in sorted(table.items(), key=str):
        label = f"{protocol}{f' {shots}-shot' if shots else ''} {metric} {dataset}"
        cells = "  ".join(f"{m} {r.value:.2f}" + (f"±{r.ci:.2f}" if r.ci else "") for m, r in sorted(by_model.items()))
        print(f"   {label:42s} {cells}")

    print("2. correlation with logit(source linear top-1)")
    found = correlations(rows, args.source)
    per_protocol = defaultdict(list)
    for c in sorted(found, key=lambda c: (c.protocol, c.shots or 0, c.dataset)):
        shots = f" {c.shots}-shot" if c.shots else ""
        label = f"{c.protocol}{shots} {c.metric}"
        print(f"   {label:28s} {c.dataset:16s} n={c.n}  r={c.pearson:+.2f}  rho={c.spearman:+.2f}")
        if not math.isnan(c.pearson):
            per_protocol[(c.protocol, c.shots)].append((c.pearson, c.spearman))
    for (protocol, shots), pairs in sorted(per_protocol.items(), key=str):
        r = sum(p for p, _ in pairs) / len(pairs)
        rho = sum(s for _, s in pairs) / len(pairs)
        name = f"{protocol}{f' {shots}-shot' if shots else ''}"
        print(f"   mean {name}: r={r:+.2f} rho={rho:+.2f} over {len(pairs)} datasets")

    print("3. best self-supervised against supervised")
    for (protocol, metric, shots, dataset), by_model in sorted(table.items(), key=str):
        sup = [r for m, r in by_model.items() if m.startswith("supervised")]
        ssl = [(m, r) for m, r in by_model.items() if not m.startswith(("supervised", "random-init"))]
        if not sup or not ssl or dataset == args.source:
            continue
        lower = metric in ("ece", "ece_scaled")
        best_m, best = (min if lower else max)(ssl, key=lambda mr: mr[1].value)
        wins = best.value < sup[0].value if lower else best.value > sup[0].value
        print(f"   {protocol}{f' {shots}-shot' if shots else ''} {metric} {dataset:16s} best SSL {best_m} "
              f"{best.value:.2f} vs supervised {sup[0].value:.2f}: {'SSL' if wins else 'supervised'}")


if __name__ == "__main__":
    main()
