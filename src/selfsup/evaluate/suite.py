"""Run frozen-feature protocols for an encoder on a dataset and land every figure in the results store.

``evaluate_model`` encodes each split once (through the feature cache), runs each requested protocol,
and writes one ``Result`` per (model, dataset, split, protocol, tap, config). A figure already in the
store for the same weights and settings is not computed again unless ``force`` is set.

Split roles follow Ericsson et al. 2021 §3: probes fit on the dataset's train split and are scored on
its test split; hyperparameters are chosen on the official val split when there is one, else on a
seeded 20 % of train, and the linear probe is refit on train+val before testing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from selfsup.config import config_hash, protocol_config, read_yaml
from selfsup.data import load
from selfsup.data.registry import per_class_subset, resolve, train_val_split
from selfsup.errors import UserError
from selfsup.evaluate.features import MAX_DIMS, Encoder, tap_features
from selfsup.evaluate.finetune import FinetuneConfig, finetune
from selfsup.evaluate.knn import knn_predict
from selfsup.evaluate.linear import linear_probe
from selfsup.evaluate.metrics import score
from selfsup.evaluate.mlp import MLPConfig, mlp_probe
from selfsup.evaluate.sgd_probe import SGDProbeConfig, sgd_probe
from selfsup.results.store import Result, Store


@dataclass
class Splits:
    """Cached features of one dataset for one encoder: train, optional official val, test."""
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    metric: str
    seed: int = 0

    def train_and_val(self) -> tuple[tuple, tuple]:
        """The official val split, else a seeded, class-stratified 20 % of train."""
        if self.val is not None:
            return self.train, self.val
        x, y = self.train
        tr, va = train_val_split(y.numpy(), seed=self.seed)
        tr, va = torch.as_tensor(tr), torch.as_tensor(va)
        return (x[tr], y[tr]), (x[va], y[va])


@dataclass
class KNNConfig:
    k: int = 200              # Wu et al. 2018 (InstDisc) §3.4
    temperature: float = 0.1


@dataclass
class LinearConfig:
    strengths: list = field(default_factory=lambda: [float(f"{v:.6g}") for v in torch.logspace(-6, 5, 45).tolist()])
    max_iter: int = 100       # Ericsson et al.'s code (scikit-learn's default)


def run_knn(s: Splits, cfg: KNNConfig, device) -> tuple[float, dict]:
    (xtr, ytr), (xte, yte) = s.train, s.test
    pred = knn_predict(xtr.to(device), ytr.to(device), xte.to(device), s.num_classes, k=cfg.k,
                       temperature=cfg.temperature)
    return score(s.metric, pred.cpu(), yte, s.num_classes), {}


def run_linear(s: Splits, cfg: LinearConfig, device) -> tuple[float, dict]:
    (xtr, ytr), (xva, yva) = s.train_and_val()
    xte, yte = s.test
    r = linear_probe(xtr, ytr, xva, yva, xte, yte, s.num_classes, metric=s.metric,
                     strengths=cfg.strengths, max_iter=cfg.max_iter, device=device)
    extra = {"best_wd": r.best_wd, "val_scores": r.val_scores, "converged": r.converged,
             "iterations": r.iterations, "refit_converged": r.refit_converged, "skipped": r.skipped}
    return r.test_score, extra


def run_mlp(s: Splits, cfg: MLPConfig, device) -> tuple[float, dict]:
    train, val = s.train_and_val()
    r = mlp_probe(train, val, s.test, s.num_classes, metric=s.metric, cfg=cfg, device=device)
    return r["value"], {"best_wd": r["best_wd"], "val_scores": r["val_scores"]}


PROTOCOLS: dict[str, tuple[type, Callable]] = {
    "knn": (KNNConfig, run_knn),
    "linear": (LinearConfig, run_linear),
    "mlp": (MLPConfig, run_mlp),
}

def run_sgd(encoder: Encoder, dataset: str, taps: tuple[str, ...], cfg: SGDProbeConfig, resolution: int | None,
            device, train_per_class: int | None, max_dims: int) -> dict[str, tuple[float, dict]]:
    """Kolesnikov et al.'s SGD probe with augmentation on the images (not on cached features): every tap at
    once, trained on train (+ the official val, their ``trainval``), scored on test after every epoch."""
    spec = resolve(dataset)
    train = load(dataset, spec.train_split)
    images, labels = train.images, np.asarray(train.labels)
    if train_per_class:
        keep = per_class_subset(labels, train_per_class)
        images, labels = images[keep], labels[keep]
    if spec.val_split:
        val = load(dataset, spec.val_split)
        images, labels = np.concatenate([images, val.images]), np.concatenate([labels, np.asarray(val.labels)])
    test = load(dataset, spec.test_split)
    out = sgd_probe(encoder, images, labels, test.images, np.asarray(test.labels), spec.num_classes, taps, cfg,
                    metric=spec.metric, size=resolution, max_dims=max_dims, device=device, log=print)
    return {t: (r["value"], {"curve": r["curve"], "seconds": r["seconds"]}) for t, r in out.items()}


@dataclass
class SemiSupConfig(FinetuneConfig):
    """PIRL §3.3's semi-supervised protocol: fine-tune on ``fraction`` of the train labels (1 % or 10 %,
    class-balanced, seeded by ``seed``), VISSL's recipe (``evaluate.finetune``)."""
    fraction: float = 0.01
    seed: int = 0


def run_semisup(encoder: Encoder, dataset: str, cfg: SemiSupConfig, resolution: int | None,
                device) -> tuple[float, dict]:
    """Top-5 (PIRL's headline figure) of the fine-tuned network on the test split; top-1 and the curve in extra."""
    spec = resolve(dataset)
    train, test = load(dataset, spec.train_split), load(dataset, spec.test_split)
    recipe = FinetuneConfig(**{f.name: getattr(cfg, f.name) for f in fields(FinetuneConfig)})
    r = finetune(encoder, train.images, np.array(train.labels), test.images, np.array(test.labels),
                 spec.num_classes, recipe, fraction=cfg.fraction, seed=cfg.seed, metric=spec.metric,
                 size=resolution, device=device, log=print)
    return r["top5"], {"top1": r["top1"], "train_images": r["train_images"], "curve": r["curve"],
                       "seconds": r["seconds"]}


DESCRIPTIONS = {
    "knn": "weighted kNN on frozen features (Wu et al. 2018: k=200, T=0.1, cosine)",
    "linear": "many-shot linear probe (Ericsson et al. 2021 §3: L-BFGS, 45 L2 strengths, val-selected, refit)",
    "mlp": "MLP probe (Kolesnikov et al. 2019: 1000 hidden, ReLU, dropout 0.5, SGD 70 epochs) on frozen features",
    "sgd": "SGD linear probe with augmentation on every tap at once (Kolesnikov et al. 2019: random crops, "
           "70 epochs, decays at 30/50), with its accuracy-against-epoch curve",
    "semisup": "semi-supervised fine-tuning on 1 % (semisup.fraction=0.01) or 10 % of the train labels "
               "(PIRL §3.3, VISSL's recipe): top-5 and top-1 on the test split",
}
CONFIGS = {**{name: cfg for name, (cfg, _) in PROTOCOLS.items()}, "sgd": SGDProbeConfig, "semisup": SemiSupConfig}
IMAGE_PROTOCOLS = ("sgd", "semisup")   # trained on augmented images, not on cached features


def load_splits(encoder: Encoder, dataset: str, taps: tuple[str, ...], resolution: int | None, device,
                size: int | None = None, train_per_class: int | None = None,
                max_dims: int = MAX_DIMS, view: str = "image") -> dict[str, Splits]:
    """Cached features of every split for every tap (one encoding pass per split for all taps).
    ``train_per_class`` keeps a seeded ``per_class_subset`` of the train split (the whole split is
    encoded and cached either way); val and test stay whole."""
    spec = resolve(dataset)
    if spec.test_split is None:
        raise UserError(f"dataset {dataset} has no test or val split to score on (splits: {spec.splits})")

    def encoded(split):
        return tap_features(encoder, load(dataset, split, size=size), taps, resolution, device, max_dims=max_dims,
                            view=view)

    train, test = encoded(spec.train_split), encoded(spec.test_split)
    val = encoded(spec.val_split) if spec.val_split else None
    if train_per_class:
        keep = torch.as_tensor(per_class_subset(next(iter(train.values()))[1].numpy(), train_per_class))
        train = {t: (x[keep], y[keep]) for t, (x, y) in train.items()}
    return {t: Splits(train[t], val[t] if val else None, test[t], spec.num_classes, spec.metric) for t in taps}


def evaluate_model(encoder: Encoder, dataset: str, protocols: list[str], store: Store,
                   taps: tuple[str, ...] = ("pre_logits",), resolution: int | None = None, device: str = "cpu",
                   force: bool = False, overrides: dict | None = None, tags: dict | None = None,
                   train_per_class: int | None = None, max_dims: int = MAX_DIMS, view: str = "image") -> list[Result]:
    """Run ``protocols`` on every tap in ``taps`` for ``encoder`` on ``dataset``. Returns the rows in
    (tap, protocol) order: new ones (also stored) and those already in the store for the same settings.
    ``tags`` (e.g. a sweep cell's coordinates) are kept in each new row's ``extra``. ``train_per_class``
    probes on that many train images per class (seeded); ``max_dims`` bounds each pooled tap (the paper's
    ~9,000 by default); ``view="tiles"`` represents an image by the mean of its nine eval tiles (patch
    models, see ``features``). Each is part of the stored settings when it differs from its default."""
    spec = resolve(dataset)
    unknown = [t for t in taps if t not in encoder.backbone.taps]
    if unknown:
        raise UserError(f"unknown tap(s) {unknown}; {encoder.label} has: {', '.join(encoder.backbone.taps)}")
    for name, values in (overrides or {}).items():
        if name not in CONFIGS:
            raise UserError(f"settings given for unknown protocol {name!r}; protocols: {', '.join(CONFIGS)}")
        protocol_config(CONFIGS[name], values, name)
    planned = []
    for tap in taps:
        for name in protocols:
            if name not in CONFIGS:
                raise UserError(f"unknown protocol {name!r}; available: {', '.join(CONFIGS)}")
            if name == "semisup" and tap != "pre_logits":
                raise UserError(f"semisup fine-tunes the whole network from its pre-logits; got tap {tap!r}")
            cfg = protocol_config(CONFIGS[name], (overrides or {}).get(name, {}), name)
            settings = {**asdict(cfg), "resolution": resolution}
            if train_per_class:  # only when set, so figures stored before the options keep their key
                settings["train_per_class"] = train_per_class
            if max_dims != MAX_DIMS:
                settings["max_dims"] = max_dims
            if view != "image":
                settings["view"] = view
            key = dict(model=encoder.label, model_hash=encoder.weights_hash, dataset=spec.name,
                       split=spec.test_split, protocol=name, tap=tap, config_hash=config_hash(settings))
            stored = [] if force else store.query(**key)
            planned.append((tap, name, cfg, settings, key, stored))
    needed = tuple(dict.fromkeys(tap for tap, name, *_, stored in planned if not stored and name in PROTOCOLS))
    splits = (load_splits(encoder, dataset, needed, resolution, device, train_per_class=train_per_class,
                          max_dims=max_dims, view=view) if needed else {})
    sgd_taps = tuple(tap for tap, name, *_, stored in planned if not stored and name == "sgd")
    if sgd_taps and view != "image":
        raise UserError("the sgd probe augments whole images: use view='image' (the default) with it")
    sgd = (run_sgd(encoder, dataset, sgd_taps, next(c for _, n, c, *_ in planned if n == "sgd"), resolution,
                   device, train_per_class, max_dims) if sgd_taps else {})
    results = []
    for tap, name, cfg, settings, key, stored in planned:
        if stored:
            results += stored
            continue
        start = time.perf_counter()
        if name == "sgd":
            value, extra = sgd[tap]
        elif name == "semisup":
            value, extra = run_semisup(encoder, dataset, cfg, resolution, device)
        else:
            value, extra = PROTOCOLS[name][1](splits[tap], cfg, device)
        extra = dict(extra)
        seconds = extra.pop("seconds", time.perf_counter() - start)  # the sgd probe ran before this loop
        rows = [Result(**key, metric="top5" if name == "semisup" else spec.metric, value=value, seconds=seconds,
                       config=settings, extra={**extra, **(tags or {})})]
        if name == "semisup":  # PIRL reports top-5; top-1 is its own row, so tables show both
            rows.append(Result(**key, metric="top1", value=extra["top1"], seconds=seconds, config=settings,
                               extra=rows[0].extra))
        store.put(rows)
        results += rows
    return results


def evaluate_invariance(path: str, dataset: str, store: Store, representation: str | None = None, seed: int = 0,
                        bins: int = 50, device: str = "cpu", force: bool = False,
                        resolution: int | None = None, bn: str = "running") -> Result:
    """PIRL's invariance analysis (§4.1, Fig. 4) of the model in run directory ``path`` on the held-out split
    of ``dataset`` (its test role): one row, protocol ``invariance``, tap = the representation compared,
    value = the mean unit-l2 distance between f(v_I) and g(v_I^t), ``extra`` the histogram (``invariance``).
    The images are decoded at ``resolution``, by default the run's own ``data.size`` (its training images');
    ``bn`` chooses BN's running or per-batch statistics (``evaluate.invariance``)."""
    from selfsup.evaluate.features import load_encoder
    from selfsup.evaluate.invariance import REPRESENTATIONS, histogram, invariance_distances, load_method

    method = load_method(path)
    representation = representation or REPRESENTATIONS.get(method.name, ("heads",))[0]
    encoder = load_encoder(path)
    spec = resolve(dataset)
    run = Path(path).parent.parent if Path(path).name.startswith("step-") else Path(path)
    if resolution is None and (run / "config.yaml").exists():
        resolution = (read_yaml(run / "config.yaml").get("data") or {}).get("size")
    settings = {"seed": seed, "bins": bins, "representation": representation}
    if resolution:  # absent for native-size images, so figures stored before this setting keep their key
        settings["resolution"] = resolution
    if bn != "running":  # likewise
        settings["bn"] = bn
    key = dict(model=encoder.label, model_hash=encoder.weights_hash, dataset=spec.name, split=spec.test_split,
               protocol="invariance", tap=representation, config_hash=config_hash(settings))
    stored = [] if force else store.query(**key)
    if stored:
        return stored[0]
    start = time.perf_counter()
    d = invariance_distances(method, load(dataset, spec.test_split, size=resolution).images, seed=seed,
                             representation=representation, device=device, bn=bn)
    row = Result(**key, metric="l2_unit", value=float(d.mean()), seconds=time.perf_counter() - start,
                 config=settings, extra={"std": float(d.std()), "method": method.name, **histogram(d, bins)})
    store.put([row])
    return row
