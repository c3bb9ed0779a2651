"""PCL v1 / v2 (Li, Zhou, Xiong, Hoi 2021, "Prototypical Contrastive Learning of Unsupervised Representations",
ICLR), as salesforce/PCL (``main_pcl.py``, ``pcl/builder.py``) trained the released PCL v1 / v2 checkpoints that
Ericsson et al. 2021 evaluate.

MoCo underneath (``methods.moco``: query encoder, momentum key encoder, a FIFO queue of r keys, shuffle-BN), with
the code's settings: r = 16,384 (``--pcl-r``: the queue *and* the number of negative prototypes), τ = 0.2
(``--temperature``), m = 0.999, dim 128. v1: the linear head, MoCo v1 views, SGD lr 0.03 × batch/256, weight
decay 1e-4, 200 epochs, ×0.1 at 120 and 160. v2 (``--mlp --aug-plus --cos``): the MLP head, the ``moco_v2`` views
(aug+, blur), a cosine schedule.

ProtoNCE (§3.2, eq. 6; ``builder.py`` forward, ``main_pcl.py`` train):

    L = InfoNCE(q, k, queue) + (1/M) Σ_m CE(logits_m, labels)

For clustering m with centroids c (K_m × d, unit rows), concentrations φ (K_m) and the batch's own clusters
pos = im2cluster_m[index] (B ids), builder.py draws r negative ids uniformly, without replacement, from
{0 … max(im2cluster_m)} minus the set of pos (one draw shared by the batch; Python's ``random.sample``, here
``torch.randperm`` from the step generator ``g``, in ``views``), and forms

    logits_m = q · [c_pos_1 … c_pos_B, c_neg_1 … c_neg_r]ᵀ / φ[[pos, neg]]        (B × (B + r))

with label i for row i: the other images' positive prototypes are negatives too (a column repeats when two
images share a cluster). Where the code's ``sample`` would raise (fewer than r non-positive clusters, as on small
datasets whose K is scaled down), every non-positive cluster is taken. The loss as a pure function is
:func:`selfsup.losses.proto_nce` (with ``proto_term`` and ``proto_logits``), beside ``info_nce``.

Clustering (``main_pcl.py``: ``compute_features``, ``run_kmeans``), at the start of every epoch from
``warmup_epochs`` on (``--warmup-epoch`` 20 of 200 epochs; before it the loss is InfoNCE alone): the momentum
encoder in eval mode encodes the un-augmented training set (theirs: resize 256 + centre crop 224; here the images
as they are, normalised with the method's mean / std, via ``TrainSet.encode``), ℓ2-normalised; for each K_m, 20
iterations of k-means (faiss ``niter = 20``), centroids ℓ2-normalised; then the concentration of cluster c::

    φ_c = mean_{v in c} ‖v − c‖ / log(|c| + 10)          for |c| > 1
    φ_c = max_c' φ_c'                                    for |c| ≤ 1 (the max over the clusters of > 1 member)
    φ  ← clip(φ, percentile(φ, 10), percentile(φ, 90));   φ ← τ · φ / mean(φ)

(``density[i] = (np.asarray(Dcluster[i])**0.5).mean() / np.log(len(Dcluster[i]) + 10)``; np.percentile's
linear interpolation is torch.quantile's.) The results live in buffers (``centroids_m``, ``density_m``,
``im2cluster_m``, ``clustered``), sized at construction, so a run resumed mid-epoch needs no re-clustering.

Scaling ``warmup_epochs`` with a run: the code clusters after 10 % of its 200 epochs; for a run of E epochs use
``method.warmup_epochs = round(E / 10)`` (e.g. 10 of 100 epochs).

Scaling K with the dataset. ``num_clusters`` = (25,000, 50,000, 100,000) are the code's counts for ImageNet's
1,281,167 images (about 51, 26 and 13 images per cluster); with ``clusters_reference_images`` = 1,281,167 they are
scaled to N training images by :func:`scaled_clusters`, K_m = min(N, max(2, round(N · K_m / 1,281,167))):

    the bundled sample (N = 4,800):          94,   187,   375
    CIFAR-10 (N = 50,000):                  976, 1,951, 3,903
    Tiny ImageNet-100 (N = 30,000):          585, 1,171, 2,342

``clusters_reference_images = None`` uses ``num_clusters`` as they are (each at most N).

Where we differ from the code, and why:

- k-means is ``nn.kmeans.spherical_kmeans`` (on unit rows, cosine assignments, unit centroids every iteration;
  one run) where the code uses faiss's Euclidean k-means (``niter = 20``, ``nredo = 5`` restarts keeping the
  best, ``seed = m``, centroids normalised only at the end; its ``max_points_per_centroid = 1000`` never
  subsamples ImageNet at K ≥ 25,000, nor any dataset under the K rule). The distance of a member v to its
  centroid is ‖v − c‖ to the unit centroid c the loss uses, √(2 − 2 v·c), where faiss measures to its
  unnormalised mean μ; for a concentrated cluster the two agree to first order (E‖v − μ‖² = 1 − ‖μ‖² ≈
  2 − 2‖μ‖ = E‖v − c‖²), and φ is rescaled to mean τ either way.
- k-means seeds come from the epoch generator (one per clustering, in order), not the code's fixed seed m.
- Distributed: each rank encodes its share (``rank::world``), k-means all-reduces (initial centroids from rank
  0's rows), and the assignments are all-gathered, so every rank holds the same buffers; the code clusters the
  gathered features on rank 0 and broadcasts.
- ``symmetric`` is refused (PCL is one-sided).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from selfsup.config import Range
from selfsup.errors import UserError
from selfsup.losses import info_nce, proto_term
from selfsup.methods.base import StepInfo, TrainSet
from selfsup.methods.moco import MoCo, MoCoConfig, MoCoV2, MoCoV2Config
from selfsup.nn.distributed import is_distributed, rank_and_world
from selfsup.nn.kmeans import spherical_kmeans
from selfsup.nn.queue import check_batch
from selfsup.views.augment import normalize, to_float

IMAGENET_IMAGES = 1_281_167   # ImageNet-1k train, for which main_pcl.py's num_cluster was chosen


# ---------------------------------------------------------------------------------------- pure functions
def scaled_clusters(counts: Sequence[int], num_images: int, reference: int | None = IMAGENET_IMAGES) -> tuple:
    """K_m = min(N, max(2, round(N · K_m / reference))) for each K_m of ``counts`` (Python's round); with
    ``reference`` None, the counts as they are, each at most N."""
    if reference is None:
        return tuple(min(int(k), num_images) for k in counts)
    return tuple(min(num_images, max(2, round(num_images * int(k) / reference))) for k in counts)


def concentration(dist_sq: Tensor, assignments: Tensor, k: int, temperature: float) -> Tensor:
    """φ (k, float64) from each image's squared distance to its centroid (faiss's D) and its cluster, as
    ``main_pcl.py`` ``run_kmeans``: mean distance / log(size + 10) for clusters of > 1 member, their max for the
    others, clipped to the 10th-90th percentiles, rescaled to mean ``temperature``."""
    d = dist_sq.detach().double().clamp_min(0).sqrt()
    a = assignments.long()
    counts = torch.bincount(a, minlength=k)
    sums = torch.zeros(k, dtype=torch.float64, device=d.device).index_add_(0, a, d)
    many = counts > 1
    density = torch.where(many, sums / counts.clamp_min(1) / torch.log(counts.double() + 10), torch.zeros_like(sums))
    density = torch.where(many, density, density.max())   # dmax = density.max() over the > 1-member ones (0 else)
    if not bool(many.any()):   # every cluster a singleton: the code's φ is 0/0; all equal instead (φ = τ)
        density = torch.ones_like(density)
    low, high = torch.quantile(density, torch.tensor([0.1, 0.9], dtype=torch.float64, device=d.device))
    density = density.clamp(low, high)
    return temperature * density / density.mean()


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (), generator=g))


def _gather_by_image(values: Tensor, num_images: int) -> Tensor:
    """This rank's values of images rank::world, all-gathered into image order (identity on one process)."""
    if not is_distributed():
        return values
    world = dist.get_world_size()
    longest = len(range(0, num_images, world))
    padded = values.new_zeros((longest,))
    padded[:len(values)] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = values.new_empty((num_images,))
    for r, part in enumerate(parts):
        out[r::world] = part[:len(range(r, num_images, world))]
    return out


# ---------------------------------------------------------------------------------------- the methods
@dataclass
class PCLConfig(MoCoConfig):
    queue_size: int = 16_384      # r: --pcl-r, the queue and the negative prototypes per clustering
    temperature: float = 0.2      # τ: --temperature, also φ's mean
    num_clusters: tuple = (25_000, 50_000, 100_000)   # --num-cluster, for ImageNet (scaled, see the module)
    clusters_reference_images: int | None = IMAGENET_IMAGES   # the N num_clusters was chosen for; None: as given
    warmup_epochs: int = 20       # --warmup-epoch: InfoNCE only before it; scale with the run (round(E / 10))
    kmeans_iterations: int = 20   # faiss niter


@dataclass
class PCLV2Config(PCLConfig, MoCoV2Config):
    temperature: float = 0.2
    mlp: bool = True              # --mlp
    view: str = "moco_v2"         # --aug-plus


class PCL(MoCo):
    name = "pcl"
    summary = ("PCL v1 (Li et al. 2021): MoCo with ProtoNCE against k-means prototypes of the momentum features, "
               "r = 16,384, φ-scaled")
    Config = PCLConfig
    limits = {**MoCo.limits, "warmup_epochs": Range(0), "kmeans_iterations": Range(0),
              "clusters_reference_images": Range(1)}

    def __init__(self, backbone, cfg: PCLConfig, num_images: int):
        if cfg.symmetric:
            raise UserError("method.symmetric=true is not part of PCL (a one-sided MoCo loss); drop it")
        counts = list(cfg.num_clusters)
        if not counts or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in counts):
            raise UserError(f"method.num_clusters={counts} must be a non-empty list of positive integers, e.g. "
                            f"[25000, 50000, 100000]")
        super().__init__(backbone, cfg, num_images)
        self.clusters = scaled_clusters(counts, num_images, cfg.clusters_reference_images)
        if cfg.clusters_reference_images is None and max(counts) > num_images:
            raise UserError(f"method.num_clusters={counts} asks for more clusters than the {num_images} training "
                            f"images: use at most {num_images}, or method.clusters_reference_images="
                            f"{IMAGENET_IMAGES} to scale the counts with the dataset")
        for m, k in enumerate(self.clusters):
            self.register_buffer(f"centroids_{m}", torch.zeros(k, cfg.embed_dim))
            self.register_buffer(f"density_{m}", torch.ones(k))
            self.register_buffer(f"im2cluster_{m}", torch.zeros(num_images, dtype=torch.long))
        self.register_buffer("clustered", torch.zeros((), dtype=torch.long))
        self._train_set: TrainSet | None = None

    def clustering(self, m: int) -> tuple[Tensor, Tensor, Tensor]:
        """(centroids, φ, im2cluster) of clustering m."""
        return getattr(self, f"centroids_{m}"), getattr(self, f"density_{m}"), getattr(self, f"im2cluster_{m}")

    def prototypical(self, info: StepInfo) -> bool:
        """Whether step ``info`` adds the prototype term (from epoch ``warmup_epochs`` on)."""
        return info.epoch >= self.cfg.warmup_epochs

    def setup(self, train_set: TrainSet) -> None:
        super().setup(train_set)
        self._train_set = train_set     # for the clustering passes at epoch_start

    # ------------------------------------------------------------------ clustering
    @torch.no_grad()
    def features(self, train_set: TrainSet) -> Tensor:
        """``compute_features``: ℓ2(f_k(x)) of this rank's un-augmented images, the key encoder in eval mode."""
        mean, std, _ = self.input_stats(self.cfg)
        encoder = self.key_encoder.target
        was = encoder.training
        encoder.eval()

        def fn(images: Tensor, index: Tensor) -> Tensor:
            return self.encode(encoder, normalize(to_float(images), mean, std), 1)

        try:
            batch = max(1, train_set.batch_size // train_set.world) if train_set.batch_size else 256
            _, z = train_set.encode(fn, batch_size=batch)
        finally:
            encoder.train(was)
        return z

    @torch.no_grad()
    def cluster(self, z: Tensor, g: torch.Generator) -> None:
        """``run_kmeans`` on this rank's unit features ``z``: centroids, φ and im2cluster of every clustering into
        the buffers (a collective when distributed)."""
        for m, k in enumerate(self.clusters):
            result = spherical_kmeans(z, k, self.cfg.kmeans_iterations, seed=_seed(g),
                                      chunk_size=4096 if z.is_cuda else 256)
            labels = _gather_by_image(result.assignments, self.num_images)
            sim = _gather_by_image(result.similarity, self.num_images)
            centroids, density, im2cluster = self.clustering(m)
            centroids.copy_(result.centroids)
            density.copy_(concentration(2 - 2 * sim, labels, k, self.cfg.temperature))
            im2cluster.copy_(labels)
        self.clustered.fill_(1)

    def epoch_start(self, info: StepInfo, g: torch.Generator) -> None:
        if not self.prototypical(info):
            return
        if self._train_set is None:
            raise RuntimeError("PCL.setup(train_set) must run before epoch_start: it clusters the training set")
        self.cluster(self.features(self._train_set), g)

    # ------------------------------------------------------------------ views and loss
    @torch.no_grad()
    def negatives(self, m: int, index: Tensor, g: torch.Generator) -> Tensor:
        """r ids drawn uniformly without replacement from {0 … max im2cluster} minus the batch's own clusters
        (all of them when fewer), builder.py's ``sample(neg_proto_id, self.r)``."""
        im2cluster = self.clustering(m)[2]
        free = torch.ones(int(im2cluster.max()) + 1, dtype=torch.bool, device=im2cluster.device)
        free[im2cluster[index.to(im2cluster.device)]] = False
        candidates = free.nonzero().squeeze(1)
        pick = torch.randperm(len(candidates), generator=g)[:self.cfg.queue_size]
        return candidates[pick.to(candidates.device)]

    def views(self, images: Tensor, index: Tensor, g: torch.Generator, info: StepInfo) -> dict:
        out = super().views(images, index, g, info)        # the augmentations draw first: MoCo's views exactly
        out["index"] = index
        if self.prototypical(info) and int(self.clustered):
            for m in range(len(self.clusters)):
                out[f"proto_negatives_{m}"] = self.negatives(m, index, g)
        return out

    def forward(self, views: dict, info: StepInfo) -> dict:
        if self.training:
            check_batch(self.cfg.queue_size, len(views["key"]) * rank_and_world()[1])
        q = self.encode(self._online(), views["query"], self.splits)
        if self.training:
            self.key_encoder.update(self._online(), self.cfg.momentum)     # MoCo eq. 2, before the key pass
        k = self.keys(views["key"], info)
        negatives = self.queue.keys()
        loss_nce = info_nce(q, k, negatives, self.cfg.temperature)
        with torch.no_grad():
            acc = ((q * k).sum(1) > (q @ negatives.T).amax(1)).float().mean()
        loss_proto, acc_proto = q.new_zeros(()), q.new_zeros(())
        if self.prototypical(info):
            if "proto_negatives_0" not in views:
                raise RuntimeError(f"PCL step {info.step} (epoch {info.epoch} >= method.warmup_epochs="
                                   f"{self.cfg.warmup_epochs}) has no clustering: epoch_start must run first")
            index = views["index"]
            parts = [self.clustering(m) for m in range(len(self.clusters))]
            loss_proto, acc_proto = proto_term(
                q, [c for c, _, _ in parts], [phi for _, phi, _ in parts],
                [a[index.to(a.device)] for _, _, a in parts],
                [views[f"proto_negatives_{m}"] for m in range(len(parts))])
        return {"loss": loss_nce + loss_proto, "loss_nce": loss_nce.detach(), "loss_proto": loss_proto.detach(),
                "pretext_acc": acc, "proto_acc": acc_proto, "state": {"keys": k}}


class PCLV2(PCL):
    name = "pcl_v2"
    summary = "PCL v2 (Li et al. 2021): PCL with MoCo v2's MLP head, aug+ (blur) views and a cosine schedule"
    Config = PCLV2Config
    optim_defaults = MoCoV2.optim_defaults
