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
from dataclasses import asdict, dataclass, field

import torch

from selfsup.config import config_hash
from selfsup.data import load
from selfsup.data.registry import resolve, train_val_split
from selfsup.evaluate.features import Encoder, features
from selfsup.evaluate.knn import knn_predict
from selfsup.evaluate.linear import linear_probe
from selfsup.evaluate.metrics import score
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


PROTOCOLS: dict[str, tuple[type, Callable]] = {
    "knn": (KNNConfig, run_knn),
    "linear": (LinearConfig, run_linear),
}

DESCRIPTIONS = {
    "knn": "weighted kNN on frozen features (Wu et al. 2018: k=200, T=0.1, cosine)",
    "linear": "many-shot linear probe (Ericsson et al. 2021 §3: L-BFGS, 45 L2 strengths, val-selected, refit)",
}


def load_splits(encoder: Encoder, dataset: str, tap: str, resolution: int | None, device,
                size: int | None = None) -> Splits:
    spec = resolve(dataset)
    if spec.test_split is None:
        raise ValueError(f"dataset {dataset} has no test or val split to score on (splits: {spec.splits})")

    def encoded(split):
        data = load(dataset, split, size=size)
        return features(encoder, data, tap, resolution, device)

    val = encoded(spec.val_split) if spec.val_split else None
    return Splits(encoded(spec.train_split), val, encoded(spec.test_split), spec.num_classes, spec.metric)


def evaluate_model(encoder: Encoder, dataset: str, protocols: list[str], store: Store, tap: str = "pre_logits",
                   resolution: int | None = None, device: str = "cpu", force: bool = False,
                   overrides: dict | None = None) -> list[Result]:
    """Run ``protocols`` for ``encoder`` on ``dataset``; returns (and stores) the new rows plus the rows
    already in the store for the same settings."""
    spec = resolve(dataset)
    results, splits = [], None
    for name in protocols:
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}")
        cfg_cls, fn = PROTOCOLS[name]
        cfg = cfg_cls(**(overrides or {}).get(name, {}))
        settings = {**asdict(cfg), "resolution": resolution}
        key = dict(model=encoder.label, model_hash=encoder.weights_hash, dataset=spec.name, split=spec.test_split,
                   protocol=name, tap=tap, config_hash=config_hash(settings))
        if not force and store.has(**key):
            results += store.query(**key)
            continue
        if splits is None:
            splits = load_splits(encoder, dataset, tap, resolution, device)
        start = time.perf_counter()
        value, extra = fn(splits, cfg, device)
        row = Result(**key, metric=spec.metric, value=value, seconds=time.perf_counter() - start,
                     config=settings, extra=extra)
        store.put([row])
        results.append(row)
    return results
