"""Equipartitioned soft assignments by Sinkhorn-Knopp, SwAV's codes (Caron et al. 2020, §3.1, eq. 3).

SwAV maps a batch of B scores S = Zᵀ C against K prototypes to codes Q that solve the entropy-regularised
transport problem over the transportation polytope

    max_Q  Tr(Qᵀ Cᵀ Z) + ε H(Q),      Q ∈ { Q ∈ R₊^{K×B} : Q 1_B = 1_K / K,  Qᵀ 1_K = 1_B / B }      (eq. 3)

whose solution is Q* = Diag(u) exp(Cᵀ Z / ε) Diag(v), the scalings u, v found by the Sinkhorn-Knopp
iteration (Cuturi 2013, "Sinkhorn distances", alg. 1): alternately rescale the rows and the columns of
exp(S / ε) to the two marginals. SeLa (Asano et al. 2020, §3.1) solves the same problem with the same
iteration, over the whole dataset instead of a batch; ``sinkhorn`` is that solver whatever the rows are.

The arithmetic is facebookresearch/swav ``main_swav.py`` ``distributed_sinkhorn``, step for step:

    Q = exp(S / ε)ᵀ                                 K × B_local
    Q /= ΣQ                                         the total all-reduced over ranks
    repeat ``iterations`` times (SwAV: 3):
        Q /= Q 1 (the K row sums, all-reduced);  Q /= K        each prototype's mass → 1/K
        Q /= 1ᵀ Q (the local column sums);      Q /= B          each sample's mass → 1/B
    Q *= B;  return Qᵀ                              B_local × K, each row (a sample's code) sums to 1

So the returned rows sum to 1 up to rounding after any number of iterations (the last step normalises
them); the K column sums reach B / K only as the iteration converges (3 steps leave them approximate).

Two departures, neither changing the result:

- Before ``exp``, the global maximum of S / ε (all-reduced with MAX, so every rank subtracts the same m)
  is subtracted: exp(S / ε − m) = e^{−m} exp(S / ε), and the constant e^{−m} cancels exactly in the
  first normalisation Q /= ΣQ. The reference overflows float32 once S / ε > 88 (scores > 4.4 at
  ε = 0.05); this does not. Entries more than ~87 (float32) / ~708 (float64) below the maximum
  still underflow to 0, as they do there: for very small ε pass float64 scores.
- B is the all-reduced sum of the local batches, sent in the same collective as the total. SwAV takes
  B_local × world, which is the same number when the local batches are equal (as SwAV's code assumes);
  with unequal ones this is still the transport problem on the concatenated batch.

It runs under ``torch.no_grad()`` (the codes are targets) and with autocast off, in float64 when the scores
are float64 and float32 otherwise. Under torch.distributed it is a collective (three all-reduces plus one per
iteration): every rank must call it, with the same ε, iterations and K. The result on each rank is its own
rows of the result on the concatenated batch (tested on 2 gloo processes).

Example::

    with torch.no_grad():
        scores = F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).T     # B × K
    q = sinkhorn(scores, epsilon=0.05, iterations=3)                          # B × K codes, rows sum to 1
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import Tensor

from selfsup.errors import UserError
from selfsup.nn.distributed import is_distributed


def _check(scores: Tensor, epsilon: float, iterations: int) -> None:
    real = isinstance(epsilon, numbers.Real) and not isinstance(epsilon, bool)
    if not (real and math.isfinite(epsilon) and epsilon > 0):
        raise UserError(f"the Sinkhorn regularisation epsilon must be a positive number (SwAV: 0.05), got {epsilon!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise UserError(f"the number of Sinkhorn iterations must be an integer >= 1 (SwAV: 3), got {iterations!r}")
    if scores.ndim != 2:
        raise UserError(f"sinkhorn() takes a 2-d B × K matrix of scores (samples × prototypes), got shape "
                        f"{tuple(scores.shape)}: flatten the leading dimensions into the batch")
    if scores.shape[1] < 1:
        raise UserError(f"sinkhorn() needs at least one prototype, got scores of shape {tuple(scores.shape)}")


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's codes for ``scores`` (B_local × K): the B_local × K equipartitioned soft assignment of this rank's
    samples, each row summing to 1 (see the module). float64 if ``scores`` is float64, else float32."""
    _check(scores, epsilon, iterations)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    distributed = is_distributed()
    with torch.autocast(scores.device.type, enabled=False):
        logits = scores.detach().to(dtype) / epsilon
        top = logits.max() if logits.numel() else torch.tensor(-math.inf, dtype=dtype, device=logits.device)
        if distributed:
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        q = torch.exp(logits - top).T                               # K × B_local
        k = q.shape[0]
        total = torch.stack([q.sum(), torch.tensor(float(q.shape[1]), dtype=dtype, device=q.device)])
        if distributed:
            dist.all_reduce(total)                                  # [ΣQ, B] over all ranks
        if total[1] < 1:
            raise UserError(f"sinkhorn() needs at least one sample in the (global) batch, got scores of shape "
                            f"{tuple(scores.shape)}")
        batch = total[1]
        q /= total[0]
        for _ in range(iterations):
            rows = q.sum(dim=1, keepdim=True)
            if distributed:
                dist.all_reduce(rows)
            q /= rows
            q /= k
            q /= q.sum(dim=0, keepdim=True)
            q /= batch
        q *= batch
        return q.T
