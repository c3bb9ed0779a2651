"""Spherical k-means on the training device, as DeepCluster v2 clusters its memory (Caron et al. 2020, the SwAV
paper's appendix on DeepCluster-v2; facebookresearch/swav ``main_deepclusterv2.py`` ``cluster_memory``).

Rows x_i are ℓ2-normalised embeddings and centroids c_j unit vectors. Lloyd's iteration on the sphere:

    E step:  a_i = argmax_j  x_i · c_j
    M step:  c_j ← (Σ_{a_i = j} x_i) / ‖Σ_{a_i = j} x_i‖     for every j with a member; an empty j keeps c_j

``iterations`` M steps (DeepCluster v2: 10), each preceded by an E step, then one more E step with the final
centroids: as the code (``for n_iter in range(nmb_kmeans_iters + 1)``: E step, ``break`` at the last), the
returned ``assignments`` are those of the final centroids, so the two agree. ``iterations=0`` is the E step
against the initial centroids alone.

Choices where the code leaves room, with what it does:

- x must already be ℓ2-normalised (DeepCluster v2's memory holds the head's normalised outputs): rows
  whose norm is off 1 by more than ``NORM_TOLERANCE`` (or the machine epsilon of x's type, if larger: bfloat16
  rounding alone moves a unit norm by up to 2⁻⁸) are refused, naming the fix (``F.normalize(x, dim=1)``),
  rather than normalised here, which would copy the whole N × d memory. float64 rows are used as they are;
  any other floating type is computed in float32 (16-bit rows are copied once, to float32).
- The E step is computed ``chunk_size`` rows at a time (``assign``): only a chunk × k block of similarities
  exists at once, never the N × k matrix (the code forms the whole ``dot_products``). The M step is one
  ``index_add_`` of the rows into k × d sums and a ``bincount`` (the code loops over clusters on the CPU via
  a sparse matrix); the direction of the sum is the direction of the code's mean ``emb_sums / counts``.
  The default chunk (4096 rows) suits a GPU; on a CPU 256 rows were faster and held ~6× less memory at
  N = 50,000, k = 3,000 (benchmarks/bench_kmeans.py).
- An empty cluster keeps its previous centroid: the code updates ``centroids[mask]`` with ``mask = counts > 0``.
  (It then renormalises every centroid, a no-op up to rounding on the kept ones; here they are kept bitwise.)
  ``empty`` records, per M step, how many clusters had no member. (A cluster whose members sum to the zero
  vector gets the zero centroid that ``F.normalize`` gives, as in the code.)
- Initial centroids: ``k`` distinct rows of rank 0's rows, ``torch.randperm(N_0, generator=
  torch.Generator().manual_seed(seed))[:k]`` (the code: ``torch.randperm`` from the global RNG on rank 0), or
  ``init`` when given; either is ℓ2-normalised and, under torch.distributed, broadcast from rank 0 as in the
  code (so only rank 0's ``seed`` / ``init`` matter).
- Distributed: each rank passes its shard of the rows; the M step all-reduces the sums and counts (as the
  code), so every rank holds the same centroids, equal to one process's on the concatenated rows (tested on
  2 gloo processes). ``assignments`` and ``similarity`` are this rank's rows; ``counts`` and ``empty`` global.
  The checks are agreed in one all-gather first, so a refusal is raised on every rank instead of a hang.

Example::

    result = spherical_kmeans(memory, k=3000, iterations=10, seed=epoch)   # memory: N × d, unit rows
    prototypes.weight.copy_(result.centroids)                              # DeepCluster v2's prototypes
    targets = result.assignments                                           # N, one cluster per row
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError
from selfsup.nn.distributed import is_distributed

NORM_TOLERANCE = 1e-3  # the largest | ‖x_i‖ − 1 | accepted as ℓ2-normalised (or the input type's eps, if larger)


@dataclass(frozen=True)
class KMeansResult:
    """``centroids`` k × d unit rows; ``assignments`` (long) and ``similarity`` (x_i · c_{a_i}), one per row of
    this rank's x, against those centroids; ``counts`` (long, k) the cluster sizes of the assignments over all
    ranks; ``empty`` the number of clusters with no member at each M step (one per iteration, global)."""

    centroids: Tensor
    assignments: Tensor
    similarity: Tensor
    counts: Tensor
    empty: tuple[int, ...]


def _positive_int(value: object, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _similarities(chunk: Tensor, centroids: Tensor) -> Tensor:
    """The chunk × k block x_chunk @ centroidsᵀ: the only similarity matrix k-means ever forms."""
    return chunk @ centroids.T


def assign(x: Tensor, centroids: Tensor, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """The E step: for each row of ``x`` (N × d), the index (long, N) of the centroid (k × d) with the largest dot
    product, and that dot product (N), computed ``chunk_size`` rows at a time (a chunk × k block, never N × k)."""
    _positive_int(chunk_size, "the k-means chunk_size (rows per similarity block)")
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise UserError(f"assign() takes N × d rows and k × d centroids, got shapes {tuple(x.shape)} and "
                        f"{tuple(centroids.shape)}")
    if centroids.shape[0] < 1:
        raise UserError("assign() needs at least one centroid, got 0")
    dtype = torch.promote_types(x.dtype, centroids.dtype)
    centroids = centroids.to(dtype)
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    best = torch.empty(n, dtype=dtype, device=x.device)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            value, index = _similarities(x[start:stop].to(dtype), centroids).max(dim=1)
            best[start:stop], labels[start:stop] = value, index
    return labels, best


def _agreed_checks(x: Tensor, k: int, init: Tensor | None, distributed: bool, tolerance: float) -> None:
    """Every rank's (N, d, norm deviation beyond ``tolerance``), gathered so that all ranks refuse together."""
    n, d = x.shape
    deviation = float((torch.linalg.vector_norm(x, dim=1) - 1).abs().max()) if n else 0.0
    excess = 0.0 if deviation <= tolerance else deviation          # NaN (a non-finite row) is an excess too
    mine = torch.tensor([n, d, excess], dtype=torch.float64, device=x.device)
    if distributed:
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
    else:
        parts = [mine]
    sizes = [(int(p[0]), int(p[1]), float(p[2])) for p in parts]
    dims = {size[1] for size in sizes}
    if len(dims) > 1:
        raise UserError(f"k-means needs rows of one dimension on every rank, got d = {[s[1] for s in sizes]} "
                        f"by rank")
    for rank, (_, _, dev) in enumerate(sizes):
        if dev != 0.0:
            where = f" on rank {rank}" if distributed else ""
            raise UserError(f"spherical k-means takes ℓ2-normalised rows, but a row{where} has a norm off 1 by "
                            f"{dev:.3g} (more than {tolerance:.3g}): pass F.normalize(x, dim=1)")
    total, first = sum(s[0] for s in sizes), sizes[0][0]
    if k < 1 or k > total:
        raise UserError(f"k-means with k={k} clusters needs 1 <= k <= N, the number of rows, got N={total}: set "
                        f"method.num_prototypes / the number of clusters to at most N={total}")
    if init is None and k > first:
        raise UserError(f"k-means draws its k={k} initial centroids from rank 0's rows, which are N={first}: set "
                        f"method.num_prototypes / the number of clusters to at most N={first}")
    if init is not None and (init.ndim != 2 or tuple(init.shape) != (k, d)):
        raise UserError(f"k-means init must be k × d = {k} × {d} centroids, got shape {tuple(init.shape)}")


@torch.no_grad()
def spherical_kmeans(x: Tensor, k: int, iterations: int = 10, *, seed: int, chunk_size: int = 4096,
                     init: Tensor | None = None) -> KMeansResult:
    """Spherical k-means of the unit rows ``x`` (N × d, this rank's shard under torch.distributed) into ``k``
    clusters: ``iterations`` M steps from ``init`` or from k rows drawn with ``seed``; see the module. A
    collective when distributed (every rank calls it with the same k, iterations)."""
    if x.ndim != 2 or not x.is_floating_point():
        raise UserError(f"spherical_kmeans() takes an N × d floating-point matrix, got shape {tuple(x.shape)} "
                        f"of {x.dtype}")
    k = _positive_int(k, "the number of clusters k (method.num_prototypes)")
    iterations = _positive_int(iterations, "the number of k-means iterations", minimum=0)
    _positive_int(chunk_size, "the k-means chunk_size (rows per similarity block)")
    distributed = is_distributed()
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tolerance = max(NORM_TOLERANCE, torch.finfo(x.dtype).eps)
    x = x.detach().to(dtype)
    _agreed_checks(x, k, init, distributed, tolerance)
    d = x.shape[1]

    if init is None:
        centroids = torch.empty(k, d, dtype=dtype, device=x.device)
        if not distributed or dist.get_rank() == 0:
            rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
            centroids = x[rows.to(x.device)]
    else:
        centroids = init.detach().to(dtype=dtype, device=x.device)
    centroids = F.normalize(centroids, dim=1).contiguous()
    if distributed:
        dist.broadcast(centroids, 0)

    empty: list[int] = []
    for step in range(iterations + 1):
        labels, best = assign(x, centroids, chunk_size)
        if step == iterations:
            break
        sums = torch.zeros(k, d, dtype=dtype, device=x.device).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        if distributed:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        filled = counts > 0
        empty.append(k - int(filled.sum()))
        centroids = torch.where(filled[:, None], F.normalize(sums, dim=1), centroids)

    counts = torch.bincount(labels, minlength=k)
    if distributed:
        dist.all_reduce(counts)
    return KMeansResult(centroids, labels, best, counts, tuple(empty))
