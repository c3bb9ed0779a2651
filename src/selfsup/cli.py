"""The ``selfsup`` command.

    selfsup pretrain METHOD --data NAME|PATH --backbone NAME [--steps N | --epochs N] [--batch-size N]
                     --out DIR [key=value ...]
    selfsup evaluate RUN_DIR_OR_CHECKPOINT... --data NAME|PATH [--protocol knn|linear|mlp|sgd ...]
    selfsup evaluate RUN_DIR_OR_CHECKPOINT... --suite transfer|transfer_paper|SUITE.yaml
                                        Ericsson et al.'s transfer benchmark: datasets × protocols from one YAML
    selfsup analyse RUN_DIR_OR_CHECKPOINT... --data NAME|PATH [--images N]
                                        what the features keep: sensitivity, saliency, inversion
    selfsup invariance RUN_DIR... --data NAME|PATH   PIRL's invariance histogram (pirl and jigsaw runs)
    selfsup bench                       pretrain on the bundled sample, evaluate it and a random-init copy
    selfsup sweep SWEEP.yaml            a grid of runs (method × backbone × width × seed) and their evaluation
    selfsup report [--out report.html]  one self-contained HTML page from the results store
    selfsup convert CKPT --backbone resnet50 --out F.safetensors   a published checkpoint to a selfsup backbone
    selfsup list methods|backbones|datasets|protocols
    selfsup results [--json]
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time
import traceback

from selfsup.errors import EXIT_PREEMPTED, EXIT_USAGE, Preempted, UserError

EPILOG_OVERRIDES = """\
key=value overrides set any field of the run config, e.g. optim.lr=0.5 method.temperature=0.2
train.checkpoint_every=100 backbone.width=0.5. Sections: method (the method's own options),
backbone, data, optim, train. `selfsup pretrain simclr --print-config` shows every field."""


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line errors of every other bad input (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, text: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low or (low == 0 and kind is float and value == 0):
        what = {(int, 1): "a positive integer", (int, 0): "an integer >= 0", (float, 0): "a positive number"}
        raise argparse.ArgumentTypeError(f"must be {what[kind, low]}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, 1, text)


def count(text: str) -> int:
    return _number(int, 0, text)


def positive_float(text: str) -> float:
    return _number(float, 0, text)


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="results database (default $SELFSUP_STORE or ~/.selfsup/results.sqlite)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selfsup", description="Self-supervised pretraining and transfer "
                                     "evaluation (Kolesnikov et al. 2019, PIRL, Ericsson et al. 2021).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="train a method; re-running the same command resumes it",
                       epilog=EPILOG_OVERRIDES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", help="pretraining method (see `selfsup list methods`)")
    p.add_argument("--data", help="dataset name under $SELFSUP_DATA (see `selfsup list datasets`) or a path to an "
                   "ImageFolder directory, ImageFolder zip or CIFAR pickles; default: the bundled sample")
    p.add_argument("--split", help="split to pretrain on (default train)")
    p.add_argument("--size", type=positive_int, help="decode images to this square size (shorter side + centre crop)")
    p.add_argument("--backbone", help="architecture (see `selfsup list backbones`), default resnet18")
    p.add_argument("--width", type=positive_float, help="width multiplier; 1.0 = the published network")
    p.add_argument("--cifar-stem", action="store_true", default=None,
                   help="3x3 stride-1 root conv without max-pool, for 32-64 px images")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=positive_int, help="total optimisation steps")
    group.add_argument("--epochs", type=positive_float, help="epochs over the pretraining split")
    p.add_argument("--batch-size", type=positive_int, help="global batch size (split across devices), default 256")
    p.add_argument("--lr", type=positive_float,
                   help="base learning rate (scaled by batch/256 unless optim.scale_lr=false)")
    p.add_argument("--seed", type=count, help="seed of initial weights, data order and augmentation (default 0)")
    p.add_argument("--out", required=True, help="run directory: config, checkpoints, metrics.csv, backbone")
    p.add_argument("--config", help="YAML recipe (e.g. configs/small/simclr_sample.yaml); flags override it")
    p.add_argument("--checkpoint-every", type=positive_int, help="save a checkpoint every N steps (default 500)")
    p.add_argument("--devices", help="number of devices (GPUs) per node, default 1")
    p.add_argument("--num-nodes", type=positive_int, help="number of nodes for multi-node DDP (torchrun/SLURM)")
    p.add_argument("--accelerator", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--precision", help="auto (bf16-mixed on GPU, 32-true on CPU) or a Fabric precision")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbone")
    p.add_argument("--no-progress", action="store_true", help="no progress line (metrics.csv is still written)")
    p.add_argument("--requeue", action="store_true", default=None,
                   help="under SLURM: on SIGTERM/SIGUSR1 checkpoint, then `scontrol requeue` the job, which resumes")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")

    p = sub.add_parser("evaluate", help="frozen-feature protocols on a dataset; figures go to the results store")
    p.add_argument("models", nargs="+", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run directories of `selfsup pretrain`, or backbone .safetensors files; protocol settings "
                   "as protocol.key=value among them, e.g. sgd.epochs=520 'sgd.milestones=[480,500]'")
    p.add_argument("--data", help="dataset name or path (default: the bundled sample)")
    p.add_argument("--protocol", action="append", choices=["knn", "linear", "mlp", "sgd", "semisup"],
                   help="protocol to run, repeatable (default: knn and linear; see `selfsup list protocols`)")
    p.add_argument("--suite", help="run a transfer suite instead of --data/--protocol: a shipped one (transfer: "
                   "Ericsson et al. 2021 sized for a CPU; transfer_paper: the paper's settings, for a GPU) or a "
                   "suite YAML (datasets × protocols linear, knn, fewshot, calibration, finetune; "
                   "src/selfsup/evaluate/transfer_suite.py documents it); protocol.key=value changes its settings")
    p.add_argument("--tap", action="append", help="feature to probe, repeatable, or 'all' for every tap of the "
                   "backbone (layer-wise, one encoding pass); feature maps are pooled to <= 9000 dims; "
                   "default pre_logits")
    p.add_argument("--resolution", type=positive_int, help="evaluation resolution (default: the images' own)")
    p.add_argument("--view", choices=["image", "tiles"], default="image",
                   help="image (default) or tiles: the mean over the nine eval tiles, for patch-trained models "
                   "(Kolesnikov et al. 2019's evaluation of Jigsaw and Relative Patch Location)")
    p.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised copy of each model's "
                   "backbone (same architecture and input normalisation) instead: the floor it must beat")
    p.add_argument("--train-per-class", type=positive_int, help="probe on this many train images per class (seeded)")
    p.add_argument("--max-dims", type=positive_int, default=9000, help="pool each feature-map tap to at most this many "
                   "dims (default 9000, Kolesnikov et al.'s)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="recompute figures already in the store")
    p.set_defaults(overrides=[])  # protocol.key=value after the flags land here (see main)
    _add_store(p)

    p = sub.add_parser("analyse", help="what the features keep (Ericsson et al. 2021 §4.8-4.9): colour against "
                       "spatial sensitivity, occlusion saliency and deep-image-prior inversion on a few test images")
    p.add_argument("models", nargs="+", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run directories of `selfsup pretrain`, or backbone .safetensors files")
    p.add_argument("--data", default="sample", help="dataset name or path; a seeded sample of its test split "
                   "(default: the bundled sample)")
    p.add_argument("--images", type=positive_int, default=8,
                   help="test images for sensitivity and saliency (default 8)")
    p.add_argument("--invert", type=count, default=1, help="of them, how many to invert (default 1)")
    p.add_argument("--steps", type=positive_int, default=300, help="inversion steps (default 300, sized for a CPU at "
                   "32-64 px; the paper's 3000 at 224 px)")
    p.add_argument("--only", action="append", choices=["sensitivity", "saliency", "inversion"],
                   help="run only this analysis, repeatable (default: all three)")
    p.add_argument("--resolution", type=positive_int, help="input resolution (default: the images' own)")
    p.add_argument("--seed", type=count, default=0, help="seed of the image sample and the perturbations")
    p.add_argument("--random-init", action="store_true", help="analyse a randomly initialised copy of each model")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="recompute figures already in the store")
    _add_store(p)

    p = sub.add_parser("invariance", help="PIRL's invariance analysis (§4.1, Fig. 4): distances between an image's "
                       "representation and its jigsaw-transformed version's, for PIRL or Jigsaw runs")
    p.add_argument("models", nargs="+", metavar="RUN_DIR", help="run directories of pirl or jigsaw pretraining")
    p.add_argument("--data", default="sample", help="dataset name or path; its held-out split is used")
    p.add_argument("--representation", help="pirl: heads (default) or trunk; jigsaw: trunk (default) or head")
    p.add_argument("--seed", type=count, default=0, help="seed of the transformations drawn")
    p.add_argument("--resolution", type=positive_int,
                   help="decode the images at this size (default: the run's data.size)")
    p.add_argument("--bn", choices=("running", "batch"), default="running",
                   help="BN statistics: running (eval mode, default) or each pass's own batch, as in training")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="recompute figures already in the store")
    _add_store(p)

    p = sub.add_parser("bench", help="the main job: pretrain on the bundled sample (or --data), then evaluate the "
                       "model and a random-init copy of its backbone with kNN and the linear probe")
    p.add_argument("--method", default="simclr", help="default simclr")
    p.add_argument("--data", default="sample", help="dataset name or path (default: the bundled sample)")
    p.add_argument("--config", help="YAML recipe (default: configs/small/bench.yaml shipped in the package)")
    p.add_argument("--steps", type=positive_int, help="pretraining steps (default from the recipe)")
    p.add_argument("--out", default="runs/bench", help="run directory (default runs/bench); re-running resumes")
    p.add_argument("--protocol", action="append", choices=["knn", "linear"], help="default: knn and linear")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    _add_store(p)

    p = sub.add_parser("sweep", help="a grid of pretraining runs and their evaluation from one YAML; re-running "
                       "resumes it and skips what is in the results store")
    p.add_argument("config", help="sweep YAML (a path, or a shipped one such as revisiting/small_sweep)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    _add_store(p)

    p = sub.add_parser("report", help="write one self-contained HTML page (tables and figures) from the results store")
    p.add_argument("--out", default="report.html", help="HTML file or directory (default report.html)")
    _add_store(p)

    p = sub.add_parser("convert", help="a published checkpoint (torchvision-layout ResNet, e.g. MoCo, PIRL, SwAV, "
                       "SimCLR) to a selfsup backbone file that evaluate, analyse and the suites read")
    p.add_argument("checkpoint", help=".pth/.pth.tar/.pt (read with weights_only=True) or .safetensors")
    p.add_argument("--backbone", default="resnet50", help="our architecture with the same layout (default resnet50)")
    p.add_argument("--width", type=positive_float, default=1.0, help="width multiplier (1.0 = the published network)")
    p.add_argument("--no-normalization", action="store_true", help="the model takes [0, 1] inputs without ImageNet "
                   "mean/std (SimCLR's checkpoints, as Ericsson et al. note)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")

    p = sub.add_parser("list", help="list methods, backbones, datasets or protocols")
    p.add_argument("what", choices=["methods", "backbones", "datasets", "protocols"])

    p = sub.add_parser("results", help="show the results store")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--model", help="only this model")
    p.add_argument("--dataset", help="only this dataset")
    p.add_argument("--protocol", help="only this protocol")
    _add_store(p)
    return parser


def _pretrain_config(args):
    from selfsup import methods
    from selfsup.config import build, parse_overrides, read_yaml

    method = methods.get(args.method)
    flags = {
        "method": {"name": args.method},
        "data": {"name": args.data, "split": args.split, "size": args.size},
        "backbone": {"name": args.backbone, "width": args.width, "cifar_stem": args.cifar_stem},
        "optim": {"lr": args.lr},
        "train": {"steps": args.steps, "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                  "checkpoint_every": args.checkpoint_every, "devices": args.devices, "num_nodes": args.num_nodes,
                  "accelerator": args.accelerator, "precision": args.precision, "compile": args.compile,
                  "progress": False if args.no_progress else None, "requeue": args.requeue},
    }
    flags = {k: {f: v for f, v in sec.items() if v is not None} for k, sec in flags.items()}
    if args.steps is not None:
        flags["train"]["epochs"] = None   # a recipe's epochs must not outrank the --steps asked for
    if args.epochs is not None:
        flags["train"]["steps"] = None
    if str(flags["train"].get("devices", "")).isdigit():
        flags["train"]["devices"] = int(flags["train"]["devices"])
    return build({"optim": method.optim_defaults}, read_yaml(args.config) if args.config else {}, flags,
                 parse_overrides(args.overrides))


def cmd_pretrain(args) -> int:
    import yaml

    from selfsup.config import to_dict
    from selfsup.train.loop import pretrain

    cfg = _pretrain_config(args)
    if args.print_config:   # every method option with its value, defaults included
        from dataclasses import asdict

        from selfsup import methods

        options = asdict(methods.get(cfg.method["name"]).make_config(cfg.method))
        shown = {**to_dict(cfg), "method": {"name": cfg.method["name"],
                                            **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}}
        print(yaml.safe_dump(shown, sort_keys=False))
        return 0
    out = pretrain(cfg, args.out)
    if out is None:  # DDP: only global rank 0 reports
        return 0
    print(f"done: {out} (backbone: {out / 'backbone.safetensors'}); evaluate with: selfsup evaluate {out} "
          f"--data {cfg.data.name}")
    return 0


def _device(arg: str | None) -> str:
    import torch

    if arg and arg.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {arg}: no CUDA device is available on this machine; pass --device cpu")
    if arg and not arg.startswith(("cuda", "cpu", "mps")):
        raise UserError(f"--device {arg!r} is not a torch device; pass cpu or cuda (cuda:N)")
    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _print_table(rows) -> None:
    if not rows:
        print("(no results)")
        return
    header = ("model", "dataset", "protocol", "tap", "metric", "value", "seconds")
    table = [(r.model, r.dataset, r.protocol, r.tap, r.metric, f"{r.value:.2f}" + (f" ± {r.ci:.2f}" if r.ci else ""),
              f"{r.seconds:.1f}") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=False)]
    for line in (header, *table):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)))


def _encoders(args):
    """The models named on the line (protocol.key=value settings among them skipped), loaded one at a time."""
    from selfsup.evaluate.features import load_encoder, random_copy

    for model in (m for m in args.models if "=" not in m):
        encoder = load_encoder(model)
        yield random_copy(encoder) if args.random_init else encoder


def cmd_evaluate(args) -> int:
    from selfsup.config import parse_overrides
    from selfsup.data.registry import resolve
    from selfsup.evaluate.suite import evaluate_model
    from selfsup.results.store import Store

    settings = parse_overrides([m for m in args.models if "=" in m] + args.overrides)
    if args.suite:
        return _evaluate_suite(args, settings)
    device = _device(args.device)
    resolve(args.data or "sample")
    encoders = list(_encoders(args))   # every model loads before the first figure is stored
    store = Store(args.store)
    rows = []
    for encoder in encoders:
        taps = args.tap or ["pre_logits"]
        taps = tuple(encoder.backbone.taps) if "all" in taps else tuple(taps)
        rows += evaluate_model(encoder, args.data or "sample", args.protocol or ["knn", "linear"], store, taps=taps,
                               resolution=args.resolution, device=device, force=args.force,
                               view=args.view, train_per_class=args.train_per_class, max_dims=args.max_dims,
                               overrides=settings)
    _print_table(rows)
    print(f"stored in {store.path}")
    return 0


def _evaluate_suite(args, settings: dict) -> int:
    from selfsup.evaluate.transfer_suite import load_suite, run_suite
    from selfsup.results.store import Store

    clash = [flag for flag, value in (("--data", args.data), ("--protocol", args.protocol), ("--tap", args.tap),
                                      ("--resolution", args.resolution), ("--train-per-class", args.train_per_class))
             if value] + (["--view"] if args.view != "image" else []) + (["--max-dims"] if args.max_dims != 9000
                                                                          else [])
    if clash:
        raise UserError(f"--suite takes its datasets, protocols, taps and resolutions from the suite file; drop "
                        f"{', '.join(clash)} (or run without --suite)")
    suite = load_suite(args.suite)   # a bad suite fails before any model is loaded
    device = _device(args.device)
    encoders = list(_encoders(args))
    store = Store(args.store)
    out = run_suite(encoders, suite, store, device=device, force=args.force, overrides=settings)
    _print_table(out.rows)
    for line in out.skipped:
        print(f"skipped: {line}")
    print(f"suite {suite.name}: {len(out.rows)} figures; stored in {store.path}")
    return 0


def cmd_analyse(args) -> int:
    from selfsup.evaluate.transfer_suite import ANALYSES, run_analyses
    from selfsup.results.store import Store

    device = _device(args.device)
    encoders = list(_encoders(args))
    store = Store(args.store)
    rows = run_analyses(encoders, args.data, store, images=args.images, invert=args.invert,
                        steps=args.steps, resolution=args.resolution, seed=args.seed, device=device,
                        force=args.force, analyses=args.only or ANALYSES)
    _print_table(rows)
    print(f"stored in {store.path}")
    return 0


def cmd_invariance(args) -> int:
    from selfsup.evaluate.suite import evaluate_invariance
    from selfsup.results.store import Store

    store = Store(args.store)
    rows = [evaluate_invariance(m, args.data, store, args.representation, args.seed, device=_device(args.device),
                                force=args.force, resolution=args.resolution, bn=args.bn)
            for m in args.models]
    _print_table(rows)
    print(f"stored in {store.path}")
    return 0


def cmd_bench(args) -> int:
    from selfsup import methods
    from selfsup.config import load_config
    from selfsup.evaluate.features import load_encoder, random_encoder
    from selfsup.evaluate.suite import evaluate_model
    from selfsup.results.store import Store
    from selfsup.train.loop import pretrain

    recipe = args.config or "bench"
    overrides = [f"method.name={args.method}", f"data.name={args.data}", *args.overrides]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(recipe, overrides, base={"optim": methods.get(args.method).optim_defaults})
    store = Store(args.store)           # an unusable store or device is refused before training, not after
    protocols = args.protocol or ["knn", "linear"]
    device = _device(args.device)
    start = time.perf_counter()
    out = pretrain(cfg, args.out)
    if out is None:  # DDP: evaluation runs once, on global rank 0
        return 0
    trained = time.perf_counter() - start
    rows = []
    for encoder in (load_encoder(out), random_encoder(cfg.backbone, seed=cfg.train.seed)):
        rows += evaluate_model(encoder, args.data, protocols, store, device=device)
    _print_table(rows)
    by_model = {}
    for r in rows:
        by_model.setdefault(r.protocol, {})[r.model.startswith("random-init")] = r.value
    for protocol, values in by_model.items():
        if len(values) == 2:
            print(f"{protocol}: pretrained {values[False]:.2f} vs random-init {values[True]:.2f} "
                  f"({values[False] - values[True]:+.2f} points)")
    print(f"pretraining took {trained / 60:.1f} min; results stored in {store.path}")
    return 0


def cmd_sweep(args) -> int:
    from selfsup.results.store import Store
    from selfsup.sweep import run_sweep

    store = Store(args.store)
    rows = run_sweep(args.config, store, device=_device(args.device))
    _print_table(rows)
    print(f"stored in {store.path}")
    return 0


def cmd_report(args) -> int:
    from selfsup.results.report import build_report
    from selfsup.results.store import Store

    print(f"report: {build_report(Store(args.store), args.out)}")
    return 0


def cmd_convert(args) -> int:
    from selfsup.zoo.convert import convert

    info = convert(args.checkpoint, args.out, args.backbone, args.width, normalization=not args.no_normalization)
    print(f"wrote {args.out}: {info['kept']} tensors kept (prefix {info['prefix']!r}), {info['dropped']} dropped"
          + (f" (e.g. {', '.join(info['dropped_examples'])})" if info["dropped"] else ""))
    return 0


def cmd_list(args) -> int:
    if args.what == "methods":
        from selfsup.methods import available
    elif args.what == "backbones":
        from selfsup.backbones import available
    elif args.what == "datasets":
        from selfsup.data.registry import names as available
    else:
        from selfsup.evaluate.suite import DESCRIPTIONS
        from selfsup.evaluate.transfer_suite import DESCRIPTIONS as TRANSFER

        def available():
            return {**DESCRIPTIONS, **TRANSFER}
    entries = available()
    width = max(len(k) for k in entries)
    for name, text in entries.items():
        print(f"{name.ljust(width)}  {text}")
    return 0


def cmd_results(args) -> int:
    from selfsup.results.store import Store, as_dict

    filters = {k: v for k, v in (("model", args.model), ("dataset", args.dataset), ("protocol", args.protocol)) if v}
    rows = Store(args.store).query(**filters)
    if args.json:
        for r in rows:
            print(json.dumps(as_dict(r), default=str))
    else:
        _print_table(rows)
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "evaluate": cmd_evaluate, "analyse": cmd_analyse, "invariance": cmd_invariance,
            "bench": cmd_bench, "sweep": cmd_sweep, "report": cmd_report, "list": cmd_list, "results": cmd_results,
            "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        # key=value overrides may come anywhere on the line, also after options: argparse leaves them unknown.
        args, extra = parser.parse_known_args(argv)
        bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
    except SystemExit as stop:  # --help, or a bad flag: argparse exits; the caller gets the code
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return COMMANDS[args.command](args)
    except Preempted as stop:
        print(f"selfsup {args.command}: {stop}. Resume with the same command (exit code {EXIT_PREEMPTED}).",
              file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as err:
        message = user_message(err)
        if message is None or "SELFSUP_DEBUG" in os.environ:
            traceback.print_exc()
            if message is None:
                print(f"selfsup {args.command}: internal error ({type(err).__name__}): this is a bug in selfsup, "
                      f"not in your input; please report it with the command line and the traceback above",
                      file=sys.stderr)
                return 1
        print(f"selfsup {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def user_message(err: BaseException) -> str | None:
    """The one-line message of an error caused by the input (a value, a file, the disk), else None (a bug)."""
    if isinstance(err, UserError):
        return " ".join(str(err).split())
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) or (
            isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)):
        what = f"{err.strerror}: {err.filename}" if err.filename and err.strerror else str(err)
        return " ".join(what.split())
    return None

if __name__ == "__main__":
    sys.exit(main())
