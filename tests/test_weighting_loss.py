"""Loss-level weightings (and GradNorm) against their formulas on hand-made inputs."""

import math

import pytest
import torch

from mtl.weighting import WEIGHTINGS, Aggregation
from mtl.weighting.loss_level import (
    FAMO,
    DynamicWeightAverage,
    EqualWeighting,
    GeometricLossStrategy,
    GradNorm,
    IMTLLoss,
    LogLosses,
    RandomLossWeighting,
    UncertaintyWeighting,
)

from conftest import roundtrip

TASKS2 = ["a", "b"]
TASKS3 = ["a", "b", "c"]


def grad_wrt(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


@pytest.mark.parametrize("name", ["uncertainty", "dwa", "gls", "rlw", "log", "imtl_l", "famo", "gradnorm"])
def test_registered_with_summary_and_citation(name):
    doc = WEIGHTINGS.get(name).__doc__
    assert dict(WEIGHTINGS.describe())[name]
    assert any(f"20{year}" in doc for year in range(18, 24))


def test_equal_sum_and_mean():
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert EqualWeighting(TASKS3)(losses).item() == 6.0
    mean = EqualWeighting(TASKS3, reduction="mean")
    assert mean(losses).item() == pytest.approx(2.0)
    assert torch.allclose(mean.weights(), torch.full((3,), 1 / 3))
    assert EqualWeighting.requires_all_tasks is False
    with pytest.raises(ValueError, match="weighting.reduction"):
        EqualWeighting(TASKS3, reduction="max")


def test_only_learnable_methods_have_parameters():
    assert [n for n, _ in UncertaintyWeighting(TASKS2).named_parameters()] == ["log_vars"]
    assert [n for n, _ in IMTLLoss(TASKS2).named_parameters()] == ["log_scales"]
    for module in (DynamicWeightAverage(TASKS2), FAMO(TASKS2), GradNorm(TASKS2), RandomLossWeighting(TASKS2)):
        assert list(module.parameters()) == []


def test_uncertainty_value_and_gradient():
    uw = UncertaintyWeighting(TASKS2)
    losses = torch.tensor([1.0, 3.0])
    assert uw(losses).item() == pytest.approx(4.0)  # s = 0: the plain sum
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.5, -1.0]))
    value = uw(losses)
    assert value.item() == pytest.approx(math.exp(-0.5) * 1 + 0.5 + math.exp(1.0) * 3 - 1.0)
    value.backward()
    # dL/ds_t = 1 − exp(−s_t) L_t
    assert torch.allclose(uw.log_vars.grad, torch.tensor([1 - math.exp(-0.5), 1 - 3 * math.exp(1.0)]))
    assert torch.allclose(uw.weights(), torch.tensor([math.exp(-0.5), math.exp(1.0)]))


def test_uncertainty_gradient_vanishes_at_log_loss():
    uw = UncertaintyWeighting(TASKS2)
    losses = torch.tensor([0.5, 4.0])
    with torch.no_grad():
        uw.log_vars.copy_(losses.log())
    uw(losses).backward()
    assert torch.allclose(uw.log_vars.grad, torch.zeros(2), atol=1e-6)


def test_uncertainty_state_round_trip():
    uw = UncertaintyWeighting(TASKS2)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.2]))
    fresh = roundtrip(uw, UncertaintyWeighting(TASKS2))
    losses = torch.tensor([1.0, 2.0])
    assert fresh(losses).item() == pytest.approx(uw(losses).item())


def test_dwa_equal_for_two_epochs_then_softmax_of_ratios():
    dwa = DynamicWeightAverage(TASKS2)
    losses = torch.tensor([1.0, 2.0])
    assert torch.equal(dwa.weights(), torch.ones(2))
    dwa.on_epoch_end(torch.tensor([1.0, 2.0]))  # end of epoch 0: epoch 1 still equal
    assert torch.equal(dwa.weights(), torch.ones(2))
    dwa.on_epoch_end(torch.tensor([0.5, 1.5]))  # end of epoch 1: r = [0.5, 0.75]
    e1, e2 = math.exp(0.5 / 2), math.exp(0.75 / 2)
    expected = torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])
    assert torch.allclose(dwa.weights(), expected)
    assert dwa.weights().sum().item() == pytest.approx(2.0)
    assert dwa(losses).item() == pytest.approx((expected * losses).sum().item())
    # The slower task (b: 2 → 1.5) gets the larger weight.
    assert dwa.weights()[1] > dwa.weights()[0]


def test_dwa_state_round_trip_and_bad_temperature():
    dwa = DynamicWeightAverage(TASKS3, temperature=1.0)
    dwa.on_epoch_end(torch.tensor([1.0, 2.0, 3.0]))
    fresh = roundtrip(dwa, DynamicWeightAverage(TASKS3, temperature=1.0))
    for module in (dwa, fresh):
        module.on_epoch_end(torch.tensor([0.9, 1.0, 3.3]))
    assert torch.allclose(fresh.weights(), dwa.weights())
    assert not torch.allclose(dwa.weights(), torch.ones(3))
    with pytest.raises(ValueError, match="weighting.temperature"):
        DynamicWeightAverage(TASKS2, temperature=0.0)


def test_gls_is_the_geometric_mean():
    gls = GeometricLossStrategy(TASKS3)
    losses = torch.tensor([1.0, 4.0, 16.0])
    assert gls(losses).item() == pytest.approx(4.0)
    # dL/dL_t = L / (T L_t)
    assert torch.allclose(grad_wrt(gls, losses), 4.0 / (3 * losses))
    many = torch.full((40,), 1e-3)  # the direct product would underflow
    assert GeometricLossStrategy([str(i) for i in range(40)])(many).item() == pytest.approx(1e-3, rel=1e-4)


def test_rlw_weights_are_a_random_point_of_the_simplex():
    rlw = RandomLossWeighting(TASKS3, seed=1)
    losses = torch.tensor([1.0, 2.0, 3.0])
    seen = []
    for _ in range(3):
        value = rlw(losses)
        w = rlw.weights()
        assert (w > 0).all() and w.sum().item() == pytest.approx(1.0)
        assert value.item() == pytest.approx((w * losses).sum().item())
        seen.append(w)
    assert not torch.allclose(seen[0], seen[1])
    generator = torch.Generator().manual_seed(1)
    assert torch.allclose(seen[0], torch.softmax(torch.randn(3, generator=generator), 0))


def test_rlw_reproducible_from_seed_and_resumes():
    losses = torch.tensor([1.0, 1.0])
    a, b = RandomLossWeighting(TASKS2, seed=7), RandomLossWeighting(TASKS2, seed=7)
    a(losses), b(losses)
    assert torch.equal(a.weights(), b.weights())
    other = RandomLossWeighting(TASKS2, seed=8)
    other(losses)
    assert not torch.equal(other.weights(), a.weights())
    resumed = roundtrip(a, RandomLossWeighting(TASKS2, seed=123))
    a(losses), resumed(losses)
    assert torch.equal(resumed.weights(), a.weights())


def test_log_losses_value_and_scale_invariance():
    log = LogLosses(TASKS2)
    losses = torch.tensor([2.0, 0.5])
    assert log(losses).item() == pytest.approx(math.log(2.0) + math.log(0.5), abs=1e-6)
    assert torch.allclose(grad_wrt(log, losses), 1 / losses)
    # Rescaling a task's loss leaves the gradient w.r.t. the model unchanged.
    theta = torch.tensor([1.5, -0.7], requires_grad=True)
    for scale in (1.0, 100.0):
        theta.grad = None
        log(torch.stack([theta[0] ** 2, scale * (theta[1] - 2) ** 2])).backward()
        if scale == 1.0:
            reference = theta.grad.clone()
    assert torch.allclose(theta.grad, reference)


def test_imtl_l_value_and_gradient():
    imtl = IMTLLoss(TASKS2)
    losses = torch.tensor([2.0, 0.25])
    assert imtl(losses).item() == pytest.approx(2.25)
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([math.log(0.5), math.log(4.0)]))
    value = imtl(losses)
    assert value.item() == pytest.approx(0.5 * 2 - math.log(0.5) + 4 * 0.25 - math.log(4.0))
    value.backward()
    # dL/ds_t = exp(s_t) L_t − 1: zero where the scaled losses are balanced at 1.
    assert torch.allclose(imtl.log_scales.grad, torch.zeros(2), atol=1e-6)
    assert torch.allclose(imtl.weights(), torch.tensor([0.5, 4.0]))


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD])
def test_imtl_l_and_uncertainty_train_bit_identically(optimizer):
    """IMTL-L is uncertainty weighting with s = −s' (see IMTLLoss): the same run, to the bit."""
    runs = []
    for method in (IMTLLoss(TASKS2), UncertaintyWeighting(TASKS2)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        x, y = torch.randn(16, 4), torch.randn(16, 2)
        opt = optimizer([{"params": model.parameters()}, {"params": method.parameters(), "weight_decay": 0.0}], lr=0.05)
        for _ in range(25):
            opt.zero_grad()
            method(((model(x) - y) ** 2).mean(dim=0) * torch.tensor([1.0, 30.0])).backward()
            opt.step()
        runs.append((model.weight.detach().clone(), model.bias.detach().clone(), next(method.parameters()).detach().clone()))
    (w1, b1, s1), (w2, b2, s2) = runs
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and torch.equal(s1, -s2)
    assert s1.abs().max() > 0.5  # the scales did move


def test_famo_loss_gives_the_normalised_direction():
    famo = FAMO(TASKS2)
    with torch.no_grad():
        famo.logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # z = [0.25, 0.75]
    losses = torch.tensor([2.0, 0.5])
    c = 1 / (0.25 / 2.0 + 0.75 / 0.5)
    assert famo(losses).item() == pytest.approx(c * (0.25 * math.log(2.0) + 0.75 * math.log(0.5)), abs=1e-6)
    # ∇ = Σ_t c z_t / L_t ∇L_t: task weights on the simplex.
    weights = grad_wrt(famo, losses)
    assert torch.allclose(weights, torch.tensor([c * 0.25 / 2.0, c * 0.75 / 0.5]))
    assert weights.sum().item() == pytest.approx(1.0)


def test_famo_one_update_by_hand():
    famo = FAMO(TASKS2)
    assert famo.wants_losses_after_step
    before = torch.tensor([1.0, 1.0])
    after = torch.tensor([math.exp(-1.0), math.exp(-0.5)])
    famo.update(before, after)
    # δ = [1, 0.5], z = [0.5, 0.5], z·δ = 0.75, ∇_ξ = z (δ − z·δ) = [0.125, −0.125], ξ = 0.
    assert torch.allclose(famo.logits, torch.tensor([-0.025 * 0.125, 0.025 * 0.125]), atol=1e-7)
    # Task b decreased less, so its weight grows.
    assert famo.weights()[1] > famo.weights()[0]


def test_famo_weight_decay_pulls_logits_to_zero():
    famo = FAMO(TASKS2, lr=0.5, gamma=0.1)
    with torch.no_grad():
        famo.logits.copy_(torch.tensor([0.4, -0.4]))
    same = torch.tensor([1.0, 2.0])
    famo.update(same, same)  # δ = 0: only the decay term acts
    assert torch.allclose(famo.logits, torch.tensor([0.4, -0.4]) * (1 - 0.5 * 0.1))


def test_famo_state_round_trip_and_bad_input():
    famo = FAMO(TASKS3)
    famo.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.9, 2.0]))
    fresh = roundtrip(famo, FAMO(TASKS3))
    losses = torch.tensor([1.0, 2.0, 0.5])
    assert fresh(losses).item() == pytest.approx(famo(losses).item())
    for module in (famo, fresh):
        module.update(losses, losses / 2)
    assert torch.allclose(fresh.logits, famo.logits)
    with pytest.raises(ValueError, match="after"):
        famo.update(losses)
    with pytest.raises(ValueError, match="weighting.lr"):
        FAMO(TASKS2, lr=0.0)
    with pytest.raises(ValueError, match="weighting.gamma"):
        FAMO(TASKS2, gamma=-1.0)


def test_gradnorm_one_update_by_hand():
    gn = GradNorm(TASKS2)
    assert gn.mode == "last_shared"
    J = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # norms [3, 1]
    gn.observe(torch.tensor([1.0, 1.0]))  # first step: r = [1, 1]
    result = gn.aggregate(J)
    assert isinstance(result, Aggregation) and result.gradient is None
    assert torch.equal(result.weights, torch.ones(2))  # this step trains on w(t)
    # G = [3, 1], target = Ḡ r^α = [2, 2], ∇_w = sign(G − target) ||∇L|| = [3, −1].
    new = torch.tensor([1 - 0.025 * 3, 1 + 0.025 * 1])
    assert torch.allclose(gn.weights(), 2 * new / new.sum())
    assert gn.weights().sum().item() == pytest.approx(2.0)
    assert gn.weights()[0] < 1 < gn.weights()[1]  # the larger gradient gets less weight


def test_gradnorm_favours_the_slower_task():
    gn = GradNorm(TASKS2, alpha=1.5, lr=0.1)
    J = torch.eye(2)  # equal gradient norms: only the training rates differ
    gn.observe(torch.tensor([2.0, 2.0]))
    gn.aggregate(J)  # G = target: no change
    assert torch.allclose(gn.weights(), torch.ones(2))
    gn.observe(torch.tensor([1.0, 2.0]))  # a halved, b did not move: r = [2/3, 4/3]
    assert torch.equal(gn.aggregate(J).weights, torch.ones(2))
    # G = [1, 1], Ḡ = 1, target = r^1.5 = [0.544, 1.540]: ∇_w = [+1, −1].
    new = torch.tensor([0.9, 1.1])
    assert torch.allclose(gn.weights(), 2 * new / new.sum())


def test_gradnorm_bf16_state_and_bad_input():
    gn = GradNorm(TASKS3)
    J = torch.tensor([[1.0, 2.0], [0.5, 0.0], [0.0, 3.0]])
    gn.observe(torch.tensor([1.0, 2.0, 3.0]))
    gn.aggregate(J)
    fresh = roundtrip(gn, GradNorm(TASKS3))
    for module in (gn, fresh):
        module.observe(torch.tensor([0.5, 1.5, 3.0]))
    result = gn.aggregate(J)
    assert torch.allclose(fresh.aggregate(J).weights, result.weights)
    assert torch.allclose(fresh.weights(), gn.weights())
    gn.observe(torch.tensor([0.5, 1.5, 3.0]))
    low = gn.aggregate(J.bfloat16())
    assert low.weights.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="observe"):
        gn.aggregate(J)  # observe is needed before each aggregate
    with pytest.raises(ValueError, match="weighting.mode"):
        GradNorm(TASKS2, mode="representation")
    with pytest.raises(ValueError, match="weighting.alpha"):
        GradNorm(TASKS2, alpha=-1.0)
    with pytest.raises(ValueError, match="weighting.lr"):
        GradNorm(TASKS2, lr=0.0)
