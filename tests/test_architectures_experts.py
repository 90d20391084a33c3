"""Mixture-of-experts architectures: each formula on a case worked out by hand, stacked experts
against a loop over the same experts, the parameter partition, and each construction error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl.architectures.experts import CGC, PLE, DSelectK, MMoE, StackedTrunks, smooth_step
from mtl.trunks import Trunk, build_trunk

from trunk_doubles import EmptyStagesTrunk, NoStagesTrunk

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_mlp(hidden: list[int]):
    """Factory of mlp trunks on 2-vectors; bias-free layers set by ``scale`` are x -> c·x on x > 0."""
    return lambda: build_trunk({"name": "mlp", "in_features": 2, "hidden": hidden})


def scale(stack: StackedTrunks, copy: int, factors: list[float]) -> None:
    """Copy ``copy``'s layer i becomes relu(factors[i] · x)."""
    with torch.no_grad():
        for layer, c in zip(stack.trunk.layers, factors):
            layer[0].weight[copy] = c * torch.eye(2)
            layer[0].bias[copy] = 0


def set_gate(linear: nn.Linear, bias: list[float]) -> None:
    """A gate that ignores its input: softmax(bias)."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor(bias))


HEADS = {"a": nn.Identity(), "b": nn.Identity()}
X = torch.tensor([[1.0, 3.0]])


class BatchNormTrunk(Trunk):
    """conv 1→3 3×3, BatchNorm, ReLU, global pool: a trunk with running-stat buffers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def layer_groups(self):
        return [("conv", self.conv), ("bn", self.bn)]

    def stages(self):
        return [lambda x: F.relu(self.bn(self.conv(x)))]

    @property
    def feature_info(self):
        return [{"module": "bn", "num_chs": 3, "reduction": 1}]

    def forward_head(self, features):
        return features.mean((2, 3))


class TokenTrunk(Trunk):
    """A trunk whose first layer embeds token ids: no gate input can be read from them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 2)

    def layer_groups(self):
        return [("embed", self.embed)]

    def forward(self, x):
        return self.embed(x).mean(1)


def test_smooth_step_at_hand_computed_points() -> None:
    t = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0])
    # -2t³ + 3t/2 + 1/2 at t = ±1/4: ∓1/32 ± 3/8 + 1/2.
    expected = torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0])
    torch.testing.assert_close(smooth_step(t, 1.0), expected)
    torch.testing.assert_close(smooth_step(2 * t, 2.0), expected)  # S depends on t/γ only


def test_mmoe_mixes_expert_outputs_by_each_task_gate() -> None:
    model = MMoE(linear_mlp([2])(), HEADS, linear_mlp([2]), experts=2)
    scale(model.experts, 0, [1.0])
    scale(model.experts, 1, [2.0])
    set_gate(model.gates.linears["a"], [0.0, math.log(3.0)])  # g_a = (1/4, 3/4)
    set_gate(model.gates.linears["b"], [0.0, 0.0])  # g_b = (1/2, 1/2)
    out = model(X)
    # E_0(x) = (1, 3), E_1(x) = (2, 6).
    torch.testing.assert_close(out["a"], torch.tensor([[0.25 * 1 + 0.75 * 2, 0.25 * 3 + 0.75 * 6]]))
    torch.testing.assert_close(out["b"], torch.tensor([[1.5, 4.5]]))


def dselect(experts: int, k: int, gamma: float = 1.0) -> DSelectK:
    model = DSelectK(linear_mlp([2])(), HEADS, linear_mlp([2]), experts=experts, k=k, gamma=gamma)
    for e in range(experts):
        scale(model.experts, e, [e + 1.0])  # E_e(x) = (e + 1) · x
    return model


def test_dselect_k_one_saturated_selector_picks_one_expert() -> None:
    model = dselect(experts=4, k=1)
    # Bit 0 on (S(1) = 1), bit 1 off (S(-1) = 0): code 0b01, expert 1.
    set_gate(model.selectors.linears["a"], [1.0, -1.0])
    torch.testing.assert_close(model(X)["a"], 2 * X)
    torch.testing.assert_close(model.weights(X, ["a"]), torch.tensor([[[0.0, 1.0, 0.0, 0.0]]]))


def test_dselect_k_weights_by_hand() -> None:
    model = dselect(experts=4, k=2)
    # Selector 1: S(1/4) = 0.84375 on bit 0, S(0) = 1/2 on bit 1; selector 2: expert 3 (0b11).
    set_gate(model.selectors.linears["a"], [0.25, 0.0, 1.0, 1.0])
    set_gate(model.mixers.linears["a"], [0.0, math.log(3.0)])  # softmax = (1/4, 3/4)
    r1 = torch.tensor([0.15625 * 0.5, 0.84375 * 0.5, 0.15625 * 0.5, 0.84375 * 0.5])
    q = 0.25 * r1 + 0.75 * torch.tensor([0.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(model.weights(X, ["a"])[0, 0], q)
    torch.testing.assert_close(model(X)["a"], (q * torch.arange(1.0, 5.0)).sum() * X)


def test_dselect_k_entropy_penalty_by_hand() -> None:
    """The penalty of a training forward is entropy · Σ −r log(r + 1e-6) over samples, selectors
    and codes; r of the hand case above: selector 1 spreads (0.078125, 0.421875) twice, selector 2
    is one-hot. Once read it is gone; an eval forward makes none."""
    model = dselect(experts=4, k=2)
    model.entropy = 0.5
    set_gate(model.selectors.linears["a"], [0.25, 0.0, 1.0, 1.0])
    model.train()
    model.weights(X, ["a"])
    r = torch.tensor([0.078125, 0.421875, 0.078125, 0.421875, 0.0, 0.0, 0.0, 1.0])
    expected = -0.5 * len(X) * float((r * torch.log(r + 1e-6)).sum())
    torch.testing.assert_close(model.penalty(), torch.tensor(expected))
    assert model.penalty() is None
    model.eval()
    model.weights(X, ["a"])
    assert model.penalty() is None


def test_dselect_k_entropy_penalty_sums_every_input_source() -> None:
    """Two sources in one forward: the penalty is the sum of each source's term alone."""
    model = dselect(experts=4, k=2)
    model.entropy = 1.0  # terms of order 10, well above assert_close's absolute tolerance
    model.train()
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[-2.0, 0.5], [0.3, 0.1]])
    alone = []
    for x in (a, b):
        model(x)
        alone.append(model.penalty())
    model.forward_groups({"a": a, "b": b}, {"a": ["a", "b"], "b": ["a", "b"]})
    torch.testing.assert_close(model.penalty(), alone[0] + alone[1], rtol=1e-6, atol=0)


def test_dselect_k_spare_codes_fold_onto_experts() -> None:
    model = dselect(experts=3, k=1)  # 2 bits, 4 codes: code 3 selects expert 3 mod 3 = 0
    set_gate(model.selectors.linears["a"], [1.0, 1.0])
    torch.testing.assert_close(model.weights(X, ["a"]), torch.tensor([[[1.0, 0.0, 0.0]]]))
    set_gate(model.selectors.linears["a"], [0.0, 0.0])  # every code 1/4: expert 0 has two
    torch.testing.assert_close(model.weights(X, ["a"]), torch.tensor([[[0.5, 0.25, 0.25]]]))


def test_cgc_mixes_shared_and_own_experts() -> None:
    model = CGC(linear_mlp([2])(), HEADS, linear_mlp([2]), shared_experts=1, task_experts=1)
    scale(model.shared, 0, [1.0])
    scale(model.own["a"], 0, [2.0])
    scale(model.own["b"], 0, [4.0])
    set_gate(model.gates.linears["a"], [0.0, math.log(3.0)])
    set_gate(model.gates.linears["b"], [0.0, 0.0])
    out = model(X)
    torch.testing.assert_close(out["a"], (0.25 * 1 + 0.75 * 2) * X)
    torch.testing.assert_close(out["b"], (0.5 * 1 + 0.5 * 4) * X)


def test_ple_two_levels_by_hand() -> None:
    model = PLE(linear_mlp([2, 2])(), HEADS, linear_mlp([2, 2]), shared_experts=1, task_experts=1)
    assert model.levels == 2
    scale(model.shared, 0, [1.0, 1.0])
    scale(model.own["a"], 0, [2.0, 3.0])
    scale(model.own["b"], 0, [4.0, 5.0])
    for level in range(2):
        for t in "ab":
            set_gate(model.task_gates[level].linears[t], [0.0, 0.0])
    set_gate(model.shared_gates[0], [0.0, 0.0, 0.0])
    out = model(torch.ones(1, 2))
    # Level 0 outputs: shared 1, a 2, b 4 (times x = 1). h_a = 3/2, h_b = 5/2, s = 7/3.
    # Level 1: shared reads s -> 7/3; a's expert 3 · 3/2; b's expert 5 · 5/2; each task mixes 1/2, 1/2.
    torch.testing.assert_close(out["a"], torch.full((1, 2), (7 / 3 + 4.5) / 2))
    torch.testing.assert_close(out["b"], torch.full((1, 2), (7 / 3 + 12.5) / 2))


def test_stacked_experts_equal_a_loop_forward_and_gradients() -> None:
    torch.manual_seed(0)
    trunks = [build_trunk({"name": "seed_net", "dropout": 0.0}) for _ in range(3)]
    stack = StackedTrunks(trunks)
    x = torch.randn(4, 1, 28, 28)
    looped = torch.stack([t(x) for t in trunks])
    batched = stack(x)
    torch.testing.assert_close(batched, looped)
    w = torch.randn_like(looped)
    (looped * w).sum().backward()
    (batched * w).sum().backward()
    for name, p in stack.trunk.named_parameters():
        torch.testing.assert_close(p.grad, torch.stack([t.get_parameter(name).grad for t in trunks]), msg=name)


def test_stacked_batchnorm_running_stats_equal_a_loop_across_groups() -> None:
    torch.manual_seed(0)
    trunks = [BatchNormTrunk() for _ in range(3)]
    groups = [StackedTrunks(trunks[:1]), StackedTrunks(trunks[1:])]  # two groups run in one vmap
    x = torch.randn(5, 1, 6, 6)
    looped = torch.stack([t(x) for t in trunks])
    torch.testing.assert_close(StackedTrunks.run(groups, x), looped)
    assert all(int(g.trunk.get_buffer("bn.num_batches_tracked").sum()) == g.count for g in groups)  # each copy updated once
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        stacked = torch.cat([g.trunk.get_buffer(name) for g in groups])
        torch.testing.assert_close(stacked, torch.stack([t.get_buffer(name) for t in trunks]), msg=name)


def test_stacked_experts_draw_different_dropout_masks() -> None:
    torch.manual_seed(0)
    stack = StackedTrunks([build_trunk({"name": "seed_net", "dropout": 0.5}) for _ in range(2)])
    with torch.no_grad():
        for p in stack.parameters():
            p[1] = p[0]  # identical experts: only dropout can tell their outputs apart
    out = stack(torch.randn(2, 1, 28, 28))
    assert not torch.equal(out[0], out[1])
    stack.eval()
    out = stack(torch.randn(2, 1, 28, 28))
    torch.testing.assert_close(out[0], out[1])


def seed_model(cls, **arguments):
    make = lambda: build_trunk({"name": "seed_net"})  # noqa: E731
    return cls(make(), {"a": nn.Linear(50, 3), "b": nn.Linear(50, 2)}, make, **arguments)


ARCHITECTURES = [
    (MMoE, {"experts": 3}),
    (DSelectK, {"experts": 3, "k": 2}),
    (CGC, {"shared_experts": 2, "task_experts": 1}),
    (PLE, {"shared_experts": 1, "task_experts": 2}),
]


@pytest.mark.parametrize("cls,arguments", ARCHITECTURES, ids=lambda v: getattr(v, "__name__", ""))
def test_parameter_partition(cls, arguments) -> None:
    model = seed_model(cls, **arguments)
    every = {id(p) for p in model.parameters()}
    shared = [id(p) for p in model.shared_parameters()]
    own = {t: [id(p) for p in ps] for t, ps in model.task_parameters().items()}
    owned = [i for ids in own.values() for i in ids]
    assert len(set(shared)) == len(shared) and len(set(owned)) == len(owned)  # no parameter twice
    assert not set(shared) & set(owned)
    assert set(shared) | set(owned) == every
    assert {id(p) for p in model.last_shared_parameters()} <= set(shared)
    out = model(torch.randn(2, 1, 28, 28))
    assert out["a"].shape == (2, 3) and out["b"].shape == (2, 2)
    out["a"].sum().backward()
    assert all(p.grad is None for p in model.heads["b"].parameters())


@pytest.mark.parametrize("cls,arguments", ARCHITECTURES[:3], ids=lambda v: getattr(v, "__name__", ""))
def test_cut_marks_the_shared_experts_outputs(cls, arguments) -> None:
    model = seed_model(cls, **arguments)
    assert model.shares_representation
    with model.representation_cuts() as cuts:
        out = model(torch.randn(2, 1, 28, 28))
    ((z, leaf),) = cuts
    shared = model.shared if cls is CGC else model.experts
    assert z.shape == (shared.count, 2, 50)
    (out["a"].sum() + out["b"].sum()).backward()
    assert leaf.grad is not None
    assert all(p.grad is None for p in model.shared_parameters())  # they wait for the engine's combined gradient
    assert all(p.grad is not None for ps in model.task_parameters().values() for p in ps)


@pytest.mark.parametrize(
    "cls,arguments,key",
    [
        (MMoE, {"experts": 0}, "architecture.experts"),
        (MMoE, {"experts": 2.5}, "architecture.experts"),
        (MMoE, {"experts": "4"}, "architecture.experts"),
        (DSelectK, {"experts": -1, "k": 1}, "architecture.experts"),
        (DSelectK, {"experts": 2, "k": 0}, "architecture.k"),
        (DSelectK, {"experts": 2, "k": 1, "gamma": 0.0}, "architecture.gamma"),
        (CGC, {"shared_experts": 0}, "architecture.shared_experts"),
        (CGC, {"task_experts": True}, "architecture.task_experts"),
        (PLE, {"shared_experts": 1, "task_experts": -2}, "architecture.task_experts"),
    ],
)
def test_bad_counts_are_refused_naming_the_key(cls, arguments, key) -> None:
    with pytest.raises(ValueError, match=key):
        seed_model(cls, **arguments)


def test_k_above_experts_is_refused() -> None:
    with pytest.raises(ValueError, match=r"architecture\.k=5 asks for a gate with more experts than exist"):
        seed_model(DSelectK, experts=4, k=5)


def test_ple_on_a_trunk_without_stages_suggests_cgc() -> None:
    with pytest.raises(ValueError, match=r"architecture\.name=ple.*NoStagesTrunk.*architecture\.name=cgc"):
        PLE(NoStagesTrunk(), {"a": nn.Identity()}, NoStagesTrunk)
    with pytest.raises(ValueError, match=r"architecture\.name=ple.*EmptyStagesTrunk"):
        PLE(EmptyStagesTrunk(), {"a": nn.Identity()}, EmptyStagesTrunk)
    CGC(NoStagesTrunk(), {"a": nn.Identity()}, NoStagesTrunk)  # one level over the whole trunk works


def test_gates_need_an_image_or_vector_input() -> None:
    with pytest.raises(ValueError, match=r"architecture\.name.*TokenTrunk.*Embedding"):
        MMoE(TokenTrunk(), {"a": nn.Identity()}, TokenTrunk)


@pytest.mark.parametrize("cls,arguments", ARCHITECTURES, ids=lambda v: getattr(v, "__name__", ""))
def test_a_tasks_own_parameters_get_no_gradient_from_another_task(cls, arguments) -> None:
    make = linear_mlp([4, 4, 4])  # three stages: PLE has a level whose task gates are shared
    model = cls(make(), {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}, make, **arguments)
    model(torch.randn(3, 2))["a"].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.task_parameters()["b"])
    assert any(p.grad is not None and p.grad.any() for p in model.task_parameters()["a"])


@pytest.mark.parametrize("cls,arguments", ARCHITECTURES, ids=lambda v: getattr(v, "__name__", ""))
def test_state_dict_round_trip(cls, arguments) -> None:
    source, target = seed_model(cls, **arguments).eval(), seed_model(cls, **arguments).eval()
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 1, 28, 28)
    for t, out in source(x).items():
        torch.testing.assert_close(target(x)[t], out)


def test_registered_by_name() -> None:
    from mtl.architectures import ARCHITECTURES

    assert [ARCHITECTURES.get(n) for n in ("mmoe", "cgc", "ple", "dselect_k")] == [MMoE, CGC, PLE, DSelectK]


@pytest.mark.parametrize("cls,arguments", ARCHITECTURES, ids=lambda v: getattr(v, "__name__", ""))
def test_each_source_feeds_its_own_tasks(cls, arguments) -> None:
    model = seed_model(cls, **arguments).eval()
    xa, xb = torch.randn(2, 1, 28, 28), torch.randn(3, 1, 28, 28)
    out = model.forward_groups({"left": xa, "right": xb}, {"left": ["a"], "right": ["b"]})
    torch.testing.assert_close(out["a"], model(xa)["a"])
    torch.testing.assert_close(out["b"], model(xb, ["b"])["b"])
