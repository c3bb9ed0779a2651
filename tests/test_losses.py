"""NT-Xent against SimCLR's eq. 1 written out term by term."""

import math

import torch

from selfsup.losses import nt_xent


def nt_xent_by_hand(z1, z2, tau):
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2
    sim = [[float(z[i] @ z[j] / (z[i].norm() * z[j].norm())) for j in range(n2)] for i in range(n2)]
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2  # the other view of the same image
        denom = sum(math.exp(sim[i][k] / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim[i][j] / tau) / denom)
    return total / n2


def test_nt_xent_equals_eq1():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for tau in (0.1, 0.5, 1.0):
        assert math.isclose(float(nt_xent(z1, z2, tau)), nt_xent_by_hand(z1, z2, tau), rel_tol=1e-5)


def test_nt_xent_prefers_aligned_views():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=g)
    aligned = nt_xent(z, z + 0.01 * torch.randn(8, 16, generator=g), 0.5)
    shuffled = nt_xent(z, z[torch.randperm(8, generator=g)], 0.5)
    assert aligned < shuffled


def test_info_nce_equals_the_formula_over_a_queue_and_per_query_negatives():
    from selfsup.losses import info_nce

    g = torch.Generator().manual_seed(0)
    q, k, queue = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    tau = 0.2
    expected = 0.0
    for i in range(4):   # −log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ exp(q·k_j/τ)), all unit vectors, by hand
        qi = q[i] / q[i].norm()
        pos = math.exp(float(qi @ (k[i] / k[i].norm())) / tau)
        neg = sum(math.exp(float(qi @ (queue[j] / queue[j].norm())) / tau) for j in range(6))
        expected += -math.log(pos / (pos + neg)) / 4
    assert abs(float(info_nce(q, k, queue, tau)) - expected) < 1e-5
    per_query = queue.expand(4, 6, 8)            # the same negatives given per query: the same loss
    assert abs(float(info_nce(q, k, per_query, tau)) - expected) < 1e-5


def test_byol_loss_is_two_minus_twice_the_cosine():
    from selfsup.losses import byol_loss

    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    cos = [float(p[i] @ z[i]) / (float(p[i].norm()) * float(z[i].norm())) for i in range(5)]
    assert abs(float(byol_loss(p, z)) - sum(2 - 2 * c for c in cos) / 5) < 1e-6
    assert float(byol_loss(p, 3 * p)) < 1e-6     # same direction: zero, whatever the scale
