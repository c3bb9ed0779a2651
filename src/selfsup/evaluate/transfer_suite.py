"""The transfer benchmark of Ericsson, Gouk, Hospedales 2021 (*How Well Do Self-Supervised Models Transfer?*, CVPR
2021, arXiv 2011.13377) as one suite: every checkpoint × dataset × protocol of a suite YAML, into the results store.

``run_suite(models, "transfer", store)`` runs, for each model and each dataset of the suite, the protocols that the
dataset lists, and writes one ``Result`` per figure in the row contracts the report draws
(``results/transfer_report.py``):

- ``linear``: the many-shot L-BFGS probe (§3 "Many-shot linear": 45 L2 strengths, chosen on val, refit on
  train+val), the dataset's metric. Same key as ``selfsup evaluate --protocol linear`` at the same resolution,
  so a figure measured by either is not measured again by the other;
- ``knn``: the weighted kNN probe (Wu et al. 2018; not in the paper, a cheap second frozen figure), same key as
  ``selfsup evaluate --protocol knn``;
- ``fewshot``: prototypical 5-way episodes (§3 "Few-shot") on the features of every split of the dataset pooled,
  split ``all``, metric ``accuracy``, ``ci`` = 1.96·σ/√episodes, one row per shot count (config ``shots``);
- ``calibration``: ECE (15 bins) of the linear probe's test logits, raw (metric ``ece``) and temperature-scaled
  (``ece_scaled``), ``extra["temperature"]`` and ``extra["reliability"]`` (raw bins on ``ece``, scaled on
  ``ece_scaled``);
- ``finetune``: the whole network plus a linear head, SGD over an lr × wd grid (§3 "Finetune";
  ``evaluate.transfer_finetune``), the dataset's metric, ``extra["best_lr"]``, ``extra["best_wd"]``,
  ``extra["grid"]``.

**Preprocessing** is the paper's for frozen protocols: the shorter side resized (bicubic, antialiased) to the
evaluation ``resolution`` and the centre crop kept, no augmentation. Named datasets are decoded square at their
native size, so ``features.encode``'s bicubic resize of the square image to ``resolution`` is exactly that; a
path dataset (unknown geometry) is decoded with its shorter side at ``resolution`` and centre-cropped
(``data.load(..., size=resolution)``), unless the suite sets ``size`` for it. Finetune uses the same view for
val/test and its random-resized crop at ``resolution`` for training.

**Encoding once.** All frozen protocols of a (model, dataset) read one ``Splits`` (``evaluate.suite.load_splits``):
every split is encoded at most once per (weights, dataset, split, tap, resolution) by ``features.tap_features``,
whose safetensors cache makes every later run, protocol and suite read the features instead of re-encoding.
Few-shot concatenates the cached features of the dataset's disjoint splits (train, the official val if there is
one, test); a val carved out of train for model selection is never added (it is part of train already). Before
loading anything, every planned row's key is looked up in the store: when all rows of a dataset are there (and
``force`` is off) nothing is decoded, encoded or fitted; when only some are, only those are computed.

**Calibration** fits the temperature, by default, as their code does (``calibration_cv``, ``fit: cv``): 5 seeded
folds of the *test* logits of the refit linear probe, T fitted on one fold and the ECE measured on the other four,
averaged. The refit probe saw val, so its val logits are in-sample and would give too small a T; the CV on test is
what their published numbers used. ``extra["temperature"]`` of a CV row is the median of the five fold
temperatures, and the scaled reliability diagram is the whole test set's at that T (the ECE is the CV mean, not
that diagram's). ``fit: val`` is Guo et al.'s protocol instead: a train-only fit at the chosen L2 strength, T
fitted on its val logits, both ECEs on its test logits. The linear probe is fitted once for both: when the linear
row is already stored but calibration is not, the probe is refit at the stored ``best_wd`` only (the same model up
to the solver's tolerance).

**Time.** Each row's ``seconds`` is the protocol's own time (fitting, episodes, fine-tuning). ``extra`` also has
``encode_seconds`` — the time this run spent getting the dataset's features (encoding, or reading the feature
cache), shared by every frozen protocol of that dataset — and ``decode_seconds`` (building or opening the uint8
image cache). ``run_suite`` returns the same split as ``SuiteRun.timings`` so that a benchmark can report the share
spent encoding against fitting. Fine-tuning has no separate encoding: its forward passes are its training.

**Suite YAML** (``configs/transfer/suite.yaml`` is ``transfer``, the default, sized for a CPU with every scale-down
commented; ``configs/transfer/paper.yaml`` is ``transfer_paper``, the paper's settings, for a GPU)::

    name: transfer
    taps: [pre_logits]                  # optional; frozen protocols run on each, finetune on pre_logits
    datasets:
      - name: cifar10                   # a registered name (`selfsup list datasets`)
        resolution: 64                  # evaluation resolution (default: the images' own)
        protocols: [linear, knn, fewshot, calibration, finetune]
      - path: pets/                     # a user's ImageFolder dir or zip, relative to this file
        metric: mean_per_class          # optional override of the dataset's metric
        size: 80                        # optional decode size (shorter side + centre crop)
        protocols: [linear, fewshot]
        settings: {fewshot: {shots: [5]}}   # optional per-dataset protocol settings
    protocols:                          # settings of each protocol (fields of its config class)
      linear: {max_iter: 100}
      fewshot: {ways: 5, shots: [5, 20, 50], queries: 15, episodes: 600}
      calibration: {bins: 15, fit: cv, folds: 5}
      finetune: {search: halving, steps: 100, lrs: [0.1, 0.01], wds: [0.0, 1.0e-4]}

**What the features keep** (``run_analyses``, ``selfsup analyse``): colour against spatial sensitivity, occlusion
saliency and deep-image-prior inversion (``analysis.information``, the paper's §4.8–4.9) on a seeded sample of a
dataset's test split, in the report's contracts (protocols ``sensitivity``, ``saliency``, ``inversion``).

Usage::

    from selfsup.evaluate.transfer_suite import run_suite
    out = run_suite(["runs/simclr"], "transfer", Store(), device="cuda")
    out.rows, out.timings
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from selfsup.config import RECIPES, config_hash, protocol_config
from selfsup.data import load
from selfsup.data.registry import METRICS, DatasetSpec, resolve
from selfsup.errors import UserError
from selfsup.evaluate.calibration import calibration, calibration_cv, logits_from_linear, reliability
from selfsup.evaluate.features import Encoder, load_encoder
from selfsup.evaluate.fewshot import FewShotConfig, fewshot
from selfsup.evaluate.linear import fit_logistic, linear_probe
from selfsup.evaluate.suite import KNNConfig, LinearConfig, Splits, load_splits, run_knn
from selfsup.evaluate.transfer_finetune import TransferFinetuneConfig, transfer_finetune
from selfsup.results.store import Result, Store

FROZEN = ("linear", "knn", "fewshot", "calibration")
PROTOCOLS = (*FROZEN, "finetune")
ANALYSES = ("sensitivity", "saliency", "inversion")
SUITES = RECIPES / "transfer"

DESCRIPTIONS = {
    "fewshot": "few-shot prototypical episodes on frozen features of all splits pooled (Ericsson et al. 2021 §3: "
               "5-way, 5/20/50 shots, 15 queries, 600 episodes, mean ± 1.96σ/√n); in --suite",
    "calibration": "ECE (15 bins) of the linear probe, raw and temperature-scaled (Ericsson et al. 2021; T by 5-fold "
                   "CV on the test logits as their code); in --suite",
    "finetune": "transfer fine-tuning (Ericsson et al. 2021 §3: SGD Nesterov, cosine, lr × wd grid chosen on val, "
                "retrained on train+val); in --suite",
    "sensitivity": "colour against spatial sensitivity of the features (Ericsson et al. 2021 §4.8); selfsup analyse",
    "saliency": "occlusion saliency and attentive diffusion (Ericsson et al. 2021 §4.9, App. A.9); selfsup analyse",
    "inversion": "deep-image-prior inversion of the last block, per-channel colour error (Ericsson et al. 2021 §4.8, "
                 "App. A.8); selfsup analyse",
}


@dataclass
class CalibrationConfig:
    """ECE with ``bins`` bins (15, the paper's); ``fit``: ``"cv"`` (their code: ``folds``-fold CV of T on the test
    logits, seeded by ``seed``) or ``"val"`` (Guo et al.: T on the val logits of a train-only fit)."""
    bins: int = 15
    fit: str = "cv"
    folds: int = 5
    seed: int = 0


CONFIGS: dict[str, type] = {"linear": LinearConfig, "knn": KNNConfig, "fewshot": FewShotConfig,
                            "calibration": CalibrationConfig, "finetune": TransferFinetuneConfig}
CALIBRATION_FITS = ("cv", "val")


# --------------------------------------------------------------------------- the suite file


@dataclass
class DatasetEntry:
    """One dataset of a suite: what to run on it and how to present its images."""
    name: str                      # a registered name or a path (``data.registry.resolve``)
    protocols: tuple[str, ...]
    resolution: int | None = None  # evaluation resolution; None: the images' own
    size: int | None = None        # decode size (shorter side + centre crop); None: see ``decode_size``
    metric: str | None = None      # override of the dataset's metric
    settings: dict = field(default_factory=dict)  # protocol -> settings for this dataset only


@dataclass
class Suite:
    name: str
    datasets: list[DatasetEntry]
    settings: dict = field(default_factory=dict)   # protocol -> settings (fields of CONFIGS[protocol])
    taps: tuple[str, ...] = ("pre_logits",)
    path: Path | None = None

    def config(self, protocol: str, entry: DatasetEntry, overrides: dict | None = None):
        """The protocol's config for ``entry``: defaults < suite settings < the dataset's < ``overrides``."""
        values = {**self.settings.get(protocol, {}), **entry.settings.get(protocol, {}),
                  **(overrides or {}).get(protocol, {})}
        return _make(protocol, values, self.path)


def _where(path: Path | None) -> str:
    return f" in {path}" if path else ""


def _make(protocol: str, values: dict, path: Path | None = None):
    if protocol == "fewshot" and "shots" in values and not isinstance(values["shots"], list | tuple):
        values = {**values, "shots": [values["shots"]]}   # fewshot.shots=5 means [5]
    try:
        cfg = protocol_config(CONFIGS[protocol], values, protocol)
    except UserError as err:
        raise type(err)(f"{path}: {err}" if path else str(err)) from err
    if protocol == "calibration" and cfg.fit not in CALIBRATION_FITS:
        raise UserError(f"calibration fit must be one of {CALIBRATION_FITS}, got {cfg.fit!r}{_where(path)}")
    return cfg


def suite_path(name: str | Path) -> Path:
    """A suite YAML path, or the name of a shipped suite (its ``name:`` or file stem under configs/transfer)."""
    path = Path(name)
    if path.is_file():
        return path
    import yaml

    named, stems = {}, {}
    for p in sorted(SUITES.glob("*.yaml")):
        with open(p) as f:
            spec = yaml.safe_load(f) or {}
        if "datasets" not in spec:   # configs/transfer also holds sweeps (models.yaml, cpu_study.yaml)
            continue
        named[spec.get("name", p.stem)] = p
        stems[p.stem] = p
    found = named.get(str(name)) or stems.get(str(name))
    if found is None:
        raise FileNotFoundError(f"suite {name} is neither a YAML file nor a shipped suite; shipped: "
                                f"{', '.join(f'{k} ({p.relative_to(RECIPES)})' for k, p in sorted(named.items()))}")
    return found


def load_suite(suite: str | Path | dict | Suite) -> Suite:
    """Parse and check a suite (a shipped name, a YAML path or the parsed mapping); errors name the file."""
    if isinstance(suite, Suite):
        return suite
    path = None
    if not isinstance(suite, dict):
        import yaml

        path = suite_path(suite)
        with open(path) as f:
            suite = yaml.safe_load(f) or {}
        if not isinstance(suite, dict):
            raise UserError(f"{path} must hold a mapping with name, datasets and protocols")
    where = _where(path)
    unknown = sorted(set(suite) - {"name", "datasets", "protocols", "taps"})
    if unknown:
        raise UserError(f"unknown suite key(s) {unknown}{where}; keys: name, datasets, protocols, taps")
    settings = suite.get("protocols") or {}
    for protocol, values in settings.items():
        if protocol not in CONFIGS:
            raise UserError(f"settings for unknown protocol {protocol!r}{where}; protocols: {', '.join(PROTOCOLS)}")
        _make(protocol, values or {}, path)
    settings = {k: dict(v or {}) for k, v in settings.items()}
    entries = []
    for i, item in enumerate(suite.get("datasets") or []):
        if isinstance(item, str):
            item = {"name": item}
        bad = sorted(set(item) - {"name", "path", "protocols", "resolution", "size", "metric", "settings"})
        if bad or ("name" in item) == ("path" in item):
            raise UserError(f"dataset {i + 1}{where}: give exactly one of name or path, and only the keys "
                            f"protocols, resolution, size, metric, settings (got {sorted(item)})")
        name = item.get("name")
        if name is None:  # a path: relative to the suite file
            p = Path(item["path"]).expanduser()
            name = str(p if p.is_absolute() or path is None else (path.parent / p).resolve())
        protocols = tuple(item.get("protocols") or PROTOCOLS)
        wrong = [p for p in protocols if p not in PROTOCOLS]
        if wrong:
            raise UserError(f"dataset {name}{where}: unknown protocol(s) {wrong}; protocols: {', '.join(PROTOCOLS)}")
        if item.get("metric") is not None and item["metric"] not in METRICS:
            raise UserError(f"dataset {name}{where}: metric must be one of {METRICS}, got {item['metric']!r}")
        own = {k: dict(v or {}) for k, v in (item.get("settings") or {}).items()}
        for protocol, values in own.items():
            if protocol not in CONFIGS:
                raise UserError(f"dataset {name}{where}: settings for unknown protocol {protocol!r}")
            _make(protocol, {**settings.get(protocol, {}), **values}, path)
        entries.append(DatasetEntry(name, protocols, item.get("resolution"), item.get("size"), item.get("metric"),
                                    own))
    if not entries:
        raise UserError(f"the suite{where} lists no datasets")
    taps = suite.get("taps") or ["pre_logits"]
    return Suite(str(suite.get("name") or (path.stem if path else "suite")), entries, settings,
                 tuple([taps] if isinstance(taps, str) else taps), path)


def decode_size(spec: DatasetSpec, size: int | None, resolution: int | None) -> int | None:
    """The size images are decoded at: the suite's ``size``; else, for a path dataset (unknown geometry), the
    evaluation resolution (shorter side + centre crop, the paper's view); else the native size (named datasets
    are square)."""
    if size is not None:
        return size
    return resolution if spec.resolution is None else None


# --------------------------------------------------------------------------- running it


@dataclass
class Timing:
    """Where one (model, dataset, protocol) spent its time in this run. ``protocol`` ``"features"`` is the shared
    cost: decoding the images (used by every protocol in ``shared_by``) and encoding them or reading the feature
    cache (used by the frozen ones, all taps at once); the others have ``fit_seconds`` only."""
    model: str
    dataset: str
    protocol: str
    tap: str
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0
    fit_seconds: float = 0.0
    computed: bool = True          # False: every row was already in the store
    shared_by: tuple[str, ...] = ()


@dataclass
class SuiteRun:
    rows: list[Result]
    timings: list[Timing]
    skipped: list[str]             # what could not be measured, and why (e.g. a class-poor few-shot setting)


@dataclass
class _Planned:
    protocol: str
    tap: str
    cfg: object
    settings: dict
    key: dict
    stored: list
    shots: int | None = None
    metrics: tuple[str, ...] = ()

    @property
    def missing(self) -> bool:
        have = {r.metric for r in self.stored}
        return not self.stored or any(m not in have for m in self.metrics)


def _encoder(item) -> Encoder:
    return item if isinstance(item, Encoder) else load_encoder(item)


def _linear(s: Splits, cfg: LinearConfig, device, strengths=None):
    """``suite.run_linear``, also returning the fitted probe (its refit ``coef`` feeds calibration)."""
    (xtr, ytr), (xva, yva) = s.train_and_val()
    xte, yte = s.test
    r = linear_probe(xtr, ytr, xva, yva, xte, yte, s.num_classes, metric=s.metric,
                     strengths=strengths or cfg.strengths, max_iter=cfg.max_iter, device=device)
    extra = {"best_wd": r.best_wd, "val_scores": r.val_scores, "converged": r.converged,
             "iterations": r.iterations, "refit_converged": r.refit_converged, "skipped": r.skipped}
    return r, extra


def _calibrate(s: Splits, probe, cfg: CalibrationConfig, linear_cfg: LinearConfig, device) -> tuple[dict, dict]:
    """Raw and scaled (value, extra) of the probe's test logits, per ``cfg.fit``."""
    xte, yte = s.test
    k = s.num_classes
    if cfg.fit == "cv":
        coef = probe.coef.double()
        d = coef.shape[1] - 1
        z = logits_from_linear(coef[:, :d], coef[:, d], xte.double())
        c = calibration_cv(z, yte, folds=cfg.folds, bins=cfg.bins, seed=cfg.seed)
        t = float(np.median(c["temperatures"]))
        scaled = reliability(torch.softmax(z / t, dim=1), yte, cfg.bins)
        common = {"fit": "cv", "folds": cfg.folds, "temperatures": c["temperatures"],
                  "ece_scaled_folds": c["ece_scaled_folds"], "temperature_at_bound": c["temperature_at_bound"],
                  "accuracy": c["accuracy"], "best_wd": probe.best_wd}
        return ({"value": c["ece"], "extra": {"temperature": t, "reliability": c["reliability"], **common}},
                {"value": c["ece_scaled"], "extra": {"temperature": t, "reliability": scaled, **common}})
    (xtr, ytr), (xva, yva) = s.train_and_val()
    theta, _ = fit_logistic(xtr.to(device), ytr.to(device), k, probe.best_wd, max_iter=linear_cfg.max_iter)
    theta = theta.double().cpu()
    d = theta.shape[1] - 1
    c = calibration(logits_from_linear(theta[:, :d], theta[:, d], xva.double()), yva,
                    logits_from_linear(theta[:, :d], theta[:, d], xte.double()), yte, bins=cfg.bins)
    common = {"fit": "val", "temperature_at_bound": c["temperature_at_bound"], "accuracy": c["accuracy"],
              "nll": c["nll"], "nll_scaled": c["nll_scaled"], "best_wd": probe.best_wd}
    t = c["temperature"]
    return ({"value": c["ece"], "extra": {"temperature": t, "reliability": c["reliability"], **common}},
            {"value": c["ece_scaled"], "extra": {"temperature": t, "reliability": c["reliability_scaled"], **common}})


def _pool(s: Splits) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Features of every disjoint split, concatenated: train, the official val (if any), test."""
    parts = {"train": s.train, **({"val": s.val} if s.val is not None else {}), "test": s.test}
    x = torch.cat([p[0] for p in parts.values()])
    y = torch.cat([p[1] for p in parts.values()])
    return x, y, {name: len(p[1]) for name, p in parts.items()}


def run_suite(paths_or_encoders: Sequence[str | Path | Encoder] | str | Path | Encoder,
              suite: str | Path | dict | Suite = "transfer", store: Store | None = None, device: str = "cpu",
              force: bool = False, log: Callable[[str], None] | None = print, overrides: dict | None = None,
              tags: dict | None = None) -> SuiteRun:
    """Run ``suite`` (a shipped name, a YAML path or its mapping) for every model and store every figure.

    ``paths_or_encoders``: run directories, backbone ``.safetensors`` files or ``Encoder``s. ``overrides``
    (protocol -> settings, e.g. ``{"finetune": {"steps": 50}}``) apply on top of the suite's settings for every
    dataset. Rows already in the store for the same key are returned as they are, unless ``force``. ``tags`` are
    kept in each new row's ``extra``. Returns the rows (new and stored, in suite order), the time split and what
    was skipped."""
    suite = load_suite(suite)
    store = store if store is not None else Store()
    log = log or (lambda _: None)
    for protocol, values in (overrides or {}).items():
        if protocol not in CONFIGS:
            raise UserError(f"settings given for unknown protocol {protocol!r}; suite protocols: {', '.join(CONFIGS)}")
        _make(protocol, {**suite.settings.get(protocol, {}), **(values or {})})
    items = paths_or_encoders if isinstance(paths_or_encoders, list | tuple) else [paths_or_encoders]
    out = SuiteRun([], [], [])
    for item in items:
        encoder = _encoder(item)
        unknown = [t for t in suite.taps if t not in encoder.backbone.taps]
        if unknown:
            raise UserError(f"suite {suite.name}: unknown tap(s) {unknown}; {encoder.label} has "
                            f"{', '.join(encoder.backbone.taps)}")
        for entry in suite.datasets:
            _run_dataset(encoder, suite, entry, store, device, force, log, overrides, tags or {}, out)
    return out


def _run_dataset(encoder: Encoder, suite: Suite, entry: DatasetEntry, store: Store, device, force: bool, log,
                 overrides: dict | None, tags: dict, out: SuiteRun) -> None:
    spec = resolve(entry.name)
    if spec.test_split is None:
        raise UserError(f"dataset {entry.name} has no test or val split to score on (splits: {spec.splits})")
    metric = entry.metric or spec.metric
    size = decode_size(spec, entry.size, entry.resolution)
    base = {"resolution": entry.resolution}
    if size is not None:  # only when set, so that rows keep the key of ``selfsup evaluate`` at the same resolution
        base["size"] = size
    if entry.metric is not None and entry.metric != spec.metric:
        base["metric"] = metric

    def key(protocol: str, tap: str, settings: dict, split: str | None = None) -> dict:
        return dict(model=encoder.label, model_hash=encoder.weights_hash, dataset=spec.name,
                    split=split or spec.test_split, protocol=protocol, tap=tap, config_hash=config_hash(settings))

    def planned(protocol, tap, cfg, settings, split=None, shots=None, metrics=()):
        k = key(protocol, tap, settings, split)
        return _Planned(protocol, tap, cfg, settings, k, [] if force else store.query(**k), shots, metrics)

    plan: list[_Planned] = []
    linear_cfg = suite.config("linear", entry, overrides)
    for tap in suite.taps:
        for protocol in (p for p in FROZEN if p in entry.protocols):
            cfg = suite.config(protocol, entry, overrides)
            if protocol in ("linear", "knn"):  # the settings of ``suite.evaluate_model``: one key for both
                plan.append(planned(protocol, tap, cfg, {**asdict(cfg), **base}, metrics=(metric,)))
            elif protocol == "fewshot":
                for shots in cfg.shots:
                    one = dataclasses.replace(cfg, shots=shots)
                    settings = {**asdict(one), **{k: v for k, v in base.items() if k != "metric"}}
                    plan.append(planned(protocol, tap, one, settings, split="all", shots=shots, metrics=("accuracy",)))
            else:
                settings = {**asdict(cfg), "linear": asdict(linear_cfg), **base}
                plan.append(planned(protocol, tap, cfg, settings, metrics=("ece", "ece_scaled")))
    if "finetune" in entry.protocols:
        cfg = suite.config("finetune", entry, overrides)
        plan.append(planned("finetune", "pre_logits", cfg, {**asdict(cfg), **base}, metrics=(metric,)))

    todo = [p for p in plan if p.missing]
    taps = tuple(dict.fromkeys(p.tap for p in todo if p.protocol in FROZEN))
    label = f"{encoder.label} · {spec.name}"
    if not todo:
        log(f"{label}: all {len(plan)} figures in the store")
    decode_seconds = encode_seconds = 0.0
    splits: dict[str, Splits] = {}
    if todo:
        start = time.perf_counter()
        for split in (spec.train_split, spec.val_split, spec.test_split):
            if split:
                load(entry.name, split, size=size)   # builds the uint8 cache once; later loads memory-map it
        decode_seconds = time.perf_counter() - start
    if taps:
        start = time.perf_counter()
        splits = {t: dataclasses.replace(s, metric=metric)
                  for t, s in load_splits(encoder, entry.name, taps, entry.resolution, device, size=size).items()}
        encode_seconds = time.perf_counter() - start
        log(f"{label}: features of {', '.join(taps)} at {entry.resolution or 'native'} px "
            f"({decode_seconds:.1f}s decoding, {encode_seconds:.1f}s encoding or reading the cache)")
    out.timings.append(Timing(encoder.label, spec.name, "features", ",".join(taps) or "-", decode_seconds,
                              encode_seconds, 0.0, bool(todo),
                              tuple(dict.fromkeys(p.protocol for p in todo))))

    shared = {"encode_seconds": encode_seconds, "decode_seconds": decode_seconds}
    probes: dict[str, object] = {}
    fit_time: dict[tuple[str, str], float] = {}

    def store_rows(rows: list[Result]) -> None:
        store.put(rows)
        out.rows.extend(rows)

    for p in plan:
        if not p.missing:
            out.rows.extend(p.stored)
            fit_time.setdefault((p.protocol, p.tap), 0.0)
            continue
        start = time.perf_counter()
        extra_common = {**shared, **tags, "suite": suite.name}
        if p.protocol == "linear":
            probe, extra = _linear(splits[p.tap], p.cfg, device)
            probes[p.tap] = probe
            seconds = probe.seconds
            store_rows([Result(**p.key, metric=metric, value=probe.test_score, seconds=seconds, config=p.settings,
                               extra={**extra, **extra_common})])
            log(f"{label}: linear {metric} {probe.test_score:.2f} (wd {probe.best_wd:.3g}, {seconds:.1f}s)")
        elif p.protocol == "knn":
            value, extra = run_knn(splits[p.tap], p.cfg, device)
            seconds = time.perf_counter() - start
            store_rows([Result(**p.key, metric=metric, value=value, seconds=seconds, config=p.settings,
                               extra={**extra, **extra_common})])
            log(f"{label}: knn {metric} {value:.2f} ({seconds:.1f}s)")
        elif p.protocol == "fewshot":
            x, y, pool = _pool(splits[p.tap])
            try:
                r = fewshot(x, y, dataclasses.replace(p.cfg, shots=[p.shots]))[p.shots]
            except ValueError as err:
                out.skipped.append(f"{label}: fewshot {p.shots}-shot: {err}")
                log(f"{label}: fewshot {p.shots}-shot skipped: {err}")
                continue
            seconds = r.pop("seconds")
            value, ci = r.pop("value"), r.pop("ci")
            store_rows([Result(**p.key, metric="accuracy", value=value, ci=ci, seconds=seconds, config=p.settings,
                               extra={**r, "pool": pool, "pool_size": len(y), **extra_common})])
            log(f"{label}: fewshot {p.cfg.ways}-way {p.shots}-shot {value:.2f} ± {ci:.2f} ({seconds:.1f}s)")
        elif p.protocol == "calibration":
            probe = probes.get(p.tap)
            if probe is None:  # the linear row is stored (or not asked for): refit at its chosen strength only
                linear_row = store.query(**key("linear", p.tap, {**asdict(linear_cfg), **base}), metric=metric)
                strengths = [linear_row[-1].extra["best_wd"]] if linear_row and not force else None
                probe, _ = _linear(splits[p.tap], linear_cfg, device, strengths)
                probes[p.tap] = probe
            raw, scaled = _calibrate(splits[p.tap], probe, p.cfg, linear_cfg, device)
            seconds = time.perf_counter() - start
            store_rows([Result(**p.key, metric=m, value=r["value"], seconds=seconds, config=p.settings,
                               extra={**r["extra"], **extra_common})
                        for m, r in (("ece", raw), ("ece_scaled", scaled))])
            log(f"{label}: ECE {raw['value']:.2f} raw, {scaled['value']:.2f} scaled (T "
                f"{raw['extra']['temperature']:.3g}, {seconds:.1f}s)")
        else:
            seconds = _finetune(encoder, spec, entry, metric, size, p, device, log, store_rows, extra_common)
        fit_time[(p.protocol, p.tap)] = fit_time.get((p.protocol, p.tap), 0.0) + seconds
    for (protocol, tap), seconds in fit_time.items():
        computed = any(p.missing for p in plan if (p.protocol, p.tap) == (protocol, tap))
        out.timings.append(Timing(encoder.label, spec.name, protocol, tap, fit_seconds=seconds, computed=computed))


def _finetune(encoder: Encoder, spec: DatasetSpec, entry: DatasetEntry, metric: str, size: int | None, p: _Planned,
              device, log, store_rows, extra_common: dict) -> float:
    train = load(entry.name, spec.train_split, size=size)
    val = load(entry.name, spec.val_split, size=size) if spec.val_split else None
    test = load(entry.name, spec.test_split, size=size)
    r = transfer_finetune(encoder, train.images, np.array(train.labels), val.images if val else None,
                          np.array(val.labels) if val else None, test.images, np.array(test.labels),
                          spec.num_classes, metric, p.cfg,
                          size=entry.resolution, device=device, log=log)
    seconds = r.pop("seconds")
    value = r.pop("value")
    r.pop("metric")
    store_rows([Result(**p.key, metric=metric, value=value, seconds=seconds, config=p.settings,
                       extra={**r, **extra_common})])
    log(f"{encoder.label} · {spec.name}: finetune {metric} {value:.2f} (lr {r['best_lr']:g}, wd {r['best_wd']:g}, "
        f"{seconds:.1f}s)")
    return seconds


# --------------------------------------------------------------------------- what the features keep


def _sample(n: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``count`` of ``n`` images."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:count])


def run_analyses(paths_or_encoders: Sequence[str | Path | Encoder] | str | Path | Encoder, dataset: str,
                 store: Store | None = None, images: int = 8, invert: int = 1, steps: int = 300,
                 resolution: int | None = None, seed: int = 0, device: str = "cpu", force: bool = False,
                 log: Callable[[str], None] | None = print, analyses: Sequence[str] = ANALYSES) -> list[Result]:
    """What the features keep (Ericsson et al. 2021 §4.8–4.9) on a seeded sample of ``images`` test images of
    ``dataset``: colour against spatial ``sensitivity`` and occlusion ``saliency`` on all of them, deep-image-prior
    ``inversion`` (``steps`` Adam steps; the paper's 3000 at 224 px) of the first ``invert``. Rows, per the
    report's contracts: sensitivity (tap pre_logits, metrics ``colour`` and ``spatial``,
    ``extra["per_perturbation"]``), saliency (``attentive_diffusion`` %, ``extra["maps"]``, ``extra["images"]``),
    inversion (``colour_error``, ``extra["per_channel"]``, ``extra["original"]``, ``extra["inverted"]``)."""
    from selfsup.analysis.information import _png, _to_input, inversion, saliency, sensitivity

    store = store if store is not None else Store()
    log = log or (lambda _: None)
    wrong = [a for a in analyses if a not in ANALYSES]
    if wrong:
        raise UserError(f"unknown analyses {wrong}; available: {', '.join(ANALYSES)}")
    if images < 2 or invert < 0 or invert > images:
        raise UserError(f"need images >= 2 (sensitivity pairs different images) and 0 <= invert <= images; got "
                        f"images={images}, invert={invert}")
    spec = resolve(dataset)
    if spec.test_split is None:
        raise UserError(f"dataset {dataset} has no test or val split (splits: {spec.splits})")
    size = decode_size(spec, None, resolution)
    items = paths_or_encoders if isinstance(paths_or_encoders, list | tuple) else [paths_or_encoders]
    rows: list[Result] = []
    for item in items:
        encoder = _encoder(item)
        taps = list(encoder.backbone.taps)
        inv_tap = "block4" if "block4" in taps else taps[-2]
        base = {"images": images, "seed": seed, "resolution": resolution, **({"size": size} if size else {})}
        jobs = {"sensitivity": ("pre_logits", base),
                "saliency": ("pre_logits", {**base, "stride": 1}),   # the mask: the paper's 10 px at 224, scaled
                "inversion": (inv_tap, {"images": invert, "seed": seed, "resolution": resolution, "steps": steps,
                                        "lr": 1e-3, **({"size": size} if size else {})})}
        keys = {a: dict(model=encoder.label, model_hash=encoder.weights_hash, dataset=spec.name,
                        split=spec.test_split, protocol=a, tap=jobs[a][0], config_hash=config_hash(jobs[a][1]))
                for a in analyses if a != "inversion" or invert > 0}
        stored = {a: ([] if force else store.query(**k)) for a, k in keys.items()}
        if all(stored.values()):
            log(f"{encoder.label} · {spec.name}: analyses in the store")
            rows += [r for a in keys for r in stored[a]]
            continue
        test = load(dataset, spec.test_split, size=size)
        pick = np.array(test.images[_sample(len(test.images), images, seed)])
        for a, k in keys.items():
            if stored[a]:
                rows += stored[a]
                continue
            tap, settings = jobs[a]
            start = time.perf_counter()
            if a == "sensitivity":
                r = sensitivity(encoder, pick, seed=seed, tap=tap, resolution=resolution, device=device)
                per = {("rotation" if n == "rotate90" else n): v for n, v in r["per_perturbation"].items()}
                dist = {("rotation" if n == "rotate90" else n): v for n, v in r["distances"].items()}
                if r["colour"] is None:
                    log(f"{encoder.label} · {spec.name}: sensitivity undefined (every image has the same features)")
                    continue
                extra = {"per_perturbation": per, "distances": dist, "pair_distance": r["pair_distance"],
                         "colour_to_spatial": r["colour_to_spatial"], "n_images": r["n_images"], "size": r["size"]}
                seconds = time.perf_counter() - start
                new = [Result(**k, metric=m, value=r[m], seconds=seconds, config=settings, extra=extra)
                       for m in ("colour", "spatial")]
                log(f"{encoder.label} · {spec.name}: sensitivity colour {r['colour']:.3f} spatial {r['spatial']:.3f}")
            elif a == "saliency":
                r = saliency(encoder, pick, tap=tap, resolution=resolution, device=device)
                x = _to_input(pick[:len(r["maps"])], resolution, "cpu")
                extra = {"maps": r["maps"], "images": [_png(im) for im in x], "per_image": r["per_image"],
                         "mask": r["mask"], "stride": r["stride"], "size": r["size"], "score": r["score"]}
                new = [Result(**k, metric="attentive_diffusion", value=r["attentive_diffusion"],
                              seconds=time.perf_counter() - start, config=settings, extra=extra)]
                log(f"{encoder.label} · {spec.name}: attentive diffusion {r['attentive_diffusion']:.1f} %")
            else:
                runs = [inversion(encoder, pick[i], steps=steps, tap=tap, seed=seed, resolution=resolution,
                                  device=device) for i in range(invert)]
                per_channel = [float(v) for v in np.mean([r["channel_mse"] for r in runs], axis=0)]
                extra = {"per_channel": per_channel, "original": runs[0]["original_png"],
                         "inverted": runs[0]["inverted_png"], "per_image": [r["colour_error"] for r in runs],
                         "loss_final": [r["loss_final"] for r in runs], "steps": steps, "size": runs[0]["size"]}
                value = float(np.mean([r["colour_error"] for r in runs]))
                new = [Result(**k, metric="colour_error", value=value, seconds=time.perf_counter() - start,
                              config=settings, extra=extra)]
                log(f"{encoder.label} · {spec.name}: inversion colour error {value:.4f} ({steps} steps)")
            store.put(new)
            rows += new
    return rows
