"""The staged Gramian: G = JJᵀ from the trunk's backward split at cuts, without J."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from mtl.engine import GradientEngine, jacobian
from mtl.gramian import plan, recording, staged_gramian
from mtl.losses import task_losses
from mtl.trunks import TRUNKS, build_trunk
from mtl.weighting import WEIGHTINGS, GramianWeighting

from test_trunks import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")


def objectives_of(trunk: nn.Module, x: torch.Tensor, T: int = 3):
    """T task objectives on the trunk's features, and the recorded candidate cuts."""
    with recording(trunk) as cuts:
        features = trunk(x).flatten(1)
    heads = nn.Linear(features.shape[1], T).to(features.dtype)
    return heads(features).square().mean(dim=0), cuts


def assert_gramian(trunk: nn.Module, x: torch.Tensor, shared=None, T: int = 3, chunk: int = 0):
    shared = list(trunk.parameters()) if shared is None else shared
    objectives, cuts = objectives_of(trunk, x, T)
    stages = plan(objectives, cuts, shared)
    J = jacobian(objectives, shared)
    expected = J @ J.T
    if stages is not None:
        G = staged_gramian(objectives, stages, chunk)
        scale = expected.abs().max()
        assert (G - expected).abs().max() <= 1e-9 * scale
        assert sorted(id(p) for s in stages for p in s.params) == sorted(id(p) for p in shared if p.requires_grad)
    return stages


@pytest.mark.parametrize("name", TRUNKS.names())
def test_staged_gramian_equals_jjt_for_every_trunk(name):
    if getattr(TRUNKS.get(name), "takes_text", False):
        pytest.skip("a text trunk takes UTF-8 rows, not tensors of a shape: tests/test_pretrained_trunks.py")
    kwargs, input_shape = SPECS[name]
    torch.manual_seed(0)
    trunk = build_trunk({"name": name, **kwargs}).double()  # exact up to float64 rounding
    stages = assert_gramian(trunk, torch.randn(2, *input_shape, dtype=torch.float64))
    assert stages is not None and len(stages) >= 2, f"{name}: no cut found, the Gramian would need all of J"


def test_resnet18_stages_and_their_sizes():
    torch.manual_seed(0)
    trunk = build_trunk({"name": "resnet18", "small_input": True}).double()
    stages = assert_gramian(trunk, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    sizes = [sum(p.numel() for p in s.params) for s in stages]
    # Residual blocks are not split (the skip bypasses their inner convolutions). layer4.1 is
    # the largest: 2 convs 512·512·3·3 + 2 batch norms 2·512 = 4,720,640. Smaller stages are
    # merged up to that size (layer4.0 alone, then everything below).
    assert sizes[0] == 2 * 512 * 512 * 9 + 2 * 2 * 512
    assert sum(sizes) == sum(p.numel() for p in trunk.parameters())
    assert max(sizes) == sizes[0] and len(stages) == 3


class Skip(nn.Module):
    """a = lin1(x); out = lin2(a) + a: a is a cut, lin2's output is not (the skip bypasses it)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, 4), nn.Linear(4, 4)

    def forward(self, x):
        a = torch.tanh(self.lin1(x))
        return self.lin2(a) + a


class Tied(nn.Module):
    """One layer applied twice: its parameters are consumed on both sides of the middle output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class Halves(nn.Module):
    """Returns one output of a two-output node (chunk); a later layer takes the other one."""

    def forward(self, h):
        first, self.second = h.chunk(2, dim=1)
        return first


class SplitUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.halves, self.lin2, self.lin3 = nn.Linear(3, 4), Halves(), nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        first = self.halves(self.lin1(x))
        return self.lin2(first) + self.lin3(self.halves.second)


def _double(module):
    torch.manual_seed(0)
    return module.double(), torch.randn(5, 3 if not isinstance(module, Tied) else 4, dtype=torch.float64)


def test_a_skip_connection_keeps_its_block_in_one_stage():
    trunk, x = _double(Skip())
    stages = assert_gramian(trunk, x)
    assert [set(map(id, s.params)) for s in stages] == [set(map(id, trunk.lin2.parameters())), set(map(id, trunk.lin1.parameters()))]


def test_tied_weights_across_a_candidate_are_not_split():
    trunk, x = _double(Tied())
    stages = assert_gramian(trunk, x)
    assert [len(s.params) for s in stages] == [2, 2]  # out | lin (both uses), no cut between the uses


def test_another_output_of_the_cut_node_used_later_is_not_a_cut():
    trunk, x = _double(SplitUse())
    stages = assert_gramian(trunk, x)  # a cut at `first` would drop the gradient through `second`
    assert stages[-1].bottom is None and stages[0].bottom is not stages[0].top
    assert [len(s.params) for s in stages] == [4, 2]  # lin2 and lin3 | lin1


def test_frozen_lower_layers_and_chunks():
    torch.manual_seed(0)
    trunk = build_trunk({"name": "mlp", "in_features": 6, "hidden": [8, 8, 8]}).double()
    for p in trunk.layers[0].parameters():
        p.requires_grad_(False)
    shared = [p for p in trunk.parameters() if p.requires_grad]
    for chunk in (0, 1, 2):
        stages = assert_gramian(trunk, torch.randn(4, 6, dtype=torch.float64), shared, T=5, chunk=chunk)
        assert len(stages) == 2


def test_separate_trunk_calls_have_no_cut():
    """Two inputs through the trunk separately: no single tensor cuts both, so J is used."""
    torch.manual_seed(0)
    trunk = build_trunk({"name": "mlp", "in_features": 6, "hidden": [8, 8]})
    with recording(trunk) as cuts:
        a, b = trunk(torch.randn(3, 6)), trunk(torch.randn(3, 6))
    objectives = torch.stack([a.square().mean(), b.square().mean()])
    assert plan(objectives, cuts, list(trunk.parameters())) is None


GRAMIAN_METHODS = [n for n in WEIGHTINGS.names() if issubclass(WEIGHTINGS.get(n), GramianWeighting) and "parameters" in WEIGHTINGS.get(n).modes]


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_engine_staged_equals_the_jacobian_path(name):
    """The same parameter gradients with G from stages as with G from J, in parameter mode."""
    from test_weighting_trainer import _model_and_batch

    grads = []
    for staged in (True, False):
        torch.manual_seed(0)
        t, inputs, targets = _model_and_batch()
        method = WEIGHTINGS.get(name)(list(t.tasks), mode="parameters")
        engine = GradientEngine(t.model, method, staged=staged)
        assert engine.staged == staged
        used = []
        original = staged_gramian
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("mtl.engine.staged_gramian", lambda *a, **k: used.append(1) or original(*a, **k))
            engine.backward(inputs, t.groups, targets, functools.partial(task_losses, t.tasks), 0, lambda: None)
        assert bool(used) == staged
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


class _Doubled(torch.autograd.Function):
    """y = 2x whose backward reads a value to the host on the way: vmap has no batching rule for that."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        assert math.isfinite(float(g.sum()))
        return 2 * g


class _FailsFirst(torch.autograd.Function):
    """y = x whose first backward (the batched one) raises ``error``: a batched backward on a
    GPU running out of memory where one row at a time would fit, or any other failure."""

    error: Exception | None = None

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        error, _FailsFirst.error = _FailsFirst.error, None
        if error is not None:
            raise error
        return g


def test_an_op_autograd_cannot_batch_falls_back_to_rows_said_once(caplog):
    from mtl import gramian

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    gramian._said.clear()
    for _ in range(2):
        objectives = _Doubled.apply(x).sum(dim=1)  # o_t = 2(x_t1 + x_t2): ∂o_t/∂x_t = (2, 2)
        J = jacobian(objectives, [x])
        torch.testing.assert_close(J, torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]]))
    said = [r.getMessage() for r in caplog.records if "cannot vectorize" in r.getMessage()]
    assert len(said) == 1 and "Batching rule not implemented for aten::item" in said[0]


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), RuntimeError("a real failure")], ids=["out-of-memory", "other"]
)
def test_other_errors_of_the_batched_backward_are_raised_not_retried_by_rows(error):
    x = torch.ones(2, 2, requires_grad=True)
    _FailsFirst.error = error
    with pytest.raises(type(error), match=str(error)):
        jacobian(_FailsFirst.apply(x).sum(dim=1), [x])


def test_the_graph_order_is_topological_and_follows_the_module_outputs():
    from mtl.gramian import topological_order

    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with recording(trunk) as outputs:
        y = trunk(torch.randn(5, 3))
    root = (y.square().sum(dim=0) * torch.tensor([1.0, 2.0])).grad_fn
    number = topological_order(root, [t.grad_fn for t in outputs])
    edges = [(node, child) for node in number for child, _ in node.next_functions if child in number]
    assert edges and all(number[child] < number[node] for node, child in edges)  # children first
    # The module outputs in forward order (linear, tanh, linear, the Sequential's = the last
    # linear's), below the objectives' nodes.
    ranks = [number[t.grad_fn] for t in outputs]
    assert ranks == sorted(ranks) and max(ranks) < number[root]
