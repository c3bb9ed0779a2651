"""Few-shot evaluation of frozen features with a prototypical classifier (Ericsson et al. 2021, §3 "Few-shot").

Protocol (paper §3 and their code, linusericsson/ssl-transfer ``few_shot.py`` +
``datasets/few_shot_dataset.py``), no training at all:

- an *episode* draws ``ways`` classes (5), then ``shots`` support and ``queries`` (15) query images of
  each class, all distinct; images are pooled from all splits of the dataset;
- each class's prototype is the mean of its support features (Snell et al. 2017); a query is assigned to
  the class of highest logit ``-‖q - p_c‖²`` (negative squared Euclidean distance);
- the episode's accuracy is the share of its ``ways · queries`` queries classified right, in percent;
- ``episodes`` (600) episodes per shot count (5, 20, 50; 20 in the main tables), reported as
  ``mean ± 1.96 σ / √episodes`` with ``σ`` the population standard deviation (their ``np.std``).

Features are **not** L2-normalised: their ``ProtoNet.loss`` computes ``euclidean_dist`` on the raw
2048-d average-pooled features (eval mode), and so do we. Pass normalised features to get the cosine
variant.

Where we differ from their code, and why:

- **Cached features.** Their loader re-encodes the ``ways · (shots + queries)`` images of every episode
  (600 × 175 forward passes for 5-way 20-shot); we draw episodes as indices into the features of the
  pooled splits, encoded once (``benchmarks/bench_fewshot.py`` measures the difference). Same
  classifier, same numbers; only the cost changes.
- **All splits really pooled.** For Aircraft, DTD, Flowers and VOC their ``SetDataset`` builds the
  train+val concatenation and then overwrites it with train alone (the ``if``/``if``-``else`` that
  follows), so the official val images never enter the pool. We follow the paper's text: the caller
  concatenates the features of every *disjoint* split (do not add a val carved out of train twice).
- **Small classes are skipped, and counted.** Their per-class loader returns fewer than
  ``shots + queries`` images for a small class, and stacking the episode then fails. Here a class with
  fewer than ``shots + queries`` images is left out of the draw for that shot count
  (``skipped_classes``); if fewer than ``ways`` classes remain, :class:`ValueError`.
- **Sampling.** Theirs: ``torch.randperm(n_classes)[:ways]`` per episode and a shuffled per-class
  loader in 12 worker processes (not reproducible across machines). Ours: the same distribution (classes
  uniformly without replacement, images uniformly without replacement within a class), drawn from a
  seeded CPU ``torch.Generator``, vectorised over episodes. Like their separate runs per shot count
  (each seeded with 0), every shot count starts from a fresh generator seeded with ``seed``, so a shot
  count's episodes do not depend on which other shot counts are asked for.
- **Arithmetic.** Prototypes come from ``embedding_bag(mode="mean")`` (no ``episodes × ways × shots × D``
  copy), and distances from ``‖q‖² - 2 q·p + ‖p‖²`` with the prototypes centred on their mean (exact
  algebra; keeps the float32 products at the scale of the differences). Queries are gathered a few
  episodes at a time, so memory stays at a few MB (CPU) or ~256 MB (CUDA) whatever ``episodes`` is.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> labels = torch.arange(8).repeat_interleave(40)
>>> features = torch.randn(320, 16, generator=g) + 10 * torch.eye(8, 16)[labels]
>>> fewshot(features, labels, FewShotConfig(shots=[5], episodes=100))[5]["value"]
100.0
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError

__all__ = [
    "Episodes",
    "FewShotConfig",
    "episode_accuracies",
    "fewshot",
    "prototype_logits",
    "prototype_predict",
    "sample_episodes",
    "summarize",
]

# Elements of one gathered block of query features: 8 MB of float32 stays in cache on a CPU; a GPU
# wants big blocks instead (kernel launches dominate small ones).
_CPU_BLOCK = 2**21
_CUDA_BLOCK = 2**26
# Elements of one block of random keys when drawing images within a class.
_KEY_BLOCK = 2**24


@dataclass
class FewShotConfig:
    """Ericsson et al.'s few-shot protocol; defaults are the paper's."""

    ways: int = 5
    shots: list[int] = field(default_factory=lambda: [5, 20, 50])
    queries: int = 15
    episodes: int = 600
    seed: int = 0


@dataclass
class Episodes:
    """Episodes as row indices into the pooled features; class ``classes[e, w]`` is episode label ``w``."""

    support: Tensor  # (episodes, ways, shots) int64
    query: Tensor    # (episodes, ways, queries) int64
    classes: Tensor  # (episodes, ways) int64, the original labels
    skipped_classes: list[int]  # labels with fewer than shots + queries images, never drawn
    num_classes: int  # classes that could be drawn


def _labels(labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.is_floating_point() or labels.is_complex():
        raise UserError(f"labels must be integers, got {labels.dtype}")
    labels = labels.long().cpu()
    if labels.numel() and int(labels.min()) < 0:
        raise UserError(f"labels must be non-negative, got {int(labels.min())}")
    return labels


def sample_episodes(
    labels: Tensor,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    episodes: int = 600,
    seed: int | torch.Generator = 0,
) -> Episodes:
    """Draw ``episodes`` episodes from ``labels`` (the pooled splits' labels), vectorised over episodes.

    Each episode takes ``ways`` distinct classes uniformly among those with at least ``shots + queries``
    images, then ``shots + queries`` distinct images of each class uniformly; the first ``shots`` are the
    support, the rest the queries. ``seed`` is an int or a CPU ``torch.Generator`` (advanced in place).
    """
    if ways < 1 or shots < 1 or queries < 1 or episodes < 1:
        raise UserError(f"ways, shots, queries and episodes must be >= 1; got {ways}, {shots}, {queries}, "
                        f"{episodes}")
    labels = _labels(labels)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    need = shots + queries
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    ok = counts >= need
    eligible = classes[ok]
    skipped = classes[~ok].tolist()
    if len(eligible) < ways:
        sizes = f"class sizes range {int(counts.min())}..{int(counts.max())}" if len(counts) else "no labels"
        raise UserError(
            f"{ways}-way {shots}-shot episodes need {ways} classes with at least shots + queries = {need} "
            f"images each, but only {len(eligible)} of {len(classes)} classes have that many ({sizes}). "
            f"Pool more splits, or lower ways, shots or queries."
        )
    # Rows of each class, contiguous in ``order``; class i of ``classes`` starts at ``starts[i]``.
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    el_starts, el_counts = starts[ok], counts[ok]

    # ways distinct classes per episode: the first ``ways`` of a uniformly random permutation.
    pick = torch.rand(episodes, len(eligible), generator=gen).argsort(dim=1)[:, :ways]  # into eligible
    rows = torch.empty(episodes * ways, need, dtype=torch.long)
    flat = pick.reshape(-1)
    for j in torch.unique(flat).tolist():  # sorted: a deterministic order of draws
        where = (flat == j).nonzero().squeeze(1)
        n, start = int(el_counts[j]), int(el_starts[j])
        step = max(1, _KEY_BLOCK // n)
        for a in range(0, len(where), step):
            part = where[a : a + step]
            # The ``need`` largest of n uniform keys: a uniform ordered subset of size ``need``.
            keys = torch.rand(len(part), n, generator=gen)
            rows[part] = order[start + keys.topk(need, dim=1).indices]
    rows = rows.view(episodes, ways, need)
    return Episodes(rows[:, :, :shots].contiguous(), rows[:, :, shots:].contiguous(), eligible[pick], skipped,
                    len(eligible))


def _features(features: Tensor) -> Tensor:
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise UserError(f"features must be 2-d (N, D), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise UserError(f"features must be floating point, got {features.dtype}")
    return features.float().contiguous()


def episode_accuracies(features: Tensor, episodes: Episodes, block: int | None = None) -> Tensor:
    """Per-episode accuracy (percent, float64 ``(episodes,)`` on the CPU) of the prototypical classifier.

    ``block``: episodes per gathered query block (default: ~8 MB of features on a CPU, ~256 MB on CUDA).
    """
    x = _features(features)
    e, ways, shots = episodes.support.shape
    queries = episodes.query.shape[2]
    d = x.shape[1]
    if int(episodes.support.max()) >= len(x) or int(episodes.query.max()) >= len(x):
        raise UserError(f"episode indices exceed the {len(x)} feature rows: episodes and features must come "
                        f"from the same pooled data")
    support = episodes.support.to(x.device).reshape(e * ways, shots)
    query = episodes.query.to(x.device).reshape(e, ways * queries)
    protos = F.embedding_bag(support, x, mode="mean").view(e, ways, d)
    centre = protos.mean(1, keepdim=True)
    centred = protos - centre
    # -‖q - p‖² = -‖q - c‖² + 2 q·(p - c) - 2 c·(p - c) - ‖p - c‖²; the first term is the same for
    # every class of a query and does not change its argmax.
    bias = -(2 * (centre * centred).sum(-1) + centred.pow(2).sum(-1))  # (e, ways)
    target = torch.arange(ways, device=x.device).repeat_interleave(queries)
    if block is None:
        per = (_CUDA_BLOCK if x.is_cuda else _CPU_BLOCK) // max(1, ways * queries * d)
        block = max(1, per)
    hits = []
    for a in range(0, e, block):
        q = x.index_select(0, query[a : a + block].reshape(-1)).view(-1, ways * queries, d)
        scores = torch.baddbmm(bias[a : a + block, None, :], q, centred[a : a + block].transpose(1, 2), alpha=2)
        hits.append((scores.argmax(-1) == target).sum(1))
    return torch.cat(hits).cpu().double() * (100.0 / (ways * queries))


def prototype_logits(support: Tensor, support_labels: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """One episode: logits ``-‖q - p_c‖²`` (``(n_query, n_classes)``) and the classes they refer to.

    ``p_c`` is the mean of the support rows labelled ``c``; classes are the sorted distinct support labels.
    """
    support, query = _features(support), _features(query).to(torch.as_tensor(support).device)
    labels = torch.as_tensor(support_labels).reshape(-1).to(support.device).long()
    if support.shape[0] != labels.shape[0] or support.shape[1] != query.shape[1]:
        raise UserError(f"support {tuple(support.shape)}, labels {tuple(labels.shape)} and query "
                        f"{tuple(query.shape)} do not fit together")
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    sums = torch.zeros(len(classes), support.shape[1], device=support.device).index_add_(0, inverse, support)
    protos = sums / torch.bincount(inverse, minlength=len(classes)).unsqueeze(1)
    centre = protos.mean(0, keepdim=True)
    p, q = protos - centre, query - centre
    d2 = q.pow(2).sum(1, keepdim=True) - 2 * q @ p.T + p.pow(2).sum(1)
    return -d2.clamp_min(0), classes


def prototype_predict(support: Tensor, support_labels: Tensor, query: Tensor) -> Tensor:
    """One episode: the support label whose class mean is nearest (squared Euclidean) to each query row."""
    logits, classes = prototype_logits(support, support_labels, query)
    return classes[logits.argmax(1)]


def summarize(accuracies: Tensor) -> dict:
    """``value`` (mean, %), ``std`` (population σ, as their ``np.std``), ``ci`` = 1.96 σ / √n, ``episodes`` n."""
    acc = torch.as_tensor(accuracies, dtype=torch.float64).reshape(-1)
    n = acc.numel()
    if n == 0:
        raise UserError("no episodes to summarise")
    std = acc.std(correction=0).item()
    return {"value": acc.mean().item(), "ci": 1.96 * std / math.sqrt(n), "std": std, "episodes": n}


def fewshot(features: Tensor, labels: Tensor, cfg: FewShotConfig | None = None) -> dict[int, dict]:
    """Ericsson et al.'s few-shot protocol on cached features of the pooled splits.

    Returns, per shot count, ``{"value": mean accuracy %, "ci": 1.96·σ/√episodes (points), "std": σ,
    "episodes", "ways", "shots", "queries", "classes": classes that could be drawn, "skipped_classes":
    how many had fewer than shots + queries images, "seconds"}``. Raises :class:`ValueError` when fewer
    than ``ways`` classes are large enough for a shot count.
    """
    cfg = cfg or FewShotConfig()
    x = _features(features)
    y = _labels(labels)
    if len(y) != len(x):
        raise UserError(f"{len(x)} feature rows but {len(y)} labels")
    out: dict[int, dict] = {}
    for shots in cfg.shots:
        t0 = time.perf_counter()
        ep = sample_episodes(y, cfg.ways, shots, cfg.queries, cfg.episodes, seed=cfg.seed)
        row = summarize(episode_accuracies(x, ep))
        row.update(ways=cfg.ways, shots=shots, queries=cfg.queries, classes=ep.num_classes,
                   skipped_classes=len(ep.skipped_classes), seconds=time.perf_counter() - t0)
        out[shots] = row
    return out
