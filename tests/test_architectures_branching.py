"""Cross-stitch, Learning to Branch and MTAN: their formulas on cases worked out by hand,
batched copies against a loop, the parameter partition, shapes, and construction errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from mtl.architectures import ARCHITECTURES
from mtl.architectures.branching import CrossStitch, LearningToBranch, TrunkCopies, mix
from mtl.architectures.mtan import MTAN
from mtl.engine import GradientEngine
from mtl.heads import LinearHead
from mtl.model import MultiTaskModel
from mtl.trunks import Trunk, build_trunk

from trunk_doubles import HostReadTrunk, NoStagesTrunk
from mtl.weighting import WEIGHTINGS, Aggregation, GradientWeighting

SEED_NET = {"name": "seed_net", "dropout": 0.0}
RESNET = {"name": "resnet18", "small_input": True}


class _ConvBN(Trunk):
    """Two conv-BatchNorm-ReLU stages (4 channels, then 6 at half the size), pooled: a
    trunk with BatchNorm small enough for fast tests."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU())

    def layer_groups(self):
        return [("block1", self.block1), ("block2", self.block2)]

    def stages(self):
        return [self.block1, self.block2]

    @property
    def feature_info(self):
        return [{"module": "block1", "num_chs": 4, "reduction": 1}, {"module": "block2", "num_chs": 6, "reduction": 2}]

    def forward_head(self, features):
        return features.mean((2, 3))


def _build(arch, trunk: dict | type, input_shape: tuple, tasks: int = 2, outputs: int = 3, **arguments):
    """``arch`` on a trunk config (or trunk class) with ``tasks`` linear heads, from seed 0."""
    torch.manual_seed(0)
    make = (lambda: build_trunk(trunk)) if isinstance(trunk, dict) else trunk
    first = make()
    shape = first.feature_shape(input_shape)
    heads = {f"t{i}": LinearHead(shape, outputs) for i in range(tasks)}
    return arch(first, heads, make, **arguments)


def _mlp(first: float, second: float) -> Trunk:
    """A 1-1-1 MLP trunk with the given layer weights and zero biases."""
    trunk = build_trunk({"name": "mlp", "in_features": 1, "hidden": [1, 1]})
    with torch.no_grad():
        for layer, w in zip(trunk.layers, (first, second)):
            layer[0].weight.fill_(w)
            layer[0].bias.zero_()
    return trunk


def test_registered():
    assert {"cross_stitch", "ltb", "mtan"} <= set(ARCHITECTURES.names())


def test_mix_is_the_cross_stitch_unit_by_hand():
    alpha = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    y = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # [tasks, batch, features]
    expected = torch.tensor([[[0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4]], [[0.2 * 1 + 0.8 * 3, 0.2 * 2 + 0.8 * 4]]])
    assert torch.allclose(mix(alpha, y), expected)


def test_cross_stitch_initial_alpha():
    assert torch.allclose(CrossStitch.initial_alpha(2, 0.9), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    assert torch.allclose(CrossStitch.initial_alpha(3, 0.8), torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    assert torch.equal(CrossStitch.initial_alpha(1, 0.9), torch.ones(1, 1))


def test_cross_stitch_network_by_hand():
    # Columns: a = relu(2 relu(1 x)), b = relu(1 relu(3 x)); at x = 1 the first stage gives
    # (1, 3); the unit (0.9, 0.1) makes (1.2, 2.8); the second stage (2.4, 2.8); the output
    # unit (0.9, 0.1) gives task a 0.9*2.4 + 0.1*2.8 = 2.44 and task b 0.1*2.4 + 0.9*2.8 = 2.76.
    columns = iter([_mlp(1, 2), _mlp(3, 1)])
    model = CrossStitch(next(columns), {"a": nn.Identity(), "b": nn.Identity()}, lambda: next(columns))
    out = model(torch.ones(1, 1))
    assert out["a"].item() == pytest.approx(2.44)
    assert out["b"].item() == pytest.approx(2.76)


def test_cross_stitch_every_column_reached_by_each_task():
    model = _build(CrossStitch, SEED_NET, (1, 28, 28))
    model(torch.randn(2, 1, 28, 28))["t0"].sum().backward()
    for column in model.copies:
        assert column.conv1.weight.grad.abs().sum() > 0
    assert not model.out_mix["t1"].grad.any()


@pytest.mark.parametrize("arch, node, shape, arguments", [
    (CrossStitch, _ConvBN, (1, 8, 8), {}),
    pytest.param(CrossStitch, RESNET, (3, 16, 16), {}, marks=pytest.mark.slow),
    (CrossStitch, SEED_NET, (1, 28, 28), {"self_weight": 0.6}),
    (LearningToBranch, SEED_NET, (1, 28, 28), {"branches": [1, 2], "tau": 0.5}),
])
def test_batched_copies_equal_a_loop(arch, node, shape, arguments):
    batched = _build(arch, node, shape, batched=True, **arguments)
    looped = _build(arch, node, shape, batched=False, **arguments)
    x = torch.randn(3, *shape)
    outs = []
    for model in (batched, looped):
        torch.manual_seed(1)  # the same Gumbel noise for LTB
        out = model(x)
        sum((o * torch.arange(1.0, 4.0)).sum() for o in out.values()).backward()
        outs.append(out)
    assert batched.copies.batched
    for t in outs[0]:
        assert torch.allclose(outs[0][t], outs[1][t], atol=1e-5)
    for (name, p), q in zip(batched.named_parameters(), looped.parameters()):
        # The loop leaves a copy's stage that no node reads without a gradient; the stack gives it zeros.
        p_grad, q_grad = (torch.zeros_like(p) if g is None else g for g in (p.grad, q.grad))
        # float32: the vmapped (grouped) convolutions sum in another order than separate ones;
        # gradients of magnitude ~5 then differ by ~1e-4 in some kernels' orders (seen in CI).
        assert torch.allclose(p_grad, q_grad, atol=1e-4, rtol=1e-3), name
    for (name, b), c in zip(batched.named_buffers(), looped.buffers()):
        assert torch.allclose(b, c, atol=1e-6), name  # BatchNorm statistics written back


def test_copies_fall_back_to_a_loop_where_vmap_cannot_batch(caplog):
    torch.manual_seed(0)
    trunks = [HostReadTrunk(), HostReadTrunk()]
    copies = TrunkCopies(trunks, batched=True)
    x = torch.ones(1, 2)
    with caplog.at_level(logging.WARNING):
        y = copies(x, [2], lambda stage, y: y)
    assert not copies.batched and "loop" in caplog.text
    assert torch.allclose(y, torch.stack([t.fc(x) * 2 for t in trunks]))
    assert torch.allclose(copies(x, [2], lambda stage, y: y), y)


def test_copies_run_in_a_loop_on_cpu_by_default(caplog):
    copies = TrunkCopies([HostReadTrunk(), HostReadTrunk()])
    with caplog.at_level(logging.WARNING):
        copies(torch.ones(1, 2), [2], lambda stage, y: y)
    assert copies.batched is None and not caplog.text  # vmap was never tried


def test_ltb_saturated_logits_and_small_tau_equal_the_hard_tree():
    model = _build(LearningToBranch, SEED_NET, (1, 28, 28), branches=[1, 2], tau=1e-3)
    with torch.no_grad():
        model.logits[0].copy_(torch.tensor([[1e3], [1e3]]))  # one parent at level 0
        model.choice["t0"].copy_(torch.tensor([-1e3, 1e3]))  # t0 -> node 1
        model.choice["t1"].copy_(torch.tensor([1e3, -1e3]))  # t1 -> node 0
    assert model.tree() == [[0, 0], [1, 0]]
    x = torch.randn(2, 1, 28, 28)
    soft = model.train()(x)
    hard = model.eval()(x)
    c0, c1 = model.copies
    root = c0.stages()[0](x)
    by_hand = {"t0": c1.forward_head(c1.stages()[1](root)), "t1": c0.forward_head(c0.stages()[1](root))}
    for t in ("t0", "t1"):
        assert torch.allclose(soft[t], hard[t], atol=1e-5)
        assert torch.allclose(hard[t], model.heads[t](by_hand[t]), atol=1e-5)


def test_ltb_eval_picks_the_argmax_parent_and_training_samples():
    model = _build(LearningToBranch, SEED_NET, (1, 28, 28), branches=[2, 2])
    logits = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    assert torch.equal(model.eval().weights(logits), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    sample = model.train().weights(logits)
    assert torch.allclose(sample.sum(-1), torch.ones(2)) and (sample > 0).all()


def _force_masks(model: MTAN, value: float) -> None:
    # The mask's last BatchNorm with weight 0 outputs its bias: sigmoid(bias) everywhere.
    with torch.no_grad():
        for masks in model.attention.values():
            for mask in masks:
                mask[4].weight.zero_()
                mask[4].bias.fill_(value)


@pytest.mark.parametrize("node, shape", [
    (SEED_NET, (1, 28, 28)), (_ConvBN, (1, 8, 8)), pytest.param(RESNET, (3, 16, 16), marks=pytest.mark.slow),
])
def test_mtan_masks_of_one_reproduce_hard_sharing(node, shape):
    model = _build(MTAN, node, shape).eval()
    _force_masks(model, 50.0)  # sigmoid(50) is 1 in float32
    hard = MultiTaskModel(model.trunk, dict(model.heads)).eval()
    x = torch.randn(2, *shape)
    out, expected = model(x), hard(x)
    for t in expected:
        assert torch.allclose(out[t], expected[t], atol=1e-6)


def test_mtan_attention_formula_by_hand():
    # Masks at sigmoid(0) = 1/2: a^1 = u^1 / 2, a^2 = u^2 / 2 whatever f^2 feeds the mask.
    model = _build(MTAN, SEED_NET, (1, 28, 28)).eval()
    _force_masks(model, 0.0)
    x = torch.randn(2, 1, 28, 28)
    _, u2 = model.trunk.forward_intermediates(x, intermediates_only=True)
    assert torch.allclose(model.attend("t0", [model.trunk.stages()[0](x), u2]), model.trunk.forward_head(u2 / 2), atol=1e-6)


def test_mtan_task_reads_its_own_attention_only():
    model = _build(MTAN, SEED_NET, (1, 28, 28)).eval()
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    with torch.no_grad():
        model.attention["t0"][0][0].weight.mul_(3)
    after = model(x)
    assert not torch.allclose(before["t0"], after["t0"])
    assert torch.equal(before["t1"], after["t1"])


@pytest.mark.parametrize("arch, arguments", [(CrossStitch, {}), (LearningToBranch, {"branches": [1, 3]}), (MTAN, {})])
def test_parameter_partition(arch, arguments):
    model = _build(arch, SEED_NET, (1, 28, 28), tasks=3, **arguments)
    shared = {id(p) for p in model.shared_parameters()}
    own = [{id(p) for p in ps} for ps in model.task_parameters().values()]
    assert all(not (shared & o) for o in own)
    assert all(not (a & b) for i, a in enumerate(own) for b in own[i + 1:])
    assert shared.union(*own) == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.last_shared_parameters()} <= shared
    assert not model.shares_representation


@pytest.mark.parametrize("arch", [CrossStitch, LearningToBranch, MTAN])
@pytest.mark.parametrize("node, shape", [
    (SEED_NET, (1, 28, 28)), pytest.param({"name": "resnet18"}, (3, 32, 32), marks=pytest.mark.slow),
])
def test_output_shapes(arch, node, shape):
    model = _build(arch, node, shape, tasks=2, outputs=4)
    out = model(torch.randn(2, *shape))
    assert {t: tuple(o.shape) for t, o in out.items()} == {"t0": (2, 4), "t1": (2, 4)}
    groups = model.forward_groups({"a": torch.randn(2, *shape), "b": torch.randn(3, *shape)}, {"a": ["t0"], "b": ["t0", "t1"]})
    assert [tuple(o.shape) for o in groups.values()] == [(3, 4), (3, 4)]


def test_groups_of_one_shape_equal_separate_batches():
    for arch in (CrossStitch, MTAN):
        model = _build(arch, SEED_NET, (1, 28, 28)).eval()
        a, b = torch.randn(2, 1, 28, 28), torch.randn(3, 1, 28, 28)
        joint = model.forward_groups({"a": a, "b": b}, {"a": ["t0"], "b": ["t1"]})
        assert torch.allclose(joint["t0"], model(a)["t0"], atol=1e-5)
        assert torch.allclose(joint["t1"], model(b)["t1"], atol=1e-5)


@pytest.mark.parametrize("arch, key", [(CrossStitch, "cross_stitch"), (LearningToBranch, "ltb"), (MTAN, "mtan")])
def test_trunk_without_stages_is_refused(arch, key):
    with pytest.raises(ValueError, match=f"architecture.name={key}.*NoStagesTrunk"):
        arch(NoStagesTrunk(), {"a": nn.Identity()}, NoStagesTrunk)


def test_mtan_refuses_stages_without_maps():
    node = {"name": "mlp", "in_features": 4}
    with pytest.raises(ValueError, match=r"architecture.name=mtan.*reduction None.*cross_stitch"):
        MTAN(build_trunk(node), {"a": nn.Identity()}, lambda: build_trunk(node))


@pytest.mark.parametrize("arguments, match", [
    ({"batched": "yes"}, r"architecture.batched must be true .*, false .* or null"),
    ({"self_weight": 0.0}, r"architecture.self_weight must be in \(0, 1\]"),
    ({"self_weight": 1.5}, r"architecture.self_weight must be in \(0, 1\]"),
])
def test_cross_stitch_bad_arguments(arguments, match):
    with pytest.raises(ValueError, match=match):
        _build(CrossStitch, SEED_NET, (1, 28, 28), **arguments)


@pytest.mark.parametrize("arguments, match", [
    ({"branches": [0, 2]}, r"architecture.branches\[0\] must be in \[1, 2\]"),
    ({"branches": [1, 3]}, r"architecture.branches\[1\] must be in \[1, 2\]"),
    ({"branches": [2]}, r"architecture.branches=\[2\]: give one node count per trunk stage \(2\)"),
    ({"branches": [2, 1]}, r"architecture.branches=\[2, 1\] narrows"),
    ({"tau": 0}, r"architecture.tau must be > 0"),
])
def test_ltb_bad_arguments(arguments, match):
    with pytest.raises(ValueError, match=match):
        _build(LearningToBranch, SEED_NET, (1, 28, 28), **arguments)


class _SumOfRows(GradientWeighting):
    """A combined gradient equal to the sum of J's rows: the engine must then give every
    parameter the plain summed backward's gradient, which holds only if the architecture's
    shared and task parameters are what they claim."""

    def aggregate(self, J):
        return Aggregation(gradient=J.sum(dim=0))


def _losses(outputs, targets):
    return {t: nn.functional.cross_entropy(o, targets[t]) for t, o in outputs.items()}


@pytest.mark.parametrize("arch, arguments", [(CrossStitch, {}), (LearningToBranch, {"branches": [1, 2]}), (MTAN, {})])
def test_engine_combined_gradient_equals_the_summed_backward(arch, arguments):
    model = _build(arch, _ConvBN, (1, 8, 8), **arguments)
    x, targets = torch.randn(4, 1, 8, 8), {"t0": torch.tensor([0, 1, 2, 0]), "t1": torch.tensor([2, 2, 1, 0])}
    torch.manual_seed(1)
    sum(_losses(model(x), targets).values()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    engine = GradientEngine(model, _SumOfRows(model.tasks, mode="parameters"))
    engine.backward({"x": x}, {"x": model.tasks}, targets, _losses, 0, lambda: None)
    for n, g in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_mtan_staged_gramian_equals_the_jacobian_path():
    grads = []
    for staged in (True, False):
        model = _build(MTAN, _ConvBN, (1, 8, 8))
        x, targets = torch.randn(4, 1, 8, 8), {"t0": torch.tensor([0, 1, 2, 0]), "t1": torch.tensor([2, 2, 1, 0])}
        engine = GradientEngine(model, WEIGHTINGS.get("upgrad")(model.tasks, mode="parameters"), staged=staged)
        assert engine.staged == staged  # MTAN's model.trunk is the trunk every task reads: its graph cuts apply
        engine.backward({"x": x}, {"x": model.tasks}, targets, _losses, 0, lambda: None)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
