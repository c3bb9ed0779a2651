"""Weighted kNN of Wu et al. 2018 (InstDisc §3.4) against explicit loops."""

import math

import pytest
import torch

from selfsup.evaluate.knn import knn_classify, knn_neighbors, knn_predict, knn_scores


def _toy(seed: int = 0, n_train: int = 40, n_test: int = 7, dim: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    train_x = torch.randn(n_train, dim, generator=g)
    train_y = torch.randint(0, classes, (n_train,), generator=g)
    test_x = torch.randn(n_test, dim, generator=g)
    return train_x, train_y, test_x


def _by_hand(train_x, train_y, test_x, classes, k, temperature):
    """Cosine similarity, the k largest, Σ exp(s/T) per class — with python loops and math.exp."""
    def cos(a, b):
        dot = sum(float(p) * float(q) for p, q in zip(a, b, strict=True))
        return dot / math.sqrt(sum(float(p) ** 2 for p in a) * sum(float(q) ** 2 for q in b))

    out = []
    for t in test_x:
        sims = sorted(((cos(t, x), i) for i, x in enumerate(train_x)), reverse=True)[:k]
        votes = [0.0] * classes
        for s, i in sims:
            votes[int(train_y[i])] += math.exp(s / temperature)
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (5, 0.1), (12, 0.5), (40, 0.07)])
def test_scores_and_prediction_match_explicit_loops(k, temperature):
    train_x, train_y, test_x = _toy()
    expected = _by_hand(train_x, train_y, test_x, 3, k, temperature)
    scores = knn_scores(train_x, train_y, test_x, 3, k=k, temperature=temperature)
    # our scores are the same votes divided by their row sum (argmax unchanged)
    torch.testing.assert_close(scores.double(), expected / expected.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    pred = knn_predict(train_x, train_y, test_x, 3, k=k, temperature=temperature)
    assert pred.dtype == torch.long
    assert torch.equal(pred, expected.argmax(1))


def test_tiny_hand_computed_case():
    # two training points of class 0 near the query, one of class 1 exactly on it
    train_x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_x = torch.tensor([[1.0, 1.0]])
    s = torch.tensor([1 / math.sqrt(2), 1.1 / math.sqrt(2 * 1.01), 1 / math.sqrt(2), 1.0])
    w = torch.exp(s / 0.1)
    class0, class1 = w[0] + w[1], w[2] + w[3]
    scores = knn_scores(train_x, train_y, test_x, 2, k=4)
    torch.testing.assert_close(scores[0], torch.stack([class0, class1]) / (class0 + class1))
    assert knn_predict(train_x, train_y, test_x, 2, k=4).item() == 1
    # with k = 2 the neighbours are (3: class 1, sim 1.0) and (1: class 0, sim 0.778): class 1 wins
    assert knn_predict(train_x, train_y, test_x, 2, k=2).item() == 1


def test_neighbours_equal_brute_force_sort():
    train_x, _, test_x = _toy(seed=1, n_train=300, n_test=20, dim=16)
    sims, index = knn_neighbors(train_x, test_x, k=25, chunk_size=7)
    full = torch.nn.functional.normalize(test_x, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    order = full.argsort(dim=1, descending=True)[:, :25]
    assert torch.equal(index, order)
    torch.testing.assert_close(sims, full.gather(1, order))


def test_k_is_clamped_and_chunking_does_not_change_the_answer():
    train_x, train_y, test_x = _toy(n_train=30, n_test=11)
    big = knn_scores(train_x, train_y, test_x, 3, k=200)
    torch.testing.assert_close(big, knn_scores(train_x, train_y, test_x, 3, k=30))
    torch.testing.assert_close(big, knn_scores(train_x, train_y, test_x, 3, k=200, chunk_size=2))
    assert knn_neighbors(train_x, test_x, k=200)[1].shape == (11, 30)


def test_small_temperature_does_not_overflow():
    train_x, train_y, test_x = _toy()
    scores = knn_scores(train_x, train_y, test_x, 3, k=10, temperature=1e-3)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(1), torch.ones(len(test_x)))


def test_bad_input_is_refused():
    train_x, train_y, test_x = _toy()
    with pytest.raises(ValueError, match="labels must lie"):
        knn_predict(train_x, train_y + 5, test_x, 3)
    with pytest.raises(ValueError, match="same width"):
        knn_predict(train_x, train_y, test_x[:, :2], 3)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train_x, train_y, test_x, 3, temperature=0.0)


def test_bf16_similarities_give_nearly_the_same_predictions():
    train_x, train_y, test_x = _toy(n_train=500, n_test=200, dim=32)
    a = knn_predict(train_x, train_y, test_x, 3, k=20)
    b = knn_predict(train_x, train_y, test_x, 3, k=20, dtype=torch.bfloat16)
    assert (a == b).float().mean() > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    train_x, train_y, test_x = _toy(n_train=500, n_test=100, dim=32)
    cpu = knn_scores(train_x, train_y, test_x, 3, k=50)
    gpu = knn_scores(train_x.cuda(), train_y.cuda(), test_x.cuda(), 3, k=50)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_classify_scores_the_predictions():
    train_x, train_y, test_x = _toy(n_train=60, n_test=30)
    test_y = torch.arange(30) % 3
    pred = knn_predict(train_x, train_y, test_x, 3, k=7)
    expected = 100.0 * (pred == test_y).double().mean().item()
    assert knn_classify(train_x, train_y, test_x, test_y, 3, k=7) == pytest.approx(expected)
