"""The MLP probe recovers a planted non-linear rule that no linear probe can."""

import torch

from selfsup.evaluate.linear import linear_probe
from selfsup.evaluate.mlp import MLPConfig, mlp_probe


def _xor(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)          # 2 informative + 4 noise dimensions
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()   # XOR of the signs: not linearly separable
    return x * 3.0 + 1.0, y                      # off-centre and scaled: the probe standardises


def test_mlp_recovers_planted_xor_where_linear_cannot():
    train, val, test = _xor(2000, 0), _xor(500, 1), _xor(1000, 2)
    cfg = MLPConfig(hidden=64, epochs=30, milestones=[20], batch_size=128, weight_decays=[0.0, 1e-3])
    r = mlp_probe(train, val, test, num_classes=2, cfg=cfg)
    assert r["value"] > 90
    assert set(r["val_scores"]) == {0.0, 1e-3}
    lin = linear_probe(*train, *val, *test, num_classes=2)
    assert lin.test_score < 65   # chance is 50
