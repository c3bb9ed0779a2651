"""Spherical k-means as DeepCluster v2 runs it: a planted clustering recovered exactly, a dense numpy loop and
scikit-learn's Lloyd steps from unit centroids as references, chunking that changes nothing and never forms more
than a chunk × k block, empty clusters keeping their centroid, the seeded initialisation, 2 gloo processes against
one on the concatenated rows, and the refusals."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import close_group, run_processes
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, pairwise_distances_argmin
from threadpoolctl import threadpool_limits

import selfsup.nn.kmeans as kmeans_module
from selfsup.errors import UserError
from selfsup.nn.kmeans import KMeansResult, assign, spherical_kmeans


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def _clustered(clusters=10, per=60, d=8, noise=0.3, seed=0, dtype=torch.float64):
    """``clusters`` random unit directions with ``per`` noisy unit points around each, shuffled; and the truth."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, d, generator=g, dtype=torch.float64), dim=1)
    truth = torch.arange(clusters).repeat_interleave(per)
    x = F.normalize(centres[truth] + noise * torch.randn(clusters * per, d, generator=g, dtype=torch.float64), dim=1)
    order = torch.randperm(len(x), generator=g)
    return x[order].to(dtype), truth[order], centres


def _numpy_spherical_kmeans(x: np.ndarray, centroids: np.ndarray, iterations: int):
    """The textbook loop, dense: the N × k similarity, argmax, each cluster's mean made unit, an empty one kept;
    then the assignment to the final centroids."""
    c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    for _ in range(iterations):
        labels = (x @ c.T).argmax(1)
        new = c.copy()
        for j in range(len(c)):
            members = x[labels == j]
            if len(members):
                mean = members.mean(0)
                new[j] = mean / np.linalg.norm(mean)
        c = new
    return (x @ c.T).argmax(1), c


# ------------------------------------------------------------------------------------------------ correctness
def test_a_planted_clustering_is_recovered_exactly():
    """5 directions in 16-d, 200 noisy points each. Lloyd's iteration is local: from k random rows it recovers the
    clusters when the rows fall in different clusters (a split cluster stays split), so the seed is the first one
    whose initial rows do; from there the partition must be exact and the centroids the planted directions."""
    x, truth, centres = _clustered(clusters=5, per=200, d=16, noise=0.15, dtype=torch.float32)

    def first_rows(seed):
        return truth[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:5]]

    seed = next(s for s in range(100) if len(set(first_rows(s).tolist())) == 5)
    result = spherical_kmeans(x, 5, 10, seed=seed)
    assert isinstance(result, KMeansResult)
    assert adjusted_rand_score(truth.numpy(), result.assignments.numpy()) == 1.0
    assert result.centroids.shape == (5, 16) and result.centroids.dtype == torch.float32
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(5), rtol=0, atol=1e-6)
    cosine = result.centroids.double() @ centres.T                          # each centroid near one planted centre
    assert (cosine.amax(1) > 0.99).all() and len(set(cosine.argmax(1).tolist())) == 5
    assert torch.equal(result.counts, torch.full((5,), 200)) and result.empty == (0,) * 10
    torch.testing.assert_close(result.similarity, (x * result.centroids[result.assignments]).sum(1))


def test_matches_a_dense_numpy_loop_from_the_same_centroids():
    x, _, _ = _clustered(seed=1)
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(5))[:10]] + 0.05   # not rows, not unit
    labels, centroids = _numpy_spherical_kmeans(x.numpy(), init.numpy(), 10)
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        result = spherical_kmeans(x.to(dtype), 10, 10, seed=0, init=init.to(dtype))
        assert np.array_equal(result.assignments.numpy(), labels)
        torch.testing.assert_close(result.centroids.double(), torch.from_numpy(centroids), rtol=0, atol=tol)


def test_each_iteration_is_a_scikit_learn_lloyd_step_from_unit_centroids_then_renormalised():
    """For unit centroids, ‖x − c‖² = ‖x‖² + 1 − 2 x·c: the nearest centroid is the most similar one, so scikit-learn's
    Lloyd step (nearest centroid, then the mean) from unit centroids, renormalised, is one spherical iteration. (Its
    own 10 iterations are not: its unnormalised means no longer rank by dot product.) No cluster empties here, so
    scikit-learn's relocation of empty clusters never runs."""
    x, _, _ = _clustered(seed=2)
    c = F.normalize(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:10]], dim=1).numpy()
    for _ in range(10):
        km = KMeans(10, init=c, n_init=1, max_iter=1, tol=0.0, algorithm="lloyd").fit(x.numpy())
        c = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
    result = spherical_kmeans(x, 10, 10, seed=3)
    assert result.empty == (0,) * 10
    torch.testing.assert_close(result.centroids, torch.from_numpy(c), rtol=0, atol=1e-10)
    assert np.array_equal(result.assignments.numpy(), pairwise_distances_argmin(x.numpy(), c))


# ------------------------------------------------------------------------------------------------ chunking
def test_chunking_changes_nothing_and_forms_only_chunk_by_k_blocks(monkeypatch):
    x, _, _ = _clustered(clusters=7, per=50, d=12, seed=4, dtype=torch.float32)
    n, k, iterations = len(x), 7, 6
    runs = {}
    for chunk in (7, 64, n):
        blocks = []
        real = kmeans_module._similarities

        def spy(chunk_rows, centroids, blocks=blocks, real=real):
            out = real(chunk_rows, centroids)
            blocks.append(tuple(out.shape))
            return out

        monkeypatch.setattr(kmeans_module, "_similarities", spy)
        runs[chunk] = spherical_kmeans(x, k, iterations, seed=1, chunk_size=chunk)
        monkeypatch.undo()
        assert len(blocks) == -(-n // chunk) * (iterations + 1)              # every E step, chunk by chunk
        assert max(rows for rows, _ in blocks) == min(chunk, n) and {cols for _, cols in blocks} == {k}
        assert sum(rows for rows, _ in blocks) == n * (iterations + 1)
    for chunk in (7, 64):
        assert torch.equal(runs[chunk].assignments, runs[n].assignments)
        assert torch.equal(runs[chunk].centroids, runs[n].centroids)
        torch.testing.assert_close(runs[chunk].similarity, runs[n].similarity, rtol=1e-6, atol=1e-7)
    labels, best = assign(x, runs[n].centroids, chunk_size=5)                 # the public E step
    assert torch.equal(labels, runs[n].assignments)
    torch.testing.assert_close(best, (x @ runs[n].centroids.T).amax(1), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ empty clusters
def test_an_empty_cluster_keeps_its_previous_centroid():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(300, 6, generator=g).abs() + torch.tensor([3.0, 0, 0, 0, 0, 0]), dim=1)  # one cap
    far = torch.tensor([[-1.0, 0, 0, 0, 0, 0], [0, -0.6, -0.8, 0, 0, 0]])     # nearer to no row than the others
    init = torch.cat([x[:3], far])
    result = spherical_kmeans(x, 5, 8, seed=0, init=init)
    assert result.empty == (2,) * 8
    assert torch.equal(result.centroids[3:], far) and (result.counts[3:] == 0).all()
    assert not (result.assignments >= 3).any() and int(result.counts.sum()) == 300
    assert not torch.equal(result.centroids[:3], init[:3])                      # the others moved


# ------------------------------------------------------------------------------------------------ seeding
def test_the_seed_picks_the_initial_rows_and_fixes_the_result(monkeypatch):
    x, _, _ = _clustered(seed=5, dtype=torch.float32)
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(11))[:10]
    start = spherical_kmeans(x, 10, 0, seed=11)                                 # no M step: the initial centroids
    assert torch.equal(start.centroids, F.normalize(x[rows], dim=1)) and start.empty == ()
    assert torch.equal(start.assignments, (x @ start.centroids.T).argmax(1))
    a, b = spherical_kmeans(x, 10, 5, seed=11), spherical_kmeans(x, 10, 5, seed=11)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("centroids", "assignments", "similarity", "counts"))
    assert not torch.equal(spherical_kmeans(x, 10, 5, seed=12).centroids, a.centroids)
    low = spherical_kmeans(x.bfloat16(), 10, 5, seed=11)   # 16-bit rows: checked to bfloat16's eps, run in float32
    assert low.centroids.dtype == torch.float32
    with pytest.raises(UserError, match="norm off 1"):                         # the same values as float32 rows:
        spherical_kmeans(x.bfloat16().float(), 10, 5, seed=11)                 # off by more than 1e-3
    monkeypatch.setattr(kmeans_module, "NORM_TOLERANCE", 1e-2)
    assert torch.equal(low.centroids, spherical_kmeans(x.bfloat16().float(), 10, 5, seed=11).centroids)


# ------------------------------------------------------------------------------------------------ 2 processes
WORLD = 2


def _worker(rank, port, x, split, k, seed, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        shard = torch.from_numpy(x[:split] if rank == 0 else x[split:])
        drawn = spherical_kmeans(shard, k, 10, seed=seed if rank == 0 else seed + 1)   # rank 0's seed counts
        given = spherical_kmeans(shard, k, 10, seed=0, init=shard[:k] if rank == 0 else shard[-k:])
        refusals = []
        for bad in ({"k": split + 1}, {"x": shard * (1.0 if rank == 0 else 1.5)}):   # a refusal on every rank
            try:
                spherical_kmeans(bad.get("x", shard), bad.get("k", k), 2, seed=0)
            except UserError as e:
                refusals.append(str(e))
        queue.put((rank, [(r.centroids.numpy(), r.assignments.numpy(), r.counts.numpy(), r.empty)
                          for r in (drawn, given)], refusals))
    finally:
        close_group()


def test_two_shards_give_the_one_process_result_on_the_concatenated_rows():
    x, _, _ = _clustered(clusters=6, per=70, seed=6)
    split, k, seed = 190, 6, 7                                                    # unequal shards: 190 and 230
    got = run_processes(_worker, WORLD, x.numpy(), split, k, seed)
    rows = torch.randperm(split, generator=torch.Generator().manual_seed(seed))[:k]
    wants = [spherical_kmeans(x, k, 10, seed=0, init=x[rows]),                   # the init from rank 0's rows
             spherical_kmeans(x, k, 10, seed=0, init=x[:k])]                      # rank 0's init, broadcast
    for case, want in enumerate(wants):
        for _, results, _ in got:
            centroids, _, counts, empty = results[case]
            torch.testing.assert_close(torch.from_numpy(centroids), want.centroids, rtol=0, atol=1e-12)
            assert np.array_equal(counts, want.counts.numpy()) and empty == want.empty
        both = np.concatenate([results[case][1] for _, results, _ in got])
        assert np.array_equal(both, want.assignments.numpy())
    for _, _, refusals in got:
        assert len(refusals) == 2
        assert "from rank 0's rows, which are N=190" in refusals[0]
        assert "a row on rank 1 has a norm off 1 by 0.5" in refusals[1]


# ------------------------------------------------------------------------------------------------ refusals
def test_bad_input_is_refused_naming_the_numbers_and_the_fix():
    x, _, _ = _clustered(clusters=2, per=5, dtype=torch.float32)
    with pytest.raises(UserError, match=r"k=11 clusters needs 1 <= k <= N.*N=10: set method\.num_prototypes / the "
                                        r"number of clusters to at most N=10"):
        spherical_kmeans(x, 11, seed=0)
    for k in (0, -2, 2.5):
        with pytest.raises(UserError, match=f"number of clusters k.*got {k}"):
            spherical_kmeans(x, k, seed=0)
    with pytest.raises(UserError, match=r"norm off 1 by 1 .*F\.normalize\(x, dim=1\)"):
        spherical_kmeans(2 * x, 2, seed=0)
    with pytest.raises(UserError, match="iterations must be an integer >= 0, got -1"):
        spherical_kmeans(x, 2, -1, seed=0)
    with pytest.raises(UserError, match="chunk_size.*>= 1, got 0"):
        spherical_kmeans(x, 2, seed=0, chunk_size=0)
    with pytest.raises(UserError, match=r"init must be k × d = 2 × 8 centroids, got shape \(3, 8\)"):
        spherical_kmeans(x, 2, seed=0, init=x[:3])
    with pytest.raises(UserError, match="N × d floating-point"):
        spherical_kmeans(x[0], 1, seed=0)
    with pytest.raises(UserError, match="N × d rows and k × d centroids"):
        assign(x, x[:, :3])
