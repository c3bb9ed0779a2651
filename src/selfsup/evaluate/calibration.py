"""Calibration of a classifier on frozen features: ECE, reliability diagrams, temperature scaling.

Ericsson et al. 2021 (their calibration analysis: "ECE with 15 bins, raw and temperature-scaled")
measure the *expected calibration error* of Guo et al. 2017 (§2, "Expected Calibration Error") before
and after temperature scaling (Guo et al. §4.2):

- confidence ``ĉ_i = max_k p_ik``, prediction ``argmax_k p_ik`` (first maximum on ties);
- ``bins`` (15) equal-width bins over [0, 1]; bin ``b`` holds ``b/B <= ĉ < (b+1)/B``, the last also
  ``ĉ = 1``;
- ``ECE = Σ_b (n_b / n) · |acc_b - conf_b|``, reported in percent;
- temperature scaling: one scalar ``T > 0`` minimising the NLL of ``softmax(z / T)`` on held-out
  logits, then the ECE of ``softmax(z_test / T)``. ``T`` leaves every prediction, hence accuracy,
  unchanged.

Their code (linusericsson/ssl-transfer ``temperature_scaling.py``) uses netcal's ``ECE(15)`` and
``TemperatureScaling``. Where we differ, and why:

- **Bins.** netcal bins with ``scipy.stats.binned_statistic_dd`` on ``linspace(0, 1, 16)`` after
  clipping confidences to ``[eps, 1 - eps]``: left-closed bins, the last closed. We bin the same way
  (``bucketize`` on the same float64 edges). Guo et al.'s reference code uses right-closed bins
  ``(b/B, (b+1)/B]``; the two differ only for confidences exactly on an edge.
- **Fitting T.** netcal fits on probabilities, taking their log after clipping; we fit on the logits
  themselves (identical up to the clipping, which only matters for probabilities within 1e-16 of 0).
  The NLL is convex in ``β = 1/T`` (a log-sum-exp of linear functions), so we find its stationary
  point by safeguarded Newton with bisection on ``β`` in float64: deterministic, no learning rate, to
  ~1e-10 relative. ``T`` is bounded to ``[1e-4, 1e4]``; ``temperature_at_bound`` says when the
  optimum lies outside (e.g. separable val logits, whose NLL keeps falling as ``T → 0``).
- **Where T is fitted.** :func:`calibration` fits ``T`` on validation logits and scores the test logits
  (Guo et al.'s protocol). Their ``cross_validate_temp_scaling`` instead splits the *test* set into 5
  seeded folds, fits ``T`` on one fold, scores the other four and averages the five scaled ECEs (the
  raw ECE is that of the whole test set); :func:`calibration_cv` reproduces it, split included. Use it
  when no held-out logits exist: the many-shot probe is refitted on train + val, so its val logits are
  in-sample and would give too small a ``T``. With :func:`calibration`, take val and test logits
  from the same train-only fit.

Reliability-diagram data (:func:`reliability`) are fractions in [0, 1] (the diagram's axes); ECE and
accuracy are percentages.

>>> import torch
>>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
>>> round(ece(probs, torch.tensor([0, 1, 0, 1])), 4)  # |0.5 - 0.9|·2/4 + |1 - 0.6|/4 + |1 - 0.7|/4
37.5
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError

__all__ = [
    "calibration",
    "calibration_cv",
    "ece",
    "fit_temperature",
    "logits_from_linear",
    "nll",
    "reliability",
]

T_BOUNDS = (1e-4, 1e4)


def _probs_labels(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels).reshape(-1).to(probs.device).long()
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise UserError(f"expected probabilities (N, K) and N labels; got {tuple(probs.shape)} and "
                        f"{tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise UserError("cannot measure calibration on an empty set")
    if int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]:
        raise UserError(f"labels must lie in [0, {probs.shape[1]})")
    return probs, labels


def _bins(probs: Tensor, labels: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per bin: sample count, sum of confidences, number correct (float64, on the CPU)."""
    if bins < 1:
        raise UserError(f"bins must be >= 1, got {bins}")
    probs, labels = _probs_labels(probs, labels)
    conf, pred = probs.max(dim=1)
    conf = conf.double().cpu()
    correct = (pred == labels).double().cpu()
    eps = float(np.finfo(np.float64).eps)
    conf = conf.clamp(eps, 1.0 - eps)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf, edges[1:-1], right=True)  # edges[b] <= c < edges[b+1]
    count = torch.bincount(index, minlength=bins).double()
    sum_conf = torch.bincount(index, weights=conf, minlength=bins)
    sum_correct = torch.bincount(index, weights=correct, minlength=bins)
    return count, sum_conf, sum_correct


def ece(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error of predicted probabilities ``(N, K)``, in percent."""
    count, sum_conf, sum_correct = _bins(probs, labels, bins)
    return 100.0 * ((sum_correct - sum_conf).abs().sum() / count.sum()).item()


def reliability(probs: Tensor, labels: Tensor, bins: int = 15) -> dict:
    """Reliability-diagram data: ``edges`` (bins + 1), and per bin the mean ``confidence``, the
    ``accuracy`` (both fractions; ``None`` for an empty bin) and the sample ``count``."""
    count, sum_conf, sum_correct = _bins(probs, labels, bins)
    nonempty = count > 0
    conf = torch.where(nonempty, sum_conf / count.clamp_min(1), torch.nan)
    acc = torch.where(nonempty, sum_correct / count.clamp_min(1), torch.nan)
    return {
        "edges": torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64).tolist(),
        "confidence": [None if math.isnan(v) else v for v in conf.tolist()],
        "accuracy": [None if math.isnan(v) else v for v in acc.tolist()],
        "count": [int(c) for c in count.tolist()],
    }


def _logits_labels(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or not logits.is_floating_point():
        raise UserError(f"logits must be a float (N, K) tensor, got {logits.dtype} {tuple(logits.shape)}")
    _probs_labels(logits, labels)  # the same shape and label checks
    return logits.double(), torch.as_tensor(labels).reshape(-1).to(logits.device).long()


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` (nats)."""
    z, y = _logits_labels(logits, labels)
    return F.cross_entropy(z / temperature, y).item()


def _nll_derivatives(z: Tensor, y: Tensor, beta: float) -> tuple[float, float]:
    """First and second derivative in ``β`` of ``mean_i [logsumexp(β z_i) - β z_iy]``."""
    p = torch.softmax(beta * z, dim=1)
    mean = (p * z).sum(1)
    grad = (mean - z.gather(1, y[:, None]).squeeze(1)).mean()
    hess = (p * (z - mean[:, None]).pow(2)).sum(1).mean()  # the variance of z under p: >= 0
    return grad.item(), hess.item()


def _fit(val_logits: Tensor, val_labels: Tensor, bounds: tuple[float, float]) -> tuple[float, bool]:
    z, y = _logits_labels(val_logits, val_labels)
    t_min, t_max = bounds
    if not 0 < t_min < t_max:
        raise UserError(f"temperature bounds must satisfy 0 < min < max, got {bounds}")
    lo, hi = 1.0 / t_max, 1.0 / t_min  # bracket on β = 1/T; the derivative increases with β
    g_lo, _ = _nll_derivatives(z, y, lo)
    if g_lo >= 0:
        return t_max, True
    g_hi, _ = _nll_derivatives(z, y, hi)
    if g_hi <= 0:
        return t_min, True
    beta = min(max(1.0, lo), hi)
    for _ in range(200):
        g, h = _nll_derivatives(z, y, beta)
        if g > 0:
            hi = beta
        elif g < 0:
            lo = beta
        else:
            break
        step = g / h if h > 0 else math.inf
        if abs(step) <= 1e-12 * beta or hi / lo - 1.0 <= 1e-12:  # converged (Newton's last step is tiny)
            break
        new = beta - step
        beta = new if lo < new < hi else math.sqrt(lo * hi)  # Newton, else bisection in log β
    return 1.0 / beta, False


def fit_temperature(val_logits: Tensor, val_labels: Tensor, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(val_logits / T)`` (clamped to ``bounds``)."""
    return _fit(val_logits, val_labels, bounds)[0]


def logits_from_linear(weight: Tensor, bias: Tensor | None, features: Tensor) -> Tensor:
    """``features @ weight.T + bias``. For :class:`selfsup.evaluate.linear.LinearProbeResult`'s
    ``coef = [W | b]`` of shape (k, d + 1): ``logits_from_linear(coef[:, :d], coef[:, d], x)``."""
    out = torch.as_tensor(features).to(weight) @ weight.T
    return out + bias if bias is not None else out


def _scores(logits: Tensor, labels: Tensor, temperature: float, bins: int) -> tuple[float, float, dict]:
    z, y = _logits_labels(logits, labels)
    probs = torch.softmax(z / temperature, dim=1)
    return ece(probs, y, bins), F.cross_entropy(z / temperature, y).item(), reliability(probs, y, bins)


def calibration(val_logits: Tensor, val_labels: Tensor, test_logits: Tensor, test_labels: Tensor,
                bins: int = 15, bounds: tuple[float, float] = T_BOUNDS) -> dict:
    """Raw and temperature-scaled calibration of test logits, ``T`` fitted on val logits.

    Returns ``ece`` and ``ece_scaled`` (percent), ``nll`` and ``nll_scaled`` (nats), ``temperature``,
    ``temperature_at_bound``, ``accuracy`` (test top-1 %, the same before and after scaling), ``bins``,
    and ``reliability`` / ``reliability_scaled`` (see :func:`reliability`).
    """
    t, at_bound = _fit(val_logits, val_labels, bounds)
    raw_ece, raw_nll, raw_rel = _scores(test_logits, test_labels, 1.0, bins)
    scaled_ece, scaled_nll, scaled_rel = _scores(test_logits, test_labels, t, bins)
    z, y = _logits_labels(test_logits, test_labels)
    return {
        "ece": raw_ece, "ece_scaled": scaled_ece, "nll": raw_nll, "nll_scaled": scaled_nll,
        "temperature": t, "temperature_at_bound": at_bound,
        "accuracy": 100.0 * (z.argmax(1) == y).double().mean().item(), "bins": bins,
        "reliability": raw_rel, "reliability_scaled": scaled_rel,
    }


def calibration_cv(logits: Tensor, labels: Tensor, folds: int = 5, bins: int = 15, seed: int = 0,
                   bounds: tuple[float, float] = T_BOUNDS) -> dict:
    """Their code's protocol (``cross_validate_temp_scaling``): raw ECE of all of ``logits``; then, for
    each of ``folds`` seeded folds, ``T`` fitted on that fold and the ECE measured on the other folds;
    ``ece_scaled`` is the mean over folds. The split is theirs exactly: ``np.random.seed(seed)``, shuffle
    ``range(n)``, chunks of ``n // folds``, the remainder in no fold.

    Returns ``ece``, ``ece_scaled`` (percent), ``ece_scaled_folds``, ``temperatures``,
    ``temperature_at_bound`` (per fold), ``accuracy``, ``bins``, ``reliability`` (raw).
    """
    z, y = _logits_labels(logits, labels)
    n = len(y)
    size = n // folds
    if folds < 2 or size < 1:
        raise UserError(f"{n} samples cannot be split into {folds} folds (need folds >= 2 and n >= folds)")
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(n))
    chunks = list(perm.split(size))[:folds]
    raw_ece, _, raw_rel = _scores(z, y, 1.0, bins)
    eces, temps, bound = [], [], []
    for i in range(folds):
        val = chunks[i].to(z.device)
        test = torch.cat(chunks[:i] + chunks[i + 1:]).to(z.device)
        t, at_bound = _fit(z[val], y[val], bounds)
        eces.append(ece(torch.softmax(z[test] / t, dim=1), y[test], bins))
        temps.append(t)
        bound.append(at_bound)
    return {
        "ece": raw_ece, "ece_scaled": float(np.mean(eces)), "ece_scaled_folds": eces, "temperatures": temps,
        "temperature_at_bound": bound, "accuracy": 100.0 * (z.argmax(1) == y).double().mean().item(),
        "bins": bins, "reliability": raw_rel,
    }
