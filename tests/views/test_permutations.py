"""Greedy maximal-Hamming permutation sets (Noroozi & Favaro 2016, §3.3) against brute force."""

import itertools
import math

import numpy as np
import pytest
import torch

from selfsup.views.permutations import (
    all_permutations,
    average_hamming_distance,
    hamming_permutations,
    min_hamming_distance,
    permute_tiles,
)


def hamming(a, b) -> int:
    return sum(int(x != y) for x, y in zip(a, b, strict=True))


def test_all_permutations_is_itertools_order():
    assert np.array_equal(all_permutations(5), np.array(list(itertools.permutations(range(5)))))
    assert all_permutations(9).shape == (math.factorial(9), 9)


def test_hundred_set_is_valid_unique_and_far_apart():
    p = hamming_permutations(100, seed=0, criterion="maximin")
    assert p.shape == (100, 9) and p.dtype == torch.long
    assert torch.equal(p.sort(1).values, torch.arange(9).expand(100, 9))  # each row a permutation
    assert len({tuple(r) for r in p.tolist()}) == 100
    # greedy max-min reaches 6 for every seed tried (a minimum of 8 is impossible for 100: at most
    # 9 * 8 = 72 permutations of 9 can pairwise differ in 8 or more positions)
    assert min_hamming_distance(p) >= 6
    assert average_hamming_distance(p) >= 8.0
    # Algorithm 1 as printed (sum criterion): the same average, a smaller minimum
    s = hamming_permutations(100, seed=0)  # the default
    assert average_hamming_distance(s) >= 8.0 and min_hamming_distance(s) <= min_hamming_distance(p)


def test_seeded_and_deterministic():
    a = hamming_permutations(10, seed=0)
    assert torch.equal(a, hamming_permutations(10, seed=0))
    b = hamming_permutations(10, seed=1)
    assert not torch.equal(a[0], b[0])  # the first permutation is drawn from the seed
    assert torch.equal(a, hamming_permutations(20, seed=0)[:10])  # a larger set extends a smaller one
    a[0, 0] = 99  # callers get a copy, not the memoised array
    assert int(hamming_permutations(10, seed=0)[0, 0]) != 99


@pytest.mark.parametrize("seed", [0, 3])
def test_greedy_step_is_maximal_against_brute_force(seed):
    perms = hamming_permutations(6, tiles=4, seed=seed, criterion="maximin").tolist()
    everything = list(itertools.permutations(range(4)))
    for t in range(1, len(perms)):
        chosen = perms[:t]
        rest = [q for q in everything if list(q) not in chosen]
        key = {q: (min(hamming(q, c) for c in chosen), sum(hamming(q, c) for c in chosen)) for q in rest}
        assert key[tuple(perms[t])] == max(key.values())  # max min-distance, ties to max total


def test_sum_criterion_step_is_maximal_against_brute_force():
    perms = hamming_permutations(8, tiles=4, seed=2).tolist()  # the default: Algorithm 1
    everything = list(itertools.permutations(range(4)))
    for t in range(1, len(perms)):
        chosen = perms[:t]
        total = {q: sum(hamming(q, c) for c in chosen) for q in everything if list(q) not in chosen}
        assert total[tuple(perms[t])] == max(total.values())


def test_bad_arguments():
    with pytest.raises(ValueError):
        hamming_permutations(25, tiles=4)
    with pytest.raises(ValueError):
        hamming_permutations(5, tiles=4, criterion="mean")


def test_distance_helpers_and_permute_tiles():
    p = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    assert min_hamming_distance(p) == 2
    assert average_hamming_distance(p.numpy()) == pytest.approx((2 + 3 + 2) / 3)
    tiles = torch.arange(2 * 3 * 2).view(2, 3, 2)
    order = torch.tensor([[2, 0, 1], [1, 2, 0]])
    out = permute_tiles(tiles, order)
    for b in range(2):
        for j in range(3):
            assert torch.equal(out[b, j], tiles[b, order[b, j]])
