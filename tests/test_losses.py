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
