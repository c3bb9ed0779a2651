"""Does the source task predict transfer? Ericsson, Gouk, Hospedales 2021, §4 (Fig. 2–4).

For every downstream (protocol, dataset, metric) the paper correlates, across the evaluated models, the
source-task linear accuracy with the downstream figure, both on a logit scale::

    x_m = logit(a_m / 100),   y_m = logit(b_m / 100)      logit(p) = log(p / (1 - p))

Pearson's r (linear association on that scale) and Spearman's ρ (rank agreement) are reported. Metrics that
are errors (lower is better: ``ece``, ``colour_error``, ...; see ``LOWER_IS_BETTER``) are negated instead of
logit-transformed, so that a positive correlation always means "a better source model transfers better".
Every other metric is a percentage, as the results store records accuracies (``Result.value`` in %).

Percentages are clipped to ``[CLIP, 100 - CLIP]`` (``CLIP = 0.01`` %) before the logit, so 0 % and 100 %
map to finite values (±9.21) instead of ±inf; no real figure is that close to either end.

One model is one ``model`` label: its rows at ``tap`` (the pre-logits features). Where a model has several
rows for the same figure (other probe settings, re-runs), the row with the default probe settings wins, then
the newest. Few-shot rows give one correlation per shot count (``config["shots"]``). A (protocol, dataset,
metric) with fewer than three models measured on both sides has no correlation and is skipped.

Usage::

    rows = Store().query()
    for c in correlations(rows, source_dataset="tinyimagenet100"):
        print(c.protocol, c.dataset, c.metric, c.shots, c.n, round(c.pearson, 2), round(c.spearman, 2))
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from selfsup.results.store import Result

CLIP = 0.01  # percent: logit(CLIP / 100) = -9.21, finite
LOWER_IS_BETTER = frozenset({"ece", "ece_scaled", "colour_error", "error", "top1_error", "mse", "rmse", "lpips"})
# protocols that describe what a representation keeps, not how well it transfers: not correlated by default
ANALYSES = frozenset({"sensitivity", "saliency", "inversion", "invariance"})
PROBE_SETTINGS = ("view", "train_per_class", "max_dims")  # non-default probe settings: another measurement
MIN_MODELS = 3


def logit_percent(p: float) -> float:
    """logit of a percentage: ``log(q / (1 - q))`` with ``q = clip(p, CLIP, 100 - CLIP) / 100``."""
    q = min(max(float(p), CLIP), 100.0 - CLIP) / 100.0
    return math.log(q / (1.0 - q))


def transform(metric: str, value: float) -> float:
    """The paper's scale for a downstream figure: negated for errors, logit of the percentage otherwise."""
    return -float(value) if metric in LOWER_IS_BETTER else logit_percent(value)


@dataclass
class Correlation:
    """Pearson ``r`` and Spearman ``ρ`` between logit(source accuracy) and the transformed downstream
    ``metric`` of (``protocol``, ``dataset``[, ``shots``]) over ``n`` models; ``points`` are
    ``(model, x, y)`` on the transformed scales. A constant side gives NaN for both coefficients."""
    protocol: str
    dataset: str
    metric: str
    n: int
    pearson: float
    spearman: float
    points: list[tuple[str, float, float]] = field(default_factory=list)
    shots: int | None = None


def _pick(rows: list[Result]) -> Result:
    """One row for one figure of one model: default probe settings first, then the newest."""
    return max(rows, key=lambda r: (not any(k in r.config for k in PROBE_SETTINGS), r.created))


def _coefficients(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # undefined; scipy would warn and return NaN
        return math.nan, math.nan
    return float(stats.pearsonr(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def source_accuracy(rows: list[Result], source_dataset: str, source_protocol: str = "linear",
                    tap: str = "pre_logits", source_metric: str | None = None) -> dict[str, float]:
    """Each model's source-task accuracy (%): ``source_metric`` if given, else ``top1`` where a model has it,
    else its one non-error metric."""
    by_model: dict[str, dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.dataset == source_dataset and r.protocol == source_protocol and r.tap == tap:
            if r.metric not in LOWER_IS_BETTER:
                by_model[r.model][r.metric].append(r)
    out = {}
    for model, metrics in by_model.items():
        if source_metric is not None:
            chosen = metrics.get(source_metric)
        elif "top1" in metrics:
            chosen = metrics["top1"]
        else:
            chosen = metrics[sorted(metrics)[0]]
        if chosen:
            out[model] = _pick(chosen).value
    return out


def correlations(rows: list[Result], source_dataset: str, source_protocol: str = "linear", tap: str = "pre_logits",
                 source_metric: str | None = None, protocols: tuple[str, ...] | None = None) -> list[Correlation]:
    """One ``Correlation`` per downstream (protocol, dataset, metric[, shots]) measured on at least three of
    the models that have a source figure, sorted by (protocol, dataset, metric, shots). ``protocols`` limits
    the downstream protocols (default: every one but the feature analyses in ``ANALYSES``); the source figure
    itself is never a downstream one."""
    source = source_accuracy(rows, source_dataset, source_protocol, tap, source_metric)
    groups: dict[tuple, dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.tap != tap or r.model not in source:
            continue
        if (protocols is None and r.protocol in ANALYSES) or (protocols is not None and r.protocol not in protocols):
            continue
        if r.protocol == source_protocol and r.dataset == source_dataset:
            continue
        shots = r.config.get("shots") if r.protocol == "fewshot" else None
        groups[(r.protocol, r.dataset, r.metric, shots)][r.model].append(r)
    out = []
    for (protocol, dataset, metric, shots), by_model in groups.items():
        if len(by_model) < MIN_MODELS:
            continue
        points = [(model, logit_percent(source[model]), transform(metric, _pick(found).value))
                  for model, found in sorted(by_model.items())]
        x = np.array([p[1] for p in points])
        y = np.array([p[2] for p in points])
        pearson, spearman = _coefficients(x, y)
        out.append(Correlation(protocol, dataset, metric, len(points), pearson, spearman, points,
                               None if shots is None else int(shots)))
    return sorted(out, key=lambda c: (c.protocol, c.dataset, c.metric, -1 if c.shots is None else c.shots))
