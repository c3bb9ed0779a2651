import math

import torch

from selfsup.config import OptimConfig
from selfsup.train.optim import LARS, lr_at


def test_warmup_then_cosine():
    cfg = OptimConfig(warmup_epochs=1, schedule="cosine", final_lr_ratio=0.0)
    assert lr_at(0, 110, 1.0, cfg, steps_per_epoch=10) == 0.1
    assert lr_at(9, 110, 1.0, cfg, steps_per_epoch=10) == 1.0
    assert math.isclose(lr_at(60, 110, 1.0, cfg, steps_per_epoch=10), 0.5)
    assert lr_at(110, 110, 1.0, cfg, steps_per_epoch=10) < 1e-12


def test_step_schedule_decays_at_milestones():
    cfg = OptimConfig(schedule="step", milestones=[15, 25], gamma=0.1)
    assert lr_at(149, 350, 1.0, cfg, 10) == 1.0
    assert math.isclose(lr_at(150, 350, 1.0, cfg, 10), 0.1)
    assert math.isclose(lr_at(250, 350, 1.0, cfg, 10), 0.01)


def test_lars_step_equals_trust_ratio_formula():
    w = torch.tensor([3.0, 4.0], requires_grad=True)          # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8])                          # ||g|| = 1
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.001)
    opt.step()
    trust = 0.001 * 5 / 1
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * torch.tensor([0.6, 0.8]))
