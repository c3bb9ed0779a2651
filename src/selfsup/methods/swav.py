"""SwAV (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS), as facebookresearch/swav ``main_swav.py`` trains the released models.

Every crop x_v (multi-crop, §3.2: ``views.multicrop``, 2 global + 6 local crops) gives z_v = ℓ2(g(f(x_v))), g the
projector Linear(d, 2048) → BN → ReLU → Linear(2048, 128) (``nn.heads.SWAV``), and prototype scores z_v·C with
C = K = 3,000 bias-free prototypes (a Linear 128 → K whose rows are re-normalised before every step, §3.1). The
backbone runs once per resolution group, as the code's ``forward_backbone``, so BN sees each resolution's batch.

Codes (§3.1, eq. 3, "Online clustering"): for each crop in ``crops_for_assign`` (the two global ones) the codes
q = Sinkhorn-Knopp(exp(z·C / ε)), ε = 0.05, 3 iterations, row and column sums over all processes
(``nn.sinkhorn``), computed without gradient. With a queue (§3.2 "small batches"; ``queue_length`` > 0 from epoch
``epoch_queue_starts``) the scores of the queued embeddings of that crop are stacked above the batch's once the
queue is full, and only the batch's rows of the codes are kept; the queue is per process (``nn.queue.LocalQueue``,
a ShardedState), newest first, fed with each assigned crop's embeddings after the step.

Loss (eq. 1-2, ``losses.swapped_prediction``): each code is predicted from every other crop,
−Σ q·log softmax(z_v·C/τ), τ = 0.1, averaged over the batch, the other crops and the assigned crops.
Prototype gradients are dropped for the first ``freeze_prototypes_niters`` steps (``before_optimizer_step``).

Defaults: the batch-256 recipe (``scripts/swav_400ep_bs256_pretrain.sh``, 74.3 % at 400 epochs): LARS (the code's
LARC, trust 1e-3, no clipping, on every parameter), lr 0.6 × batch/256 → 0.0006 cosine, no warm-up, weight decay
1e-6, queue 3,840 from epoch 15, prototypes frozen for 5,005 steps (one ImageNet epoch at batch 256: scale it with
your dataset). The 800-epoch checkpoint Ericsson et al. evaluate (75.3 %) is batch 4096, lr 4.8 → 0.0048 after 10
warm-up epochs from 0.3, no queue, frozen for 313 steps. The queue's length is rounded down to a multiple of the
global batch, as the code does. Crops: the recipe named by ``multicrop`` scaled to the images
(``views.multicrop.scaled``: 2 × 32 + 6 × 14 at 32 px), or ``crops`` given as [[count, size, [low, high]], …];
``view`` replaces SwAV's colour part (jitter 0.8 s, blur p 0.5) by a ``views.augment`` preset, e.g. ``simclr_cifar``
for lightly's CIFAR-10 recipe (``configs/lightly/swav_cifar10.yaml``).
Where we differ: LARC's per-parameter trust ratio is our LARS's (``train.optim``, the same formula without the
clip); the code's apex mixed precision is our bf16 autocast on GPU; the code normalises the prototypes at the top
of each step, we after each optimiser step (and once at init), so every forward sees unit prototypes either way.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import POSITIVE, Range, one_of
from selfsup.errors import UserError
from selfsup.losses import swapped_prediction
from selfsup.methods.base import Method, StepInfo, TrainSet
from selfsup.nn.heads import SWAV, build_head
from selfsup.nn.queue import LocalQueue
from selfsup.nn.sinkhorn import sinkhorn
from selfsup.views.augment import IMAGENET_MEAN, PRESETS
from selfsup.views.multicrop import RECIPES, SWAV_STD, MultiCrop, crop_counts, multicrop_views, recipe


@dataclass
class SwAVConfig:
    embed_dim: int = 128              # feat_dim
    proj_hidden: int = 2048           # hidden_mlp
    num_prototypes: int = 3000        # nmb_prototypes
    temperature: float = 0.1          # τ of the swapped prediction
    epsilon: float = 0.05             # ε of Sinkhorn-Knopp
    sinkhorn_iterations: int = 3
    crops_for_assign: tuple = (0, 1)  # the crops whose codes are predicted (the global ones)
    queue_length: int = 3840          # 0 = no queue (the 800-epoch recipe)
    epoch_queue_starts: int = 15
    freeze_prototypes_niters: int = 5005
    multicrop: str = "swav"           # a views.multicrop recipe, scaled to the images' size
    crops: list | None = None         # or explicit groups [[count, size, [low, high]], ...], the global group first
    view: str | None = None           # the colour part of every crop: a views.augment preset; None = SwAV's own
    size: int | None = None           # the global crop's size for the scaled recipe; None = the images' own


class SwAV(Method):
    name = "swav"
    summary = "SwAV (Caron et al. 2020): multi-crop, online Sinkhorn codes, swapped prediction over 3,000 prototypes"
    Config = SwAVConfig
    limits = {"proj_hidden": Range(1), "num_prototypes": Range(1), "epsilon": POSITIVE,
              "sinkhorn_iterations": Range(1), "queue_length": Range(0), "epoch_queue_starts": Range(0),
              "freeze_prototypes_niters": Range(0), "multicrop": one_of(*RECIPES),
              "view": one_of(*PRESETS)}
    optim_defaults = dict(name="lars", lr=0.6, scale_lr=True, momentum=0.9, lars_eta=1e-3, weight_decay=1e-6,
                          exclude_norm_and_bias=False, warmup_epochs=0, schedule="cosine", final_lr_ratio=1e-3)

    def __init__(self, backbone, cfg: SwAVConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        if cfg.num_prototypes > num_images:
            raise UserError(f"method.num_prototypes={cfg.num_prototypes} is more than the {num_images} training "
                            f"images: set method.num_prototypes to at most {num_images}")
        self.head = build_head(backbone.out_dim, dataclasses.replace(SWAV, hidden_dim=cfg.proj_hidden,
                                                                     out_dim=cfg.embed_dim))
        self.prototypes = nn.Linear(cfg.embed_dim, cfg.num_prototypes, bias=False)
        self.normalize_prototypes()
        self.queue: LocalQueue | None = None
        try:
            self._crops = MultiCrop(cfg.crops, **self._view(cfg)) if cfg.crops is not None else None
        except UserError as e:
            raise UserError(f"method.crops: {e}") from None
        counts = crop_counts(self._crops) if self._crops else crop_counts(RECIPES[cfg.multicrop])
        if not cfg.crops_for_assign or any(not 0 <= c < counts[0] for c in cfg.crops_for_assign):
            raise UserError(f"method.crops_for_assign={list(cfg.crops_for_assign)} must name global crops, "
                            f"0 … {counts[0] - 1} (the first group of the multi-crop recipe)")

    @staticmethod
    def _view(cfg: SwAVConfig) -> dict:
        return {} if cfg.view is None else {"view": PRESETS[cfg.view]}

    @classmethod
    def input_stats(cls, cfg: SwAVConfig) -> tuple[tuple, tuple, bool]:
        if cfg.view is None:
            return IMAGENET_MEAN, SWAV_STD, False
        view = PRESETS[cfg.view]
        return tuple(view.mean), tuple(view.std), False

    def crops(self, image_size: int) -> MultiCrop:
        """The multi-crop recipe for images of ``image_size`` px (or ``cfg.size``)."""
        if self._crops is not None:
            return self._crops
        mc = recipe(self.cfg.multicrop, self.cfg.size or image_size)
        return dataclasses.replace(mc, **self._view(self.cfg))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def setup(self, train_set: TrainSet) -> None:
        length, world = self.cfg.queue_length, train_set.world
        if length and train_set.batch_size:
            length -= length % train_set.batch_size          # the code: a multiple of the global batch
            if length == 0:
                raise UserError(f"method.queue_length={self.cfg.queue_length} is shorter than the global batch "
                                f"{train_set.batch_size}: make it a multiple of the batch, e.g. "
                                f"{train_set.batch_size * 15}, or 0 for no queue")
        if length:
            self.queue = LocalQueue(len(self.cfg.crops_for_assign), length // world, self.cfg.embed_dim).to(
                train_set.device)
            if length >= train_set.num_images and train_set.rank == 0:
                warnings.warn(f"the SwAV queue (method.queue_length={self.cfg.queue_length}) holds at least the "
                              f"{train_set.num_images} images of {train_set.name}: stale embeddings of the batch's own "
                              f"images join its Sinkhorn problem; use a shorter queue", stacklevel=2)

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        groups = multicrop_views(images, self.crops(images.shape[-1]), g=g)
        return {f"crops_{i}": x for i, x in enumerate(groups)}

    def embed(self, views: dict) -> torch.Tensor:
        """z = ℓ2(g(f(x))) of every crop, V·B × d, crop-major; one backbone pass per resolution group."""
        groups = [views[f"crops_{i}"] for i in range(len(views))]
        z = torch.cat([self.head(self.backbone(x)["pre_logits"]) for x in groups])
        return F.normalize(z.float(), dim=1)

    def queue_on(self, info: StepInfo) -> bool:
        return self.queue is not None and info.epoch >= self.cfg.epoch_queue_starts

    def forward(self, views: dict, info: StepInfo) -> dict:
        batch = len(views["crops_0"]) // crop_counts(self.crops(views["crops_0"].shape[-1]))[0]
        z = self.embed(views)
        scores = self.prototypes(z).split(batch)                               # one B × K block per crop
        codes = []
        with torch.no_grad():
            for i, crop in enumerate(self.cfg.crops_for_assign):
                out = scores[crop].detach()
                if self.queue_on(info) and self.queue.full(i):
                    out = torch.cat([self.queue.queue[i] @ self.prototypes.weight.T, out])
                codes.append(sinkhorn(out, self.cfg.epsilon, self.cfg.sinkhorn_iterations)[-batch:])
        loss = swapped_prediction(list(scores), codes, tuple(self.cfg.crops_for_assign), self.cfg.temperature)
        with torch.no_grad():   # how many prototypes the codes use: a collapse monitor
            used = torch.cat(codes).argmax(1).unique().numel()
        state = {"assigned": torch.stack([z[c * batch:(c + 1) * batch].detach() for c in self.cfg.crops_for_assign])}
        return {"loss": loss, "prototypes_used": torch.tensor(float(used)), "state": state}

    def before_optimizer_step(self, info: StepInfo) -> None:
        if info.step < self.cfg.freeze_prototypes_niters:                      # the code: p.grad = None
            self.prototypes.weight.grad = None

    def after_step(self, state: dict, info: StepInfo) -> None:
        self.normalize_prototypes()
        if self.queue_on(info):
            for i, rows in enumerate(state["assigned"]):
                self.queue.push(i, rows)
