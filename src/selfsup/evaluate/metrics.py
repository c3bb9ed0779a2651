"""Classification metrics of the transfer protocols, in percent.

Ericsson et al. 2021 (§3, "Datasets") score most targets by top-1 accuracy and Aircraft, Caltech-101,
Flowers and Pets by *mean per-class accuracy*: the recall of each class, averaged over classes, so
that large classes do not dominate. Their code computes it from a confusion matrix
(``cm.diagonal() / cm.sum(axis=1)``, then the mean). We do the same with ``bincount``; a class that
never occurs in ``labels`` has no recall and is left out of the mean (their code would produce a NaN).

>>> import torch
>>> round(top1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])), 2)
66.67
>>> mean_per_class(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), num_classes=2)
75.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from selfsup.errors import UserError

__all__ = ["METRICS", "mean_per_class", "score", "top1"]


def _check(pred: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    pred, labels = torch.as_tensor(pred).reshape(-1), torch.as_tensor(labels).reshape(-1)
    if pred.shape != labels.shape:
        raise UserError(f"pred has {pred.numel()} entries but labels has {labels.numel()}")
    if pred.numel() == 0:
        raise UserError("cannot score an empty set of predictions")
    return pred.long(), labels.long().to(pred.device)


def top1(pred: Tensor, labels: Tensor) -> float:
    """Share of predictions equal to the label, in percent."""
    pred, labels = _check(pred, labels)
    return 100.0 * (pred == labels).double().mean().item()


def mean_per_class(pred: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` of the per-class recall, in percent."""
    pred, labels = _check(pred, labels)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise UserError(f"labels must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    total = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    present = total > 0
    return 100.0 * (hits[present] / total[present]).mean().item()


METRICS: dict[str, Callable[[Tensor, Tensor, int], float]] = {
    "top1": lambda pred, labels, num_classes: top1(pred, labels),
    "mean_per_class": mean_per_class,
}
# The names Ericsson et al.'s code uses, so their tables can be matched by name.
_ALIASES = {"accuracy": "top1", "mean per-class accuracy": "mean_per_class"}


def score(metric_name: str, pred: Tensor, labels: Tensor, num_classes: int) -> float:
    """Dispatch on the metric's name: ``"top1"`` or ``"mean_per_class"`` (their code's names work too)."""
    name = _ALIASES.get(metric_name, metric_name)
    if name not in METRICS:
        raise UserError(f"unknown metric {metric_name!r}; choose one of {sorted(METRICS)}")
    return METRICS[name](pred, labels, num_classes)
