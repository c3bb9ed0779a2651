"""Expected calibration error and temperature scaling (Guo et al. 2017, as used by Ericsson et al. 2021)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.evaluate.calibration import (
    calibration,
    calibration_cv,
    ece,
    fit_temperature,
    logits_from_linear,
    nll,
    reliability,
)


def _planted(n: int, classes: int, temperature: float, scale: float = 3.0, seed: int = 0):
    """Logits z ~ N(0, scale²) and labels drawn from softmax(z / temperature): T = temperature is right."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, classes, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / temperature, dim=1), 1, generator=g).squeeze(1)
    return z, y


def test_ece_and_reliability_on_a_hand_computed_case():
    # three classes; confidences 0.95 (x2: one right, one wrong), 0.5 (right), 0.38 (wrong), 0.82 (right)
    probs = torch.tensor([
        [0.95, 0.03, 0.02],
        [0.95, 0.03, 0.02],
        [0.2, 0.5, 0.3],
        [0.38, 0.31, 0.31],
        [0.09, 0.09, 0.82],
    ], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 2])
    # 15 bins of width 1/15: 0.95 -> bin 14, 0.82 -> bin 12, 0.5 -> bin 7, 0.38 -> bin 5
    expected = (2 * abs(0.5 - 0.95) + abs(1 - 0.82) + abs(1 - 0.5) + abs(0 - 0.38)) / 5
    assert ece(probs, labels) == pytest.approx(100 * expected, abs=1e-9)
    rel = reliability(probs, labels)
    counts = [0] * 15
    counts[5], counts[7], counts[12], counts[14] = 1, 1, 1, 2
    assert rel["count"] == counts
    assert rel["confidence"][14] == pytest.approx(0.95) and rel["accuracy"][14] == pytest.approx(0.5)
    assert rel["confidence"][5] == pytest.approx(0.38) and rel["accuracy"][5] == 0.0
    assert rel["confidence"][0] is None and rel["accuracy"][0] is None
    assert len(rel["edges"]) == 16 and rel["edges"][0] == 0.0 and rel["edges"][-1] == 1.0
    # 5 bins of width 0.2: 0.95, 0.95 and 0.82 share the last bin (2 of 3 right)
    five = (3 * abs(2 / 3 - (0.95 + 0.95 + 0.82) / 3) + abs(1 - 0.5) + abs(0 - 0.38)) / 5
    assert ece(probs, labels, bins=5) == pytest.approx(100 * five, abs=1e-9)


def test_bins_are_left_closed_and_the_last_includes_one():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    counts = reliability(probs, torch.tensor([0, 0, 0, 1]), bins=4)["count"]
    # edges 0, .25, .5, .75, 1: 0.5 -> [.5, .75), 0.75 (twice) and 1.0 -> [.75, 1]
    assert counts == [0, 0, 1, 3]


def test_a_perfectly_calibrated_construction_has_zero_ece():
    # in each bin, the share of right answers equals the (single) confidence of its samples
    rows, labels = [], []
    for conf, n, right in [(0.55, 20, 11), (0.7, 10, 7), (0.9, 30, 27), (1.0, 4, 4)]:
        rows += [[conf, 1 - conf]] * n
        labels += [0] * right + [1] * (n - right)
    assert ece(torch.tensor(rows, dtype=torch.float64), torch.tensor(labels)) == pytest.approx(0.0, abs=1e-9)
    # and labels drawn from the model's own probabilities are calibrated up to sampling noise
    z, y = _planted(50_000, 10, temperature=1.0)
    assert ece(torch.softmax(z, 1), y) < 1.0


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5])
def test_fit_recovers_a_planted_temperature(t0):
    z, y = _planted(10_000, 10, temperature=t0, seed=int(10 * t0))
    t = fit_temperature(z, y)
    assert t == pytest.approx(t0, rel=0.06)
    # the fitted T minimises the NLL: no point of an independent grid around it is lower
    grid = np.exp(np.linspace(math.log(t / 1.1), math.log(t * 1.1), 41))
    losses = [F.cross_entropy(z / g, y).item() for g in grid]
    assert nll(z, y, t) <= min(losses) + 1e-12
    assert int(np.argmin(losses)) == 20  # the grid's centre, T itself


def test_scaling_fixes_over_confident_logits():
    z, y = _planted(20_000, 10, temperature=1.0, seed=3)
    over = 3.0 * z  # the same predictions, three times too confident
    out = calibration(over[:8000], y[:8000], over[8000:], y[8000:])
    assert out["temperature"] == pytest.approx(3.0, rel=0.05)
    assert not out["temperature_at_bound"]
    assert out["ece"] > 10.0 and out["ece_scaled"] < 1.5 and out["ece_scaled"] < out["ece"] / 5
    assert out["nll_scaled"] < out["nll"]
    assert out["accuracy"] == pytest.approx(100 * (z[8000:].argmax(1) == y[8000:]).double().mean().item())
    for key in ("reliability", "reliability_scaled"):
        assert sum(out[key]["count"]) == 12_000 and len(out[key]["confidence"]) == out["bins"] == 15
    assert out["ece"] == pytest.approx(ece(torch.softmax(over[8000:], 1), y[8000:]))


def test_separable_logits_hit_the_lower_bound():
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    t = calibration(z, torch.tensor([0, 1, 0]), z, torch.tensor([0, 1, 0]))
    assert t["temperature_at_bound"] and t["temperature"] == pytest.approx(1e-4)
    assert t["ece_scaled"] == pytest.approx(0.0, abs=1e-6)  # confidence 1, all right


def test_cross_validated_scaling_reproduces_their_split():
    z, y = _planted(2_003, 5, temperature=1.0, seed=5)
    z = 2.0 * z
    out = calibration_cv(z, y, folds=5, seed=0)
    # their code: np.random.seed(seed); shuffle list(range(n)); split into chunks of int(n / k); keep k
    np.random.seed(0)
    indices = list(range(len(y)))
    np.random.shuffle(indices)
    idxs = torch.tensor(indices).split(int(len(indices) / 5))[:5]
    eces, temps = [], []
    for i in range(5):
        test = torch.cat([idxs[j] for j in range(5) if j != i])
        t = fit_temperature(z[idxs[i]], y[idxs[i]])
        temps.append(t)
        eces.append(ece(torch.softmax(z[test] / t, 1), y[test]))
    assert out["temperatures"] == pytest.approx(temps)
    assert out["ece_scaled_folds"] == pytest.approx(eces)
    assert out["ece_scaled"] == pytest.approx(np.mean(eces))
    assert out["ece"] == pytest.approx(ece(torch.softmax(z, 1), y))
    assert all(1.6 < t < 2.5 for t in temps) and out["ece_scaled"] < out["ece"]


def test_logits_from_linear_and_bad_input():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.randn(6, 4, generator=g)
    torch.testing.assert_close(logits_from_linear(w, b, x), F.linear(x, w, b))
    with pytest.raises(ValueError, match="labels must lie"):
        ece(torch.softmax(x[:, :3], 1), torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match="empty"):
        ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="folds"):
        calibration_cv(x[:3, :3], torch.tensor([0, 1, 2]), folds=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    z, y = _planted(5_000, 10, temperature=2.0, seed=4)
    cpu = calibration(z[:2000], y[:2000], z[2000:], y[2000:])
    gpu = calibration(z[:2000].cuda(), y[:2000].cuda(), z[2000:].cuda(), y[2000:].cuda())
    for key in ("ece", "ece_scaled", "temperature", "nll", "nll_scaled", "accuracy"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-6, abs=1e-9)
    assert gpu["reliability"]["count"] == cpu["reliability"]["count"]
    cv = calibration_cv(z.cuda(), y.cuda())
    assert cv["ece_scaled"] == pytest.approx(calibration_cv(z, y)["ece_scaled"], rel=1e-6)
