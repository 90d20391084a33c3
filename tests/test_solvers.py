"""The task-weight solvers (``mtl.weighting.solvers``) against scipy on hundreds of Gramians.

scipy is an independent solver of the same problems: SLSQP on the simplex problems (MGDA's
min-norm point, CAGrad's inner problem), NNLS for ``nonneg_qp`` (with b = −Gc the problem is
min_{λ ≥ 0} ½||Jᵀ(λ + c)||², as for UPGrad and DualProj), L-BFGS-B for Nash-MTL's convex
potential. Weights may not be unique (T > rank J), so objective values are compared: ours
must be feasible and at least as good as scipy's, up to a tolerance relative to the scale
of the problem. Where a certificate exists (MGDA's Frank-Wolfe gap) it is checked too.
"""

import numpy as np
import pytest
import torch
from scipy import optimize

from mtl.weighting import solvers

pytestmark = pytest.mark.usefixtures("one_thread")  # T × T solves: launch-bound

# 10 Gramians per test by default, 200 with the slow tests (`-m "slow or not slow"`).
SEEDS = [seed if seed < 10 else pytest.param(seed, marks=pytest.mark.slow) for seed in range(200)]


def jacobian(seed: int) -> np.ndarray:
    """A random J [T, D]: even seeds are plain Gaussian rows with norms over 4 decades; odd seeds
    are ill-conditioned, in turn rank-deficient (T > rank), with nearly parallel rows, or with
    norms over 8 decades."""
    rng = np.random.default_rng(seed)
    T = int(rng.integers(2, 11))
    D = int(rng.integers(2, 30))
    J = rng.standard_normal((T, D))
    if seed % 2:
        kind = (seed // 2) % 3
        if kind == 0:
            rank = int(rng.integers(1, T))
            J = rng.standard_normal((T, rank)) @ rng.standard_normal((rank, D))
        elif kind == 1:
            J[1:] = J[0] + 1e-5 * rng.standard_normal((T - 1, D)) * rng.choice([-1.0, 1.0], (T - 1, 1))
        else:
            J *= np.logspace(-4, 4, T)[rng.permutation(T), None]
            return J
    return J * np.logspace(-2, 2, T)[rng.permutation(T), None]


def gramian(J: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(J @ J.T)


def slsqp_on_simplex(f, grad, T: int) -> np.ndarray:
    start = np.full(T, 1.0 / T)
    result = optimize.minimize(
        f, start, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * T,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    # SLSQP can end slightly off the simplex (a sum of 1 + 4e-4 was seen), where the objective
    # may be lower than anywhere on it: compare at its point put back on the simplex.
    x = result.x.clip(min=0.0)
    return x / x.sum()


def assert_on_simplex(w: np.ndarray) -> None:
    assert (w >= -1e-12).all() and abs(w.sum() - 1.0) < 1e-9


@pytest.mark.parametrize("seed", SEEDS)
def test_min_norm_weights_against_slsqp(seed):
    J = jacobian(seed)
    G = J @ J.T
    scale = G.diagonal().max()
    ours = solvers.min_norm_weights(gramian(J)).numpy()
    assert_on_simplex(ours)
    value = ours @ G @ ours
    reference = slsqp_on_simplex(lambda a: a @ G @ a, lambda a: 2 * G @ a, len(G))
    assert value <= reference @ G @ reference + 1e-9 * scale
    # Frank-Wolfe gap: f(α) − f* ≤ 2(αᵀGα − min_t (Gα)_t).
    assert 2 * (value - (G @ ours).min()) <= 1e-8 * scale


# Known failures, not fixed: with c = 2 on rank-deficient J, where 0 is in the hull of the g_t
# (f's root term has unbounded curvature there), the interior-point iterates of
# cagrad_weights cycle and end up to 1e-2·max ||g_t||² above SLSQP's value. Allowing more
# backtracking halvings (6 → 30) removed these but left other problems unconverged in 50
# iterations (off the simplex). Strict: a fix makes these tests pass and must remove them here.
CAGRAD_KNOWN_FAILURES = {(2.0, seed) for seed in (7, 19, 67, 85, 103, 127, 133, 136, 150, 164, 181)}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("c", [0.4, 2.0])
def test_cagrad_weights_against_slsqp(seed, c, request):
    if (c, seed) in CAGRAD_KNOWN_FAILURES:
        request.applymarker(pytest.mark.xfail(strict=True, reason="cagrad_weights cycles where 0 is in the hull"))
    J = jacobian(seed)
    G = J @ J.T
    T = len(G)
    a = G.mean(axis=1)
    c0 = c * np.sqrt(max(G.mean(), 0.0))

    def f(w):
        return w @ a + c0 * np.sqrt(max(w @ G @ w, 0.0))

    def grad(w):
        root = np.sqrt(max(w @ G @ w, 1e-300))
        return a + c0 * G @ w / root

    ours = solvers.cagrad_weights(gramian(J), c).numpy()
    assert_on_simplex(ours)
    reference = slsqp_on_simplex(f, grad, T)
    scale = G.diagonal().max()
    assert f(ours) <= f(reference) + 1e-8 * scale


@pytest.mark.parametrize("seed", SEEDS)
def test_nonneg_qp_against_nnls(seed):
    J = jacobian(seed)
    G = J @ J.T
    T = len(G)
    rng = np.random.default_rng(10_000 + seed)
    C = np.concatenate([np.eye(T), np.full((T, 1), 1.0 / T), rng.random((T, 2))], axis=1)  # UPGrad, DualProj, others
    ours = solvers.nonneg_qp(gramian(J), torch.from_numpy(-G @ C)).numpy()
    assert (ours >= 0).all()
    for k in range(C.shape[1]):
        reference, _ = optimize.nnls(J.T, -J.T @ C[:, k], maxiter=50 * T)
        def f(lam):
            return 0.5 * lam @ G @ lam + (G @ C[:, k]) @ lam
        # The solver's ridge (1e-8 on the unit-diagonal problem) costs at most about
        # 1e-8·Σ_t ||g_t||² λ_t², far below this tolerance at these scales.
        scale = G.diagonal().max() * max(1.0, np.abs(C[:, k]).sum()) ** 2
        assert f(ours[:, k]) <= f(reference) + 1e-7 * scale


def _well_posed(seed: int) -> bool:
    """Gα = 1/α has no solution where a non-negative combination of the g_t vanishes, which
    needs a singular G (see solvers.nash_weights): Nash-MTL is compared where the cosine
    matrix is safely non-singular."""
    J = jacobian(seed)
    norms = np.linalg.norm(J, axis=1)
    return np.linalg.eigvalsh((J / norms[:, None]) @ (J / norms[:, None]).T).min() > 1e-6


@pytest.mark.parametrize("seed", [s for s in SEEDS if _well_posed(getattr(s, "values", [s])[0])])
def test_nash_weights_against_lbfgsb(seed):
    J = jacobian(seed)
    G = J @ J.T
    d = 1 / np.sqrt(G.diagonal())

    def phi(alpha):  # ½αᵀGα − Σ log α: convex, minimized where Gα = 1/α
        return 0.5 * alpha @ G @ alpha - np.log(alpha).sum()

    ours = solvers.nash_weights(gramian(J)).numpy()
    assert (ours > 0).all()
    result = optimize.minimize(
        phi, d, jac=lambda x: G @ x - 1 / x, method="L-BFGS-B",
        bounds=[(1e-12 * x, None) for x in d], options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000},
    )
    assert phi(ours) <= phi(result.x) + 1e-9 * len(G)
    np.testing.assert_allclose(G @ ours * ours, 1.0, rtol=1e-6)
