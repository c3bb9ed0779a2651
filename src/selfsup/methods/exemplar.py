"""Exemplar (Dosovitskiy et al. 2014, "Discriminative Unsupervised Feature Learning with Convolutional
Neural Networks") as studied by Kolesnikov, Zhai, Beyer 2019, "Revisiting Self-Supervised Visual
Representation Learning", §3 ("Exemplar"); public code ``self_supervision/exemplar.py`` and
``config/exemplar/imagenet.sh`` (google/revisiting-self-supervised).

Every image is its own class. Each image of the batch yields 8 independently augmented copies (64
images → 512 samples), labelled with the image's identity, and the network is trained so that copies
of one image lie closer together than copies of different images: the backbone's pre-logits feed a
linear "1000-d output layer", each embedding is L2-normalised, and the loss is the semi-hard triplet
loss with margin 0.5 (``selfsup.losses.triplet_semihard``, TF's ``triplet_semihard_loss`` semantics).

Views follow their preprocessing ``to_gray,crop_inception_preprocess_patches,standardization``:

1. grayscale with p = 0.66, decided once per *image* so its 8 copies share it; grey = the mean of R, G, B
   (their ``_to_gray``), not luma;
2. per copy, slim's Inception training preprocessing (the ``exemplar`` view preset): a crop covering
   10–100 % of the image with aspect ratio 3/4–4/3, bilinear resize, horizontal flip, brightness then
   saturation, values scaled to [−1, 1];
3. per copy, TF's ``per_image_standardization``: (x − mean) / max(std, 1/√N), N = C·H·W, which removes
   each copy's low-level colour statistics (their comment: "to avoid low level statistics").

Evaluation uses plain [−1, 1] inputs without standardisation (their ``config/evaluation/
rotation_or_exemplar.sh``), which is what the preset's mean/std give ``input_normalization``.

Deviations, documented:
- Their code normalises with ``tf.nn.l2_normalize(logits, axis=0)``, i.e. each *dimension* across the
  batch, a bug (the embedding of a sample then depends on the rest of the batch). We normalise each
  embedding vector (``dim=1``), as the paper's and FaceNet's triplet loss intends.
- Brightness is the multiplicative factor U[0.875, 1.125] of ``views.color.color_jitter`` (slim: additive,
  max delta 32/255), and the two colour ops come in random order (slim's fast mode: brightness first);
  both ops are linear, so order matters only through clipping.
- Labels are the images' dataset indices, not their batch positions: equal whenever a batch holds each
  image once (one epoch's order), and an image drawn twice is then not its own negative.
- Under DDP each rank computes the loss on its own batch, as their per-TPU-core estimator did.

Optimisation as their config: SGD momentum 0.9, lr 0.1 × batch/256 (batch counted in images, 64),
weight decay 1e-4, 5 warmup epochs, 35 epochs, ×0.1 at epochs 15 and 25.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import NON_NEGATIVE, PROBABILITY, Range
from selfsup.losses import triplet_semihard
from selfsup.methods.base import REVISITING_OPTIM, Method, StepInfo
from selfsup.views.augment import PRESETS, make_view, to_float
from selfsup.views.color import random_mean_gray
from selfsup.views.patches import standardize_patches


@dataclass
class ExemplarConfig:
    copies: int = 8               # augmented copies per image (--num_of_inception_patches 8)
    gray_p: float = 0.66          # grayscale probability, once per image (--grayscale_probability 0.66)
    embed_dim: int = 1000         # the "1000-d output layer" (--embed_dim 1000)
    margin: float = 0.5           # triplet margin (--margin 0.5)
    view: str = "exemplar"        # augmentation preset applied to each copy
    size: int | None = None       # crop size; None = the images' own size (their configs: 224)


class Exemplar(Method):
    name = "exemplar"
    summary = "Exemplar (Dosovitskiy et al. 2014; Kolesnikov et al. 2019 §3): 8 copies/image, semi-hard triplet loss"
    Config = ExemplarConfig
    limits = {"copies": Range(2), "gray_p": PROBABILITY, "margin": NON_NEGATIVE}   # a triplet needs 2 copies
    optim_defaults = REVISITING_OPTIM

    def __init__(self, backbone, cfg: ExemplarConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        self.view_cfg = PRESETS[cfg.view]
        self.head = nn.Linear(backbone.out_dim, cfg.embed_dim)   # their net's logits layer, num_classes=embed_dim

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        channels_last = images.is_contiguous(memory_format=torch.channels_last)
        x = to_float(images)
        # grayscale decided once per image, before the copies are made, so all 8 share it (their to_gray)
        x = random_mean_gray(x, self.cfg.gray_p, g)
        x = x.repeat_interleave(self.cfg.copies, 0)                # image 0 ×8, image 1 ×8, … (np.repeat)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cfg = dataclasses.replace(self.view_cfg, size=self.cfg.size or images.shape[-1], gray_p=0.0)
        x = standardize_patches(make_view(x, cfg, g=g))       # each copy drawn independently
        labels = index.to(x.device).repeat_interleave(self.cfg.copies)
        return {"x": x, "labels": labels}

    def forward(self, views: dict, info: StepInfo) -> dict:
        z = self.head(self.backbone(views["x"])["pre_logits"]).float()
        z = F.normalize(z, dim=1)            # per vector; their axis=0 normalises over the batch (a bug)
        labels = views["labels"]
        loss = triplet_semihard(z, labels, self.cfg.margin)
        with torch.no_grad():  # share of samples whose nearest other embedding is a copy of the same image
            sim = z @ z.T
            sim.fill_diagonal_(float("-inf"))
            acc = (labels[sim.argmax(1)] == labels).float().mean()
        return {"loss": loss, "pretext_acc": acc}
