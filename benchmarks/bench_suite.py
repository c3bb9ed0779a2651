"""Wall time of the transfer suite (Ericsson et al. 2021) for one ResNet-18, and where it goes: encoding vs fitting.

    python benchmarks/bench_suite.py [CKPT] [--suite transfer] [--frozen] [--datasets a,b] [--protocols p,q]
                                     [--home DIR] [--threads N] [protocol.key=value ...]

Runs ``run_suite`` (``selfsup evaluate CKPT --suite transfer``) once, from a cold start: a fresh ``SELFSUP_HOME``
(decoded-image and feature caches) and a fresh results store in a temporary folder unless ``--home`` names one,
so every image is decoded and encoded for real. ``CKPT`` is a run directory or backbone ``.safetensors``; without
it, a randomly initialised ResNet-18 (width 1, ImageNet stem: 512-d pre-logits) — the cost of the suite does not
depend on the weights. Needs ``$SELFSUP_DATA`` (the five datasets; ``../shared/data`` beside a checkout).

Printed: one line per (dataset, protocol) with the protocol's own time (fitting: L-BFGS path, kNN, episodes,
temperature, fine-tuning runs); per dataset the shared cost of the frozen protocols (decoding the images once,
encoding every split once at the suite's resolution); then per protocol the sums, with the share encoding would
take if that protocol ran alone (encode / (encode + fit)), and the whole run's split of wall time into decoding,
encoding, fitting and the rest (store, logging). A JSON line closes the output.

**Budget.** The whole default suite does not fit in ~15 minutes on this 2-core CPU: fine-tuning a ResNet-18 at
64 px (4 halving runs of 50 steps, 2 of 100, a final 100, each scored on val or test) on four datasets is most of
it. ``--frozen`` drops fine-tuning (linear, kNN, few-shot, calibration on all five datasets), the subset that does
fit; ``--datasets eurosat --protocols finetune`` times one fine-tuning. The output says which subset ran; it never
extrapolates to what did not run. Measured with one torch thread (``OMP_NUM_THREADS=1``, the machine shared with
other jobs), random-init ResNet-18, cold caches:

- ``--frozen``: 8.7 min wall; encoding 462.6 s (89 %: ~118k images once, ~265 img/s), fitting 39.5 s (8 %:
  linear 27.9 s, kNN 10.0 s, few-shot 1.3 s, calibration 0.3 s), decoding 19.2 s (4 %). Alone, every frozen
  protocol would spend 94-100 % of its time encoding: the cache is what makes five of them cost one encoding.
- ``--datasets eurosat --protocols finetune``: 6.9 min (412.6 s fine-tuning, ~83 img/s training), so the frozen
  part plus one of the four fine-tunings already exceeds 15 min; the whole suite was not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FROZEN = ("linear", "knn", "fewshot", "calibration")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?", help="run directory or backbone .safetensors (default: random-init resnet18)")
    ap.add_argument("--suite", default="transfer", help="suite name or YAML (default transfer, the CPU-sized one)")
    ap.add_argument("--frozen", action="store_true", help="frozen protocols only (no finetune): fits ~15 min")
    ap.add_argument("--datasets", help="comma-separated subset of the suite's datasets")
    ap.add_argument("--protocols", help="comma-separated subset of protocols (linear,knn,fewshot,calibration,finetune)")
    ap.add_argument("--home", help="SELFSUP_HOME to use (default: a fresh temporary folder: a cold run)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, from OMP_NUM_THREADS or the cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="protocol settings, e.g. finetune.steps=50")
    return ap.parse_args()


def _subset(suite, args):
    """The suite restricted to --datasets / --protocols / --frozen, and a line saying what was left out."""
    from dataclasses import replace

    from selfsup.data.registry import resolve

    datasets = set(args.datasets.split(",")) if args.datasets else None
    protocols = set(args.protocols.split(",")) if args.protocols else None
    if args.frozen:
        protocols = (protocols or set(FROZEN)) & set(FROZEN)
    kept, dropped = [], []
    for entry in suite.datasets:
        name = resolve(entry.name).name
        keep = tuple(p for p in entry.protocols if (datasets is None or name in datasets)
                     and (protocols is None or p in protocols))
        dropped += [f"{name}:{p}" for p in entry.protocols if p not in keep]
        if keep:
            kept.append(replace(entry, protocols=keep))
    if not kept:
        raise SystemExit("the subset is empty: check --datasets / --protocols against the suite")
    return replace(suite, datasets=kept), dropped


def main() -> None:
    args = _args()
    if "SELFSUP_DATA" not in os.environ and SHARED.is_dir():
        os.environ["SELFSUP_DATA"] = str(SHARED)
    tmp = None
    if args.home:
        os.environ["SELFSUP_HOME"] = args.home
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_suite_")
        os.environ["SELFSUP_HOME"] = tmp.name

    import torch

    from selfsup.config import BackboneConfig, parse_overrides
    from selfsup.evaluate.features import load_encoder, random_encoder
    from selfsup.evaluate.transfer_suite import load_suite, run_suite
    from selfsup.results.store import Store

    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite(args.suite)
    full = sum(len(e.protocols) for e in suite.datasets)
    suite, dropped = _subset(suite, args)
    encoder = load_encoder(args.ckpt) if args.ckpt else random_encoder(BackboneConfig("resnet18", 1.0, False))
    store = Store(Path(os.environ["SELFSUP_HOME"]) / "bench.sqlite")
    print(f"suite {suite.name} ({suite.path}); model {encoder.label}; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs; device {args.device}; SELFSUP_HOME {os.environ['SELFSUP_HOME']}")
    for entry in suite.datasets:
        print(f"  {entry.name} @ {entry.resolution or 'native'} px: {', '.join(entry.protocols)}")
    if dropped:
        print(f"SUBSET: {full - len(dropped)} of the suite's {full} (dataset, protocol) pairs; not run: "
              f"{', '.join(dropped)}. The times below are of this subset only.")
    else:
        print("the whole suite: on a 2-core CPU this takes well over 15 min, fine-tuning most of it (see this "
              "script's docstring); --frozen runs the frozen protocols only, the subset that fits")
    start = time.perf_counter()
    progress = lambda line: print(f"[{time.perf_counter() - start:7.1f}s] {line}", file=sys.stderr, flush=True)  # noqa: E731
    out = run_suite([encoder], suite, store, device=args.device, log=progress,
                    overrides=parse_overrides(args.overrides))
    wall = time.perf_counter() - start

    features = {t.dataset: t for t in out.timings if t.protocol == "features"}
    fits = [t for t in out.timings if t.protocol != "features"]
    print(f"\n{'dataset':<16}{'protocol':<13}{'decode s':>9}{'encode s':>10}{'fit s':>10}")
    for dataset, f in features.items():
        print(f"{dataset:<16}{'(features)':<13}{f.decode_seconds:>9.1f}{f.encode_seconds:>10.1f}{'':>10}"
              f"   shared by {', '.join(f.shared_by)}")
        for t in (t for t in fits if t.dataset == dataset):
            print(f"{'':<16}{t.protocol:<13}{'':>9}{'':>10}{t.fit_seconds:>10.1f}")
    per = defaultdict(lambda: {"fit": 0.0, "encode": 0.0, "datasets": 0})
    for t in fits:
        p = per[t.protocol]
        p["fit"] += t.fit_seconds
        p["datasets"] += 1
        if t.protocol in FROZEN:   # the features it reads; shared with the other frozen protocols of the dataset
            p["encode"] += features[t.dataset].encode_seconds
    print(f"\n{'protocol':<13}{'datasets':>9}{'fit s':>10}{'encode s':>10}  encode share alone")
    for protocol, p in per.items():
        share = p["encode"] / (p["encode"] + p["fit"]) if p["encode"] + p["fit"] > 0 else 0.0
        enc = f"{p['encode']:.1f}" if protocol in FROZEN else "-"
        alone = f"{100 * share:.0f} %" if protocol in FROZEN else "n/a (trains on the images)"
        print(f"{protocol:<13}{p['datasets']:>9}{p['fit']:>10.1f}{enc:>10}  {alone}")
    decode = sum(f.decode_seconds for f in features.values())
    encode = sum(f.encode_seconds for f in features.values())
    fit = sum(t.fit_seconds for t in fits)
    rest = wall - decode - encode - fit
    print(f"\nwall {wall:.1f} s ({wall / 60:.1f} min): decoding {decode:.1f} s ({100 * decode / wall:.0f} %), encoding "
          f"{encode:.1f} s ({100 * encode / wall:.0f} %), fitting {fit:.1f} s ({100 * fit / wall:.0f} %), rest "
          f"{rest:.1f} s ({100 * rest / wall:.0f} %)")
    for protocol in sorted(per):
        print(f"  fitting {protocol}: {per[protocol]['fit']:.1f} s ({100 * per[protocol]['fit'] / wall:.0f} % of wall)")
    if out.skipped:
        print("skipped: " + "; ".join(out.skipped))
    print(f"{len(out.rows)} figures; e.g. " + ", ".join(f"{r.dataset} {r.protocol} {r.metric} {r.value:.1f}"
                                                     for r in out.rows[:4]))
    print(json.dumps({"suite": suite.name, "subset": dropped, "threads": torch.get_num_threads(), "wall_s": wall,
                      "decode_s": decode, "encode_s": encode, "fit_s": fit,
                      "per_protocol": {k: dict(v) for k, v in per.items()}}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
