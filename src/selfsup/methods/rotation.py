"""Rotation prediction (Gidaris, Singh, Komodakis 2018) as studied by Kolesnikov, Zhai, Beyer 2019,
"Revisiting Self-Supervised Visual Representation Learning", §3.1 ("Rotation").

Every image of the batch appears under all four rotations, 0°, 90°, 180° and 270°, with labels
0–3 (a batch of 64 images is 256 samples), and a linear layer on the pre-logits is trained with a
4-way softmax cross-entropy. Augmentation before rotating is Inception-style (their public config
``inception_preprocess,rotate``): a random crop covering 10–100 % of the image with aspect ratio
3/4–4/3, a horizontal flip and a mild colour distortion (brightness, then saturation), values
scaled to [−1, 1] (``views.augment.INCEPTION_SLIM``). Deviation, documented: slim's brightness change is additive
(±32/255), ours is the multiplicative factor of ``views.augment.color_jitter`` (±0.125).

Optimisation as their configs: SGD momentum 0.9, lr 0.1 × batch/256, weight decay 1e-4, 5 warmup
epochs, 35 epochs with ×0.1 at epochs 15 and 25 (set ``optim.milestones`` to match shorter runs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.methods.base import REVISITING_OPTIM, Method, StepInfo
from selfsup.views.augment import PRESETS, make_view, rotate90


@dataclass
class RotationConfig:
    view: str = "inception_rotation"  # augmentation preset applied before rotating
    size: int | None = None           # crop size; None = the images' own size


class Rotation(Method):
    name = "rotation"
    summary = "Rotation (Gidaris et al. 2018; Kolesnikov et al. 2019 §3.1): all 4 rotations, 4-way softmax"
    Config = RotationConfig
    optim_defaults = REVISITING_OPTIM

    def __init__(self, backbone, cfg: RotationConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        self.head = nn.Linear(backbone.out_dim, 4)
        self.view_cfg = PRESETS[cfg.view]

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        cfg = dataclasses.replace(self.view_cfg, size=self.cfg.size or images.shape[-1])
        x = make_view(images, cfg, g=g)
        b = x.shape[0]
        labels = torch.arange(4, device=x.device).repeat_interleave(b)   # 0…0, 1…1, 2…2, 3…3
        return {"x": rotate90(x.repeat(4, 1, 1, 1), labels), "labels": labels}

    def forward(self, views: dict, info: StepInfo) -> dict:
        logits = self.head(self.backbone(views["x"])["pre_logits"])
        loss = F.cross_entropy(logits.float(), views["labels"])
        acc = (logits.argmax(1) == views["labels"]).float().mean()
        return {"loss": loss, "pretext_acc": acc.detach()}
