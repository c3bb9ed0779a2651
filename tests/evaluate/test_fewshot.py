"""Prototypical few-shot evaluation (Ericsson et al. 2021, §3) against hand computations and explicit loops."""

import math

import numpy as np
import pytest
import torch

from selfsup.evaluate.fewshot import (
    FewShotConfig,
    episode_accuracies,
    fewshot,
    prototype_logits,
    prototype_predict,
    sample_episodes,
)


def _clusters(classes: int, per_class: int, dim: int, separation: float, seed: int = 0):
    """Gaussian clusters around random centres; ``separation`` scales the centres (0: no class signal)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = separation * torch.randn(classes, dim, generator=g)
    features = centres[labels] + torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)  # labels need not be sorted
    return features[perm], labels[perm]


def _loop_accuracies(features, episodes):
    """Per-episode accuracy with explicit class means and torch.cdist, one episode at a time."""
    out = []
    for e in range(episodes.support.shape[0]):
        protos = torch.stack([features[episodes.support[e, w]].double().mean(0)
                              for w in range(episodes.support.shape[1])])
        queries = features[episodes.query[e].reshape(-1)].double()
        target = torch.arange(episodes.query.shape[1]).repeat_interleave(episodes.query.shape[2])
        pred = torch.cdist(queries, protos).argmin(1)
        out.append(100.0 * (pred == target).double().mean().item())
    return np.array(out)


def test_prototype_predict_on_a_hand_computed_toy_set():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
    labels = torch.tensor([3, 3, 7, 7])  # means: class 3 at (1, 0), class 7 at (0, 5)
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0], [0.5, 2.6]])
    logits, classes = prototype_logits(support, labels, query)
    assert classes.tolist() == [3, 7]
    expected = -torch.tensor([[1.0, 17.0], [10.0, 4.0], [0.25 + 2.6**2, 0.25 + 2.4**2]])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert prototype_predict(support, labels, query).tolist() == [3, 7, 7]


def test_prototype_logits_match_explicit_loops_on_large_offset_features():
    g = torch.Generator().manual_seed(1)
    support = torch.randn(12, 6, generator=g) + 100.0  # a large common offset, like raw ReLU features
    labels = torch.tensor([0, 1, 2] * 4)
    query = torch.randn(5, 6, generator=g) + 100.0
    logits, _ = prototype_logits(support, labels, query)
    expected = torch.zeros(5, 3, dtype=torch.float64)
    for c in range(3):
        rows = [support[i].double() for i in range(12) if labels[i] == c]
        mean = sum(rows) / len(rows)
        for j in range(5):
            expected[j, c] = -sum((float(query[j, k]) - float(mean[k])) ** 2 for k in range(6))
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-3)


def test_episodes_have_ways_classes_and_disjoint_support_and_query():
    labels = torch.arange(9).repeat_interleave(torch.tensor([40, 25, 60, 40, 23, 40, 80, 40, 10]))
    ep = sample_episodes(labels, ways=5, shots=5, queries=15, episodes=200, seed=3)
    assert ep.support.shape == (200, 5, 5) and ep.query.shape == (200, 5, 15) and ep.classes.shape == (200, 5)
    assert ep.skipped_classes == [8] and ep.num_classes == 8  # 10 < 5 + 15
    for e in range(200):
        assert len(set(ep.classes[e].tolist())) == 5
        rows = torch.cat([ep.support[e].reshape(-1), ep.query[e].reshape(-1)]).tolist()
        assert len(set(rows)) == len(rows)  # no image twice: support and query are disjoint
        for w in range(5):
            c = int(ep.classes[e, w])
            assert (labels[ep.support[e, w]] == c).all() and (labels[ep.query[e, w]] == c).all()
    assert 8 not in ep.classes.unique().tolist()


def test_sampler_is_uniform_over_classes_and_images():
    labels = torch.arange(10).repeat_interleave(30)
    ep = sample_episodes(labels, ways=5, shots=5, queries=5, episodes=1200, seed=0)
    per_class = torch.bincount(ep.classes.reshape(-1), minlength=10).double()
    assert per_class.sum() == 6000
    assert (per_class - 600).abs().max() < 100  # binomial sd ~21
    rows = torch.cat([ep.support.reshape(-1), ep.query.reshape(-1)])
    per_image = torch.bincount(rows, minlength=300).double()  # each image: expected 600 * 10 / 30 = 200
    assert (per_image - 200).abs().max() < 70  # sd ~11.5; a sampler favouring some images fails
    in_support = torch.bincount(ep.support.reshape(-1), minlength=300).double()  # expected 100 each
    assert (in_support - 100).abs().max() < 45  # sd ~9.5; e.g. support = lowest indices of the draw fails


def test_episode_accuracies_equal_a_per_episode_loop():
    features, labels = _clusters(12, 40, 16, separation=0.4)
    ep = sample_episodes(labels, ways=5, shots=5, queries=15, episodes=60, seed=0)
    fast = episode_accuracies(features, ep).numpy()
    np.testing.assert_allclose(fast, _loop_accuracies(features, ep), atol=1e-9)
    np.testing.assert_allclose(episode_accuracies(features, ep, block=7).numpy(), fast)
    assert 20 < fast.mean() < 100  # a non-trivial case: neither chance nor perfect


def test_mean_and_ci_equal_an_independent_computation():
    features, labels = _clusters(12, 80, 16, separation=0.3, seed=2)
    cfg = FewShotConfig(ways=5, shots=[5, 20], queries=15, episodes=100, seed=7)
    out = fewshot(features, labels, cfg)
    for shots in (5, 20):
        acc = _loop_accuracies(features, sample_episodes(labels, 5, shots, 15, 100, seed=7))
        assert out[shots]["value"] == pytest.approx(acc.mean(), abs=1e-9)
        assert out[shots]["std"] == pytest.approx(np.std(acc), abs=1e-9)
        assert out[shots]["ci"] == pytest.approx(1.96 * np.std(acc) / math.sqrt(100), abs=1e-9)
        assert out[shots]["episodes"] == 100 and out[shots]["shots"] == shots
        assert out[shots]["std"] > 0
    assert out[20]["value"] > out[5]["value"]  # more shots, better prototypes


def test_planted_clusters_give_100_and_random_features_give_chance():
    features, labels = _clusters(20, 70, 32, separation=10.0)
    out = fewshot(features, labels, FewShotConfig(shots=[5, 20, 50]))
    for shots in (5, 20, 50):
        assert out[shots]["value"] == 100.0 and out[shots]["ci"] == 0.0
        assert out[shots]["classes"] == 20 and out[shots]["skipped_classes"] == 0
    noise, labels = _clusters(20, 70, 32, separation=0.0)
    out = fewshot(noise, labels, FewShotConfig(ways=5, shots=[5]))[5]
    assert abs(out["value"] - 20.0) < 2.0  # chance = 1/ways; ci ~0.4 points at 600 episodes
    assert 0.2 < out["ci"] < 0.7


def test_seeding_is_reproducible_and_shot_counts_are_independent():
    features, labels = _clusters(10, 60, 8, separation=0.3)
    a = fewshot(features, labels, FewShotConfig(shots=[5, 20], episodes=50, seed=1))
    b = fewshot(features, labels, FewShotConfig(shots=[20], episodes=50, seed=1))
    c = fewshot(features, labels, FewShotConfig(shots=[20], episodes=50, seed=2))
    assert a[20]["value"] == b[20]["value"] and a[20]["std"] == b[20]["std"]
    e1 = sample_episodes(labels, 5, 20, 15, 50, seed=1)
    e2 = sample_episodes(labels, 5, 20, 15, 50, seed=1)
    e3 = sample_episodes(labels, 5, 20, 15, 50, seed=2)
    assert torch.equal(e1.support, e2.support) and torch.equal(e1.query, e2.query)
    assert not torch.equal(e1.support, e3.support)
    assert c[20]["value"] != b[20]["value"]


def test_too_few_large_classes_is_a_clear_error():
    labels = torch.arange(6).repeat_interleave(torch.tensor([40, 40, 40, 40, 34, 100]))
    features = torch.randn(len(labels), 4)
    # 20 + 15 = 35 images needed: only 5 classes qualify, enough for 5-way but not 6-way
    assert fewshot(features, labels, FewShotConfig(shots=[20], episodes=5))[20]["skipped_classes"] == 1
    with pytest.raises(ValueError, match=r"need 6 classes with at least shots \+ queries = 35.*only 5 of 6"):
        fewshot(features, labels, FewShotConfig(ways=6, shots=[20], episodes=5))
    with pytest.raises(ValueError, match="only 1 of 6"):
        fewshot(features, labels, FewShotConfig(shots=[50], episodes=5))


def test_bad_input_is_refused():
    features, labels = _clusters(6, 40, 4, separation=1.0)
    with pytest.raises(ValueError, match="labels"):
        fewshot(features, labels[:-1])
    with pytest.raises(ValueError, match="integers"):
        fewshot(features, labels.float())
    with pytest.raises(ValueError, match="2-d"):
        fewshot(features[:, 0], labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    features, labels = _clusters(12, 80, 64, separation=0.3)
    ep = sample_episodes(labels, 5, 20, 15, 200, seed=0)
    cpu = episode_accuracies(features, ep)
    gpu = episode_accuracies(features.cuda(), ep)
    assert gpu.device.type == "cpu" and (gpu == cpu).double().mean() > 0.98
    assert abs(gpu.mean().item() - cpu.mean().item()) < 0.1
    out = fewshot(features.cuda(), labels.cuda(), FewShotConfig(shots=[20], episodes=200))[20]
    assert out["value"] == pytest.approx(cpu.mean().item(), abs=0.1)
