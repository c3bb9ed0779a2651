"""Metrics of the transfer protocols (Ericsson et al. 2021) on hand-made cases."""

import pytest
import torch

from selfsup.evaluate.metrics import mean_per_class, score, top1


def test_top1_counts_matches():
    pred = torch.tensor([0, 1, 2, 2, 1])
    labels = torch.tensor([0, 1, 1, 2, 0])
    assert top1(pred, labels) == pytest.approx(60.0)
    assert isinstance(top1(pred, labels), float)


def test_mean_per_class_is_mean_of_recalls():
    # class 0: 4 samples, 3 right (0.75); class 1: 1 sample, 0 right (0.0); class 2: 2 samples, 2 right (1.0)
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 2, 0, 2, 2])
    assert mean_per_class(pred, labels, num_classes=3) == pytest.approx(100 * (0.75 + 0.0 + 1.0) / 3)
    # top-1 weights samples, not classes: 5/7
    assert top1(pred, labels) == pytest.approx(100 * 5 / 7)


def test_mean_per_class_ignores_absent_classes():
    labels = torch.tensor([0, 0, 2])
    pred = torch.tensor([0, 1, 2])
    # class 1 never occurs among the labels: it has no recall and is left out of the mean
    assert mean_per_class(pred, labels, num_classes=3) == pytest.approx(100 * (0.5 + 1.0) / 2)


def test_score_dispatch_and_aliases():
    labels = torch.tensor([0, 0, 0, 1])
    pred = torch.tensor([0, 0, 0, 0])
    assert score("top1", pred, labels, 2) == pytest.approx(75.0)
    assert score("mean_per_class", pred, labels, 2) == pytest.approx(50.0)
    assert score("accuracy", pred, labels, 2) == pytest.approx(75.0)
    assert score("mean per-class accuracy", pred, labels, 2) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="unknown metric"):
        score("top5", pred, labels, 2)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="entries"):
        top1(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="empty"):
        top1(torch.tensor([]), torch.tensor([]))
    with pytest.raises(ValueError, match="labels must lie"):
        mean_per_class(torch.tensor([0]), torch.tensor([3]), num_classes=2)
