"""SwAV's Sinkhorn-Knopp codes: the marginals (rows exactly after any number of iterations, the equipartition
as it converges), an independent float64 numpy re-implementation by scaling vectors, invariances that make the
max-shift safe, the hard assignment it tends to as ε → 0 on a planted transport problem, 2 gloo processes
against one, and the refusals."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import close_group, run_processes
from scipy.optimize import linear_sum_assignment

from selfsup.errors import UserError
from selfsup.nn.sinkhorn import sinkhorn


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scores(b=32, k=8, d=16, seed=0, dtype=torch.float64):
    """Cosine scores of b unit embeddings against k unit prototypes, as SwAV's (in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return (z @ c.T).to(dtype)


def _reference(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Sinkhorn-Knopp from the papers, in float64: the plan diag(u) exp(S/ε) diag(v) (here B × K, samples × prototypes)
    with the scaling vectors alternately fitted to the prototype marginal 1/K and the sample marginal 1/B, starting
    from v = 1, then scaled by B so that each sample's code sums to 1. One half-step each per iteration."""
    kernel = np.exp(scores.astype(np.float64) / epsilon)
    b, k = kernel.shape
    u, v = np.ones(b), np.ones(k)       # u scales the samples (rows here), v the prototypes (columns)
    for _ in range(iterations):
        v = (1.0 / k) / (kernel.T @ u)  # prototype marginals: Σ_i u_i K_ij v_j = 1/K
        u = (1.0 / b) / (kernel @ v)    # sample marginals:    Σ_j u_i K_ij v_j = 1/B
    return b * u[:, None] * kernel * v[None, :]


# ------------------------------------------------------------------------------------------------ marginals
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_rows_sum_to_one_after_any_iterations_and_columns_reach_the_equipartition(dtype, tol):
    s = _scores(dtype=dtype)
    b, k = s.shape
    for iterations in (1, 3):                          # the last half-step normalises the samples: exact rows
        q = sinkhorn(s, 0.05, iterations)
        assert q.shape == (b, k) and q.dtype == dtype and (q >= 0).all()
        torch.testing.assert_close(q.sum(1), torch.ones(b, dtype=dtype), rtol=0, atol=tol)
        assert (q.sum(0) - b / k).abs().max() > 0.1    # ... but 3 steps leave the prototypes' mass unequal
    q = sinkhorn(s, 0.05, 200)                         # converged: both marginals
    torch.testing.assert_close(q.sum(1), torch.ones(b, dtype=dtype), rtol=0, atol=tol)
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k, dtype=dtype), rtol=0, atol=b * tol)


def test_matches_an_independent_float64_reimplementation_half_step_for_half_step():
    for seed, (b, k), epsilon in [(0, (32, 8), 0.05), (1, (10, 25), 0.1), (2, (7, 3), 0.03)]:
        s = _scores(b, k, seed=seed)
        for iterations in (1, 3, 10):
            want = torch.from_numpy(_reference(s.numpy(), epsilon, iterations))
            torch.testing.assert_close(sinkhorn(s, epsilon, iterations), want, rtol=1e-10, atol=1e-15)
            got32 = sinkhorn(s.float(), epsilon, iterations)
            torch.testing.assert_close(got32.double(), want, rtol=2e-5, atol=1e-9)


def test_constant_and_per_prototype_offsets_cancel_so_the_max_shift_is_safe():
    s = _scores()
    q = sinkhorn(s, 0.05, 3)
    # a global constant cancels in the first normalisation: S + 100 (S/ε = 2000, exp overflows float64) gives q
    torch.testing.assert_close(sinkhorn(s + 100.0, 0.05, 3), q, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(sinkhorn((s + 100.0).float(), 0.05, 3)).all()
    assert not torch.isfinite(torch.exp((s + 100.0).float() / 0.05)).all()   # what the unshifted reference meets
    # a per-prototype constant is a diagonal scaling that the first prototype normalisation removes
    offsets = torch.linspace(-0.5, 0.5, s.shape[1], dtype=s.dtype)
    torch.testing.assert_close(sinkhorn(s + offsets, 0.05, 3), q, rtol=1e-9, atol=1e-12)


def test_float32_without_gradient_whatever_autocast_and_input_precision():
    s = _scores(dtype=torch.float32).requires_grad_()
    q = sinkhorn(s, 0.05, 3)
    assert not q.requires_grad and q.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sinkhorn(s, 0.05, 3)
        low = sinkhorn(s.detach().bfloat16(), 0.05, 3)
    assert inside.dtype == torch.float32 and torch.equal(inside, q)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, sinkhorn(s.detach().bfloat16().float(), 0.05, 3), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ ε → 0
def test_small_epsilon_tends_to_the_optimal_transport_permutation():
    """B = K = 8, the planted permutation π dominant (+1 over U(0, 0.3) noise), and one prototype made the favourite
    of every sample (+1.2 on its column): the per-sample argmax puts all on it, but a column constant does not change
    the transport problem under equipartition (every permutation uses each column once), so the optimal plan is π
    (checked with the Hungarian algorithm), and the codes tend to it as ε shrinks."""
    rng = np.random.default_rng(3)
    n = 8
    perm = rng.permutation(n)
    s = 0.3 * rng.random((n, n))
    s[np.arange(n), perm] += 1.0
    s[:, perm[0]] += 1.2
    assert (s.argmax(1) == perm[0]).all()                                  # greedy: one cluster takes all
    assert (linear_sum_assignment(-s)[1] == perm).all()                    # the optimal transport plan: π
    plan = np.zeros((n, n))
    plan[np.arange(n), perm] = 1.0
    errors = []
    for epsilon in (0.5, 0.2, 0.1, 0.05, 0.02):
        q = sinkhorn(torch.from_numpy(s), epsilon, 1000).numpy()
        errors.append(np.abs(q - plan).max())
        assert (q.argmax(1) == perm).all()
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))   # closer as ε shrinks
    assert errors[0] > 0.3 and errors[-1] < 1e-12


# ------------------------------------------------------------------------------------------------ 2 processes
WORLD = 2


def _worker(rank, port, cases, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = []
        for scores, sizes, epsilon, iterations in cases:
            start = sum(sizes[:rank])
            mine = torch.from_numpy(scores[start:start + sizes[rank]])
            out.append(sinkhorn(mine, epsilon, iterations).numpy())
        queue.put((rank, out))   # numpy: a tensor would travel as a handle that dies with this process
    finally:
        close_group()


def test_two_processes_give_the_rows_of_the_one_process_result_on_the_whole_batch():
    cases = [(_scores(16, 5, dtype=torch.float32).numpy(), (8, 8), 0.05, 3),      # equal halves, as SwAV
             (_scores(16, 5, seed=1).numpy(), (5, 11), 0.05, 3),                 # unequal: B is the sum
             ((_scores(12, 6, seed=2) + 3.0).numpy(), (6, 6), 0.02, 20)]          # the global max shift agrees
    got = run_processes(_worker, WORLD, cases)
    for case, (scores, _, epsilon, iterations) in enumerate(cases):
        whole = sinkhorn(torch.from_numpy(scores), epsilon, iterations)
        both = torch.cat([torch.from_numpy(out[case]) for _, out in got])
        rtol = 1e-6 if whole.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(both, whole, rtol=rtol, atol=1e-12)


# ------------------------------------------------------------------------------------------------ refusals
def test_bad_input_is_refused_naming_the_value():
    s = _scores()
    for epsilon in (0, -0.1, float("nan"), float("inf"), "0.05", None):
        with pytest.raises(UserError, match=f"epsilon must be a positive number.*got {epsilon!r}"):
            sinkhorn(s, epsilon)
    for iterations in (0, -3, 1.5, True):
        with pytest.raises(UserError, match=f"iterations must be an integer >= 1.*got {iterations!r}"):
            sinkhorn(s, 0.05, iterations)
    for shape in ((8,), (2, 4, 8)):
        with pytest.raises(UserError, match=rf"2-d B × K.*got shape {shape}".replace("(", r"\(").replace(")", r"\)")):
            sinkhorn(torch.zeros(shape), 0.05)
    with pytest.raises(UserError, match="at least one prototype"):
        sinkhorn(torch.zeros(4, 0), 0.05)
    with pytest.raises(UserError, match="at least one sample"):
        sinkhorn(torch.zeros(0, 4), 0.05)
