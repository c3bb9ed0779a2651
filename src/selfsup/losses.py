"""The papers' objectives as pure functions: tensors in, scalar loss out, no training-loop knowledge.

Every equation that selfsup trains with lives in this file, each with its paper, section and
equation number, so a reader can check them in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def nce_scores(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
               temperature: float = 0.07) -> torch.Tensor:
    """The scores s(u, v)/τ of NCE against a memory bank (Wu et al. 2018 §3.2; Misra & van der Maaten 2020,
    PIRL §3.2, eq. 3): B × (1 + N), column 0 the positive, with s the cosine similarity.

    query: B × d embeddings (normalised here); positive: B × d bank entries m_I; negatives: B × N × d bank
    entries m_I' per sample, or N × d shared by the batch. Bank entries are unit vectors already, so only the
    query is normalised (normalising B·N·d negatives again would double the memory traffic of the step).
    Computed in float32 even under autocast: the scores go through exp(s/τ) with τ = 0.07.
    """
    with torch.autocast(query.device.type, enabled=False):
        q = F.normalize(query.float(), dim=1)
        pos = (q * positive.float()).sum(1, keepdim=True)
        if negatives.dim() == 2:
            neg = q @ negatives.float().T
        else:
            neg = torch.bmm(negatives.float(), q.unsqueeze(2)).squeeze(2)
        return torch.cat([pos, neg], 1) / temperature


def estimate_nce_z(scores: torch.Tensor, num_items: int) -> torch.Tensor:
    """VISSL's normalising constant (``NCEAverage.compute_partition_function``, after Wu et al.'s
    lemniscate): Z = mean(exp(s/τ)) · |D| over all B × (1 + N) scores of a batch, so that exp(s/τ)/Z
    approximates a probability over the |D| images (Wu et al. 2018, eq. 4–5, Monte-Carlo estimate of Z)."""
    return scores.detach().float().exp().mean() * num_items


def nce_from_scores(scores: torch.Tensor, num_items: int, z: float | torch.Tensor = 1.0) -> torch.Tensor:
    """L_NCE of PIRL eq. 4 from the scores of ``nce_scores`` (column 0 the positive, N negatives):

        h(u, v) = e(u, v) / (e(u, v) + N/|D|),    e(u, v) = exp(s(u, v)/τ) / Z          (eq. 3)
        L_NCE = −log h(q, m_I) − Σ_{I' ∈ D_N} log(1 − h(q, m_I'))                        (eq. 4)

    averaged over the batch (VISSL's ``NCECriterion`` divides the sums by the batch size). ``z = 1`` is
    eq. 3 as printed; VISSL (whose numbers the paper reports) divides by Z (``estimate_nce_z``), without
    which e ≫ N/|D| for every pair and h ≈ 1 saturates. Computed in log space, exactly:
    log h = x − logaddexp(x, log(N/|D|)) and log(1 − h) = log(N/|D|) − logaddexp(x, log(N/|D|)) with
    x = s/τ − log Z (VISSL instead adds float32 eps to the denominators).
    """
    n = scores.shape[1] - 1
    log_prior = torch.tensor(math.log(n / num_items), dtype=scores.dtype, device=scores.device)
    x = scores - torch.log(torch.as_tensor(z, dtype=scores.dtype, device=scores.device))
    denom = torch.logaddexp(x, log_prior)
    log_h_pos = x[:, 0] - denom[:, 0]
    log_not_h_neg = log_prior - denom[:, 1:]
    return -(log_h_pos + log_not_h_neg.sum(1)).mean()


def nce_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, num_items: int,
             temperature: float = 0.07, z: float | torch.Tensor = 1.0) -> torch.Tensor:
    """PIRL eq. 3–4 (and InstDisc's NCE, Wu et al. 2018 eq. 6–7) in one call: ``nce_from_scores`` of
    ``nce_scores``. See those two for the shapes and the normalising constant ``z``.

    Example::

        neg = bank.lookup(sample_negatives(index, 4096, len(bank), g))            # B × 4096 × 128
        loss = nce_loss(head(backbone(x)), bank.lookup(index), neg, num_items=len(dataset), z=z)
    """
    return nce_from_scores(nce_scores(query, positive, negatives, temperature), num_items, z)


def pirl_loss(image_scores: torch.Tensor, transformed_scores: torch.Tensor | list[torch.Tensor], num_items: int,
              lam: float = 0.5, z: float | torch.Tensor = 1.0) -> torch.Tensor:
    """PIRL's objective (Misra & van der Maaten 2020, §3.2, eq. 5), from ``nce_scores`` against the memory bank:

        L = λ · L_NCE(m_I, g(v_I^t)) + (1 − λ) · L_NCE(m_I, f(v_I)),    λ = 0.5

    ``image_scores`` are f(v_I)'s scores, ``transformed_scores`` g(v_I^t)'s; a list of several transformed
    branches (PIRL with jigsaw and rotation) averages their terms: λ · mean_t L_NCE(m_I, g_t) + (1 − λ) · ….
    λ = 0 is NPID++ (the image term only). One Z for all terms, as VISSL.
    """
    if isinstance(transformed_scores, torch.Tensor):
        transformed_scores = [transformed_scores]
    image = nce_from_scores(image_scores, num_items, z)
    # no shortcut at λ = 0 or 1: a zero-weighted term still puts its head in the graph, which DDP requires
    transformed = torch.stack([nce_from_scores(s, num_items, z) for s in transformed_scores]).mean()
    return lam * transformed + (1.0 - lam) * image


def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE against a set of negatives (van den Oord et al. 2018), as MoCo trains it (He et al. 2020, §3.1,
    eq. 1, Algorithm 1): with q, k₊ and the negatives k_i L2-normalised,

        L_q = −log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_{i=1}^{K} exp(q·k_i/τ)),

    i.e. cross-entropy over the logits [q·k₊, q·k_1 … q·k_K]/τ with label 0, averaged over the batch.
    ``query`` and ``key`` are B × d, ``negatives`` K × d (MoCo's queue, shared by every query) or B × K × d
    (per-query negatives, a memory bank's draws). They are normalised here; the keys carry no gradient in
    MoCo (the caller passes them detached). InsDis (Wu et al. 2018 as PyContrast trains it) is the same
    softmax with the key a bank entry.

    Example::

        loss = info_nce(q, k.detach(), queue.keys(), temperature=0.2)
    """
    q, k = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
    n = F.normalize(negatives.float(), dim=-1)
    positive = (q * k).sum(1, keepdim=True)                                    # B × 1
    negative = q @ n.T if n.dim() == 2 else torch.einsum("bd,bkd->bk", q, n)   # B × K
    logits = torch.cat([positive, negative], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, §3.1, eq. 2): the mean squared error between the
    L2-normalised online prediction q̄ and target projection z̄′,

        L = ‖q̄ − z̄′‖² = 2 − 2·⟨q, z′⟩ / (‖q‖·‖z′‖),

    averaged over the batch. The target carries no gradient (the caller passes it detached: sg(z′)); BYOL's
    loss is symmetrised over the two views by the caller, L + L̃ (eq. 2–3).

    Example::

        loss = byol_loss(predictor(z1), target_z2.detach()) + byol_loss(predictor(z2), target_z1.detach())
    """
    p, z = F.normalize(prediction.float(), dim=1), F.normalize(target.float(), dim=1)
    return (2 - 2 * (p * z).sum(1)).mean()


def swapped_prediction(scores: list[torch.Tensor], codes: list[torch.Tensor], assign: tuple[int, ...],
                       temperature: float) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, §3.1, eq. 1-2; main_swav.py ``train``).

    ``scores[v]`` is crop v's B × K prototype scores z_v·C, ``codes[i]`` the B × K Sinkhorn codes q of crop
    ``assign[i]``. Each code is predicted from every other crop, ℓ(z_v, q) = −Σ_k q_k log softmax(z_v·C/τ)_k:

        L = 1/|assign| · Σ_i 1/(V − 1) · Σ_{v ≠ assign[i]} mean_b ℓ(z_v, q_i),    V = the number of crops,

    averaged as the code does (over the batch, the other crops, then the assigned crops).
    """
    total = scores[0].new_zeros(())
    for crop, q in zip(assign, codes, strict=True):
        others = [v for v in range(len(scores)) if v != crop]
        sub = sum(-(q * F.log_softmax(scores[v].float() / temperature, dim=1)).sum(1).mean() for v in others)
        total = total + sub / len(others)
    return total / len(assign)


def proto_logits(q: torch.Tensor, centroids: torch.Tensor, density: torch.Tensor, positive: torch.Tensor,
                 negative: torch.Tensor) -> torch.Tensor:
    """builder.py's ``logits_proto``: q · [c_pos (B), c_neg (r)]ᵀ / φ[[pos, neg]], B × (B + r); label i for row i."""
    ids = torch.cat([positive, negative]).to(centroids.device)
    return q @ centroids[ids].to(q.dtype).T / density[ids].to(q.dtype)


def proto_term(q: torch.Tensor, centroids: Sequence[torch.Tensor], density: Sequence[torch.Tensor],
               positive: Sequence[torch.Tensor], negative: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/M) Σ_m CE(logits_m, arange(B)) and the mean top-1 accuracy of the prototype logits."""
    labels = torch.arange(len(q), device=q.device)
    loss, acc = q.new_zeros(()), q.new_zeros(())
    for c, phi, pos, neg in zip(centroids, density, positive, negative, strict=True):
        logits = proto_logits(q, c, phi, pos, neg)
        loss = loss + F.cross_entropy(logits, labels)
        acc = acc + (logits.detach().argmax(1) == labels).float().mean()
    m = max(len(centroids), 1)
    return loss / m, acc / m


def proto_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float,
              centroids: Sequence[torch.Tensor] = (), density: Sequence[torch.Tensor] = (),
              positive: Sequence[torch.Tensor] = (), negative: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """ProtoNCE (PCL eq. 6, builder.py / main_pcl.py): InfoNCE over [q·k, q·queue]/τ plus, when clusterings are
    given (per clustering m: centroids K_m × d, φ K_m, the batch's cluster ids B, the negative ids r), the mean
    over m of the prototype cross-entropy. With no clustering it is InfoNCE (before the warm-up ends)."""
    loss = info_nce(q, k, negatives, temperature)
    if len(centroids):
        loss = loss + proto_term(q, centroids, density, positive, negative)[0]
    return loss
