"""Many-shot linear probe (Ericsson et al. 2021 §3): solver, selection, refit, reporting."""

import warnings

import numpy as np
import pytest
import torch

from selfsup.evaluate.linear import DEFAULT_STRENGTHS, fit_logistic, linear_probe, predict
from selfsup.evaluate.metrics import mean_per_class, top1


def _sklearn_objective(x: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, c: float) -> float:
    """scikit-learn's documented objective C · Σ_i CE(W x_i + b, y_i) + ½‖W‖², written out in numpy."""
    z = x @ coef.T + intercept
    z = z - z.max(1, keepdims=True)
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
    return c * ce.sum() + 0.5 * (coef**2).sum()


def _small_problem(seed=0, n=300, d=10, k=3):
    g = np.random.default_rng(seed)
    x = (g.standard_normal((n, d)) + 0.5).astype(np.float32)
    w = g.standard_normal((d, k))
    y = np.argmax(x @ w + 2.0 * g.standard_normal((n, k)), 1)
    return x, y


@pytest.mark.parametrize("wd", [1e-2, 1.0, 100.0])
def test_objective_and_coefficients_match_sklearn(wd):
    from sklearn.linear_model import LogisticRegression

    x, y = _small_problem()
    ref = LogisticRegression(C=1 / wd, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
    f_ref = _sklearn_objective(x.astype(np.float64), y, ref.coef_, ref.intercept_, 1 / wd)
    for dtype, tol, rel in ((torch.float64, 1e-9, 1e-9), (torch.float32, 1e-5, 1e-4)):
        theta, info = fit_logistic(torch.tensor(x, dtype=dtype), torch.tensor(y), 3, wd, max_iter=1000, tol=tol)
        assert bool(info.converged[0])
        theta = theta.double().numpy()
        f_ours = _sklearn_objective(x.astype(np.float64), y, theta[:, :-1], theta[:, -1], 1 / wd)
        assert abs(f_ours - f_ref) / abs(f_ref) < rel
    # float64: the coefficients themselves agree (the objective is strictly convex in W)
    np.testing.assert_allclose(theta[:, :-1], ref.coef_, atol=2e-3)


def test_preconditioning_changes_the_path_not_the_answer():
    x, y = _small_problem(seed=1)
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    a, info_a = fit_logistic(xt, yt, 3, 0.3, max_iter=2000, tol=1e-9, precondition=True)
    b, info_b = fit_logistic(xt, yt, 3, 0.3, max_iter=2000, tol=1e-9, precondition=False)
    assert bool(info_a.converged[0]) and bool(info_b.converged[0])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert int(info_a.iterations[0]) < int(info_b.iterations[0])


def test_batched_strengths_equal_separate_fits():
    x, y = _small_problem(seed=2)
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    wds = [1e-3, 1.0, 1e3]
    batch, info = fit_logistic(xt, yt, 3, wds, max_iter=500, tol=1e-9)
    assert batch.shape == (3, 3, 11) and bool(info.converged.all())
    for i, wd in enumerate(wds):
        single, _ = fit_logistic(xt, yt, 3, wd, max_iter=500, tol=1e-9)
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-5)


def test_planted_linear_model_is_recovered():
    g = torch.Generator().manual_seed(0)
    d, k = 20, 4
    w_true = torch.randn(k, d, generator=g)
    x = torch.randn(3000, d, generator=g)
    logits = x @ w_true.T
    top2 = logits.topk(2, dim=1).values
    x = x[(top2[:, 0] - top2[:, 1]) > 0.5]  # a margin: the classes are linearly separable
    y = (x @ w_true.T).argmax(1)
    tr, va, te = slice(0, 1200), slice(1200, 1600), slice(1600, None)
    r = linear_probe(x[tr], y[tr], x[va], y[va], x[te], y[te], num_classes=k)
    assert r.test_score > 97.0
    # The direction of the planted weights (up to softmax's shift invariance) is found.
    w = r.coef[:, :d]
    w, w0 = w - w.mean(0), w_true - w_true.mean(0)
    cos = (w * w0).sum() / (w.norm() * w0.norm())
    assert cos > 0.95
    assert torch.equal(predict(r.coef, x[te]), r.coef[:, :d].matmul(x[te].T).T.add(r.coef[:, d]).argmax(1))


def _realish(seed: int, n: int = 300, d: int = 48, k: int = 5, informative: int = 8):
    """Non-negative features with a few informative directions buried in correlated noise: the val
    curve has an interior peak, as on real frozen features."""
    g = np.random.default_rng(seed)
    means = g.standard_normal((k, informative))
    mix = g.standard_normal((informative, d)) / np.sqrt(informative)
    noise = g.standard_normal((d, d)) * 0.5 / np.sqrt(d)

    def draw(m):
        y = g.integers(0, k, m)
        z = means[y] + g.standard_normal((m, informative))
        return np.maximum(z @ mix + g.standard_normal((m, d)) @ noise + 0.3, 0).astype(np.float32), y

    return (*draw(n), *draw(n // 2), *draw(600))


def _ericsson_loop(xtr, ytr, xva, yva):
    """Their LinearTester.validate: warm-started sklearn fits from weak to strong, strict '>'."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=100, warm_start=True)
    best, best_wd = 0.0, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for wd in DEFAULT_STRENGTHS:
            clf.set_params(C=1 / wd)
            s = 100 * clf.fit(xtr, ytr).score(xva, yva)
            if s > best:
                best, best_wd = s, wd
    return best_wd


def test_val_selection_matches_the_sklearn_loop_and_searches_agree():
    xtr, ytr, xva, yva, xte, yte = _realish(seed=1)
    expected = _ericsson_loop(xtr, ytr, xva, yva)
    args = [torch.from_numpy(a) for a in (xtr, ytr, xva, yva, xte, yte)]
    results = {s: linear_probe(*args, num_classes=5, search=s) for s in ("path", "early_stop", "batched")}
    for search, r in results.items():
        assert r.best_wd == pytest.approx(expected), search
        assert sorted([*r.val_scores, *r.skipped]) == pytest.approx(sorted(DEFAULT_STRENGTHS))
        assert set(r.iterations) == set(r.val_scores) == set(r.converged)
    assert results["path"].skipped == [] and results["batched"].skipped == []
    # the early stop left out weak strengths only, and said so
    early = results["early_stop"]
    assert early.skipped and max(early.skipped) < min(early.val_scores)
    assert any("early stop" in note for note in early.notes)
    assert results["path"].test_score == pytest.approx(early.test_score)


def test_non_convergence_is_reported():
    xtr, ytr, xva, yva, xte, yte = _realish(seed=2)
    args = [torch.from_numpy(a) for a in (xtr, ytr, xva, yva, xte, yte)]
    r = linear_probe(*args, num_classes=5, max_iter=2, tol=1e-8, search="path")
    assert not all(r.converged.values())
    assert max(r.iterations.values()) <= 2
    assert r.refit_converged is False and r.refit_iterations == 2
    assert all(r.converged[wd] is False for wd, it in r.iterations.items() if it == 2)


def test_mean_per_class_is_used_when_asked():
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([400, 60, 20])  # imbalanced: top-1 and mean per-class accuracy differ
    y = torch.repeat_interleave(torch.arange(3), counts)
    x = torch.randn(len(y), 6, generator=g) + torch.nn.functional.one_hot(y, 6).float() * 1.2
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    tr, va, te = slice(0, 250), slice(250, 350), slice(350, None)
    r = linear_probe(x[tr], y[tr], x[va], y[va], x[te], y[te], num_classes=3, metric="mean_per_class")
    pred = predict(r.coef, x[te])
    assert r.metric == "mean_per_class"
    assert r.test_score == pytest.approx(mean_per_class(pred, y[te], 3))
    assert r.test_score != pytest.approx(top1(pred, y[te]))


def test_ties_go_to_the_weakest_regularisation():
    # With absurdly strong L2 every strength predicts the majority class: all val scores tie.
    x, y = _small_problem(seed=4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    r = linear_probe(xt[:200], yt[:200], xt[200:250], yt[200:250], xt[250:], yt[250:], num_classes=3,
                     strengths=[1e9, 1e10, 1e11], search="path")
    assert len(set(r.val_scores.values())) == 1
    assert r.best_wd == pytest.approx(1e9)


def test_bad_input_is_refused():
    x, y = _small_problem()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with pytest.raises(ValueError, match="labels must lie"):
        linear_probe(xt, yt, xt, yt, xt, yt + 3, num_classes=3)
    with pytest.raises(ValueError, match="do not match"):
        linear_probe(xt, yt, xt[:, :4], yt, xt, yt, num_classes=3)
    with pytest.raises(ValueError, match="search"):
        linear_probe(xt, yt, xt, yt, xt, yt, num_classes=3, search="grid")


def test_batched_search_in_groups_gives_the_same_answer(monkeypatch):
    import selfsup.evaluate.linear as linear

    xtr, ytr, xva, yva, xte, yte = _realish(seed=3, n=200, d=24)
    args = [torch.from_numpy(a) for a in (xtr, ytr, xva, yva, xte, yte)]
    # float64: in float32 the GEMM's rounding depends on the batch width, and with tol = 1e-4 two
    # trajectories that differ by rounding may stop at points predicting a val sample differently.
    whole = linear_probe(*args, num_classes=5, search="batched", dtype=torch.float64)
    # room for 7 strengths per solve: the 45 are solved in 7 groups
    monkeypatch.setattr(linear, "_BATCH_BYTES", 7 * 32 * 5 * 25 * 8)
    grouped = linear_probe(*args, num_classes=5, search="batched", dtype=torch.float64)
    assert grouped.best_wd == whole.best_wd
    assert grouped.val_scores == pytest.approx(whole.val_scores)
    assert grouped.iterations == whole.iterations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("search", ["batched", "early_stop"])
def test_cuda_matches_cpu(search):
    xtr, ytr, xva, yva, xte, yte = _realish(seed=1)
    args = [torch.from_numpy(a) for a in (xtr, ytr, xva, yva, xte, yte)]
    cpu = linear_probe(*args, num_classes=5, search=search)
    gpu = linear_probe(*args, num_classes=5, search=search, device="cuda")
    assert gpu.best_wd == pytest.approx(cpu.best_wd)
    assert abs(gpu.test_score - cpu.test_score) < 1.0
