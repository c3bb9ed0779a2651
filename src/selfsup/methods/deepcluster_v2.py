"""DeepCluster-v2 (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS, App. A "DeepCluster-v2"), as facebookresearch/swav
``main_deepclusterv2.py`` trains the released 800-epoch model.

Model: as SwAV (``methods.swav``): every crop x_v of the multi-crop views (2 global + 6 local crops, §3.2,
``views.multicrop`` recipe ``deepcluster_v2``) gives z_v = ℓ2(g(f(x_v))), g = Linear(d, 2048) → BN → ReLU →
Linear(2048, 128) (``nn.heads.SWAV``); the backbone runs once per resolution group, as the code's
``forward_backbone``. H = 3 prototype heads (``num_prototypes`` = [3000, 3000, 3000]), each a bias-free
Linear(128 → K_h) whose rows C_h are the centroids of the last k-means: they are never trained (their weights
do not require grad, so no gradient reaches them and the optimiser does not hold them; the code leaves them
in the optimiser but drops their gradient for ``freeze_prototypes_niters`` steps, 300,000 in the released
script, more than the ~250,000 steps of its 800 epochs at batch 4096, and overwrites them at every epoch start,
so they get no update there either).

Clustering (App. A; the code's ``cluster_memory``), at every epoch start (``epoch_start``): for head h, spherical
k-means (``nn.kmeans.spherical_kmeans``, 10 iterations, initial centroids K_h random rows of rank 0's memory, drawn
with a seed taken from the epoch generator ``g``, one per head) on the memory of crop ``crops_for_assign[h % 2]``
(the heads alternate between the two global crops' memories, the code's ``j = (j + 1) % 2``); C_h := the centroids
(the code: ``prototypes{h}.weight.copy_(centroids)``), and y_h(i), the cluster of every image i, kept in the
buffer ``assignments`` (H × N, long). What the clustering computes lives in buffers and parameters, so a run
resumed mid-epoch needs no re-clustering and equals the uninterrupted one (tested); one resumed at an epoch's
first step clusters the checkpointed memory, as the uninterrupted run would.

Loss (the code's training loop): with the crops stacked crop-major (V·B rows, V = 8),

    L = (1/H) Σ_h  (1/(V·B)) Σ_{v,b}  −log softmax(z_{v,b} · C_hᵀ / τ)[y_h(i_b)],      τ = 0.1

``nn.CrossEntropyLoss(ignore_index=-100)`` summed over heads and divided by H; an image never clustered has
target −100 and is ignored, as in the code (here every image is clustered: the memory holds all of them).

Memory (the code's ``local_memory_embeddings``): the 128-d z of crops 0 and 1 of every training image, written
after every step with that step's (pre-update) embeddings of the batch. Design: one ``nn.memory_bank.MemoryBank``
per assigned crop, ``memory.0`` and ``memory.1``, keyed by dataset index (momentum 0, so an entry is replaced by
the new unit embedding), interleaved over the processes (image i on rank i % world): each rank holds N/world
rows, as the code's local memories do, but an image's row never moves between ranks, so the state is a function
of the step alone and a checkpoint (the banks are ShardedState: gathered whole, resumable on any number of
processes) resumes bit for bit. The code instead keys its local memory by position in the rank's pass of the
epoch (rows move with the sampler); k-means sees the same set of rows either way. A write all-gathers the
global batch's (index, z) pairs, O(B·d) per step. k-means runs on each rank's shard and all-reduces sums and
counts (as the code); each rank's assignments are all-gathered into the full ``assignments`` buffer, identical
on every rank (so not sharded; DDP's buffer broadcast copies it from rank 0 each step: H × N longs).

Initial memory (the code's ``init_memory``): before the first clustering, every image's crops 0 and 1 go
through the model in training mode (the code calls it before training, the model in its default train mode:
BN uses batch statistics and updates its running averages), each crop its own batch, with the training
augmentation. Here that pass runs at the first ``epoch_start`` while the buffer ``memory_filled`` is 0 (so a
resumed run, whose checkpoint has it at 1, never repeats it), over this rank's images via ``TrainSet.encode``
(kept from ``setup``) in batches of the per-process training batch, each batch's global crops drawn from a
generator seeded by (run seed, first index of the batch): reproducible, and the same images get the same crops
on any number of processes when the batches are the same. Only the global group of the recipe is drawn
(``multicrop_views`` gives group 0 the same crops whatever local groups follow). A one-image batch (BN cannot
take it in training mode) is run as two copies of that image.

Defaults: the released 800-epoch recipe (``scripts/deepclusterv2_800ep_pretrain.sh``, 75.2 % linear top-1):
LARS (the code's LARC, trust 1e-3, no clipping, every parameter), lr 4.8 at batch 4096 (0.3 × batch/256 here)
after 10 linear warm-up epochs, cosine to 0.0048 (ratio 1e-3), weight decay 1e-6, momentum 0.9; crops 2 × 224 at
scale (0.14, 1) + 6 × 96 at (0.05, 0.14), scaled to the images (``views.multicrop.scaled``: 2 × 32 + 6 × 14 at
32 px); 3 × 3000 prototypes, τ = 0.1, 10 k-means iterations. Where we differ: the code warms up from 0.3, our
schedule from 0; LARC is our LARS (``train.optim``); apex fp16 is our bf16 autocast on GPU; SyncBN is per-process
BN; the memory holds ``F.normalize`` of z (a unit vector renormalised: equal up to rounding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.config import Range, one_of
from selfsup.errors import UserError
from selfsup.methods.base import Method, StepInfo, TrainSet
from selfsup.nn.distributed import is_distributed
from selfsup.nn.heads import SWAV, build_head
from selfsup.nn.kmeans import spherical_kmeans
from selfsup.nn.memory_bank import MemoryBank
from selfsup.views.augment import IMAGENET_MEAN
from selfsup.views.multicrop import RECIPES, SWAV_STD, MultiCrop, crop_counts, multicrop_views, recipe

IGNORE = -100  # the target of an image never clustered (the code's CrossEntropyLoss(ignore_index=-100))


@dataclass
class DeepClusterV2Config:
    embed_dim: int = 128                          # feat_dim
    proj_hidden: int = 2048                       # hidden_mlp
    num_prototypes: tuple = (3000, 3000, 3000)    # nmb_prototypes: one k-means (and one head) per entry
    temperature: float = 0.1                      # τ of the cross-entropy
    kmeans_iterations: int = 10                   # nmb_kmeans_iters
    crops_for_assign: tuple = (0, 1)              # the two global crops whose memories are clustered
    multicrop: str = "deepcluster_v2"             # a views.multicrop recipe, scaled to the images' size
    crops: list | None = None                     # or explicit groups [[count, size, [low, high]], ...]
    size: int | None = None                       # the global crop's size for the scaled recipe; None = the images'


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (), generator=g))


class DeepClusterV2(Method):
    name = "deepcluster_v2"
    summary = ("DeepCluster-v2 (Caron et al. 2020): multi-crop, k-means of a memory of embeddings every epoch, "
               "3 × 3,000 frozen centroid prototypes")
    Config = DeepClusterV2Config
    limits = {"proj_hidden": Range(1), "kmeans_iterations": Range(0), "multicrop": one_of(*RECIPES)}
    optim_defaults = dict(name="lars", lr=0.3, scale_lr=True, momentum=0.9, lars_eta=1e-3, weight_decay=1e-6,
                          exclude_norm_and_bias=False, warmup_epochs=10, schedule="cosine", final_lr_ratio=1e-3)

    def __init__(self, backbone, cfg: DeepClusterV2Config, num_images: int):
        super().__init__(backbone, cfg, num_images)
        ks = list(cfg.num_prototypes)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise UserError(f"method.num_prototypes={ks} must be a non-empty list of positive integers, one per "
                            f"head, e.g. [3000, 3000, 3000]")
        if max(ks) > num_images:
            raise UserError(f"method.num_prototypes={ks} has a head of {max(ks)} prototypes, more than the "
                            f"{num_images} training images: set every entry of method.num_prototypes to at most "
                            f"{num_images}")
        try:
            self._crops = MultiCrop(cfg.crops) if cfg.crops is not None else None
        except UserError as e:
            raise UserError(f"method.crops: {e}") from None
        counts = crop_counts(self._crops) if self._crops else crop_counts(RECIPES[cfg.multicrop])
        assign = list(cfg.crops_for_assign)
        if len(assign) != 2 or len(set(assign)) != 2 or any(not 0 <= c < counts[0] for c in assign):
            raise UserError(f"method.crops_for_assign={assign} must name two different global crops, from 0 … "
                            f"{counts[0] - 1} (the first group of the multi-crop recipe): e.g. [0, 1]"
                            + ("; the global group has one crop: give it two" if counts[0] < 2 else ""))
        self.head = build_head(backbone.out_dim, dataclasses.replace(SWAV, hidden_dim=cfg.proj_hidden,
                                                                     out_dim=cfg.embed_dim))
        self.prototypes = nn.ModuleList(nn.Linear(cfg.embed_dim, k, bias=False) for k in ks)
        for p in self.prototypes.parameters():
            p.requires_grad_(False)                 # set by k-means, never trained
            p.copy_(F.normalize(p, dim=1))
        self.memory = nn.ModuleList(MemoryBank(num_images, cfg.embed_dim, momentum=0.0, seed=c)
                                    for c in range(2))
        self.register_buffer("assignments", torch.full((len(ks), num_images), IGNORE, dtype=torch.long))
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.long))
        self._train_set: TrainSet | None = None

    @classmethod
    def input_stats(cls, cfg: DeepClusterV2Config) -> tuple[tuple, tuple, bool]:
        return IMAGENET_MEAN, SWAV_STD, False

    def crops(self, image_size: int) -> MultiCrop:
        """The multi-crop recipe for images of ``image_size`` px (or ``cfg.size``)."""
        return self._crops or recipe(self.cfg.multicrop, self.cfg.size or image_size)

    def setup(self, train_set: TrainSet) -> None:
        self._train_set = train_set     # for the memory's initial pass, at the first epoch_start

    # ------------------------------------------------------------------ views and forward
    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        groups = multicrop_views(images, self.crops(images.shape[-1]), g=g)
        return {**{f"crops_{i}": x for i, x in enumerate(groups)}, "index": index}

    def embed(self, views: dict) -> torch.Tensor:
        """z = ℓ2(g(f(x))) of every crop, V·B × d, crop-major; one backbone pass per resolution group."""
        groups = [views[f"crops_{i}"] for i in range(sum(k.startswith("crops_") for k in views))]
        z = torch.cat([self.head(self.backbone(x)["pre_logits"]) for x in groups])
        return F.normalize(z.float(), dim=1)

    def forward(self, views: dict, info: StepInfo) -> dict:
        index = views["index"]
        batch = len(index)
        z = self.embed(views)
        crops = len(z) // batch
        loss = 0.0
        for h, proto in enumerate(self.prototypes):
            scores = z @ proto.weight.float().T / self.cfg.temperature
            targets = self.assignments[h][index.to(self.assignments.device)].repeat(crops)
            loss = loss + F.cross_entropy(scores, targets, ignore_index=IGNORE)
        loss = loss / len(self.prototypes)
        state = {"index": index,
                 "emb": torch.stack([z[c * batch:(c + 1) * batch].detach() for c in self.cfg.crops_for_assign])}
        return {"loss": loss, "state": state}

    def after_step(self, state: dict, info: StepInfo) -> None:
        for bank, emb in zip(self.memory, state["emb"], strict=True):
            bank.update(state["index"], emb)

    # ------------------------------------------------------------------ memory and clustering
    @torch.no_grad()
    def fill_memory(self, train_set: TrainSet, seed: int) -> None:
        """The code's ``init_memory``: z of crops ``crops_for_assign`` of this rank's images (index rank::world,
        the banks' own rows), in training mode, each crop its own batch; see the module."""
        global_only = None

        def encode(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            nonlocal global_only
            if global_only is None:
                mc = self.crops(images.shape[-1])
                global_only = dataclasses.replace(mc, groups=mc.groups[:1])
            single = len(images) == 1
            if single:                                   # BN in training mode needs two rows
                images, index = images.repeat(2, 1, 1, 1), index.repeat(2)
            g = torch.Generator().manual_seed((seed * 1_000_003 + int(index[0]) * 7_919 + 3) % (2**63 - 1))
            crops = multicrop_views(images, global_only, g=g)[0].split(len(images))
            z = torch.stack([F.normalize(self.head(self.backbone(crops[c])["pre_logits"]).float(), dim=1)
                             for c in self.cfg.crops_for_assign], 1)
            return z[:1] if single else z

        batch = max(1, train_set.batch_size // train_set.world) if train_set.batch_size else 256
        index, z = train_set.encode(encode, batch_size=batch)
        for c, bank in enumerate(self.memory):
            if bank.memory.shape[0] != len(index):
                raise RuntimeError(f"the memory shard has {bank.memory.shape[0]} rows, this rank encoded "
                                   f"{len(index)} images")
            bank.memory.copy_(z[:, c].to(bank.memory))
        self.memory_filled.fill_(1)

    @torch.no_grad()
    def cluster(self, g: torch.Generator) -> None:
        """The code's ``cluster_memory``: k-means of the memory of crop h % 2 for head h; centroids into the
        prototypes, every image's cluster into ``assignments``. A collective when distributed."""
        for h, proto in enumerate(self.prototypes):
            bank = self.memory[h % 2]
            result = spherical_kmeans(bank.memory, proto.weight.shape[0], self.cfg.kmeans_iterations,
                                      seed=_seed(g), chunk_size=4096 if bank.memory.is_cuda else 256)
            proto.weight.copy_(result.centroids.to(proto.weight))
            self.store_assignments(h, result.assignments)

    @torch.no_grad()
    def store_assignments(self, h: int, labels: torch.Tensor) -> None:
        """This rank's labels (its images rank::world) into the full ``assignments[h]``, all-gathered."""
        if is_distributed():        # rank r's rows are images r, r + world, … (equal lengths up to one)
            world = dist.get_world_size()
            longest = len(range(0, self.num_images, world))
            padded = labels.new_full((longest,), IGNORE)
            padded[:len(labels)] = labels
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            for r, part in enumerate(parts):
                self.assignments[h, r::world] = part[:len(range(r, self.num_images, world))].to(
                    self.assignments.device)
        else:
            self.assignments[h] = labels.to(self.assignments.device)

    def epoch_start(self, info: StepInfo, g: torch.Generator) -> None:
        if not int(self.memory_filled):
            if self._train_set is None:
                raise RuntimeError("DeepClusterV2.setup(train_set) must run before the first epoch_start: the "
                                   "memory is filled from the training set")
            self.fill_memory(self._train_set, info.seed)
        self.cluster(g)
