"""What Relative Patch Location and Jigsaw share (Kolesnikov, Zhai, Beyer 2019 §3; their public code
``self_supervision/patch_utils.py``): the patch views, the per-patch embedding and the fc head.

Views (their config ``resize,to_gray,crop,crop_patches,standardization``): grayscale with p = 0.66 for
the whole image before cropping, as the mean of R, G and B (``to_gray``; the paper's text says per
patch — we follow the code, as PAPERS.md notes), a random crop, a 3×3 grid of cells with a random
patch in each (jitter), and per-patch standardisation. The geometry (292 → 255 → 85 → 64 at ImageNet
scale) is scaled to the input size by ``views.patches.patch_geometry``.

Model: every patch goes through the shared backbone and a linear layer to ``embed_dim`` = 1000 (their
network's 1000-way output layer); a task picks tuples of patch embeddings, concatenates them
(``permutate_and_concat_batch_patches``) and classifies the tuple with AlexNet's fc7–fc8 as in their
``fully_connected``: FC 4096 + BN (momentum 0.997) + ReLU + dropout 0.5 → FC classes, weights from a
truncated normal with std 0.005, the first bias 0.1, weight decay 5e-4 on this head only.

The patch models of the paper use stride 1 in the first convolution and in the last stage: set
``backbone.options: {first_conv_stride1: true, last_stage_stride1: true}`` (configs/revisiting/).
At evaluation the representation is the full image through the backbone (the default of
``selfsup evaluate``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import FRACTION_BELOW_ONE, NON_NEGATIVE, PROBABILITY, Range
from selfsup.methods.base import Method, StepInfo
from selfsup.nn.heads import HeadSpec, build_head
from selfsup.views.augment import to_float
from selfsup.views.color import random_mean_gray
from selfsup.views.patches import extract_patches, patch_geometry, standardize_patches


@dataclass
class PatchTaskConfig:
    embed_dim: int = 1000        # per-patch embedding (their --embed_dim)
    gray_p: float = 0.66         # --grayscale_probability
    hidden: int = 4096           # fc7 of the head
    dropout: float = 0.5
    head_weight_decay: float = 5e-4
    size: int | None = None      # the image size the geometry is scaled from; None = the images' own


def fc_head(in_dim: int, hidden: int, classes: int, dropout: float) -> nn.Sequential:
    head = build_head(in_dim, HeadSpec(out_dim=classes, hidden_dim=hidden, bn="hidden", bn_momentum=0.003,
                                       dropout=dropout))   # Linear → BN → ReLU → Dropout → Linear
    for layer, bias in ((head[0], 0.1), (head[4], 0.0)):
        nn.init.trunc_normal_(layer.weight, std=0.005, a=-0.01, b=0.01)
        nn.init.constant_(layer.bias, bias)
    return head


class PatchTask(Method):
    """Base of the patch tasks: subclasses define ``tuples(g)`` -> (patch index tuples m×k, labels m)."""

    num_classes: int
    tuple_len: int
    limits = {"gray_p": PROBABILITY, "hidden": Range(1), "dropout": FRACTION_BELOW_ONE,
              "head_weight_decay": NON_NEGATIVE}

    def __init__(self, backbone, cfg, num_images: int):
        super().__init__(backbone, cfg, num_images)
        self.embed = nn.Linear(backbone.out_dim, cfg.embed_dim)
        self.head = fc_head(self.tuple_len * cfg.embed_dim, cfg.hidden, self.num_classes, cfg.dropout)
        self.weight_decay_overrides = {"head.": cfg.head_weight_decay}

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        x = random_mean_gray(to_float(images), self.cfg.gray_p, g)
        geom = patch_geometry(self.cfg.size or images.shape[-1])  # resizes the images when size is set
        patches = standardize_patches(extract_patches(x, geom, g))           # B×9×C×p×p
        tuples, labels = self.tuples(g)
        return {"patches": patches, "tuples": tuples.to(x.device), "labels": labels.to(x.device)}

    @classmethod
    def input_stats(cls, cfg) -> tuple[tuple, tuple, bool]:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), True   # trained on standardised patches

    @abc.abstractmethod
    def tuples(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch-index tuples (m×k) to classify for every image of the batch, and their labels (m)."""

    def forward(self, views: dict, info: StepInfo) -> dict:
        patches, tuples, labels = views["patches"], views["tuples"], views["labels"]
        b, n = patches.shape[:2]
        e = self.embed(self.backbone(patches.flatten(0, 1))["pre_logits"]).view(b, n, -1)   # B×9×E
        m, k = tuples.shape
        picked = e[:, tuples.flatten()].view(b * m, k * e.shape[-1])                      # (B·m)×(k·E)
        logits = self.head(picked).float()
        target = labels.repeat(b)
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(1) == target).float().mean()
        return {"loss": loss, "pretext_acc": acc.detach()}
