"""Mixtures of experts: MMoE, CGC, PLE and DSelect-k, with experts that are copies of the trunk.

Experts of one trunk config have parameters of one shape, so they are stored stacked (one
``[E, ...]`` parameter per trunk parameter, ``StackedTrunks``) and run in one
``torch.vmap`` over ``torch.func.functional_call``: one kernel per layer for all experts
instead of one per expert (convolutions become one grouped convolution). BatchNorm buffers
are stacked the same way; their running-stat updates in train mode land in the stacked
buffers (tested against a loop on torch 2.14), and dropout draws independent masks per
expert (``randomness="different"``). The gain meant is in kernel launches, a GPU's; on a CPU
grouped convolutions can cost more than separate ones (``python -m mtl.bench.architectures``
times each architecture's step against hard sharing; experts have no loop mode to compare).

Gates read the input as LibMTL's do (a linear map of the flattened input), except for images:
the contract gives no input size, so an image gate reads a 4×4 average-pooled thumbnail of
the input (C·16 values, any image size), a cheap summary that still sees where the ink is.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mtl import checks
from mtl.architectures.base import Architecture, TrunkFactory, register_architecture
from mtl.trunks import Trunk

POOL = 4  # an image gate reads the input average-pooled to POOL × POOL


def _count(value: object, key: str) -> int:
    return checks.number(value, f"architecture.{key}", 1, integer=True)


def _gate_width(trunk: Trunk) -> tuple[int, bool]:
    """(width of the gate input, whether images are pooled), read from the trunk's first layer."""
    first = next((m for m in trunk.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding))), None)
    if isinstance(first, nn.Conv2d) and not trunk.takes_text:
        return first.in_channels * POOL * POOL, True
    if isinstance(first, nn.Linear) and not trunk.takes_text:
        return first.in_features, False
    reads = "text rows" if trunk.takes_text else f"inputs through {type(first).__name__ if first is not None else 'no layer'}"
    raise ValueError(
        f"architecture.name: the gates of a mixture of experts read the input, and trunk {type(trunk).__name__} reads "
        f"{reads}, neither images (a 2-d convolution first) nor vectors (a linear layer first); use "
        "architecture.name=hard, or a trunk of images or vectors."
    )


def _gate_input(x: torch.Tensor, pooled: bool, lead: int = 1) -> torch.Tensor:
    """What a gate reads of x ``[*lead dims, *shape]`` (the batch dim last of ``lead``): ``[*lead dims, D]``."""
    if pooled:
        return F.adaptive_avg_pool2d(x.flatten(0, lead - 1), POOL).reshape(*x.shape[:lead], -1)
    return x.flatten(lead)


class _Call(nn.Module):
    """``fn(trunk, x)`` as a module, so functional_call can run a part of the trunk (a stage)."""

    def __init__(self, trunk: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.trunk = trunk
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.trunk, x)


def _whole(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk(x)


class StackedTrunks(nn.Module):
    """E copies of one trunk in one module: ``trunk`` is a copy whose every parameter and
    buffer holds the E copies' tensors stacked, ``[E, ...]``. State-dict keys are
    ``trunk.<name>``; ``trunk.layer_groups()`` name the stacked parameters of each group."""

    def __init__(self, trunks: list[Trunk]):
        super().__init__()
        self.count = len(trunks)
        self.trunk = copy.deepcopy(trunks[0])
        with torch.no_grad():
            for name, p in trunks[0].named_parameters():
                stacked = torch.stack([t.get_parameter(name) for t in trunks])
                _assign(self.trunk, name, nn.Parameter(stacked, requires_grad=p.requires_grad))
            for name, _ in trunks[0].named_buffers():
                _assign(self.trunk, name, torch.stack([t.get_buffer(name) for t in trunks]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[E, B, ...]``: each copy on one batch x."""
        return StackedTrunks.run([self], x)

    @staticmethod
    def run(groups: list[StackedTrunks], x: torch.Tensor, fn: Callable = _whole, per_copy: bool = False) -> torch.Tensor:
        """All copies of ``groups`` (stacks of one trunk config) in one vmap: ``[ΣE, B, ...]``.
        x is one batch for all copies, or ``[ΣE, B, ...]`` with ``per_copy``. Several groups are
        concatenated for the call; their buffers' running-stat updates are copied back after."""
        tensors = [dict(g.trunk.named_parameters()) | dict(g.trunk.named_buffers()) for g in groups]
        joined = tensors[0] if len(groups) == 1 else {n: torch.cat([t[n] for t in tensors]) for n in tensors[0]}
        call = _Call(groups[0].trunk, fn)

        def one(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(call, {f"trunk.{n}": v for n, v in state.items()}, (x,))

        out = torch.vmap(one, in_dims=(0, 0 if per_copy else None), randomness="different")(joined, x)
        if len(groups) > 1 and groups[0].training:
            with torch.no_grad():
                for name, _ in groups[0].trunk.named_buffers():
                    for t, part in zip(tensors, joined[name].split([g.count for g in groups])):
                        t[name].copy_(part)
        return out


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner), attr, value)


class _Gates(nn.Module):
    """Per task a linear map of the gate input to ``width`` logits; the tasks asked for run as
    one einsum over their stacked weights."""

    def __init__(self, tasks: list[str], inputs: int, width: int):
        super().__init__()
        self.linears = nn.ModuleDict({t: nn.Linear(inputs, width) for t in tasks})

    def forward(self, u: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """Logits ``[T, B, width]`` from u ``[B, D]`` (one input for all tasks) or ``[T, B, D]``."""
        weight = torch.stack([self.linears[t].weight for t in tasks])
        bias = torch.stack([self.linears[t].bias for t in tasks])
        spec = "bi,toi->tbo" if u.dim() == 2 else "tbi,toi->tbo"
        return torch.einsum(spec, u, weight) + bias[:, None, :]


def _mix(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_e w_te · O_e: outputs ``[E, B, ...]``, weights ``[T, B, E]`` -> ``[T, B, ...]``."""
    return torch.einsum("eb...,tbe->tb...", outputs, weights.to(outputs.dtype))


class _SharedExperts(Architecture):
    """E experts every task reads, mixed per task by its gate weights ``[T, B, E]`` (``weights``).
    The experts' outputs ``[E, B, ...]`` are the shared representation."""

    shares_representation = True

    def __init__(self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory, experts: int):
        super().__init__(heads)
        experts = _count(experts, "experts")
        self.experts = StackedTrunks([trunk, *(make_trunk() for _ in range(experts - 1))])
        self.gate_inputs, self.pooled = _gate_width(trunk)

    def weights(self, x: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward_groups(self, inputs: dict[str, torch.Tensor], members: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        outputs = {}
        for name, x in inputs.items():
            tasks = members[name]
            mixed = _mix(self.cut(self.experts(x)), self.weights(x, tasks))
            outputs.update({t: self.heads[t](z) for t, z in zip(tasks, mixed)})
        return outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.trunk.layer_groups()[-1][1].parameters())


@register_architecture("mmoe")
class MMoE(_SharedExperts):
    """Multi-gate mixture of experts (Ma et al. 2018, KDD, "Modeling Task Relationships in
    Multi-task Learning with Multi-gate Mixture-of-Experts"): z_t = Σ_e g_t(x)_e · E_e(x),
    g_t(x) = softmax(W_t u(x) + b_t), with E ``experts`` (trunk copies; the first is the given
    trunk). u(x), what every gate here reads: the flattened input for vectors (as LibMTL);
    for images, the input average-pooled to 4×4 (C·16 values), since no input size is known
    when the gates are built."""

    def __init__(self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory, experts: int = 2):
        super().__init__(trunk, heads, make_trunk, experts)
        self.gates = _Gates(self.tasks, self.gate_inputs, self.experts.count)

    def weights(self, x: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        return self.gates(_gate_input(x, self.pooled), tasks).softmax(-1)

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [*self.heads[t].parameters(), *self.gates.linears[t].parameters()] for t in self.tasks}


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """DSelect-k's smooth-step: 0 for t ≤ −γ/2, 1 for t ≥ γ/2, else −2t³/γ³ + 3t/(2γ) + 1/2."""
    cubic = -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


@register_architecture("dselect_k")
class DSelectK(_SharedExperts):
    """DSelect-k (Hazimeh et al. 2021, NeurIPS, "DSelect-k: Differentiable Selection in the
    Mixture of Experts with Applications to Multi-Task Learning"), per-example gate. Per task,
    k selectors each read m = ⌈log₂ E⌉ logits z_i = A_i u(x) through the smooth-step S and
    pick expert e with r_i(e) = Π_j (S(z_ij) if bit j of e is 1 else 1 − S(z_ij)); the gate is
    q = Σ_i softmax(w)_i r_i with w = B u(x), and z_t = Σ_e q_e E_e(x). Selector logits start
    in ±γ/100 (S ≈ 1/2, all experts alike), as the authors' code does.

    The entropy regularizer that drives the selectors to binary choices is the architecture's
    ``penalty()``: ``entropy`` · Σ −r log(r + 1e-6), summed over the tasks, samples, selectors and
    codes of the last training forward, every input source's (weight 1e-6 as LibMTL; LibMTL's adds only the last task's
    term, here every task's). When E is not a power of two the paper penalizes the 2^m − E codes
    without an expert; here code c selects expert c mod E, so q sums to 1 with no penalty (some
    experts have two codes)."""

    def __init__(
        self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory, experts: int = 4, k: int = 2, gamma: float = 1.0,
        entropy: float = 1e-6,
    ):
        experts, k = _count(experts, "experts"), _count(k, "k")
        if k > experts:
            raise ValueError(
                f"architecture.k={k} asks for a gate with more experts than exist (architecture.experts={experts}); "
                f"set k to at most {experts}, or raise architecture.experts."
            )
        self.gamma = checks.number(gamma, "architecture.gamma", 0, low_open=True)
        self.entropy = checks.number(entropy, "architecture.entropy", 0)
        super().__init__(trunk, heads, make_trunk, experts)
        self._entropy: torch.Tensor | None = None
        self.k, self.bits = k, max(1, math.ceil(math.log2(experts)))
        codes = torch.arange(2**self.bits)
        self.register_buffer("codes", (codes[:, None] >> torch.arange(self.bits)) & 1 == 1, persistent=False)  # [2^m, m]
        self.register_buffer("fold", F.one_hot(codes % experts, experts).float(), persistent=False)  # [2^m, E]
        self.selectors = _Gates(self.tasks, self.gate_inputs, k * self.bits)
        self.mixers = _Gates(self.tasks, self.gate_inputs, k)
        with torch.no_grad():
            for p in self.selectors.parameters():
                p.uniform_(-self.gamma / 100, self.gamma / 100)

    def weights(self, x: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        u = _gate_input(x, self.pooled)
        s = smooth_step(self.selectors(u, tasks).unflatten(-1, (self.k, 1, self.bits)), self.gamma)  # [T, B, k, 1, m]
        codes = torch.where(self.codes, s, 1 - s).prod(-1)  # [T, B, k, 2^m]
        if self.training and self.entropy:
            # One call per input source in a forward: the penalty is their sum.
            term = -self.entropy * (codes * torch.log(codes + 1e-6)).sum()
            self._entropy = term if self._entropy is None else self._entropy + term
        return torch.einsum("tbk,tbkc,ce->tbe", self.mixers(u, tasks).softmax(-1), codes, self.fold.to(codes.dtype))

    def penalty(self) -> torch.Tensor | None:
        """The entropy term of the last training forward, once (the next step's forward makes its own)."""
        term, self._entropy = self._entropy, None
        return term

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            t: [*self.heads[t].parameters(), *self.selectors.linears[t].parameters(), *self.mixers.linears[t].parameters()]
            for t in self.tasks
        }


@register_architecture("cgc")
class CGC(Architecture):
    """Customized gate control (Tang et al. 2020, RecSys, "Progressive Layered Extraction
    (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations"):
    z_t = Σ_e g_t(x)_e · O_e over the S shared experts and task t's own K experts,
    g_t(x) = softmax(W_t u(x) + b_t) over those S + K. The shared experts' outputs
    ``[S, B, ...]`` are the shared representation; a task's own experts are its parameters."""

    shares_representation = True

    def __init__(
        self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory, shared_experts: int = 1, task_experts: int = 1
    ):
        super().__init__(heads)
        shared, own = _count(shared_experts, "shared_experts"), _count(task_experts, "task_experts")
        self.shared = StackedTrunks([trunk, *(make_trunk() for _ in range(shared - 1))])
        self.own = nn.ModuleDict({t: StackedTrunks([make_trunk() for _ in range(own)]) for t in self.tasks})
        width, self.pooled = _gate_width(trunk)
        self.gates = _Gates(self.tasks, width, shared + own)

    def forward_groups(self, inputs: dict[str, torch.Tensor], members: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        outputs = {}
        s = self.shared.count
        for name, x in inputs.items():
            tasks = members[name]
            shared = self.cut(self.shared(x))
            # The tasks' own experts run in a second vmap, so the cut above leaves them in the task's graph.
            own = StackedTrunks.run([self.own[t] for t in tasks], x).unflatten(0, (len(tasks), -1))  # [T, K, B, ...]
            g = self.gates(_gate_input(x, self.pooled), tasks).softmax(-1)
            mixed = _mix(shared, g[..., :s]) + torch.einsum("tkb...,tbk->tb...", own, g[..., s:].to(own.dtype))
            outputs.update({t: self.heads[t](z) for t, z in zip(tasks, mixed)})
        return outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.trunk.layer_groups()[-1][1].parameters())

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [*self.heads[t].parameters(), *self.gates.linears[t].parameters(), *self.own[t].parameters()] for t in self.tasks}


def _stage(trunk: Trunk, x: torch.Tensor, index: int, last: bool) -> torch.Tensor:
    x = trunk.stages()[index](x)
    return trunk.forward_head(x) if last else x


@register_architecture("ple")
class PLE(Architecture):
    """Progressive layered extraction (Tang et al. 2020, RecSys, "Progressive Layered
    Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
    Recommendations"): CGC levels stacked over the trunk's stages. Level l runs stage l of
    every expert (S shared, K per task; the last level adds the trunk's ``forward_head``) on
    that expert's input: the shared experts read the shared input s_l, task t's experts read
    t's input h_l^t (s_0 = h_0^t = x). Then h_{l+1}^t = Σ g_l^t(h_l^t)_e O_e over the shared and
    t's experts, and, below the last level, s_{l+1} = Σ g_l^s(s_l)_e O_e over all experts.
    Gates are softmax(W u + b) of their own input (a stage map pooled like an image input).

    No one tensor feeds every task (each reads its own h_L^t), so no representation is cut.
    Below the last level, a task's own experts feed the shared gate and so reach every task;
    the Trunk contract does not say which parameters a stage uses, so with two or more levels
    all expert parameters are declared shared (the last stage's are in fact task t's alone).
    A task gate below level L−2 reaches every task through t's experts; the others are t's."""

    def __init__(
        self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory, shared_experts: int = 1, task_experts: int = 1
    ):
        super().__init__(heads)
        shared, own = _count(shared_experts, "shared_experts"), _count(task_experts, "task_experts")
        try:
            self.levels, info = len(trunk.stages()), trunk.feature_info
        except NotImplementedError:
            self.levels = 0
        if not self.levels:  # no stages(), an empty list, or no feature_info
            raise ValueError(
                f"architecture.name=ple stacks one level per trunk stage, and trunk {type(trunk).__name__} lists no "
                "stages() (or no feature_info); use architecture.name=cgc, one level over the whole trunk."
            )
        self.shared = StackedTrunks([trunk, *(make_trunk() for _ in range(shared - 1))])
        self.own = nn.ModuleDict({t: StackedTrunks([make_trunk() for _ in range(own)]) for t in self.tasks})
        width, pooled = _gate_width(trunk)
        self.pooled = [pooled] + [d["reduction"] is not None for d in info[:-1]]
        widths = [width] + [d["num_chs"] * (POOL * POOL if d["reduction"] is not None else 1) for d in info[:-1]]
        self.task_gates = nn.ModuleList(_Gates(self.tasks, w, shared + own) for w in widths)
        self.shared_gates = nn.ModuleList(nn.Linear(w, shared + own * len(self.tasks)) for w in widths[:-1])

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Every task's input to its head, ``[T, B, ...]`` in ``self.tasks`` order."""
        groups = [self.shared, *(self.own[t] for t in self.tasks)]
        s, k = self.shared.count, self.own[self.tasks[0]].count
        shared_in, task_in = x, None
        for level in range(self.levels):
            last = level == self.levels - 1
            fn = functools.partial(_stage, index=level, last=last)
            if task_in is None:
                out = StackedTrunks.run(groups, x, fn)
                u = _gate_input(x, self.pooled[level])
            else:
                inputs = torch.cat([shared_in.expand(s, *shared_in.shape), task_in.repeat_interleave(k, 0)])
                out = StackedTrunks.run(groups, inputs, fn, per_copy=True)
                u = _gate_input(task_in, self.pooled[level], lead=2)
            g = self.task_gates[level](u, self.tasks).softmax(-1)
            own = out[s:].unflatten(0, (len(self.tasks), k))
            mixed = _mix(out[:s], g[..., :s]) + torch.einsum("tkb...,tbk->tb...", own, g[..., s:].to(own.dtype))
            if not last:
                gs = self.shared_gates[level](_gate_input(shared_in, self.pooled[level])).softmax(-1)
                shared_in = _mix(out, gs[None])[0]
            task_in = mixed
        return task_in

    def forward_groups(self, inputs: dict[str, torch.Tensor], members: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        # The shared gates mix every task's experts, so all tasks' experts run for any subset asked.
        outputs = {}
        for name, x in inputs.items():
            final = dict(zip(self.tasks, self.extract(x)))
            outputs.update({t: self.heads[t](final[t]) for t in members[name]})
        return outputs

    def _task_gate_levels(self) -> range:
        return range(max(0, self.levels - 2), self.levels)

    def shared_parameters(self) -> list[nn.Parameter]:
        params = [*self.shared.parameters(), *self.shared_gates.parameters()]
        if self.levels > 1:
            params += [p for t in self.tasks for p in self.own[t].parameters()]
        params += [p for level in range(self.levels) if level not in self._task_gate_levels() for p in self.task_gates[level].parameters()]
        return params

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.trunk.layer_groups()[-1][1].parameters())

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            t: [
                *self.heads[t].parameters(),
                *(p for level in self._task_gate_levels() for p in self.task_gates[level].linears[t].parameters()),
                *(self.own[t].parameters() if self.levels == 1 else ()),
            ]
            for t in self.tasks
        }
