"""MoCo v1 (He, Fan, Wu, Xie, Girshick 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR) and MoCo v2 (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive
Learning", arXiv 2003.04297), as facebookresearch/moco (``moco/builder.py``, ``main_moco.py``) trains them.

Two views of every image: the query q = ℓ2(f_q(x_q)) with f_q = backbone + head, the key k = ℓ2(f_k(x_k))
from a momentum copy f_k (``nn.momentum.MomentumEncoder``), and InfoNCE (§3.1, eq. 1; ``losses.info_nce``)
over the logits [q·k, q·queue]/τ with label 0 against a FIFO queue of K past keys (§3.2; ``nn.queue.KeyQueue``).
Each training forward first updates θ_k ← m·θ_k + (1 − m)·θ_q (eq. 2), then encodes the keys under no_grad;
``after_step`` enqueues them. Algorithm 1 updates θ_k after the SGD step, builder.py at the start of the next
forward: the key passes see the same weights (the very first update is a no-op on the fresh copy), so we
follow the code, and only in training mode (an eval forward changes nothing).

Shuffling BN (§3.3). BN over the batch would let a query find its positive by the statistics they share.
The code (``_batch_shuffle_ddp``) gathers the key images of every rank, permutes them, lets each rank encode
its slice and un-permutes the keys; the queries keep their order. Here every process splits its batch into
``shuffle_bn_splits`` = S BN groups, so the world has G = world × S groups of B/G images:

- the queries: each process encodes its local batch in S contiguous chunks (its "virtual ranks");
- the keys: the global key batch (gathered across ranks) is permuted by π = ``shuffle_permutation(B, info)``,
  ``torch.randperm(B)`` from a generator seeded with (seed · 2654435761 + step · 97003 + 12345) mod (2⁶³ − 1),
  the same on every rank without the code's broadcast from rank 0 (and on resume); rank r encodes the
  permuted images π[r·B/world:(r+1)·B/world] in S chunks (``tensor_split``), the keys are gathered and put
  back in image order (k[π[j]] = key j), each rank keeping its own.

So one process with S = 2 computes what 2 processes with S = 1 do (queries, keys, loss, queue; BN running
statistics, used in eval mode only, differ: a process updates them once per group). Default S = None: 2 on
one process, 1 per process under DDP (the code's setting). S = 1 on one process is the ablation without
shuffling (§3.3: without it the model "cheats" the pretext task with an easy low-loss solution).

Defaults are the released recipes: v1 dim 128 (a single Linear, the fc of their ResNet), K 65,536, m 0.999,
τ 0.07 (§3.3, §4); SGD lr 0.03 × batch/256, momentum 0.9, weight decay 1e-4 on every parameter, 200 epochs,
×0.1 at epochs 120 and 160 (§4, ``main_moco.py``); views ``moco_v1``. v2 (§3, Table 1): the MLP head
(``heads.MOCO_V2``: 2048-ReLU-128 on R-50), τ 0.2, ``moco_v2`` (aug+) views, cosine schedule; ``main_moco.py
--cos`` decays the lr once per epoch, ours every step. Its released 800-epoch checkpoint differs only in
train.epochs. K must be a multiple of the global batch (``check_batch``); K ≥ the dataset size is warned about.

``symmetric`` (not in either paper; the MoCo CIFAR-10 demo notebook of facebookresearch/moco and lightly's CIFAR-10
benchmark use it): both views serve as query and as key, the loss is ½(L(q₁, k₂) + L(q₂, k₁)), each against the
queue as it stood before the step, and both key sets (2B keys) are enqueued after it, so K must be a multiple of 2B.
The demo sums the two terms; we average them so that the lr means what it means for the one-sided loss (lightly
averages too). lightly's loss enqueues k₂ between the two terms, so its second term meets the momentum key of its
own query's image among the negatives; we do not copy that.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import PROBABILITY, Range
from selfsup.losses import info_nce
from selfsup.methods.base import Method, StepInfo, TrainSet
from selfsup.nn.distributed import gather_with_grad, rank_and_world
from selfsup.nn.heads import MOCO_V2, HeadSpec, build_head
from selfsup.nn.momentum import MomentumEncoder
from selfsup.nn.queue import KeyQueue, check_batch
from selfsup.views.augment import PRESETS, make_view


def shuffle_permutation(batch: int, info: StepInfo) -> torch.Tensor:
    """The key batch's permutation π of step ``info.step``: identical on every rank and on resume."""
    seed = (info.seed * 2_654_435_761 + info.step * 97_003 + 12_345) % (2**63 - 1)
    return torch.randperm(batch, generator=torch.Generator().manual_seed(seed))


@dataclass
class MoCoConfig:
    embed_dim: int = 128          # §3.3 / builder.py dim
    queue_size: int = 65_536      # K, §3.3 (Fig. 3 ablates it)
    momentum: float = 0.999       # m, eq. 2 (§4.1 ablates it)
    temperature: float = 0.07     # τ, §3.3 after Wu et al. 2018
    mlp: bool = False             # builder.py mlp: Linear-ReLU-Linear head (MoCo v2)
    shuffle_bn_splits: int | None = None  # BN groups per process; None: 2 on one process, 1 under DDP
    symmetric: bool = False       # ½(L(q₁, k₂) + L(q₂, k₁)), both key sets enqueued (the module docstring)
    view: str = "moco_v1"         # augmentation preset
    size: int | None = None       # crop size; None = the images' own size


@dataclass
class MoCoV2Config(MoCoConfig):
    temperature: float = 0.2      # Chen et al. 2020, §3 (Table 1)
    mlp: bool = True
    view: str = "moco_v2"         # aug+: + blur, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8


class MoCo(Method):
    name = "moco"
    summary = "MoCo v1 (He et al. 2020): momentum key encoder, 65,536-key queue, InfoNCE, shuffle-BN"
    Config = MoCoConfig
    limits = {"queue_size": Range(1), "momentum": PROBABILITY, "shuffle_bn_splits": Range(1)}
    optim_defaults = dict(name="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, schedule="step",
                          milestones=[120, 160], gamma=0.1, warmup_epochs=0)

    def __init__(self, backbone, cfg: MoCoConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        spec = MOCO_V2 if cfg.mlp else HeadSpec(out_dim=cfg.embed_dim, layers=1)
        self.head = build_head(backbone.out_dim, dataclasses.replace(spec, out_dim=cfg.embed_dim))
        self.key_encoder = MomentumEncoder(self._online())   # θ_k starts as a copy of θ_q (builder.py)
        self.queue = KeyQueue(cfg.queue_size, cfg.embed_dim)

    def _online(self) -> nn.ModuleDict:
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    @property
    def splits(self) -> int:
        """S, the BN groups of this process."""
        return self.cfg.shuffle_bn_splits or (2 if rank_and_world()[1] == 1 else 1)

    @property
    def keys_per_image(self) -> int:
        """Keys enqueued per image and step: 2 when ``symmetric``."""
        return 2 if self.cfg.symmetric else 1

    @property
    def keys_why(self) -> str:
        return " of keys (2 per image under method.symmetric)" if self.cfg.symmetric else ""

    def setup(self, train_set: TrainSet) -> None:
        k, n = self.cfg.queue_size, train_set.num_images
        batch = train_set.batch_size * self.keys_per_image
        if batch:   # before the first step; without it, forward refuses at the first step
            check_batch(k, batch, self.keys_why)
        if k >= n and train_set.rank == 0:
            fix = max(batch or 1, n // 4 // (batch or 1) * (batch or 1))
            warnings.warn(f"the key queue (method.queue_size={k}) is at least as large as the {n} images of "
                          f"{train_set.name}: it holds stale keys of the same images, the positive's own image "
                          f"among the negatives; use a queue below the dataset size, e.g. method.queue_size={fix}",
                          stacklevel=2)

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        cfg = dataclasses.replace(PRESETS[self.cfg.view], size=self.cfg.size or images.shape[-1])
        return {"query": make_view(images, cfg, g=g), "key": make_view(images, cfg, g=g)}

    @staticmethod
    def encode(encoder: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
        """ℓ2(head(backbone(x))) with BN statistics per group of ``x.tensor_split(groups)``."""
        z = [encoder["head"](encoder["backbone"](chunk)["pre_logits"]) for chunk in x.tensor_split(min(groups, len(x)))]
        return F.normalize(torch.cat(z).float(), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """This rank's keys ℓ2(f_k(x)), encoded with shuffled BN (the module docstring)."""
        rank, world = rank_and_world()
        if world * self.splits == 1:
            return self.encode(self.key_encoder.target, x, 1)
        every = gather_with_grad(x)                                         # B_global in rank order
        perm = shuffle_permutation(len(every), info).to(x.device)
        mine = perm.view(world, -1)[rank]
        shuffled = gather_with_grad(self.encode(self.key_encoder.target, every[mine], self.splits))
        return shuffled[perm.argsort()].view(world, -1, shuffled.shape[1])[rank]  # k[π[j]] = shuffled[j]

    def forward(self, views: dict, info: StepInfo) -> dict:
        if self.training:   # refused before any weight changes, whatever setup was told
            check_batch(self.cfg.queue_size, len(views["key"]) * rank_and_world()[1] * self.keys_per_image,
                        self.keys_why)
        pairs = [("query", "key"), ("key", "query")][:self.keys_per_image]
        queries = [self.encode(self._online(), views[a], self.splits) for a, _ in pairs]
        if self.training:
            self.key_encoder.update(self._online(), self.cfg.momentum)     # eq. 2, before the key pass
        keys = [self.keys(views[b], info) for _, b in pairs]
        negatives = self.queue.keys()
        loss = sum(info_nce(q, k, negatives, self.cfg.temperature) for q, k in zip(queries, keys, strict=True))
        with torch.no_grad():   # how often the positive outscores every queued key
            acc = sum(((q * k).sum(1) > (q @ negatives.T).amax(1)).float().mean() for q, k in zip(queries, keys,
                                                                                                  strict=True))
        n = len(pairs)
        return {"loss": loss / n, "pretext_acc": acc / n, "state": {"keys": torch.cat(keys)}}

    def after_step(self, state: dict, info: StepInfo) -> None:
        self.queue.enqueue(state["keys"])   # every rank's keys, in rank order (a collective)


class MoCoV2(MoCo):
    name = "moco_v2"
    summary = "MoCo v2 (Chen et al. 2020): MoCo with an MLP head, τ 0.2, blur augmentation, cosine schedule"
    Config = MoCoV2Config
    optim_defaults = dict(name="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, schedule="cosine", warmup_epochs=0)
