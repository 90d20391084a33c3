"""Small torch-native solvers on a task Gramian ``G = J Jᵀ`` ``[T, T]``.

The gradient methods reduce to tiny problems over task weights. They are solved here on G's
device, in float64 (the problems are ``T × T``: the cost is kernel launches, not arithmetic,
and float64 makes the tolerances below meaningful), without cvxpy or scipy:

- ``min_norm_weights``: α = argmin_{α ∈ Δ} αᵀGα, the min-norm point of the convex hull of
  the rows of J (MGDA). Closed form for T ≤ 2, the interior-point method below otherwise.
- ``nonneg_qp``: λ = argmin_{λ ≥ 0} ½λᵀGλ − bᵀλ for several right-hand sides b at once
  (UPGrad, DualProj).
- ``cagrad_weights``: w = argmin_{w ∈ Δ} g_wᵀg_0 + c·||g_0||·||g_w|| (CAGrad).
- ``nash_weights``: α > 0 with Gα = 1/α (Nash-MTL), by damped Newton steps.

Δ is the probability simplex. The interior-point method (primal-dual, Newton steps on the
KKT conditions with the objective's exact Hessian) takes 10–20 iterations whatever the
conditioning of G (up to 35 for CAGrad's non-quadratic objective on degenerate inputs), and
stops when every KKT residual is below ``tol`` on the problem scaled to unit diagonal (so
relative to ||g_t||²). Convergence is checked every ``CHECK_EVERY`` iterations; those checks
and the error check of one eigendecomposition (``_psd``) are the only host synchronizations.
"""

from __future__ import annotations

from typing import Callable

import torch

DTYPE = torch.float64
TOL = 1e-12
MAX_ITER = 50
CHECK_EVERY = 5
_RIDGE = 1e-13  # keeps Newton systems positive definite where G is singular (T > rank J)
_ZERO = 1e-30  # see nonzero
_NNQP_RIDGE = 1e-8  # see nonneg_qp
_SMOOTH = 1e-16  # see cagrad_weights
_TO_BOUNDARY = 0.99  # fraction of the step to the boundary of the positive orthant

# x [K, T] -> (gradient [K, T], Hessian [T, T] or [K, T, T]) of a convex objective f.
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# x [..., T] -> f(x) [...], for a line search.
Value = Callable[[torch.Tensor], torch.Tensor]


def gramian(J: torch.Tensor) -> torch.Tensor:
    """G = J Jᵀ in float64, J multiplied in float32 when it is half precision."""
    J = J.float() if J.dtype in (torch.float16, torch.bfloat16) else J
    return (J @ J.T).to(DTYPE)


def _psd(G: torch.Tensor) -> torch.Tensor:
    """G in float64 with the negative eigenvalues that rounding gives a singular Gramian
    (T > rank J, a float32 product) set to 0: the problems below need it convex. Done on
    DGD, D = diag(G)^-½, so that small gradients keep their relative precision."""
    G = G.to(DTYPE)
    d = inverse_norms(G)
    values, vectors = torch.linalg.eigh(d[:, None] * G * d[None, :])
    return (vectors * values.clamp_min(0)) @ vectors.T / (d[:, None] * d[None, :])


def _scale(G: torch.Tensor) -> torch.Tensor:
    """The largest diagonal entry (the largest ||g_t||²); 1 when G is zero."""
    top = G.diagonal().max()
    return torch.where(top > 0, top, torch.ones_like(top))


def nonzero(G: torch.Tensor) -> torch.Tensor:
    """Tasks whose ||g_t||² exceeds 1e-30·max_s ||g_s||².

    The problems below are solved on DGD (D = diag(G)^-½), where a small gradient keeps its
    relative precision, so only a gradient that is zero up to underflow is left out; a
    threshold of 1e-13 on ||g_t||² dropped the constraints of tasks whose gradients were
    7 decades smaller than the largest (checked against scipy in tests/test_solvers.py)."""
    return G.diagonal() > _ZERO * _scale(G)


def inverse_norms(G: torch.Tensor) -> torch.Tensor:
    """1/||g_t|| = diag(G)^-½, with the largest ||g_t|| standing in for zero gradients."""
    return torch.where(nonzero(G), G.diagonal(), _scale(G)).rsqrt()


def _step_to_boundary(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Per row, the largest a ≤ 1 with v + a·dv ≥ 0 (v > 0)."""
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, float("inf")))
    return ratio.amin(dim=-1, keepdim=True).clamp(max=1.0)


def _interior_point(
    objective: Objective,
    x: torch.Tensor,
    simplex: bool,
    tol: float,
    max_iter: int,
    value: Value | None = None,
) -> torch.Tensor:
    """Rows x ``[K, T]`` minimizing K convex objectives f_k(x) s.t. x ≥ 0 (and 1ᵀx = 1 if
    ``simplex``), from the strictly positive start ``x``.

    KKT: ∇f(x) − ζ1 − s = 0, s ≥ 0, x∘s = 0 (ζ only with the simplex constraint). Each
    iteration takes a Newton step on these equations with x∘s relaxed towards σ·mean(x∘s),
    solving (∇²f + diag(s/x)) dx = r by Cholesky, batched over the K problems. For a
    quadratic f, Mehrotra's predictor-corrector sets σ. Otherwise ``value`` (f itself) is
    given: σ = 0.1 and the step is shortened by backtracking on the barrier merit
    f(x) − μ·Σ log x, without which Newton's model of a non-quadratic f can cycle.
    """
    K, T = x.shape
    eye = torch.eye(T, dtype=x.dtype, device=x.device)
    ones = torch.ones_like(x)
    s = ones.clone()
    zeta = torch.zeros(K, 1, dtype=x.dtype, device=x.device)
    for it in range(max_iter):
        gradient, hessian = objective(x)
        r_dual = gradient - zeta - s
        r_primal = x.sum(dim=1, keepdim=True) - 1.0 if simplex else torch.zeros_like(zeta)
        gap = (x * s).mean(dim=1, keepdim=True)
        if it and it % CHECK_EVERY == 0 and torch.stack([r_dual.abs().max(), r_primal.abs().max(), gap.max()]).max() <= tol:
            break
        factor, _ = torch.linalg.cholesky_ex(hessian + torch.diag_embed(s / x) + _RIDGE * eye)
        unit = torch.cholesky_solve(ones.unsqueeze(-1), factor).squeeze(-1) if simplex else None

        def direction(r_center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # s∘dx + x∘ds = r_center gives ds = (r_center − s∘dx)/x, which leaves
            # (∇²f + diag(s/x)) dx − dζ·1 = r_center/x − r_dual, and on the simplex 1ᵀdx = −r_primal.
            dx = torch.cholesky_solve((r_center / x - r_dual).unsqueeze(-1), factor).squeeze(-1)
            d_zeta = torch.zeros_like(zeta)
            if simplex:
                d_zeta = -(r_primal + dx.sum(dim=1, keepdim=True)) / unit.sum(dim=1, keepdim=True)
                dx = dx + d_zeta * unit
            return dx, (r_center - s * dx) / x, d_zeta

        if value is None:
            # Predictor: the pure Newton step; its gap after the step to the boundary sets σ.
            dx, ds, _ = direction(-x * s)
            step = torch.minimum(_step_to_boundary(x, dx), _step_to_boundary(s, ds))
            gap_affine = ((x + step * dx) * (s + step * ds)).mean(dim=1, keepdim=True)
            sigma = (gap_affine / gap.clamp_min(torch.finfo(x.dtype).tiny)).clamp(max=1.0) ** 3
            # Corrector: centred, with the predictor's second-order term.
            dx, ds, d_zeta = direction(sigma * gap - x * s - dx * ds)
            step = _TO_BOUNDARY * torch.minimum(_step_to_boundary(x, dx), _step_to_boundary(s, ds))
        else:
            mu = 0.1 * gap
            dx, ds, d_zeta = direction(mu - x * s)
            step = _TO_BOUNDARY * torch.minimum(_step_to_boundary(x, dx), _step_to_boundary(s, ds))
            step = _backtrack(value, x, dx, ((gradient - mu / x) * dx).sum(dim=1, keepdim=True), mu, step)
        x, s, zeta = x + step * dx, s + step * ds, zeta + step * d_zeta
    return x


def _backtrack(value: Value, x: torch.Tensor, dx: torch.Tensor, slope: torch.Tensor, mu: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per row, the longest of step·2^-j (j < 6) meeting Armijo's condition on the barrier merit
    f(x) − μ·Σ log x (slope: its derivative along dx), tried all at once so that nothing syncs.
    When none does, the full step: only rounding hides the decrease then, near the solution."""
    steps = step * 0.5 ** torch.arange(6, dtype=x.dtype, device=x.device)  # [K, J]
    candidates = x.unsqueeze(1) + steps.unsqueeze(-1) * dx.unsqueeze(1)  # [K, J, T]
    merit = value(candidates) - mu * candidates.log().sum(dim=-1)
    current = value(x.unsqueeze(1)) - mu * x.log().sum(dim=-1, keepdim=True)
    accepted = merit <= current + 1e-4 * steps * slope
    return steps.gather(1, accepted.to(torch.uint8).argmax(dim=1, keepdim=True))


def nonneg_qp(G: torch.Tensor, B: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER) -> torch.Tensor:
    """Columns λ_k = argmin_{λ ≥ 0} ½λᵀGλ − b_kᵀλ for the columns b_k of B ``[T, K]``.

    Solved as λ = ρ_k·Dλ' on G' = DGD + εI, b' = Db_k/ρ_k, with D = diag(G)^-½ (which keeps
    λ ≥ 0) and ρ_k = max |Db_k|: a unit-scale problem, so that ``tol`` is relative. The ridge
    ε = 1e-8 (below float32 rounding of G) picks the smallest λ where the minimizers are not
    unique (T > rank J, or a non-negative combination of the g_t that vanishes), where the
    iterates would otherwise run off to infinity. At the solution λ ≥ 0 and
    (Gλ − b)_t ≥ −ε·||g_t||²·λ_t (the price of ε), up to ``tol``. Where g_t = 0 the objective
    does not depend on λ_t if b_t = 0 (as for UPGrad and DualProj, whose b are in G's
    range): λ_t = 0 there.
    """
    G, B = _psd(G), B.to(DTYPE)
    d = inverse_norms(G)
    G_scaled = d[:, None] * G * d[None, :] + _NNQP_RIDGE * torch.eye(G.shape[0], dtype=DTYPE, device=G.device)
    B_scaled = (d[:, None] * B).T
    rho = B_scaled.abs().amax(dim=1, keepdim=True)
    rho = torch.where(rho > 0, rho, torch.ones_like(rho))
    B_scaled = B_scaled / rho
    start = torch.ones_like(B_scaled)
    scaled = _interior_point(lambda x: (x @ G_scaled - B_scaled, G_scaled), start, False, tol, max_iter)
    return (d * nonzero(G))[:, None] * (rho * scaled).T


def min_norm_weights(G: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER) -> torch.Tensor:
    """α = argmin_{α ∈ Δ} ||Σ_t α_t g_t||² = argmin αᵀGα: the min-norm point of the hull of the g_t.

    Optimality: g_tᵀd ≥ ||d||² for every t, with equality where α_t > 0 (d = Σ α_t g_t).
    T = 2 in closed form: α_1 = clamp((G_22 − G_12) / (G_11 + G_22 − 2 G_12), 0, 1), ½ when
    g_1 = g_2. Otherwise to ``tol`` relative to max ||g_t||².
    """
    G = G.to(DTYPE)
    T = G.shape[0]
    if T == 1:
        return torch.ones(1, dtype=DTYPE, device=G.device)
    if T == 2:
        curvature = G[0, 0] + G[1, 1] - 2 * G[0, 1]  # ||g_1 − g_2||²
        ratio = (G[1, 1] - G[0, 1]) / curvature
        first = torch.where(curvature > 0, ratio, torch.full_like(ratio, 0.5)).clamp(0.0, 1.0)
        return torch.stack([first, 1 - first])
    G = _psd(G)
    G_scaled = G / _scale(G)
    start = torch.full((1, T), 1.0 / T, dtype=DTYPE, device=G.device)
    return _interior_point(lambda x: (x @ G_scaled, G_scaled), start, True, tol, max_iter).squeeze(0)


def cagrad_weights(G: torch.Tensor, c: float, tol: float = TOL, max_iter: int = MAX_ITER) -> torch.Tensor:
    """w = argmin_{w ∈ Δ} g_wᵀg_0 + c·||g_0||·||g_w||, g_w = Σ_t w_t g_t, g_0 = mean_t g_t.

    In Gramian terms: f(w) = aᵀw + c_0·r with a = G1/T, c_0 = c·√(1ᵀG1)/T and
    r = √(wᵀGw + ε): ∇f = a + c_0·Gw/r, ∇²f = c_0·(G/r − Gw(Gw)ᵀ/r³). ε = 1e-16·max ||g_t||²
    smooths the root where 0 is in the hull (the official code adds 1e-8), at a cost of at
    most c_0·1e-8·max ||g_t|| in f.
    """
    G = _psd(G)
    T = G.shape[0]
    G_scaled = G / _scale(G)
    linear = G_scaled.mean(dim=1)
    c0 = c * G_scaled.mean().clamp_min(0).sqrt()

    def value(w: torch.Tensor) -> torch.Tensor:
        return w @ linear + c0 * (((w @ G_scaled) * w).sum(dim=-1) + _SMOOTH).sqrt()

    def objective(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Gw = w @ G_scaled
        r = ((Gw * w).sum() + _SMOOTH).sqrt()
        return linear + c0 * Gw / r, c0 * (G_scaled / r - Gw.T @ Gw / r**3)

    start = torch.full((1, T), 1.0 / T, dtype=DTYPE, device=G.device)
    return _interior_point(objective, start, True, tol, max_iter, value).squeeze(0)


def nash_weights(G: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER) -> torch.Tensor:
    """α > 0 with Gα = 1/α element-wise (Nash-MTL's bargaining solution).

    The solution minimizes φ(α) = ½αᵀGα − Σ_t log α_t (∇φ = Gα − 1/α), a self-concordant
    function, so damped Newton steps α ← α − H⁻¹∇φ / (1 + δ) (H = G + diag(1/α²), Newton
    decrement δ² = ∇φᵀH⁻¹∇φ) stay positive and converge without a line search; full
    steps once δ < ¼, where convergence is quadratic. Stops when δ² ≤ tol.

    Solved as Cβ = 1/β on C = DGD, D = diag(G)^-½, then α = Dβ (the equation is invariant
    under this scaling, and the start β = 1 is exact for orthogonal gradients). No solution
    exists where a non-negative combination of the gradients vanishes: a ridge of 1e-13 on
    C's unit diagonal makes one exist, and the weights of those tasks grow large (towards
    ~3e6/||g_t||, stopped at ``max_iter``) instead of to infinity. A task whose gradient is
    zero gets α_t = 1/max_s ||g_s|| (its equation has no solution, and it does not move d).
    """
    G = _psd(G)
    d = inverse_norms(G)
    ridge = torch.where(nonzero(G), _RIDGE, 1.0)
    C = d[:, None] * G * d[None, :] + torch.diag(ridge)
    beta = torch.ones_like(d)
    for it in range(max_iter):
        gradient = C @ beta - 1 / beta
        factor, _ = torch.linalg.cholesky_ex(C + torch.diag(beta.pow(-2)))
        newton = torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1)
        decrement = (gradient * newton).sum().clamp_min(0).sqrt()
        if it % CHECK_EVERY == 0 and decrement.square() <= tol:
            break
        beta = beta - torch.where(decrement < 0.25, 1.0, 1 / (1 + decrement)) * newton
    return d * beta
