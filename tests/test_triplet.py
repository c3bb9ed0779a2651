"""The semi-hard triplet loss against TF's ``triplet_semihard_loss`` written out as loops over (a, p, n)."""

import math

import pytest
import torch

from selfsup.losses import triplet_semihard


def triplet_semihard_by_hand(emb, labels, margin):
    e = emb.double().tolist()
    y = labels.tolist()
    n = len(y)
    d = [[sum((u - v) ** 2 for u, v in zip(e[i], e[j], strict=True)) for j in range(n)] for i in range(n)]
    total, pairs = 0.0, 0
    for a in range(n):
        negatives = [d[a][k] for k in range(n) if y[k] != y[a]]
        for p in range(n):
            if p == a or y[p] != y[a]:
                continue
            farther = [x for x in negatives if x > d[a][p]]
            if farther:
                d_an = min(farther)            # semi-hard: the closest negative beyond the positive
            elif negatives:
                d_an = max(negatives)          # TF's fallback: the farthest negative
            else:
                d_an = 0.0                     # no negative at all: TF's masked maximum is the diagonal's 0
            total += max(d[a][p] - d_an + margin, 0.0)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.1, 0.5, 2.0])
def test_triplet_semihard_equals_loops(seed, margin):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    labels = torch.randint(0, 4, (12,), generator=g)
    expected = triplet_semihard_by_hand(emb, labels, margin)
    assert math.isclose(float(triplet_semihard(emb, labels, margin)), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_fallback_to_farthest_negative_when_none_is_semihard():
    # Positives far apart, negatives close: no negative is farther than the positive from any anchor,
    # so every pair falls back to the farthest negative.
    emb = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.1], [1.2, -0.1], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    d = torch.cdist(emb.double(), emb.double()) ** 2
    assert all(d[0, k] < d[0, 1] and d[1, k] < d[0, 1] for k in (2, 3, 4))
    loss = float(triplet_semihard(emb, labels, 0.5))
    expected = triplet_semihard_by_hand(emb, labels, 0.5)
    assert math.isclose(loss, expected, rel_tol=1e-6)
    # by hand: (0,1) 9 − 4 + 0.5 and (1,0) 9 − 4.01 + 0.5 use the farthest negative; (2,3) and (3,2) have
    # semi-hard negatives at 1.01 and 0.65 beyond D = 0.08, and their hinges are 0
    assert loss == pytest.approx((5.5 + 5.49) / 4, rel=1e-6)


def test_degenerate_batches():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(6, 4, generator=g)
    one_label = torch.zeros(6, dtype=torch.long)
    assert math.isclose(float(triplet_semihard(emb, one_label, 0.5)),
                        triplet_semihard_by_hand(emb, one_label, 0.5), rel_tol=1e-5)
    assert float(triplet_semihard(emb, torch.arange(6), 0.5)) == 0.0   # no positive pairs: 0, not 0/0


def test_gradient_matches_loops():
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    triplet_semihard(emb, labels, 0.5).backward()
    eps, numeric = 1e-6, torch.zeros_like(emb)
    for i in range(emb.shape[0]):
        for j in range(emb.shape[1]):
            plus, minus = emb.detach().clone(), emb.detach().clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric[i, j] = (triplet_semihard_by_hand(plus, labels, 0.5)
                             - triplet_semihard_by_hand(minus, labels, 0.5)) / (2 * eps)
    assert torch.allclose(emb.grad.double(), numeric, atol=1e-4)


def test_pulls_copies_together():
    # the loss is lower when each label's embeddings cluster than when labels are shuffled
    g = torch.Generator().manual_seed(5)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(4)
    emb = centres[labels] + 0.05 * torch.randn(16, 8, generator=g)
    shuffled = labels[torch.randperm(16, generator=g)]
    assert triplet_semihard(emb, labels, 0.5) < triplet_semihard(emb, shuffled, 0.5)
