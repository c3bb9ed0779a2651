"""Maximal-Hamming-distance permutation sets for the Jigsaw task, generated here with a fixed seed.

Noroozi & Favaro 2016 (§3.3, Algorithm 1) choose the N tile orders the network must tell apart
greedily: start from a uniformly random permutation of the 9 tiles, then repeatedly add the
permutation farthest from those chosen so far, because a set whose orders differ in many tile
positions makes the task harder and the features better (their Table 3). Kolesnikov et al. 2019
(§3, "Jigsaw") use their 100-permutation "max" set. We never download that file; the set is a pure
function of (n, tiles, seed, criterion), computed in about a second for n = 100 and memoised
in-process (``functools.lru_cache``), so no cache file can go stale.

"Farthest" has two readings, both offered:

- ``criterion="sum"`` (default, faithful): Algorithm 1 as printed, ``j = argmax_k 1ᵀ D``: maximise the
  total (equivalently average) distance to the chosen set; ties to a seeded uniform choice. Their
  "maximal" set of Table 3 (argmax, as opposed to the argmin "minimal" set) is this rule, and it is
  the set Kolesnikov et al. use.
- ``criterion="maximin"`` (an option, ours): maximise the *minimum* Hamming distance to the chosen set;
  ties go to the larger total distance (so the average stays as high as Algorithm 1's), remaining
  ties to a seeded uniform choice. Same average distance (8.08 for seed 0), but a minimum of 6 against
  Algorithm 1's 3, i.e. no two classes that differ in only 3 tile positions.

A running min and sum vector over all 9! candidates make each step one O(9! · 9) comparison.

Permutation ``perm`` reads "position j holds tile ``perm[j]``" (TF's ``gather(patches, perm)`` in the
Revisiting code): ``permute_tiles`` applies it.
"""

from __future__ import annotations

from functools import lru_cache
from math import factorial
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from selfsup.errors import UserError

Criterion = Literal["sum", "maximin"]


def all_permutations(k: int) -> np.ndarray:
    """All k! permutations of range(k) in lexicographic order (itertools' order), k! x k int8.

    Built level by level without a Python loop over permutations: the lexicographic permutations
    of m items are, for each first item v, v followed by the (m-1)-item permutations relabelled onto
    the remaining items (a monotone relabelling keeps the order lexicographic).
    """
    perms = np.zeros((1, 0), dtype=np.int8)
    for m in range(1, k + 1):
        blocks = []
        for first in range(m):
            rest = np.delete(np.arange(m, dtype=np.int8), first)
            head = np.full((perms.shape[0], 1), first, dtype=np.int8)
            blocks.append(np.concatenate((head, rest[perms]), axis=1))
        perms = np.concatenate(blocks, axis=0)
    return perms


@lru_cache(maxsize=16)
def _hamming_set(n: int, tiles: int, seed: int, criterion: str) -> np.ndarray:
    cands = all_permutations(tiles)
    total = cands.shape[0]
    # onehot[p * tiles + v, i] = 1 iff candidate i holds tile v at position p, so the number of
    # positions where every candidate agrees with permutation q is the sum of ``tiles`` rows:
    # a row gather instead of a k!-by-k comparison (3x faster for 9 tiles).
    onehot = np.zeros((tiles * tiles, total), dtype=np.uint8)
    rows = np.arange(tiles) * tiles
    onehot[rows[None, :] + cands, np.arange(total)[:, None]] = 1

    def distance_to(j: int) -> np.ndarray:
        return tiles - onehot[rows + cands[j]].sum(0, dtype=np.int64)

    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(total))]
    dmin = distance_to(chosen[0])
    dsum = dmin.copy()
    taken = np.zeros(total, dtype=bool)
    taken[chosen[0]] = True
    weight = tiles * n + 1  # max: lexicographic key (min distance, total distance); the total is < weight
    for _ in range(1, n):
        score = dmin * weight + dsum if criterion == "maximin" else dsum.copy()
        score[taken] = -1
        best = np.flatnonzero(score == score.max())
        j = int(best[rng.integers(best.size)])
        chosen.append(j)
        taken[j] = True
        d = distance_to(j)
        np.minimum(dmin, d, out=dmin)
        dsum += d
    out = cands[chosen].astype(np.int64)
    out.setflags(write=False)
    return out


def hamming_permutations(n: int = 100, tiles: int = 9, seed: int = 0, criterion: Criterion = "sum") -> Tensor:
    """n greedy maximal-Hamming-distance permutations of ``tiles`` tiles (Noroozi & Favaro 2016, §3.3).

    Returns a fresh n x tiles LongTensor (row 0 is the seeded random start). Deterministic in
    (n, tiles, seed, criterion); the first rows of a larger set equal the smaller set with the same seed.
    """
    if criterion not in ("sum", "maximin"):
        raise UserError(f"criterion must be 'sum' or 'maximin', got {criterion!r}")
    if not 1 <= n <= factorial(tiles):
        raise UserError(f"n must be in [1, {tiles}!] for {tiles} tiles, got {n}")
    return torch.from_numpy(_hamming_set(n, tiles, seed, criterion).copy())


def _pairwise(perms: Tensor | np.ndarray) -> Tensor:
    p = torch.as_tensor(np.asarray(perms))
    if p.dim() != 2 or p.shape[0] < 2:
        raise UserError(f"need an m x k set of at least two permutations, got shape {tuple(p.shape)}")
    d = (p[:, None, :] != p[None, :, :]).sum(-1)
    iu = torch.triu_indices(p.shape[0], p.shape[0], offset=1)
    return d[iu[0], iu[1]]


def min_hamming_distance(perms: Tensor | np.ndarray) -> int:
    """Smallest Hamming distance (tile positions that differ) over all pairs of rows."""
    return int(_pairwise(perms).min())


def average_hamming_distance(perms: Tensor | np.ndarray) -> float:
    """Mean Hamming distance over all unordered pairs of rows."""
    return float(_pairwise(perms).double().mean())


def permute_tiles(tiles: Tensor, perms: Tensor) -> Tensor:
    """Reorder tiles B x T x ... by per-sample permutations B x T: ``out[b, j] = tiles[b, perms[b, j]]``."""
    idx = perms.to(tiles.device).view(*perms.shape, *([1] * (tiles.dim() - 2))).expand_as(tiles)
    return tiles.gather(1, idx)
