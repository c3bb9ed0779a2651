"""Optimizers (SGD, LARS, AdamW) and the learning-rate schedule (linear warmup + cosine or steps).

The schedule is a pure function of the step, so it carries no state a checkpoint could lose.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from selfsup.config import OptimConfig
from selfsup.errors import UserError


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR (Chen et al. 2020, §B.1): SGD with momentum whose
    per-layer step is scaled by the trust ratio ``eta * ||w|| / ||g + wd * w||``.

    Parameter groups with ``lars=False`` (biases and normalisation weights, as in SimCLR) skip both
    the trust ratio and weight decay is whatever their group says.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    grad = grad * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool) -> list[dict]:
    """Split parameters so that biases and normalisation weights (1-d tensors) can skip weight decay
    and LARS adaptation, as SimCLR, BYOL and VISSL's PIRL recipe do. A method may set
    ``weight_decay_overrides = {"head.": 5e-4}``: parameters whose name starts with a prefix get that
    decay (e.g. the patch tasks' fc head, Kolesnikov et al.'s code)."""
    overrides: dict[str, float] = getattr(model, "weight_decay_overrides", {})
    buckets: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = next((v for prefix, v in overrides.items() if name.startswith(prefix)), weight_decay)
        plain = exclude_norm_and_bias and p.ndim <= 1
        buckets.setdefault((0.0, False) if plain else (wd, True), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lars": lars} for (wd, lars), ps in buckets.items()]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_norm_and_bias)
    if cfg.name == "sgd":
        for g in groups:
            g.pop("lars", None)
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    if cfg.name == "adamw":
        for g in groups:
            g.pop("lars", None)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    raise UserError(f"optim.name={cfg.name!r} is not one of sgd, lars, adamw")


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Base lr when ``cfg.scale_lr`` is set: linear in the batch (lr × batch / 256), as Goyal et al. 2017 and the
    Revisiting configs (lr 0.1 × batch/256) do, or with ``lr_scaling="sqrt"`` lr × √batch, SimCLR v2's rule
    (Chen et al. 2020b, App. B: 0.075·√batch)."""
    if not cfg.scale_lr:
        return cfg.lr
    return cfg.lr * math.sqrt(global_batch) if cfg.lr_scaling == "sqrt" else cfg.lr * global_batch / 256


def lr_at(step: int, total: int, base_lr: float, cfg: OptimConfig, steps_per_epoch: int) -> float:
    """Linear warmup for ``warmup_epochs``, then ``cosine`` decay to ``base_lr * final_lr_ratio``
    or ``step`` decay by ``gamma`` at each epoch in ``milestones``."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        floor = base_lr * cfg.final_lr_ratio
        return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        return base_lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "constant":
        return base_lr
    raise UserError(f"optim.schedule={cfg.schedule!r} is not one of cosine, step, constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
