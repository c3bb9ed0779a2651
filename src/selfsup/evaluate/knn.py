"""Weighted k-nearest-neighbour probe of frozen features (Wu et al. 2018, InstDisc, §3.4).

Wu et al. classify a test image by its ``k`` most similar training features (cosine similarity
``s_i`` of L2-normalised features), each neighbour voting for its class with weight
``α_i = exp(s_i / τ)``; the class score is the sum of its neighbours' weights and the prediction its
argmax. Defaults: ``k = 200`` (paper and code), ``τ = 0.1``.

Deviations from their code (lemniscate.pytorch, ``test.py: kNN``), none of which changes a prediction:

- Their code passes its NCE temperature as ``σ`` (0.07 by default); we default to ``τ = 0.1``, the
  value this project's protocol fixes, and take any other as an argument.
- Scores are returned normalised to sum to one per test row, computed as ``exp((s_i - s_max) / τ)``
  so that a small ``τ`` cannot overflow float32. Dividing a row by a positive constant leaves the
  argmax, hence the prediction, unchanged.
- ``k`` larger than the training set is clamped to its size (their code would fail in ``topk``).
- Test rows are processed in chunks so that the ``chunk × n_train`` similarity block stays bounded
  (their code does the same per test batch).

>>> import torch
>>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
>>> knn_predict(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.2]]), num_classes=2, k=2)
tensor([0])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError
from selfsup.evaluate.metrics import score

__all__ = ["knn_classify", "knn_neighbors", "knn_predict", "knn_scores"]

# Size of one similarity block (test chunk × training set), in elements: 2**26 float32 = 256 MiB.
_BLOCK_ELEMENTS = 2**26


def _prepare(
    train_x: Tensor, test_x: Tensor, device: torch.device | str | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    train_x, test_x = torch.as_tensor(train_x), torch.as_tensor(test_x)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise UserError(
            f"features must be 2-d with the same width; got train {tuple(train_x.shape)}, "
            f"test {tuple(test_x.shape)}"
        )
    if train_x.shape[0] == 0:
        raise UserError("the training set is empty")
    device = torch.device(device) if device is not None else train_x.device
    # Normalise in float32 (even for a bf16 similarity), then cast: the norm of a 2048-d bf16 vector
    # loses more precision than the cast itself.
    train = F.normalize(train_x.to(device, torch.float32), dim=1).to(dtype)
    test = F.normalize(test_x.to(device, torch.float32), dim=1).to(dtype)
    return train, test


def _chunk(chunk_size: int | None, n_train: int) -> int:
    return chunk_size if chunk_size is not None else max(1, _BLOCK_ELEMENTS // n_train)


def knn_neighbors(
    train_x: Tensor,
    test_x: Tensor,
    k: int = 200,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Cosine similarities and indices of the ``k`` nearest training rows of each test row.

    Returns ``(sims, index)``, both ``(n_test, min(k, n_train))``, sorted by decreasing similarity.
    """
    train, test = _prepare(train_x, test_x, device, dtype)
    k = min(k, train.shape[0])
    step = _chunk(chunk_size, train.shape[0])
    sims, index = [], []
    for start in range(0, test.shape[0], step):
        block = test[start : start + step] @ train.T
        s, i = block.topk(k, dim=1, largest=True, sorted=True)
        sims.append(s.float())
        index.append(i)
    if not sims:
        return torch.empty(0, k, device=train.device), torch.empty(0, k, dtype=torch.long, device=train.device)
    return torch.cat(sims), torch.cat(index)


def knn_scores(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-class weighted votes ``Σ_{i in top-k, y_i = c} exp(s_i / τ)``, normalised per row.

    Returns a float32 ``(n_test, num_classes)`` tensor whose rows sum to one.
    """
    if temperature <= 0:
        raise UserError(f"temperature must be positive, got {temperature}")
    train, test = _prepare(train_x, test_x, device, dtype)
    labels = torch.as_tensor(train_y).to(train.device).long().reshape(-1)
    if labels.shape[0] != train.shape[0]:
        raise UserError(f"{train.shape[0]} training features but {labels.shape[0]} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"training labels must lie in [0, {num_classes})")
    k = min(k, train.shape[0])
    step = _chunk(chunk_size, train.shape[0])
    out = torch.zeros(test.shape[0], num_classes, device=train.device)
    for start in range(0, test.shape[0], step):
        sims, idx = (test[start : start + step] @ train.T).topk(k, dim=1, largest=True, sorted=True)
        sims = sims.float()
        # sorted=True puts the largest similarity first: subtracting it keeps exp() finite for any τ.
        weights = ((sims - sims[:, :1]) / temperature).exp_()
        votes = out[start : start + step]
        votes.scatter_add_(1, labels[idx], weights)
        votes /= votes.sum(dim=1, keepdim=True)
    return out


def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """InstDisc's weighted-kNN prediction (argmax of :func:`knn_scores`), a LongTensor ``(n_test,)``."""
    scores = knn_scores(train_x, train_y, test_x, num_classes, k, temperature, chunk_size, device, dtype)
    return scores.argmax(dim=1)


def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    metric: str = "top1",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """The kNN probe's score on the test split, in percent (``metric``: see :mod:`selfsup.evaluate.metrics`)."""
    pred = knn_predict(train_x, train_y, test_x, num_classes, k, temperature, chunk_size, device, dtype)
    return score(metric, pred, torch.as_tensor(test_y).to(pred.device), num_classes)
