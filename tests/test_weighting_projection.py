"""MGDA, CAGrad, Nash-MTL, UPGrad and DualProj against their formulas, and their solvers."""

import itertools
import math

import pytest
import torch

from mtl.weighting import WEIGHTINGS, solvers
from mtl.weighting.projection import MGDA, MGDAUB, CAGrad, DualProj, NashMTL, UPGrad

pytestmark = pytest.mark.usefixtures("one_thread")  # T × T solves: launch-bound

METHODS = {"mgda": MGDA, "mgda_ub": MGDAUB, "cagrad": CAGrad, "nash_mtl": NashMTL, "upgrad": UPGrad, "dualproj": DualProj}
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-9}  # relative to max ||g_t||²


def tasks(n):
    return [f"t{i}" for i in range(n)]


def combine(J, weights):
    return weights.double() @ J.double()


def random_jacobian(seed, T, D, dtype):
    """Rows of very different norms, and row 1 made to conflict with row 0."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, D, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, T, dtype=torch.float64)[:, None]
    J[1] = -0.7 * J[0] * J[1].norm() / J[0].norm() + 0.3 * J[1]
    return J.to(dtype)


CASES = [(seed, T, D) for seed, (T, D) in itertools.product(range(2), [(2, 5), (3, 2), (4, 50), (8, 20), (6, 3)])]


def test_registered_with_a_summary_line():
    for name, cls in METHODS.items():
        assert WEIGHTINGS.get(name) is cls
        assert dict(WEIGHTINGS.describe())[name]


# --- solvers -----------------------------------------------------------------------------


def test_min_norm_two_tasks_matches_the_interior_point_method():
    # A duplicated row does not change the hull: the T = 3 solve (interior point) must
    # reach the same min-norm point as the T = 2 closed form.
    for seed in range(5):
        J = random_jacobian(seed, 2, 4, torch.float64)
        d_exact = combine(J, solvers.min_norm_weights(solvers.gramian(J)))
        J3 = torch.cat([J, J[:1]])
        d_ipm = combine(J3, solvers.min_norm_weights(solvers.gramian(J3)))
        assert torch.allclose(d_ipm, d_exact, atol=1e-6 * J.norm(dim=1).max().item())


def test_min_norm_beats_a_brute_force_grid():
    n = 120
    grid = torch.tensor(
        [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)], dtype=torch.float64
    )
    for seed in range(4):
        J = random_jacobian(seed, 3, 4, torch.float64)
        G = solvers.gramian(J)
        alpha = solvers.min_norm_weights(G)
        best = ((grid @ G) * grid).sum(dim=1).min()
        assert alpha @ G @ alpha <= best + 1e-12
        assert alpha.min() >= 0 and abs(alpha.sum().item() - 1) < 1e-9


def test_nonneg_qp_meets_its_kkt_conditions():
    for seed, T, D in CASES:
        J = random_jacobian(seed, T, D, torch.float64)
        G = solvers.gramian(J)
        B = torch.randn(T, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ torch.diag(
            torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
        )
        B = G @ B  # in G's range, so that a minimizer exists when G is singular
        lam = solvers.nonneg_qp(G, B)
        # KKT of the problem with its ridge: Gλ − b + ε·diag(G)∘λ ≥ 0, complementary to λ ≥ 0.
        slack = G @ lam - B + 1e-8 * G.diagonal()[:, None] * lam
        tol = 1e-10 * G.diagonal().max() * (1 + lam.abs().max())
        assert lam.min() >= 0
        assert slack.min() >= -tol
        assert (lam * slack).abs().max() <= tol * lam.abs().max()


# --- MGDA ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),  # orthogonal, equal norms
        ([[1.0, 0.0], [0.0, 2.0]], [0.8, 0.2]),  # α_1 = (4 − 0) / (1 + 4 − 0)
        ([[1.0, 0.0], [-1.0, 0.0]], [0.5, 0.5]),  # opposite: d = 0
        ([[1.0, 0.0], [3.0, 0.0]], [1.0, 0.0]),  # one dominant: d is the smaller one
    ],
)
def test_mgda_two_tasks(rows, expected):
    weights = MGDA(tasks(2)).aggregate(torch.tensor(rows)).weights
    assert torch.allclose(weights, torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed, T, D", CASES)
def test_mgda_is_the_min_norm_point_of_the_hull(seed, T, D, dtype):
    J = random_jacobian(seed, T, D, dtype)
    alpha = MGDA(tasks(T)).aggregate(J).weights
    assert alpha.dtype == dtype and alpha.min() >= 0 and abs(alpha.double().sum().item() - 1) < 1e-6
    d = combine(J, alpha)
    # Optimality of the min-norm point: g_tᵀd ≥ ||d||² for every t.
    scale = J.double().norm(dim=1).max() ** 2
    assert (J.double() @ d - d @ d).min() >= -TOL[dtype] * scale


def test_mgda_zero_in_the_hull():
    # ½g_1 + ½g_2 = 0: the min-norm point is 0 (Pareto-stationary), g_3 gets no weight.
    # The solver's tolerance (1e-12) bounds ||d||², so ||d|| and α_3 come out near 1e-6.
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    weights = MGDA(tasks(3)).aggregate(J).weights
    assert torch.allclose(weights, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), atol=1e-5)
    assert combine(J, weights).square().sum() < 1e-11


def test_mgda_l2_normalization_balances_the_norms():
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weights = MGDA(tasks(2), normalization="l2").aggregate(J).weights
    assert torch.allclose(weights, torch.tensor([0.5, 0.5]))  # weights of the raw losses


@pytest.mark.parametrize(
    "normalization, expected",
    [
        # rows g_t / n_t are orthogonal with squared norms a, b, so α_1 = b / (a + b).
        ("loss", [4 / 4.25, 0.25 / 4.25]),  # n = L = (2, 1): a = 0.25, b = 4
        ("loss+", [0.8, 0.2]),  # n = L·||g|| = (2, 2): a = 0.25, b = 1
    ],
)
def test_mgda_loss_normalizations(normalization, expected):
    method = MGDA(tasks(2), normalization=normalization)
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    method.observe(torch.tensor([2.0, 1.0]))
    assert torch.allclose(method.aggregate(J).weights, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="observe"):  # each step's losses are used once
        method.aggregate(J)


def test_mgda_modes():
    assert MGDA(tasks(2)).mode == "parameters"
    assert MGDA(tasks(2), mode="representation").mode == "representation"
    assert MGDAUB(tasks(2)).mode == "representation"
    with pytest.raises(ValueError, match="weighting.mode"):
        MGDAUB(tasks(2), mode="parameters")
    J = random_jacobian(0, 4, 6, torch.float64)
    assert torch.equal(MGDAUB(tasks(4)).aggregate(J).weights, MGDA(tasks(4)).aggregate(J).weights)


# --- CAGrad -------------------------------------------------------------------------------


def test_cagrad_two_orthogonal_gradients():
    # g_0 = (½, ½); by symmetry w* = (½, ½), so d = g_0 + c·g_w* = (1 + c)·g_0, over 1 + c².
    result = CAGrad(tasks(2), c=0.5).aggregate(torch.eye(2))
    assert torch.allclose(result.gradient, torch.tensor([0.6, 0.6]), atol=1e-6)
    assert torch.allclose(result.weights, torch.tensor([0.6, 0.6]), atol=1e-6)


def test_cagrad_two_conflicting_gradients():
    # g_1 = (1, 0), g_2 = (−1, 1): g_0 = (0, ½), √φ = ¼. With w = (1 − t, t),
    # F(t) = t/2 + ¼·√(5t² − 4t + 1) has F'(0) = 0, so w* = (1, 0), g_w* = g_1 and
    # d = (g_0 + ¼·g_1) / 1.25 = (0.2, 0.4): both tasks improve by the same 0.2.
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    result = CAGrad(tasks(2)).aggregate(J)
    assert torch.allclose(result.gradient, torch.tensor([0.2, 0.4], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(result.weights, torch.tensor([0.6, 0.4], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(J @ result.gradient, torch.tensor([0.2, 0.2], dtype=torch.float64), atol=1e-7)


def test_cagrad_opposite_gradients_of_different_norms():
    # g_1 = (2, 0), g_2 = (−1, 0): g_0 = (½, 0), √φ = ¼; w* = (0, 1) (a vertex), ||g_w*|| = 1,
    # so d = (g_0 + ¼·g_2) = (¼, 0), and (0.2, 0) after rescaling.
    result = CAGrad(tasks(2)).aggregate(torch.tensor([[2.0, 0.0], [-1.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(result.gradient, torch.tensor([0.2, 0.0], dtype=torch.float64), atol=1e-7)


def test_cagrad_opposite_gradients_of_equal_norm():
    # g_0 = 0, so φ = 0 and d = g_0 = 0.
    result = CAGrad(tasks(2)).aggregate(torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    assert torch.allclose(result.gradient, torch.zeros(2), atol=1e-7)


def test_cagrad_rescale_and_c():
    J = torch.eye(2)
    assert torch.allclose(CAGrad(tasks(2), c=0.0).aggregate(J).gradient, torch.tensor([0.5, 0.5]))
    assert torch.allclose(CAGrad(tasks(2), rescale=0).aggregate(J).gradient, torch.tensor([0.75, 0.75]), atol=1e-6)
    assert torch.allclose(CAGrad(tasks(2), rescale=2).aggregate(J).gradient, torch.tensor([0.5, 0.5]), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed, T, D", CASES[:5])
def test_cagrad_solves_its_inner_problem(seed, T, D, dtype):
    J = random_jacobian(seed, T, D, dtype)
    result = CAGrad(tasks(T)).aggregate(J)
    assert torch.allclose(combine(J, result.weights), result.gradient.double(), rtol=1e-5, atol=1e-5)
    # The weights' optimality against a softmax-parametrized L-BFGS solve of the same problem.
    G = solvers.gramian(J)
    g0_norm = G.mean().sqrt()

    def inner(w):
        return w @ G.mean(dim=1) + 0.5 * g0_norm * (w @ G @ w).sqrt()

    w = solvers.cagrad_weights(G, 0.5)
    logits = torch.zeros(T, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = inner(torch.softmax(logits, 0))
        value.backward()
        return value

    opt.step(closure)
    assert inner(w) <= inner(torch.softmax(logits, 0).detach()) + 1e-10 * G.diagonal().max()


# --- Nash-MTL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([[1.0, 0.0], [0.0, 2.0]], [1.0, 0.5]),  # orthogonal: α_t = 1/||g_t||
        ([[1.0, 0.0], [-0.5, math.sqrt(0.75)]], [math.sqrt(2), math.sqrt(2)]),  # cos = −½: α = 1/√(1 + ρ)
        ([[1.0, 0.0], [0.5, math.sqrt(0.75)]], [math.sqrt(2 / 3), math.sqrt(2 / 3)]),  # cos = ½
    ],
)
def test_nash_mtl_hand_made(rows, expected):
    weights = NashMTL(tasks(2)).aggregate(torch.tensor(rows, dtype=torch.float64)).weights
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed, T, D", [c for c in CASES if c[2] >= c[1]])
def test_nash_mtl_kkt(seed, T, D, dtype):
    J = random_jacobian(seed, T, D, dtype)
    alpha = NashMTL(tasks(T)).aggregate(J).weights
    assert alpha.dtype == dtype and alpha.min() > 0
    # Gα = 1/α, i.e. α_t·g_tᵀd = 1 for every t (G in float64 from this J).
    product = alpha.double() * (solvers.gramian(J) @ alpha.double())
    assert torch.allclose(product, torch.ones(T, dtype=torch.float64), rtol=1e-5 if dtype == torch.float32 else 1e-9)


def test_nash_mtl_zero_gradient_task():
    weights = NashMTL(tasks(3)).aggregate(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0]])).weights
    assert torch.allclose(weights, torch.tensor([0.5, 0.25, 0.25]))


# --- UPGrad and DualProj ------------------------------------------------------------------


def test_upgrad_two_conflicting_gradients():
    # Dual cone of g_1 = (1, 0), g_2 = (−1, 1): {x_1 ≥ 0, x_2 ≥ x_1}. π(g_1) = (½, ½),
    # π(g_2) = (0, 1); d = (¼, ¾) = 1·g_1 + ¾·g_2.
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    weights = UPGrad(tasks(2)).aggregate(J).weights
    assert torch.allclose(weights, torch.tensor([1.0, 0.75], dtype=torch.float64), atol=1e-9)


def test_dualproj_conflicting_gradients():
    # g_0 = (−½, 0.05) conflicts with g_1 = (1, 0); its projection onto {x_1 ≥ 0, x_2 ≥ 20 x_1}
    # is (0, 0.05) = 1·g_1 + ½·g_2.
    J = torch.tensor([[1.0, 0.0], [-2.0, 0.1]], dtype=torch.float64)
    weights = DualProj(tasks(2)).aggregate(J).weights
    assert torch.allclose(weights, torch.tensor([1.0, 0.5], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_without_conflict_the_mean_is_kept(cls):
    J = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.2, 0.3, 0.0]], dtype=torch.float64)
    assert (J @ J.T).min() >= 0
    assert torch.allclose(cls(tasks(3)).aggregate(J).weights, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed, T, D", CASES)
def test_no_conflict_with_any_task(cls, seed, T, D, dtype):
    J = random_jacobian(seed, T, D, dtype)
    weights = cls(tasks(T)).aggregate(J).weights
    assert weights.dtype == dtype and weights.min() >= 0
    # g_tᵀd ≥ −ε·w_t·||g_t||² with the solver's ridge ε = 1e-8, up to the tolerance.
    d = combine(J, weights)
    norms = J.double().norm(dim=1) ** 2
    ridge = 1e-8 * weights.double() * norms
    assert (J.double() @ d + ridge).min() >= -TOL[dtype] * norms.max() * weights.double().abs().max().clamp_min(1)


def test_upgrad_weights_are_the_mean_of_the_projections():
    # Each λ_i solves the projection of g_i: check it against the primal optimality of
    # π(g_i) = g_i + Jᵀλ_i (feasible, and no feasible direction gets closer to g_i).
    J = random_jacobian(1, 4, 6, torch.float64)
    G = solvers.gramian(J)
    lam = solvers.nonneg_qp(G, -G)
    projections = J + lam.T @ J
    assert (projections @ J.T).min() >= -1e-9 * G.diagonal().max()
    # Complementary slackness: (π(g_i) − g_i) only uses constraints active at π(g_i).
    assert (lam.T * (projections @ J.T)).abs().max() <= 1e-8 * G.diagonal().max()
    weights = UPGrad(tasks(4)).aggregate(J).weights
    assert torch.allclose(weights @ J, projections.mean(dim=0), atol=1e-9)


# --- every method -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_returns_bf16(name):
    J = random_jacobian(0, 4, 64, torch.float32)
    method = METHODS[name](tasks(4))
    reference = method.aggregate(J)
    result = method.aggregate(J.bfloat16())
    for field in ("weights", "gradient"):
        expected, got = getattr(reference, field), getattr(result, field)
        if expected is None:
            assert got is None
            continue
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        assert torch.allclose(got.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_zero_and_single_gradients_are_finite(name):
    for J in (torch.zeros(3, 5), torch.randn(1, 5, generator=torch.Generator().manual_seed(0))):
        result = METHODS[name](tasks(J.shape[0])).aggregate(J)
        assert torch.isfinite(result.weights).all()
        assert result.gradient is None or torch.isfinite(result.gradient).all()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_round_trips(name):
    # These methods are stateless: a fresh instance loaded from the state dict agrees.
    method = METHODS[name](tasks(3))
    J = random_jacobian(2, 3, 7, torch.float64)
    first = method.aggregate(J)
    fresh = METHODS[name](tasks(3))
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.aggregate(J).weights, first.weights)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (MGDA, {"normalization": "max"}, "weighting.normalization"),
        (MGDA, {"mode": "last_shared"}, "weighting.mode"),
        (CAGrad, {"c": -0.1}, "weighting.c"),
        (CAGrad, {"c": float("nan")}, "weighting.c"),
        (CAGrad, {"rescale": 3}, "weighting.rescale"),
        (UPGrad, {"mode": "everything"}, "weighting.mode"),
    ],
)
def test_bad_hyper_parameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(tasks(2), **kwargs)
