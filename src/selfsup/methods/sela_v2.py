"""SeLa-v2 (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS, App. A "SeLa-v2"), the label assignment of SeLa (Asano, Rupprecht,
Vedaldi 2020, "Self-labelling via simultaneous clustering and representation learning", ICLR, §3.1) inside
DeepCluster-v2's pipeline (``methods.deepcluster_v2``).

No training code was released. The SwAV authors' description (facebookresearch/swav issue 59): DeepCluster-v2's
code, with the k-means step replaced by a Sinkhorn-Knopp label assignment over the whole memory, and prototypes
learned by SGD (not set to centroids, not frozen). So this is a subclass of ``DeepClusterV2`` that keeps its
model (multi-crop, projector ``nn.heads.SWAV``, H bias-free prototype heads), its memory of the two global
crops' embeddings (filled once by ``fill_memory``, rewritten after every step), its loss and its resume story,
and changes three things:

1. Clustering (``cluster``, at every ``epoch_start``): for head h, with M the memory of crop
   ``crops_for_assign[h % 2]`` (N × 128, unit rows, as DeepCluster-v2 alternates them) and C_h its prototypes
   (unit rows),

       S = M C_hᵀ (N × K_h),   Q = Sinkhorn(S, ε, iterations) over the WHOLE memory,   y_h(i) = argmax_k Q_ik

   i.e. SeLa's transport problem (equipartition: each of the K_h labels gets N / K_h images) solved with SwAV's
   arithmetic (``nn.sinkhorn``: exp(S/ε) shifted by its global max, rows to 1/K, columns to 1/N, ``iterations``
   times), and SeLa's hard labels (its "argmax of Q"), kept in the buffer ``assignments`` as DeepCluster-v2 does.
   ε = 0.05 and 3 iterations by default, SwAV's values: SeLa-v2 is described as SwAV's/DeepCluster-v2's code with
   SwAV's Sinkhorn, and the paper gives no other value. SeLa itself uses λ = 25 (ε = 0.04) and iterates to
   convergence: set ``epsilon: 0.04`` and ``sinkhorn_iterations`` higher for that. Three iterations over the
   whole memory leave the equipartition approximate (the argmax of a near-uniform-column plan; tested).

   Chunked (``sinkhorn_labels``): the N × K matrix is never held. Writing the iterate as Q = Diag(a) P Diag(b),
   P = exp(S/ε − m) (m the global max of S/ε), every row step only rescales a (K numbers, the row sums
   accumulated chunk by chunk and all-reduced across processes) and every column step b_i = 1 / (N Σ_k a_k P_ki)
   depends on a alone, so each iteration is one pass over the memory in chunks of ``chunk_size`` rows that
   recomputes S; SwAV's first normalisation Q /= ΣQ cancels in the first row step and is skipped; the argmax
   over k does not depend on b, so the last column step is skipped. The result is the argmax of
   ``nn.sinkhorn(S)`` up to float rounding (tested against it and against an independent numpy Sinkhorn).
   Cost: (iterations + 2) passes of N·K·128 multiply-adds per head. Distributed: each rank's memory is its shard
   (images rank::world, as DeepCluster-v2), the max, the row sums and N are all-reduced (the plan of the
   concatenated memory), and the labels are all-gathered into the full buffer as DeepCluster-v2 does (the
   labelling on 2 gloo processes is tested to equal the one-process labels of the whole memory).

2. Prototypes are trainable parameters (``requires_grad`` True, so the optimiser holds them, with the same LARS
   and weight decay as every parameter, as SwAV), never overwritten by the clustering, re-normalised to unit rows
   after every optimiser step (``after_step``, as ``methods.swav``) and once at init; their gradient is dropped
   for the first ``freeze_prototypes_niters`` steps (SwAV's recipe; default 313, the value of SwAV's 800-epoch
   batch-4096 script, about one ImageNet epoch at that batch: scale it to your data).

3. Defaults: the released SeLa-v2 model (swav README model zoo: 400 epochs, multi-crop 2 × 160 + 4 × 96,
   ``views.multicrop`` recipe ``sela_v2``, scaled to the images as DeepCluster-v2's). The README gives only the
   crops and epochs; assumed from DeepCluster-v2 / SwAV's 800-epoch scripts: batch 4096, 3 × 3000 prototypes,
   τ = 0.1, LARS lr 0.3 × batch/256 = 4.8 with 10 warm-up epochs, cosine to ×1e-3, weight decay 1e-6, momentum
   0.9 (DeepCluster-v2's ``optim_defaults``; run 400 epochs with ``train.epochs``).

Loss: DeepCluster-v2's, L = (1/H) Σ_h CE(z · C_hᵀ / τ, y_h) over all crops of the batch, τ = 0.1; the gradient now
reaches C_h too. There is no randomness in the clustering (the epoch generator is unused), and what it computes
lives in ``assignments``, the memory and the prototypes: a run resumed mid-epoch or right after an epoch start
equals the uninterrupted one bit for bit (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from selfsup.config import POSITIVE, Range, one_of
from selfsup.errors import UserError
from selfsup.methods.base import StepInfo
from selfsup.methods.deepcluster_v2 import DeepClusterV2
from selfsup.nn.distributed import is_distributed
from selfsup.views.multicrop import RECIPES


@dataclass
class SeLaV2Config:
    embed_dim: int = 128                          # feat_dim
    proj_hidden: int = 2048                       # hidden_mlp
    num_prototypes: tuple = (3000, 3000, 3000)    # one Sinkhorn labelling (and one head) per entry (assumed)
    temperature: float = 0.1                      # τ of the cross-entropy
    epsilon: float = 0.05                         # ε of Sinkhorn-Knopp (SwAV's; SeLa: 1/λ = 0.04)
    sinkhorn_iterations: int = 3                  # SwAV's (SeLa iterates to convergence)
    freeze_prototypes_niters: int = 313           # SwAV 800-epoch batch-4096 script
    crops_for_assign: tuple = (0, 1)              # the two global crops whose memories are labelled
    multicrop: str = "sela_v2"                    # a views.multicrop recipe, scaled to the images' size
    crops: list | None = None                     # or explicit groups [[count, size, [low, high]], ...]
    size: int | None = None                       # the global crop's size for the scaled recipe; None = the images'


@torch.no_grad()
def sinkhorn_labels(memory: Tensor, prototypes: Tensor, epsilon: float = 0.05, iterations: int = 3,
                    chunk_size: int = 1024) -> Tensor:
    """SeLa's hard labels of this rank's ``memory`` rows (N_local × d) against ``prototypes`` (K × d, used as
    given: pass unit rows): argmax_k of ``nn.sinkhorn(memory @ prototypes.T, epsilon, iterations)`` over the
    memory of all processes, computed in chunks of ``chunk_size`` rows without the N × K matrix (see the module).
    float64 if ``memory`` is float64, else float32. A collective when distributed."""
    real = isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)
    if not (real and math.isfinite(epsilon) and epsilon > 0):
        raise UserError(f"the Sinkhorn regularisation epsilon must be a positive number (SwAV: 0.05), got {epsilon!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise UserError(f"the number of Sinkhorn iterations must be an integer >= 1 (SwAV: 3), got {iterations!r}")
    dtype = torch.float64 if memory.dtype == torch.float64 else torch.float32
    distributed = is_distributed()
    c = prototypes.detach().to(memory.device, dtype)
    k = c.shape[0]
    chunks = memory.detach().split(max(1, chunk_size))

    def logits(x: Tensor) -> Tensor:              # S / ε of a chunk, chunk × K
        return x.to(dtype) @ c.T / epsilon

    with torch.autocast(memory.device.type, enabled=False):
        top = torch.tensor(-math.inf, dtype=dtype, device=memory.device)
        for x in chunks:
            top = torch.maximum(top, logits(x).max())
        n = torch.tensor(float(len(memory)), dtype=dtype, device=memory.device)
        if distributed:
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            dist.all_reduce(n)
        if n < 1:
            raise UserError("SeLa-v2's Sinkhorn labelling needs at least one row in the memory")

        def exp(x: Tensor) -> Tensor:             # P of a chunk, chunk × K
            return torch.exp(logits(x) - top)

        rows = torch.zeros(k, dtype=dtype, device=memory.device)   # first row step: a = 1 / (K Σ_i P_ki)
        for x in chunks:
            rows += exp(x).sum(0)
        if distributed:
            dist.all_reduce(rows)
        a = 1.0 / (rows * k)
        for _ in range(iterations - 1):           # column step (b from a), then the next row step
            rows = torch.zeros(k, dtype=dtype, device=memory.device)
            for x in chunks:
                q = exp(x) * a                    # Diag(a) P, transposed: chunk × K
                b = 1.0 / (q.sum(1, keepdim=True) * n)
                rows += (q * b).sum(0)
            if distributed:
                dist.all_reduce(rows)
            a = a / (rows * k)
        labels = [(exp(x) * a).argmax(1) for x in chunks]
        return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=memory.device)


class SeLaV2(DeepClusterV2):
    name = "sela_v2"
    summary = ("SeLa-v2 (Caron et al. 2020): DeepCluster-v2's multi-crop and memory, Sinkhorn-Knopp labels over "
               "the whole memory every epoch, 3 × 3,000 prototypes learned by SGD")
    Config = SeLaV2Config
    limits = {"proj_hidden": Range(1), "epsilon": POSITIVE, "sinkhorn_iterations": Range(1),
              "freeze_prototypes_niters": Range(0), "multicrop": one_of(*RECIPES)}
    optim_defaults = DeepClusterV2.optim_defaults

    def __init__(self, backbone, cfg: SeLaV2Config, num_images: int):
        super().__init__(backbone, cfg, num_images)
        for p in self.prototypes.parameters():
            p.requires_grad_(True)                # learned by SGD (DeepCluster-v2 freezes them)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        for proto in self.prototypes:
            proto.weight.copy_(F.normalize(proto.weight, dim=1))

    @torch.no_grad()
    def cluster(self, g: torch.Generator) -> None:
        """Sinkhorn-Knopp labels of the memory of crop h % 2 against the unit prototypes of head h, into
        ``assignments``; the prototypes are left as they are. ``g`` is unused (nothing is random)."""
        for h, proto in enumerate(self.prototypes):
            bank = self.memory[h % 2]
            labels = sinkhorn_labels(bank.memory, F.normalize(proto.weight, dim=1), self.cfg.epsilon,
                                     self.cfg.sinkhorn_iterations,
                                     chunk_size=4096 if bank.memory.is_cuda else 1024)
            self.store_assignments(h, labels)

    def before_optimizer_step(self, info: StepInfo) -> None:
        if info.step < self.cfg.freeze_prototypes_niters:      # SwAV's code: p.grad = None
            for proto in self.prototypes:
                proto.weight.grad = None

    def after_step(self, state: dict, info: StepInfo) -> None:
        self.normalize_prototypes()
        super().after_step(state, info)
