"""PCGrad, GradVac, GradDrop, IMTL-G, Aligned-MTL and DB-MTL against their formulas on hand-made gradients."""

import math

import pytest
import torch

from mtl.weighting.surgery import DBMTL, IMTLG, AlignedMTL, GradDrop, GradVac, PCGrad

from conftest import roundtrip

TASKS2 = ["a", "b"]
TASKS3 = ["a", "b", "c"]
DTYPES = [torch.float32, torch.float64]


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def close(actual, expected, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol)


# PCGrad


@pytest.mark.parametrize("dtype", DTYPES)
def test_pcgrad_removes_the_conflict_of_two_tasks(dtype):
    g1, g2 = t([1.0, 0.0], dtype), t([-1.0, 2.0], dtype)
    projected = PCGrad(TASKS2).adjusted(torch.stack([g1, g2]))
    # Each projected gradient is orthogonal to the other original (no conflict left).
    assert projected[0] @ g2 >= -1e-6 and projected[1] @ g1 >= -1e-6
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    close(projected, torch.stack([p1, p2]), dtype)
    close(PCGrad(TASKS2).aggregate(torch.stack([g1, g2])).gradient, p1 + p2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pcgrad_without_conflict_is_the_plain_sum(dtype):
    J = t([[1.0, 0.5, 0.0], [0.2, 1.0, 0.0], [0.0, 0.3, 2.0]], dtype)
    close(PCGrad(TASKS3).aggregate(J).gradient, J.sum(0), dtype)


def test_pcgrad_order_is_seeded_and_survives_a_checkpoint():
    J = t([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-0.5, -1.0, 1.0]])
    # With three conflicting tasks the result depends on the order of the projections.
    results = {tuple(PCGrad(TASKS3, seed=s).aggregate(J).gradient.tolist()) for s in range(20)}
    assert len(results) > 1
    assert torch.equal(PCGrad(TASKS3, seed=3).aggregate(J).gradient, PCGrad(TASKS3, seed=3).aggregate(J).gradient)
    used = PCGrad(TASKS3, seed=3)
    used.aggregate(J)
    resumed = roundtrip(used, PCGrad(TASKS3, seed=99))
    for _ in range(5):
        assert torch.equal(used.aggregate(J).gradient, resumed.aggregate(J).gradient)


def _orders(method, T):
    """The order a fresh copy of ``method`` will draw next (its generator state, cloned)."""
    twin = type(method)([f"t{i}" for i in range(T)])
    twin.set_extra_state(method.get_extra_state())
    return twin._random_orders(T, torch.device("cpu"))


def test_pcgrad_gramian_form_equals_the_papers_loop():
    # The paper's algorithm on explicit [D] vectors, task by task, with the method's own order.
    J = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    J[1:] -= 0.8 * J[0]  # many conflicts
    method = PCGrad([f"t{i}" for i in range(6)], seed=5)
    order = _orders(method, 6)
    expected = []
    for i in range(6):
        g = J[i].clone()
        for j in order[i].tolist():
            if g @ J[j] < 0:
                g = g - (g @ J[j]) / (J[j] @ J[j]) * J[j]
        expected.append(g)
    result = method.aggregate(J)
    close(result.gradient, torch.stack(expected).sum(0), torch.float64)
    close(result.weights @ J, result.gradient, torch.float64)


# GradVac


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradvac_raises_the_cosine_to_the_target(dtype):
    g1, g2 = t([1.0, 0.0], dtype), t([-1.0, 1.0], dtype)
    J = torch.stack([g1, g2])
    method = GradVac(TASKS2)
    # Targets start at 0: g1 + ½ g2 = (½, ½) and g2 + 1·g1 = (0, 1), both orthogonal to the other.
    close(method.adjusted(J), t([[0.5, 0.5], [0.0, 1.0]]), dtype)
    cos = -1 / math.sqrt(2)
    close(method.target, torch.full((2, 2), 0.01 * cos).fill_diagonal_(0.0), dtype)

    method.target.fill_(0.5)
    adjusted = method.adjusted(J)
    cosine = torch.nn.functional.cosine_similarity
    close(cosine(adjusted[0], g2, dim=0), torch.tensor(0.5), dtype)
    close(cosine(adjusted[1], g1, dim=0), torch.tensor(0.5), dtype)
    close(method.target[0, 1], torch.tensor(0.99 * 0.5 + 0.01 * cos), dtype)


def test_gradvac_gramian_form_equals_the_papers_loop():
    J = torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J[1:] -= 0.5 * J[0]
    method = GradVac([f"t{i}" for i in range(5)], beta=0.5, seed=2)
    method.target.fill_(0.3)
    order, targets = _orders(method, 5), method.target.clone()
    expected = []
    for i in range(5):
        g = J[i].clone()
        for j in order[i].tolist():
            cos = (g @ J[j]) / (g.norm() * J[j].norm())
            goal = targets[i, j]
            if cos < goal:
                g = g + g.norm() * (goal * (1 - cos**2).sqrt() - cos * (1 - goal**2).sqrt()) / (J[j].norm() * (1 - goal**2).sqrt()) * J[j]
            targets[i, j] = 0.5 * goal + 0.5 * cos
        expected.append(g)
    # The Gramian form takes ||g_i|| from CJJᵀCᵀ, which rounds differently from the loop's norms.
    torch.testing.assert_close(method.aggregate(J).gradient, torch.stack(expected).sum(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(method.target, targets, rtol=1e-6, atol=1e-7)


def test_gradvac_leaves_gradients_above_the_target_and_sums():
    J = t([[1.0, 0.2], [0.3, 1.0]])
    close(GradVac(TASKS2).aggregate(J).gradient, J.sum(0), torch.float64)


def test_gradvac_targets_survive_a_checkpoint():
    J = t([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-0.5, -1.0, 1.0]])
    used = GradVac(TASKS3, seed=1)
    used.aggregate(J)
    resumed = roundtrip(used, GradVac(TASKS3, seed=5))
    assert torch.equal(resumed.target, used.target)
    assert torch.equal(used.aggregate(J).gradient, resumed.aggregate(J).gradient)


# GradDrop


@pytest.mark.parametrize("dtype", DTYPES)
def test_graddrop_purity_zero_or_one_is_deterministic(dtype):
    # Column 0 all positive (P = 1): kept; column 1 all negative (P = 0): kept; column 2 zero.
    J = t([[2.0, -1.0, 0.0], [3.0, -4.0, 0.0]], dtype)
    for seed in range(5):
        close(GradDrop(TASKS2, seed=seed).aggregate(J).gradient, t([5.0, -5.0, 0.0]), dtype)


def test_graddrop_keeps_one_sign_per_element():
    J = torch.randn(3, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = GradDrop(TASKS3).aggregate(J).gradient
    positive, negative = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
    # Each element is either all its positive parts or all its negative parts.
    assert torch.all(torch.isclose(result, positive) | torch.isclose(result, negative))
    assert torch.isclose(result, positive).any() and torch.isclose(result, negative).any()


def test_graddrop_follows_the_purity_on_average():
    # One element with P = ¾: the positive side is kept about 3 times in 4.
    J = t([[3.0], [-1.0]])
    method = GradDrop(TASKS2)
    kept = torch.stack([method.aggregate(J).gradient for _ in range(4000)])
    assert set(kept.flatten().tolist()) <= {3.0, -1.0}
    assert abs((kept == 3.0).double().mean().item() - 0.75) < 0.03


def test_graddrop_draws_are_seeded_and_survive_a_checkpoint():
    J = torch.randn(2, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(GradDrop(TASKS2, seed=4).aggregate(J).gradient, GradDrop(TASKS2, seed=4).aggregate(J).gradient)
    assert not torch.equal(GradDrop(TASKS2, seed=4).aggregate(J).gradient, GradDrop(TASKS2, seed=5).aggregate(J).gradient)
    used = GradDrop(TASKS2, seed=4)
    first = used.aggregate(J).gradient
    resumed = roundtrip(used, GradDrop(TASKS2, seed=0))
    second = used.aggregate(J).gradient
    assert torch.equal(resumed.aggregate(J).gradient, second)
    assert not torch.equal(first, second)
    assert GradDrop(TASKS2).mode == "representation"


# IMTL-G


@pytest.mark.parametrize("dtype", DTYPES)
def test_imtl_g_orthogonal_hand_case(dtype):
    # g = α1 (3, 0) + α2 (0, 1) with equal projections 3α1 = α2 and α1 + α2 = 1.
    weights = IMTLG(TASKS2).aggregate(t([[3.0, 0.0], [0.0, 1.0]], dtype)).weights
    close(weights, t([0.25, 0.75]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_imtl_g_equal_projections_and_weights_sum_to_one(dtype):
    J = t([[1.0, 2.0, 0.0, -1.0], [-3.0, 0.5, 1.0, 0.0], [0.2, -0.1, 4.0, 1.0]], dtype)
    weights = IMTLG(TASKS3).aggregate(J).weights
    assert weights.dtype == dtype
    close(weights.sum(), torch.tensor(1.0), dtype)
    combined = weights @ J
    projections = (J / J.norm(dim=1, keepdim=True)) @ combined
    close(projections, projections[0].expand(3), dtype)


def test_imtl_g_parallel_gradients_give_finite_weights():
    weights = IMTLG(TASKS2).aggregate(t([[1.0, 0.0], [2.0, 0.0]])).weights
    assert torch.isfinite(weights).all() and torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def _imtl_g_paper(J):
    """The paper's closed form on J: α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:T}."""
    U = J / J.norm(dim=1, keepdim=True)
    D, Ud = J[:1] - J[1:], U[:1] - U[1:]
    rest = J[0] @ Ud.T @ torch.linalg.inv(D @ Ud.T)
    return torch.cat([(1 - rest.sum()).unsqueeze(0), rest])


@pytest.mark.parametrize("seed", range(20))
def test_imtl_g_is_the_paper_closed_form_on_full_row_rank(seed):
    gen = torch.Generator().manual_seed(seed)
    T = 2 + seed % 4
    J = torch.randn(T, 6, generator=gen, dtype=torch.float64) * torch.rand(T, 1, generator=gen, dtype=torch.float64).mul(10).add(0.1)
    close(IMTLG([str(i) for i in range(T)]).aggregate(J).weights, _imtl_g_paper(J), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_imtl_g_zero_gradient_gets_no_weight_and_the_other_task_descends(dtype):
    # The paper's formula gave weights (0, 1) here: the update was the zero gradient.
    result = IMTLG(TASKS2).aggregate(t([[1.0, 0.0], [0.0, 0.0]], dtype))
    close(result.weights, t([1.0, 0.0]), dtype)
    close(result.gradient, t([1.0, 0.0]), dtype)
    # Three tasks, one with a zero gradient: the closed form on the other two, (3, 0) and (0, 1).
    result = IMTLG(TASKS3).aggregate(t([[3.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype))
    close(result.weights, t([0.25, 0.0, 0.75]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_imtl_g_more_tasks_than_rank_without_conflict_descends(dtype):
    # Unit directions e1, e2, (e1 + e2)/√2: no d has equal projections. By symmetry the
    # least-squares x = a(1, 1) minimises 2(a − 1)² + (√2a − 1)². The least-norm γ with
    # Σ_t γ_t u_t = x is orthogonal to the null vector (1, 1, −√2) of C: γ = (a/2, a/2, a/√2),
    # so α ∝ γ_t/||g_t|| = (a/2, a/2, a/2): α = (1, 1, 1)/3 and d = (2/3, 2/3), whatever a.
    J = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype)
    result = IMTLG(TASKS3).aggregate(J)
    close(result.weights, t([1.0, 1.0, 1.0]) / 3, dtype)
    close(result.gradient, t([2.0, 2.0]) / 3, dtype)
    assert (J @ result.gradient > 0).all()  # the paper's pseudo-inverse form gave d = 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_imtl_g_opposite_gradients_give_no_update(dtype):
    # 1 is orthogonal to range(U) = span((1, −1)): no direction helps either task in the least-squares sense.
    result = IMTLG(TASKS2).aggregate(t([[1.0, 0.0], [-2.0, 0.0]], dtype))
    close(result.weights, t([0.0, 0.0]), dtype)


def test_imtl_g_negative_weight_with_every_projection_positive():
    # The example: full row rank, so the paper's weights, one of them negative.
    J = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.1]])
    result = IMTLG(TASKS3).aggregate(J)
    close(result.weights, _imtl_g_paper(J), torch.float64)
    assert result.weights[2] < -0.9
    assert (J @ result.gradient > 0).all()
    assert not IMTLG.weigh_heads  # heads train on their own losses (see the engine test)


# Aligned-MTL


@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_mtl_balances_orthogonal_gradients(dtype):
    J = t([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]], dtype)
    weights = AlignedMTL(TASKS3).aggregate(J).weights
    # B = σ_min V Λ^{-1/2} Vᵀ with V = I: w_t = σ_min / ||g_t||, σ_min = 0.5.
    close(weights, t([0.5 / 3, 0.5, 1.0]), dtype)
    update = weights @ J
    projections = (J / J.norm(dim=1, keepdim=True)) @ update
    close(projections, torch.full((3,), 0.5), dtype)  # every task gets σ_min


@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_mtl_on_balanced_orthogonal_gradients_is_the_sum(dtype):
    J = t([[2.0, 0.0], [0.0, 2.0]], dtype)
    weights = AlignedMTL(TASKS2).aggregate(J).weights
    close(weights, t([1.0, 1.0]), dtype)


def test_aligned_mtl_aligns_singular_values():
    J = t([[1.0, 2.0, 0.0, -1.0], [-3.0, 0.5, 1.0, 0.0], [0.2, -0.1, 4.0, 1.0]])
    gram = J @ J.T
    eigenvalues, V = torch.linalg.eigh(gram)
    B = eigenvalues.min().sqrt() * (V * eigenvalues.rsqrt()) @ V.T
    close(torch.linalg.svdvals(B @ J), eigenvalues.min().sqrt().expand(3), torch.float64)
    close(AlignedMTL(TASKS3).aggregate(J).weights, B.sum(1), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_mtl_rank_deficient(dtype):
    # Two identical gradients: Gramian [[1, 1], [1, 1]] has rank 1, kept eigenvalue 2, B = vvᵀ.
    weights = AlignedMTL(TASKS2).aggregate(t([[1.0, 0.0], [1.0, 0.0]], dtype)).weights
    close(weights, t([1.0, 1.0]), dtype)
    weights = AlignedMTL(TASKS3).aggregate(t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype)).weights
    assert torch.isfinite(weights).all()


# DB-MTL


def test_db_mtl_log_transform():
    losses = t([1.0, math.e, 0.0])
    close(DBMTL(TASKS3).transform_losses(losses), torch.log(losses + 1e-8), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_db_mtl_first_three_steps_match_the_reference_buffer_from_zero(dtype):
    # LibMTL's DB_MTL: buffer ← g + β(buffer − g) from zeros, update Σ_t max||b|| / (||b_t|| + 1e-8) b_t.
    method = DBMTL(TASKS2)
    steps = [t([[3.0, 0.0], [0.0, 1.0]]), t([[0.0, 3.0], [1.0, 0.0]]), t([[1.0, 1.0], [0.0, -2.0]])]
    buffers = [
        t([[0.3, 0.0], [0.0, 0.1]]),  # 0.1 g_1: the first update is 10× smaller than from ĝ = g_1
        t([[0.27, 0.3], [0.1, 0.09]]),
        t([[0.343, 0.37], [0.09, -0.119]]),
    ]
    for J, buffer in zip(steps, buffers):
        norms = buffer.norm(dim=1)
        expected = (norms.max() / (norms + 1e-8)) @ buffer
        close(method.aggregate(J.to(dtype)).gradient, expected, dtype)
        close(method.grad_ema, buffer, dtype)
    # Step 1 by hand: norms (0.3, 0.1), scales (0.3/(0.3 + 1e-8), 0.3/(0.1 + 1e-8)): ≈ (0.3, 0.3), not (3, 3).
    close(DBMTL(TASKS2).aggregate(steps[0].to(dtype)).gradient, t([0.09 / (0.3 + 1e-8), 0.03 / (0.1 + 1e-8)]), dtype)


def test_db_mtl_lazy_ema_survives_a_checkpoint():
    J1, J2 = t([[3.0, 0.0, 1.0], [0.0, 1.0, -1.0]]), t([[1.0, 2.0, 0.0], [-1.0, 0.0, 1.0]])
    used = DBMTL(TASKS2)
    used.aggregate(J1)
    resumed = roundtrip(used, DBMTL(TASKS2))
    assert resumed.grad_ema.shape == (2, 3)
    assert torch.equal(used.aggregate(J2).gradient, resumed.aggregate(J2).gradient)
    # A state saved before any step restores the empty buffer.
    assert roundtrip(DBMTL(TASKS2), DBMTL(TASKS2)).grad_ema.numel() == 0
    assert DBMTL(TASKS2).mode == "parameters"


# All methods


ALL = [PCGrad, GradVac, GradDrop, IMTLG, AlignedMTL, DBMTL]


@pytest.mark.parametrize("method", ALL)
def test_bf16_in_bf16_out(method):
    J = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    result = method(TASKS3).aggregate(J)
    out = result.gradient if result.gradient is not None else result.weights
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("method", ALL)
def test_zero_gradients_give_finite_results(method):
    result = method(TASKS3).aggregate(torch.zeros(3, 4))
    out = result.gradient if result.gradient is not None else result.weights
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        (GradVac, {"beta": 0.0}, "weighting.beta"),
        (GradVac, {"beta": 1.5}, "weighting.beta"),
        (DBMTL, {"beta": 1.0}, "weighting.beta"),
        (DBMTL, {"eps": 0.0}, "weighting.eps"),
        (PCGrad, {"seed": 1.5}, "weighting.seed"),
        (GradDrop, {"seed": "x"}, "weighting.seed"),
        (IMTLG, {"mode": "last_shared"}, "weighting.mode"),
        (DBMTL, {"mode": "representation"}, "weighting.mode"),
    ],
)
def test_bad_hyper_parameters_raise(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        method(TASKS2, **kwargs)
