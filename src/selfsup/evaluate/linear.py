"""Many-shot linear probe of frozen features (Ericsson et al. 2021, §3 "Many-shot linear").

Protocol (paper §3 and their code, linusericsson/ssl-transfer ``linear.py``):

- multinomial logistic regression on the frozen features, no feature standardisation;
- L2 strength ``wd`` over ``logspace(-6, 5, 45)``, ``C = 1 / wd``, i.e. scikit-learn's objective
  ``C · Σ_i CE(W x_i + b, y_i) + ½‖W‖²`` (the bias is not penalised), L-BFGS with ``max_iter = 100``
  and scikit-learn's gradient tolerance ``tol = 1e-4``;
- ``wd`` chosen by the validation metric (official val split, else a seeded 20 % of train, supplied
  by the caller), first best wins when walking the grid from weak to strong (their strict ``>``);
- refit on train + val with the chosen ``wd``; score the test split (top-1 or mean per-class).

What is ours, and why. Measured on 40k × 512 CIFAR-10 stand-in features (random ReLU features of
the real pixels), 10 classes, on 2 CPU cores shared with other jobs (so: ratios, not absolute times;
``benchmarks/bench_linear.py`` prints current numbers). scikit-learn's loop: ~1,300 L-BFGS iterations
over the 45 strengths + 100 for the refit, 100-220 s; ours: ~100 loss evaluations, 2-13 s, the same
chosen ``wd`` and test accuracy within 0.01 points (16-50x). On more separable stand-in features
(95 % test accuracy): 31x, ``wd`` one grid step apart on a val tie (94.59 vs 94.58), test +0.04.

- **Own L-BFGS in torch, float32, full batch.** An evaluation is two memory-bound GEMMs over ``X``
  (``Z = X Wᵀ``, then ``G = R X`` with the residual ``R = softmax − onehot`` laid out classes ×
  samples) plus O(n·k) work: log-softmax over the strided class axis (15x faster on CPU than over a
  contiguous axis of 10; ``logsumexp`` is slower still), residual in place, loss summed in float64 so
  that line searches still see decreases of 1e-7. Two-loop recursion with 10 pairs (scipy's
  ``maxcor``), Armijo backtracking with quadratic interpolation (one evaluation per iteration almost
  always; the objective is convex, so ``sᵀy ≥ 0`` holds without a curvature test).
- **The objective is scaled like scikit-learn's** (``mean CE + wd / (2n) ‖W‖²``, theirs divided by
  ``C·n``) so that ``tol`` means the same thing: iterate until ``max |∇| ≤ tol`` (scipy's ``pgtol``).
- **Preconditioning** (:class:`_Precond`): ``H0`` of L-BFGS is a Gauss-Newton approximation built from
  the feature covariance (one Gram matrix and one ``eigh`` per data set, 0.3 s here). Raw frozen
  features have a large mean and a fast-decaying spectrum, which the ``γI`` of plain L-BFGS handles
  badly. Largest single win: 1,298 → 198 evaluations for the whole path.
- **A warm-started path from strong to weak regularisation.** Their code chains warm starts from weak
  to strong (``logspace`` order): the weakest fits start from zero and use all 100 iterations, and
  each stronger fit must shrink a large ``W``. From strong to weak each fit starts next to its
  solution (3-8 iterations here). The curvature pairs are carried along the path, corrected exactly
  for the change of λ (``y += Δλ·s``; 198 → 148 evaluations), and ``f, ∇f`` at the warm start are
  obtained from the previous fit without a data pass (148 → 104).
- **Early stopping along the path** (``search="early_stop"``, the CPU default): walking towards weaker
  regularisation, stop once the validation score has stayed more than ``margin`` below the best for
  ``patience`` consecutive strengths (default 4, about a decade of the grid); ``margin`` defaults to
  two binomial standard errors of the best val accuracy, ``200·sqrt(p(1−p)/n_val)`` points, so only a
  drop that is clearly not noise counts. Skipped strengths are listed in ``skipped``. On a plateau
  (common: at weak λ scikit-learn's ``tol`` is met after 0 iterations, for them and for us) nothing
  is skipped and nothing is lost, as those fits cost no data pass. It chose the full path's ``wd`` on
  every data set tried (tests/evaluate/test_linear.py checks one).
- **All strengths at once** (``search="batched"``, the CUDA default): the problems share ``X``, so one
  ``X Wᵀ`` with ``45·k`` columns evaluates all of them; each problem has its own step, history and
  stopping test. All start from zero (with the preconditioner the weakest converge in ~20
  iterations). On the CPU this is compute-bound and slower than the path (36 s here).
- Tried and dropped: coarse-to-fine over the grid (every 4th strength, then ±4 steps around the coarse
  peak): 124 evaluations vs 104 for the whole path, since each warm start is farther away.
- **Refit warm-started from the chosen train-only solution**, not from the last fit of the loop as in
  their code (``warm_start=True`` carries the ``wd = 1e5`` coefficients into their refit). Same
  100-iteration budget; ours starts next to the answer (5-10 iterations vs their 100, unconverged).

Convergence is reported, never hidden: per fitted strength, the L-BFGS iterations used and whether
``max |∇| ≤ tol`` was reached (a fit that hits ``max_iter`` or whose line search can make no more
progress in float32 is reported as not converged). Their code suppresses scikit-learn's
``ConvergenceWarning``; we return it as data and leave printing to the caller.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(300, 5, generator=g); y = (x[:, 0] > 0).long()
>>> r = linear_probe(x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:], num_classes=2)
>>> r.test_score > 90
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError
from selfsup.evaluate.metrics import score

__all__ = ["DEFAULT_STRENGTHS", "LinearProbeResult", "fit_logistic", "linear_probe", "predict"]

# Ericsson et al.: torch.logspace(-6, 5, 45). Computed in float64 here; theirs is float32 (their C
# values differ from ours in the 7th digit).
DEFAULT_STRENGTHS: tuple[float, ...] = tuple(float(w) for w in np.logspace(-6, 5, 45))
_SEARCHES = ("auto", "path", "early_stop", "batched")
PRECONDITION_MAX_DIM = 2048
# Rows × (problems · classes) per block of the loss evaluation: bounds the logits' memory (64 MiB on
# CPU, where blocks also keep the working set small; 512 MiB on GPU, where fewer launches matter).
_BLOCK_ELEMENTS = {"cpu": 2**24, "cuda": 2**27}
# Solver state of one batched solve (search="batched"); more strengths than fit are solved in groups.
_BATCH_BYTES = 2**32


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`; strengths (``wd``) are the dictionaries' keys."""

    test_score: float
    best_wd: float
    metric: str
    val_scores: dict[float, float]  # wd -> validation metric, for the strengths actually fitted
    iterations: dict[float, int]  # wd -> L-BFGS iterations of its train-only fit
    converged: dict[float, bool]  # wd -> max|grad| <= tol reached within max_iter
    refit_converged: bool
    skipped: list[float]  # strengths not fitted because the search proved/declared them unnecessary
    seconds: float
    search: str = "path"  # the search actually run ("auto" resolved)
    refit_iterations: int = 0
    coef: Tensor | None = None  # the refit classifier [W | b], (k, d + 1), on the CPU: predict(coef, x)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Objective: f_b(θ) = mean_i CE(W_b x_i + c_b, y_i) + λ_b/2 ‖W_b‖², λ_b = wd_b / n, for B problems at once.
# θ has shape (B, k, d + 1): the last column is the (unpenalised) bias.


def _loss_grad(x: Tensor, y: Tensor, theta: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Objective (float64, (B,)), gradient (like ``theta``) and curvature weight (B,) of B problems.

    The curvature weight ``c = mean_i (1 - Σ_j p_ij²) / (k - 1)`` is the average eigenvalue of the
    per-sample softmax Hessian ``diag(p) - p pᵀ``; the preconditioner uses it (see :class:`_Precond`).
    """
    n, d = x.shape
    nb, k, _ = theta.shape
    w = theta[:, :, :d].reshape(nb * k, d)
    bias = theta[:, :, d].reshape(nb * k)
    grad_w = torch.zeros(nb * k, d, dtype=theta.dtype, device=theta.device)
    grad_b = torch.zeros(nb * k, dtype=theta.dtype, device=theta.device)
    ce = torch.zeros(nb, dtype=torch.float64, device=theta.device)
    sq = torch.zeros(nb, dtype=theta.dtype, device=theta.device)
    rows = max(1, _BLOCK_ELEMENTS.get(x.device.type, 2**24) // (nb * k))
    for start in range(0, n, rows):
        xb, yb = x[start : start + rows], y[start : start + rows]
        m = xb.shape[0]
        # X Wᵀ is the fast GEMM shape (W X^T is 1.5x slower on CPU), but the softmax wants the logits
        # laid out (classes, samples): it then reduces over a strided axis of length k, vectorised
        # along the samples, 15x faster on CPU than over a contiguous axis of 10. The transposed copy
        # is O(n·k), cheap next to either.
        logits = torch.addmm(bias, xb, w.T).T.contiguous()
        logp = F.log_softmax(logits.view(nb, k, m), dim=1)
        index = yb.view(1, 1, m).expand(nb, 1, m)
        ce -= logp.gather(1, index).view(nb, m).sum(1, dtype=torch.float64)
        resid = logp.exp_()  # softmax probabilities, in place
        sq += resid.square().sum((1, 2))
        resid.scatter_add_(1, index, resid.new_full((nb, 1, m), -1.0))
        resid = resid.view(nb * k, m)
        grad_w.addmm_(resid, xb)  # Rᵀ X, a plain row-major GEMM in this layout
        grad_b += resid.sum(1)
    w3 = w.view(nb, k, d)
    grad = torch.cat([grad_w.view(nb, k, d) / n + lam.view(nb, 1, 1) * w3, grad_b.view(nb, k, 1) / n], dim=2)
    penalty = 0.5 * lam.double() * w3.double().pow(2).sum((1, 2))
    curvature = ((1.0 - sq / n) / max(k - 1, 1)).clamp_min(1e-4)
    return ce / n + penalty, grad, curvature


class _Precond:
    """Initial inverse Hessian ``H0`` of L-BFGS: Gauss-Newton with the softmax coupling averaged out.

    The data term's Hessian is ``E[(diag(p) - ppᵀ) ⊗ x̃x̃ᵀ]`` with ``x̃ = (x, 1)``. Replacing the softmax
    factor by its mean eigenvalue ``c`` and centring ``x`` (the change of variables ``b' = b + Wμ``,
    exact because the bias is not penalised) gives the block-diagonal approximation
    ``(c·Cov + λI)`` for each class's weights and ``c`` for its bias. With ``Cov = V diag(σ) Vᵀ``
    computed once per data set, ``H0 = T · blockdiag((c·Cov + λI)⁻¹, 1/c) · Tᵀ`` costs two (k × d)·(d × d)
    products per iteration, for any λ and c. Raw features are far from isotropic (their mean direction
    alone dwarfs the rest, and the covariance spectrum decays fast), which is what makes the plain
    ``γI`` of L-BFGS slow here.
    """

    def __init__(self, mean: Tensor, evals: Tensor, evecs: Tensor, lam: Tensor):
        self.mean, self.evals, self.evecs, self.lam = mean, evals, evecs, lam

    @staticmethod
    def spectrum(total: Tensor, gram: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, covariance eigenvalues and eigenvectors from ``Σ x`` and ``Σ x xᵀ`` (float64)."""
        mean = total / n
        evals, evecs = torch.linalg.eigh(gram / n - torch.outer(mean, mean))
        return mean.to(dtype), evals.clamp_min(0).to(dtype), evecs.to(dtype)

    def __call__(self, q: Tensor, c: Tensor) -> Tensor:
        d = self.mean.shape[0]
        qb = q[..., d]
        qw = q[..., :d] - qb.unsqueeze(-1) * self.mean  # Tᵀ
        scale = c.view(-1, 1, 1) * self.evals + self.lam.view(-1, 1, 1)
        qw = ((qw @ self.evecs) / scale) @ self.evecs.T
        qb = qb / c.view(-1, 1)
        return torch.cat([qw, (qb - qw @ self.mean).unsqueeze(-1)], dim=-1)  # T


@dataclass
class _FitInfo:
    iterations: Tensor  # (B,) long
    converged: Tensor  # (B,) bool
    evaluations: int
    pairs: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    f: Tensor | None = None  # objective, gradient and curvature weight at the returned θ
    g: Tensor | None = None
    curvature: Tensor | None = None


def _lbfgs(
    fun: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    theta: Tensor,
    max_iter: int,
    tol: float,
    precond: Callable[[Tensor, Tensor], Tensor] | None = None,
    pairs: list[tuple[Tensor, Tensor, Tensor]] | None = None,
    history: int = 10,
    max_ls: int = 25,
    c1: float = 1e-4,
    start: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, _FitInfo]:
    """Batched L-BFGS: B independent problems stacked on dim 0, each with its own step and history.

    ``fun(θ) -> (f, ∇f, c)``; ``precond(q, c)`` applies ``H0`` (else ``γI``, γ = sᵀy / yᵀy). Stops a
    problem when ``max |∇f_b| ≤ tol`` (scipy's ``pgtol``, as scikit-learn uses it), when it has used
    ``max_iter`` iterations, or when its line search cannot decrease ``f_b`` any more.
    """
    nb = theta.shape[0]
    theta = theta.clone()
    f, g, curv = start if start is not None else fun(theta)
    evals = int(start is None)
    gmax = g.reshape(nb, -1).abs().amax(1)
    converged = gmax <= tol
    active = ~converged
    iters = torch.zeros(nb, dtype=torch.long, device=theta.device)
    pairs = list(pairs or [])  # (s, y, ρ) with ρ = 0 where a problem skipped the update
    gamma = torch.ones(nb, dtype=theta.dtype, device=theta.device)
    first = torch.full((nb,), not pairs and precond is None, dtype=torch.bool, device=theta.device)
    flat = (nb, -1)

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a.reshape(flat) * b.reshape(flat)).sum(1)

    def col(v: Tensor) -> Tensor:
        return v.view(nb, *([1] * (theta.ndim - 1)))

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        # Two-loop recursion (Nocedal & Wright, Alg. 7.4).
        q = -g
        alphas = []
        for s, yv, rho in reversed(pairs):
            a = rho * dot(s, q)
            q = q - col(a) * yv
            alphas.append(a)
        q = precond(q, curv) if precond is not None else q * col(gamma)
        for (s, yv, rho), a in zip(pairs, reversed(alphas), strict=True):
            q = q + col(a - rho * dot(yv, q)) * s
        direction = torch.where(col(active), q, torch.zeros_like(q))
        slope = dot(g, direction)
        # A non-descent direction can only come from round-off: fall back to steepest descent.
        bad = active & (slope >= 0)
        if bool(bad.any()):
            direction = torch.where(col(bad), -g, direction)
            slope = torch.where(bad, -dot(g, g), slope)
            first = first | bad
        # First step without curvature information: scipy/torch's 1/‖g‖₁ scaling of steepest descent.
        step = torch.where(first, 1.0 / g.reshape(flat).abs().sum(1).clamp_min(1e-12), torch.ones_like(gmax))
        step = step.clamp(max=1.0)

        pending = active.clone()
        new_theta, new_f, new_g, new_c = theta.clone(), f.clone(), g.clone(), curv.clone()
        for _ls in range(max_ls):
            cand = theta + col(step) * direction
            fc, gc, cc = fun(cand)
            evals += 1
            ok = pending & (fc <= f + c1 * step.double() * slope.double())
            new_theta = torch.where(col(ok), cand, new_theta)
            new_f, new_c = torch.where(ok, fc, new_f), torch.where(ok, cc, new_c)
            new_g = torch.where(col(ok), gc, new_g)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            # Minimiser of the quadratic through f(0), f'(0) and f(step), kept within [0.1, 0.5]·step.
            denom = 2.0 * (fc - f - slope.double() * step.double())
            t_quad = (-slope.double() * step.double() ** 2 / denom.clamp_min(1e-300)).to(step.dtype)
            step = torch.where(pending, torch.minimum(torch.maximum(t_quad, 0.1 * step), 0.5 * step), step)
        stalled = pending  # no decrease found: float32 round-off dominates, nothing more to gain

        s_new, y_new = new_theta - theta, new_g - g
        sy, yy = dot(s_new, y_new), dot(y_new, y_new)
        keep = active & ~stalled & (sy > 1e-10 * yy) & (yy > 0)
        rho = torch.where(keep, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        pairs.append((torch.where(col(keep), s_new, 0.0), torch.where(col(keep), y_new, 0.0), rho))
        if len(pairs) > history:
            pairs.pop(0)
        gamma = torch.where(keep, sy / yy.clamp_min(1e-30), gamma)
        first = first & ~keep

        moved = active & ~stalled
        iters += moved.long()
        theta, f, g, curv = new_theta, new_f, new_g, new_c
        gmax = g.reshape(flat).abs().amax(1)
        converged = converged | (active & (gmax <= tol))
        active = active & ~converged & ~stalled
    return theta, _FitInfo(iters, converged, evals, pairs, f, g, curv)


# --------------------------------------------------------------------------------------------------
# Public solver API


class _Objective:
    """One data set's multinomial logistic objective, with the moments the preconditioner needs."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int, precondition: bool = True,
                 moments: tuple[Tensor, Tensor] | None = None):
        self.x, self.y, self.k, self.precondition = x, y, num_classes, precondition
        self._moments = moments
        self._spectrum: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def moments(self) -> tuple[Tensor, Tensor]:
        """``(Σ x, Σ x xᵀ)`` in float64 (the Gram matrix is one n·d² product, done once)."""
        if self._moments is None:
            self._moments = (self.x.sum(0, dtype=torch.float64), (self.x.T @ self.x).double())
        return self._moments

    def fit(self, wds: Sequence[float], init: Tensor | None, max_iter: int, tol: float,
            pairs: list[tuple[Tensor, Tensor, Tensor]] | None = None,
            start: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, _FitInfo]:
        """Solve for each ``wd`` (a batch); ``start`` = ``(f, ∇f, c)`` at ``init`` if already known."""
        x = self.x
        n, d = x.shape
        lam = torch.tensor(list(wds), dtype=x.dtype, device=x.device) / n
        if init is None:
            init = torch.zeros(len(lam), self.k, d + 1, dtype=x.dtype, device=x.device)
        elif init.ndim == 2:
            init = init.unsqueeze(0).expand(len(lam), -1, -1)
        precond = None
        if self.precondition:
            if self._spectrum is None:
                self._spectrum = _Precond.spectrum(*self.moments, n, x.dtype)
            precond = _Precond(*self._spectrum, lam)
        return _lbfgs(lambda t: _loss_grad(x, self.y, t, lam), init.to(x.dtype), max_iter, tol, precond, pairs,
                      start=start)


def _reweight(info: _FitInfo, theta: Tensor, lam_old: float, lam_new: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(f, ∇f, c)`` at ``theta`` for penalty λ_new, from their values for λ_old: no data pass needed."""
    d = theta.shape[-1] - 1
    w = theta[..., :d]
    f = info.f + 0.5 * (lam_new - lam_old) * w.double().pow(2).sum((1, 2))
    g = info.g.clone()
    g[..., :d] += (lam_new - lam_old) * w
    return f, g, info.curvature


def _shift_pairs(pairs: list[tuple[Tensor, Tensor, Tensor]], delta_lam: float, d: int) -> list:
    """Curvature pairs of λ reused at λ + Δλ: the penalty adds exactly Δλ·s to y on the weights."""
    out = []
    for s, y, _rho in pairs:
        y = y.clone()
        y[..., :d] += delta_lam * s[..., :d]
        sy = (s * y).reshape(s.shape[0], -1).sum(1)
        out.append((s, y, torch.where(sy > 0, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))))
    return out


def fit_logistic(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    wd: float | Sequence[float],
    max_iter: int = 100,
    tol: float = 1e-4,
    init: Tensor | None = None,
    precondition: bool = True,
) -> tuple[Tensor, _FitInfo]:
    """Multinomial logistic regression with scikit-learn's objective ``C Σ CE + ½‖W‖²``, ``C = 1/wd``.

    ``x`` (n, d) float, ``y`` (n,) long, on the device the solve should run on. ``wd`` may be a sequence:
    then all strengths are solved at once as a batch. Returns ``theta`` of shape (k, d + 1) (or
    (B, k, d + 1) for a sequence) holding ``[W | b]``, and the convergence info.
    """
    batched = not isinstance(wd, int | float)
    wds = list(wd) if batched else [float(wd)]
    theta, info = _Objective(x, y, num_classes, precondition).fit(wds, init, max_iter, tol)
    return (theta if batched else theta[0]), info


def predict(theta: Tensor, x: Tensor) -> Tensor:
    """Class predictions ``argmax(W x + b)`` for ``theta = [W | b]`` of shape (k, d + 1)."""
    d = x.shape[1]
    return torch.addmm(theta[:, d], x, theta[:, :d].T).argmax(1)


def _two_standard_errors(best: float, n_val: int) -> float:
    """Two binomial standard errors of an accuracy of ``best`` % measured on ``n_val`` samples, in points.

    For mean per-class accuracy this is an approximation (exact for balanced classes).
    """
    p = min(max(best / 100.0, 0.0), 1.0)
    return 200.0 * math.sqrt(max(p * (1 - p), 1e-4) / max(n_val, 1))


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    metric: str = "top1",
    strengths: Sequence[float] | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    device: torch.device | str | None = None,
    search: str = "auto",
    patience: int = 4,
    margin: float | None = None,
    dtype: torch.dtype = torch.float32,
    precondition: bool | None = None,
    carry_history: bool = True,
) -> LinearProbeResult:
    """Ericsson et al.'s many-shot linear protocol: choose ``wd`` on val, refit on train+val, score test.

    ``search``: ``"path"`` fits every strength along a warm-started strong-to-weak path;
    ``"early_stop"`` (CPU default) stops that path once val has clearly peaked (``patience`` strengths
    in a row more than ``margin`` points below the best; ``margin=None`` means two standard errors of
    the best val accuracy); ``"batched"`` (CUDA default) solves all strengths at once from zero;
    ``"auto"`` picks by device. ``precondition`` and ``carry_history`` switch off the two solver
    accelerations (for comparison; the answer is the same up to ``tol``). ``precondition=None`` uses the
    preconditioner up to ``PRECONDITION_MAX_DIM`` features: it costs one d×d eigendecomposition, which
    pays off at pre-logits sizes (512 dims: 0.1 s against 0.9 s without) but not for the ~9,000-dim
    pooled taps of layer-wise probes (8,192 dims, 3,072 samples: 108 s against 8.6 s without; measured on
    the 2-core CPU of docs/BENCHMARKS.md).
    """
    t0 = time.perf_counter()
    if search not in _SEARCHES:
        raise UserError(f"search must be one of {_SEARCHES}, got {search!r}")
    device = torch.device(device) if device is not None else torch.as_tensor(train_x).device
    if search == "auto":
        search = "batched" if device.type == "cuda" else "early_stop"

    def prep(a: Tensor, kind: torch.dtype) -> Tensor:
        return torch.as_tensor(a).to(device=device, dtype=kind).contiguous()

    xtr, xva, xte = (prep(a, dtype) for a in (train_x, val_x, test_x))
    ytr, yva, yte = (prep(a, torch.long).reshape(-1) for a in (train_y, val_y, test_y))
    for name, xs, ys in (("train", xtr, ytr), ("val", xva, yva), ("test", xte, yte)):
        if xs.ndim != 2 or xs.shape[0] != ys.shape[0] or xs.shape[1] != xtr.shape[1]:
            raise UserError(f"{name}: features {tuple(xs.shape)} and labels {tuple(ys.shape)} do not match")
        if ys.numel() == 0:
            raise UserError(f"{name} split is empty")
        if int(ys.min()) < 0 or int(ys.max()) >= num_classes:
            raise UserError(f"{name} labels must lie in [0, {num_classes})")
    grid = sorted(float(w) for w in (strengths if strengths is not None else DEFAULT_STRENGTHS))
    if not grid or grid[0] <= 0:
        raise UserError("strengths must be a non-empty sequence of positive numbers")

    k, d, n = num_classes, xtr.shape[1], xtr.shape[0]
    if precondition is None:
        precondition = d <= PRECONDITION_MAX_DIM
    val_scores: dict[float, float] = {}
    iterations: dict[float, int] = {}
    converged: dict[float, bool] = {}
    notes: list[str] = []
    # Selection rule of their code: walking from weak to strong, keep the first strict maximum, i.e.
    # among tied val scores the weakest regularisation wins. ``keep`` applies it in any fitting order.
    chosen: dict = {"wd": None, "theta": None}

    def keep(wd: float, theta: Tensor) -> None:
        best = chosen["wd"]
        if best is None or (val_scores[wd], -wd) > (val_scores[best], -best):
            chosen.update(wd=wd, theta=theta)

    train = _Objective(xtr, ytr, k, precondition)
    if search == "batched":
        # θ, ∇f, the direction, 10 curvature pairs and temporaries: ~32 copies of θ per strength.
        group = max(1, _BATCH_BYTES // (32 * k * (d + 1) * xtr.element_size()))
        for first in range(0, len(grid), group):
            wds = grid[first : first + group]
            thetas, info = train.fit(wds, None, max_iter, tol)
            for i, wd in enumerate(wds):
                val_scores[wd] = score(metric, predict(thetas[i], xva), yva, k)
                iterations[wd], converged[wd] = int(info.iterations[i]), bool(info.converged[i])
                keep(wd, thetas[i])
    else:
        theta, info, lam_prev, wd_prev = None, None, 0.0, None
        best, below = -math.inf, 0
        for wd in reversed(grid):  # strong to weak: each fit starts next to its solution
            lam = wd / n
            start = pairs = None
            if info is not None:  # f, ∇f and curvature pairs of the previous fit, moved to the new λ
                start = _reweight(info, theta[None], lam_prev, lam)
                pairs = _shift_pairs(info.pairs, lam - lam_prev, d) if carry_history else None
            fitted, info = train.fit([wd], theta, max_iter, tol, pairs, start)
            theta, lam_prev = fitted[0], lam
            iterations[wd], converged[wd] = int(info.iterations[0]), bool(info.converged[0])
            if iterations[wd] == 0 and wd_prev is not None:
                val_scores[wd] = val_scores[wd_prev]  # θ did not move: same predictions
            else:
                val_scores[wd] = score(metric, predict(theta, xva), yva, k)
            keep(wd, theta)
            wd_prev = wd
            best = max(best, val_scores[wd])
            thresh = margin if margin is not None else _two_standard_errors(best, yva.numel())
            below = below + 1 if val_scores[wd] < best - thresh else 0
            if search == "early_stop" and below >= patience:
                notes.append(
                    f"early stop after wd={wd:.3g}: {patience} strengths in a row more than "
                    f"{thresh:.2f} points below the best val score {best:.2f}"
                )
                break
    skipped = [wd for wd in grid if wd not in val_scores]

    # Refit on train + val, warm-started from the chosen train-only solution. Their code starts it
    # from the last fit of their loop (wd = 1e5), a worse start within the same 100 iterations.
    xall, yall = torch.cat([xtr, xva]), torch.cat([ytr, yva])
    moments = None
    if precondition:  # train+val moments = train's + val's: only the (smaller) val Gram is new work
        moments = tuple(a + b for a, b in zip(train.moments, _Objective(xva, yva, k).moments, strict=True))
    refit = _Objective(xall, yall, k, precondition, moments)
    theta, info = refit.fit([chosen["wd"]], chosen["theta"], max_iter, tol)
    theta = theta[0]
    return LinearProbeResult(
        test_score=score(metric, predict(theta, xte), yte, k),
        best_wd=chosen["wd"],
        metric=metric,
        val_scores=val_scores,
        iterations=iterations,
        converged=converged,
        refit_converged=bool(info.converged[0]),
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        search=search,
        refit_iterations=int(info.iterations[0]),
        coef=theta.detach().cpu(),
        notes=notes,
    )
