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
