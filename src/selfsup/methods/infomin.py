"""InfoMin (Tian, Sun, Poole, Krishnan, Schmid, Isola 2020, "What Makes for Good Views for Contrastive Learning?",
NeurIPS), as HobbitLong/PyContrast trained the released InfoMin checkpoints (``--method InfoMin``: RGB, jigsaw,
MoCo memory, aug D, MLP head, τ 0.15; ``learning/contrast_trainer.py`` ``_train_moco``), which Ericsson et al.
2021 evaluate.

MoCo v2 (``methods.moco``: momentum key encoder m = 0.999, a queue of K = 65,536 128-d keys, shuffle-BN, the MLP
head d-ReLU-128) with two changes:

- the InfoMin views (§4.2, "InfoMin Aug"; ``views.infomin_views``): stronger colour jitter, blur and RandAugment
  on both the query and the key;
- PIRL's jigsaw branch (§4.3 of the paper combines InfoMin Aug with PIRL's jigsaw; PyContrast ``RGBMultiHeads``,
  ``JigsawHead``, ``mem_moco.RGBMoCo``): nine tiles of a separate crop, each through the query backbone and an MLP
  d-ReLU-128 (``fc1``), concatenated in their shuffled order (9 × 128) → Linear 128 (``fc2``) → ℓ2, is a second
  query q_jig of the same image, scored against the same key k and queue:

      L = (1 − β)·L_NCE(q, k) + β·L_NCE(q_jig, k),    β = 0.5,

  with L_NCE MoCo's InfoNCE over [q·k, q·queue]/τ (``losses.info_nce``). Only the image keys are enqueued, and the
  key encoder is the EMA of the backbone and the image head only (PyContrast's EMA copy also carries a jigsaw
  head that no forward uses).

The tiles go through the backbone as their own BN batch (PyContrast: ``encoder(x_jig)``), split in the same S
groups of whole images as the queries, so one process with S groups computes what S processes would.
Defaults are PyContrast's: SGD lr 0.03 × batch/256, momentum 0.9, weight decay 1e-4, cosine from lr to lr·0.1³
(``eta_min = lr · lr_decay_rate³``), no warmup at batch 256, 800 epochs for the released ``InfoMin_800.pth``
(73.0 % ImageNet linear). PyContrast updates the key encoder after the optimiser step, we before the next key
pass, as ``methods.moco``: the key passes see the same weights. ``symmetric`` is refused: InfoMin is one-sided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import PROBABILITY, Range, one_of
from selfsup.errors import UserError
from selfsup.losses import info_nce
from selfsup.methods.base import StepInfo
from selfsup.methods.moco import MoCo, MoCoV2Config
from selfsup.nn.distributed import rank_and_world
from selfsup.nn.heads import MOCO_V2, build_head
from selfsup.nn.queue import check_batch
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD
from selfsup.views.infomin_views import infomin_jigsaw_view, infomin_view
from selfsup.views.pirl_views import GRID


@dataclass
class InfoMinConfig(MoCoV2Config):
    temperature: float = 0.15     # PyContrast's InfoMin nce_t
    beta: float = 0.5             # β: the jigsaw term's weight (PyContrast --beta)
    jigsaw_scale: tuple = (0.6, 1.0)  # area scale of the jigsaw crop (JigsawCrop's RandomResizedCrop)
    randaugment_n: int = 2        # RandAugment layers of aug D ('rand-n2-m10-mstd0.5'); 0 leaves it out
    randaugment_m: float = 10.0   # its magnitude, out of 10
    view: str = "infomin"         # aug D (views.infomin_views); not a make_view preset


class InfoMin(MoCo):
    name = "infomin"
    summary = "InfoMin (Tian et al. 2020): MoCo v2 with InfoMin views (RandAugment) and PIRL's jigsaw branch"
    Config = InfoMinConfig
    limits = {**MoCo.limits, "beta": PROBABILITY, "jigsaw_scale": Range(0, 1, low_open=True),
              "view": one_of("infomin"), "randaugment_n": Range(0, 15), "randaugment_m": Range(0, 10)}
    optim_defaults = dict(name="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, schedule="cosine", warmup_epochs=0,
                          final_lr_ratio=1e-3)

    def __init__(self, backbone, cfg: InfoMinConfig, num_images: int):
        if cfg.symmetric:
            raise UserError("method.symmetric=true is not part of InfoMin (a one-sided MoCo loss); drop it")
        super().__init__(backbone, cfg, num_images)
        self.tile_head = build_head(backbone.out_dim, MOCO_V2)              # fc1: d-ReLU-128 per tile
        self.jigsaw_head = nn.Linear(GRID * GRID * MOCO_V2.out_dim, cfg.embed_dim)   # fc2: 9 × 128 → 128

    @classmethod
    def input_stats(cls, cfg: InfoMinConfig) -> tuple[tuple, tuple, bool]:
        return IMAGENET_MEAN, IMAGENET_STD, False

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        size = self.cfg.size or images.shape[-1]
        n, m = self.cfg.randaugment_n, self.cfg.randaugment_m
        return {"query": infomin_view(images, size, n, m, g=g), "key": infomin_view(images, size, n, m, g=g),
                "tiles": infomin_jigsaw_view(images, size, tuple(self.cfg.jigsaw_scale), g=g)}

    def jigsaw_query(self, tiles: torch.Tensor) -> torch.Tensor:
        """q_jig = ℓ2(fc2(concat of fc1(f(tile)) over the nine shuffled tiles)), BN per group of whole images."""
        z = []
        for chunk in tiles.tensor_split(min(self.splits, len(tiles))):
            b, n = chunk.shape[:2]
            per_tile = self.tile_head(self.backbone(chunk.flatten(0, 1))["pre_logits"]).view(b, n, -1)
            z.append(self.jigsaw_head(per_tile.flatten(1)))
        return F.normalize(torch.cat(z).float(), dim=1)

    def forward(self, views: dict, info: StepInfo) -> dict:
        if self.training:
            check_batch(self.cfg.queue_size, len(views["key"]) * rank_and_world()[1])
        q = self.encode(self._online(), views["query"], self.splits)
        q_jig = self.jigsaw_query(views["tiles"])
        if self.training:
            self.key_encoder.update(self._online(), self.cfg.momentum)     # MoCo eq. 2, before the key pass
        k = self.keys(views["key"], info)
        negatives = self.queue.keys()
        beta = self.cfg.beta
        loss_img = info_nce(q, k, negatives, self.cfg.temperature)
        loss_jig = info_nce(q_jig, k, negatives, self.cfg.temperature)
        with torch.no_grad():
            acc = ((q * k).sum(1) > (q @ negatives.T).amax(1)).float().mean()
        return {"loss": (1 - beta) * loss_img + beta * loss_jig, "loss_img": loss_img.detach(),
                "loss_jig": loss_jig.detach(), "pretext_acc": acc, "state": {"keys": k}}
