"""The MLP probe of Kolesnikov et al. 2019 (§4.5 / Fig. "linear vs MLP"): one hidden layer of 1000 units,
ReLU, dropout 0.5, softmax over the classes, trained on frozen features.

Their head (``self_supervision/linear_eval.py: add_mlp_heads``) is 1×1 conv 1000 + ReLU, dropout 0.5,
1×1 conv to the classes, L2 ``weight_decay`` flag default 0; their evaluation config trains with SGD
momentum 0.9, lr 0.1 × batch/256 (batch 512), 70 epochs with ×0.1 decays at epochs 30 and 50. We train
the same head on cached features (no augmentation: the frozen, cached-feature setting of their main
study) with those settings as defaults, and choose the weight decay on the validation split from
``weight_decays`` (0 alone by default, i.e. theirs), then retrain on train+val and score the test split —
the same selection rule as the linear probe.

Deviation: features are standardised with the train statistics first. It is an affine map the first
layer can absorb, so the probe's capacity is unchanged, and it lets one learning rate suit backbones
whose features differ in scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from selfsup.evaluate.metrics import score


@dataclass
class MLPConfig:
    hidden: int = 1000
    dropout: float = 0.5
    epochs: int = 70
    milestones: list = field(default_factory=lambda: [30, 50])
    batch_size: int = 512
    lr: float = 0.1                 # × batch/256
    momentum: float = 0.9
    weight_decays: list = field(default_factory=lambda: [0.0])
    seed: int = 0


def _head(dim: int, classes: int, cfg: MLPConfig) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
                         nn.Linear(cfg.hidden, classes))


def train_mlp(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: MLPConfig, weight_decay: float,
              device="cpu") -> nn.Module:
    """SGD on (standardised) features; returns the trained head in eval mode."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = _head(x.shape[1], num_classes, cfg).to(device)
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)
    x, y = x.to(device), y.to(device)
    n = len(x)
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)
        order = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def _predict(head: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([head(x[i:i + 4096].to(device)).argmax(1).cpu() for i in range(0, len(x), 4096)])


def mlp_probe(train: tuple, val: tuple, test: tuple, num_classes: int, metric: str = "top1",
              cfg: MLPConfig | None = None, device="cpu") -> dict:
    """Select weight decay on val, retrain on train+val, score test. Returns value, best_wd, val_scores."""
    cfg = cfg or MLPConfig()
    start = time.perf_counter()
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)

    def norm(x):
        return (x - mean) / std

    val_scores = {}
    if len(cfg.weight_decays) > 1:  # with one candidate there is nothing to choose: skip the train-only fits
        for wd in cfg.weight_decays:
            head = train_mlp(norm(xtr), ytr, num_classes, cfg, wd, device)
            val_scores[wd] = score(metric, _predict(head, norm(xva), device), yva, num_classes)
    best = max(val_scores, key=lambda w: (val_scores[w], -w)) if val_scores else cfg.weight_decays[0]
    head = train_mlp(norm(torch.cat([xtr, xva])), torch.cat([ytr, yva]), num_classes, cfg, best, device)
    value = score(metric, _predict(head, norm(xte), device), yte, num_classes)
    return {"value": value, "best_wd": best, "val_scores": val_scores, "seconds": time.perf_counter() - start}
