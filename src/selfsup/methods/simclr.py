"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML; SimCLR-v1 of Ericsson et al. 2021's model zoo).

Two augmented views of every image (§3, App. A: random resized crop + flip, colour jitter with
strength s = 1 applied with p = 0.8, grayscale p = 0.2, Gaussian blur p = 0.5), the backbone's
pre-logits h, a projector g(h) = W2 ReLU(BN(W1 h)) to 128 dims (§2.1; the BN in the hidden layer
follows the authors' public code, the paper only says "MLP with one hidden layer"), and the NT-Xent
loss (eq. 1, ``selfsup.losses.nt_xent``) over the global batch, negatives gathered across ranks.

Defaults are the paper's ImageNet recipe: τ = 0.1, LARS, lr 0.3 × batch/256, weight decay 1e-6,
10 warmup epochs, cosine decay, no decay or LARS on biases and BN. For CIFAR-sized images use the
``simclr_cifar`` view preset (no blur, as SimCLR App. B.9) and τ = 0.5 (configs/small/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from selfsup.config import Range
from selfsup.losses import nt_xent
from selfsup.methods.base import Method, StepInfo
from selfsup.nn.heads import SIMCLR_V1, build_head
from selfsup.views.augment import PRESETS, make_view


@dataclass
class SimCLRConfig:
    temperature: float = 0.1      # §B.1 / Table 5 (ImageNet); 0.5 for CIFAR-10 (App. B.9)
    proj_hidden: int | None = None  # hidden width; None = the backbone's feature dimension (2048 for R-50)
    proj_dim: int = 128           # §2.1
    view: str = "simclr"          # augmentation preset: simclr | simclr_cifar
    size: int | None = None       # crop size; None = the images' own size


class SimCLR(Method):
    name = "simclr"
    summary = "SimCLR (Chen et al. 2020): two views, projector, NT-Xent with cross-rank negatives"
    Config = SimCLRConfig
    limits = {"proj_hidden": Range(1), "proj_dim": Range(1)}
    optim_defaults = dict(name="lars", lr=0.3, weight_decay=1e-6, exclude_norm_and_bias=True,
                          warmup_epochs=10, schedule="cosine")

    def __init__(self, backbone, cfg: SimCLRConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        dim = backbone.out_dim
        self.projector = build_head(dim, dataclasses.replace(SIMCLR_V1, hidden_dim=cfg.proj_hidden,
                                                             out_dim=cfg.proj_dim))
        self.view_cfg = PRESETS[cfg.view]

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        cfg = dataclasses.replace(self.view_cfg, size=self.cfg.size or images.shape[-1])
        return {"x1": make_view(images, cfg, g=g), "x2": make_view(images, cfg, g=g)}

    def forward(self, views: dict, info: StepInfo) -> dict:
        x = torch.cat([views["x1"], views["x2"]])
        z = self.projector(self.backbone(x)["pre_logits"])
        z1, z2 = z.chunk(2)
        with torch.no_grad():  # how often a view's nearest neighbour (cosine) is its positive: a pretext accuracy
            zn = torch.nn.functional.normalize(z.float(), dim=1)
            sim = zn @ zn.T
            sim.fill_diagonal_(float("-inf"))
            b = z1.shape[0]
            target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
            acc = (sim.argmax(1) == target).float().mean()
        return {"loss": nt_xent(z1, z2, self.cfg.temperature), "pretext_acc": acc}
