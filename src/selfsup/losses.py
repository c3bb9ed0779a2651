"""The papers' objectives as pure functions: tensors in, scalar loss out, no training-loop knowledge.

Every equation that selfsup trains with lives in this file, each with its paper, section and
equation number, so a reader can check them in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.nn.distributed import gather_with_grad, rank_and_world


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (Chen et al. 2020, §2.1, eq. 1).

    For 2N projected views (z1[k], z2[k] are the two views of image k), with sim(u, v) = uᵀv/‖u‖‖v‖,

        ℓ(i, j) = −log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ),

    averaged over all 2N ordered positive pairs (i, j). With several processes, each rank's anchors
    are its local 2b views and the candidates are the 2B views of the global batch, gathered with
    gradients, so the loss and its gradient equal the single-process loss on the global batch.

    Example::

        loss = nt_xent(projector(backbone(x1)), projector(backbone(x2)), temperature=0.5)
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    local = z1.shape[0]
    rank, _ = rank_and_world()
    all1, all2 = (gather_with_grad(z1), gather_with_grad(z2)) if gather else (z1, z2)
    total = all1.shape[0]
    candidates = torch.cat([all1, all2])                    # 2B × d, global order
    anchors = torch.cat([z1, z2])                           # 2b × d, local
    logits = anchors @ candidates.T / temperature           # 2b × 2B
    own = rank * local + torch.arange(local, device=z1.device)
    self_pos = torch.cat([own, own + total])                # where each anchor sits among the candidates
    positive = torch.cat([own + total, own])                # its other view
    rows = torch.arange(2 * local, device=z1.device)
    logits = logits.float()
    logits[rows, self_pos] = float("-inf")
    return F.cross_entropy(logits, positive)


def triplet_semihard(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Triplet loss with semi-hard negative mining, with the semantics of TF's
    ``tf.contrib.losses.metric_learning.triplet_semihard_loss`` (Schroff et al. 2015, FaceNet, §3.2), the
    Exemplar objective of Kolesnikov et al. 2019 §3 (their ``self_supervision/exemplar.py``).

    With squared Euclidean distances D_ij = ‖e_i − e_j‖² (TF: ``pairwise_distance(squared=True)``), for
    every ordered positive pair (a, p), a ≠ p, y_a = y_p, the negative distance is

        D_an* = min { D_an : y_n ≠ y_a, D_an > D_ap }     (the closest negative farther than the positive)
        D_an* = max { D_an : y_n ≠ y_a }                  if no negative is farther (TF's fallback: the
                                                           farthest negative, so such pairs add ≈ nothing)

    and the loss is the mean over all P ordered positive pairs

        L = 1/P Σ_(a,p) max(D_ap − D_an* + margin, 0).

    As TF, an anchor without any negative (the whole batch one label) uses D_an* = 0; unlike TF, which
    divides 0 by 0, a batch without positive pairs gives 0. Memory is O(N²): each anchor's negative
    distances are sorted once and every positive finds its semi-hard negative by binary search (TF
    tiles an N² × N mask). ``embeddings`` are used as given: normalise them first if the method wants to.

    Example::

        loss = triplet_semihard(F.normalize(head(features), dim=1), image_ids.repeat_interleave(8), margin=0.5)
    """
    e = embeddings.float()
    n = e.shape[0]
    sq = (e * e).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * e @ e.T).clamp_min(0.0)    # TF: small negatives set to 0
    eye = torch.eye(n, dtype=torch.bool, device=e.device)
    dist = dist.masked_fill(eye, 0.0)                                     # TF zeroes the diagonal
    same = labels[:, None] == labels[None, :]
    negative = ~same
    positive = same & ~eye
    # each anchor's negative distances in ascending order, non-negatives pushed to +inf at the end
    neg_sorted, _ = dist.masked_fill(~negative, float("inf")).sort(1)
    num_neg = negative.sum(1, keepdim=True)
    # first negative strictly farther than each D_ap (searchsorted right=True: index of the first > value)
    first = torch.searchsorted(neg_sorted.detach(), dist.detach().contiguous(), right=True)
    has_semihard = first < num_neg
    outside = neg_sorted.gather(1, first.clamp_max(n - 1))
    farthest = neg_sorted.gather(1, (num_neg - 1).clamp_min(0))          # the largest D_an
    inside = torch.where(num_neg > 0, farthest, torch.zeros_like(farthest))
    d_an = torch.where(has_semihard, outside, inside.expand(n, n))
    hinge = (dist - d_an + margin).clamp_min(0.0)
    return hinge[positive].sum() / positive.sum().clamp_min(1)
