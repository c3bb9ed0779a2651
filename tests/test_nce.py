"""PIRL's NCE (eq. 3–4) and its objective (eq. 5) against the formulas written out with plain Python math,
with and without VISSL's normalising constant Z, and Z's life cycle (fixed after the first batch, or
re-estimated every step, and resumed from the state dict)."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import estimate_nce_z, nce_from_scores, nce_loss, nce_scores, pirl_loss
from selfsup.methods.npid import NormalizingConstant

B, N, DIM, ITEMS = 3, 5, 4, 40


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, DIM, generator=g)                          # any length: the loss normalises it
    positive = F.normalize(torch.randn(B, DIM, generator=g), dim=1)   # bank entries are unit vectors
    negatives = F.normalize(torch.randn(B, N, DIM, generator=g), dim=2)
    return query, positive, negatives


def _cos(u, v):
    u, v = [float(a) for a in u], [float(b) for b in v]
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _h(s, tau, n, items, z):
    """Eq. 3: h = e / (e + N/|D|), e = exp(s/τ)/Z."""
    e = math.exp(s / tau) / z
    return e / (e + n / items)


def nce_by_hand(query, positive, negatives, tau, z=1.0, items=ITEMS):
    """Eq. 4, averaged over the batch: −log h(q, m_I) − Σ_{I'} log(1 − h(q, m_I'))."""
    total = 0.0
    for b in range(len(query)):
        n = len(negatives[b])
        total += -math.log(_h(_cos(query[b], positive[b]), tau, n, items, z))
        for neg in negatives[b]:
            total += -math.log(1.0 - _h(_cos(query[b], neg), tau, n, items, z))
    return total / len(query)


def z_by_hand(query, positive, negatives, tau, items=ITEMS):
    """VISSL: Z = mean over all B × (1 + N) scores of exp(s/τ), times |D|."""
    values = []
    for b in range(len(query)):
        values.append(math.exp(_cos(query[b], positive[b]) / tau))
        values += [math.exp(_cos(query[b], neg) / tau) for neg in negatives[b]]
    return sum(values) / len(values) * items


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_nce_equals_eq3_eq4_with_the_prior_only(tau):
    q, pos, neg = _inputs()
    assert math.isclose(float(nce_loss(q, pos, neg, ITEMS, tau)), nce_by_hand(q, pos, neg, tau), rel_tol=1e-5)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_nce_with_vissl_normalising_constant(tau):
    q, pos, neg = _inputs(1)
    scores = nce_scores(q, pos, neg, tau)
    z = estimate_nce_z(scores, ITEMS)
    assert math.isclose(float(z), z_by_hand(q, pos, neg, tau), rel_tol=1e-5)
    assert math.isclose(float(nce_from_scores(scores, ITEMS, z)), nce_by_hand(q, pos, neg, tau, float(z)),
                        rel_tol=1e-5)
    # any fixed Z, e.g. one estimated on an earlier batch
    assert math.isclose(float(nce_loss(q, pos, neg, ITEMS, tau, z=123.0)), nce_by_hand(q, pos, neg, tau, 123.0),
                        rel_tol=1e-5)


def test_shared_negatives_equal_the_same_rows_per_sample():
    q, pos, neg = _inputs(2)
    shared = neg[0]                                       # N × d for the whole batch
    expected = nce_by_hand(q, pos, shared.expand(B, N, DIM), 0.1, 50.0)
    assert math.isclose(float(nce_loss(q, pos, shared, ITEMS, 0.1, z=50.0)), expected, rel_tol=1e-5)


def test_pirl_objective_equals_eq5():
    q_img, pos, neg = _inputs(3)
    q_jig, q_rot = _inputs(4)[0], _inputs(5)[0]
    tau, z = 0.07, 2.5e4
    img, jig, rot = (nce_by_hand(q, pos, neg, tau, z) for q in (q_img, q_jig, q_rot))
    s_img, s_jig, s_rot = (nce_scores(q, pos, neg, tau) for q in (q_img, q_jig, q_rot))
    for lam in (0.0, 0.5, 0.9):
        assert math.isclose(float(pirl_loss(s_img, s_jig, ITEMS, lam, z)), lam * jig + (1 - lam) * img, rel_tol=1e-5)
        # two transformed branches (jigsaw + rotation): their terms are averaged inside λ
        assert math.isclose(float(pirl_loss(s_img, [s_jig, s_rot], ITEMS, lam, z)),
                            lam * (jig + rot) / 2 + (1 - lam) * img, rel_tol=1e-5)


def test_nce_gradient_moves_query_towards_positive():
    q, pos, neg = _inputs(6)
    q = q.clone().requires_grad_()
    nce_loss(q, pos, neg, ITEMS, 0.07, z=100.0).backward()
    stepped = q.detach() - 0.01 * q.grad
    before = F.cosine_similarity(q.detach(), pos).sum()
    assert F.cosine_similarity(stepped, pos).sum() > before


def test_normalising_constant_fixed_after_first_batch_and_resumed():
    q, pos, neg = _inputs(7)
    first, second = nce_scores(q, pos, neg, 0.07), nce_scores(q, pos, neg, 0.07) * 0.5
    const = NormalizingConstant(ITEMS, "first_batch")
    z1 = const(first)
    assert math.isclose(float(z1), z_by_hand(q, pos, neg, 0.07), rel_tol=1e-5)
    assert float(const(second)) == float(z1)                 # not re-estimated
    resumed = NormalizingConstant(ITEMS, "first_batch")
    resumed.load_state_dict(const.state_dict())
    assert float(resumed(second)) == float(z1)               # the buffer came back with the checkpoint


def test_normalising_constant_every_step_and_none():
    q, pos, neg = _inputs(8)
    first, second = nce_scores(q, pos, neg, 0.07), nce_scores(q, pos, neg, 0.07) * 0.5
    every = NormalizingConstant(ITEMS, "every_step")
    z1, z2 = float(every(first)), float(every(second))
    assert math.isclose(z2, float(estimate_nce_z(second, ITEMS)), rel_tol=1e-6) and z2 < z1
    assert float(NormalizingConstant(ITEMS, "none")(first)) == 1.0
    with pytest.raises(ValueError, match="norm_constant"):
        NormalizingConstant(ITEMS, "sometimes")
