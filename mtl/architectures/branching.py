"""Architectures made of several trunk copies read stage by stage: cross-stitch networks (a
column per task, mixed after each stage) and Learning to Branch (a tree of stage copies whose
branching is learnt).

The copies of one stage run as one batched call: ``torch.func.vmap`` over their parameters,
stacked with ``torch.stack`` at each forward. The stack is differentiable, so every copy keeps
its own parameters, state-dict keys and gradients (``torch.func.stack_module_state`` would
detach them); BatchNorm running statistics, updated in the stacked buffers, are copied back.
``architecture.batched`` chooses: true for vmap, false for a Python loop over the copies,
null (the default) for vmap on CUDA, where one call per stage saves kernel launches, and the
loop on CPU, where grouped convolutions cost more than separate ones: the trainer's step with
the loop took 0.54-0.81x the vmap time on seed_net (batch 64) and 0.44-0.63x on ResNet-18
(batch 8, 32x32), at T = 2 and 10 on one CPU thread, one run (``python -m mtl.bench.architectures
--loop --architectures cross_stitch ltb --threads 1``, with ``--trunk resnet18 --batch 8``). A
trunk with an op vmap cannot batch runs its copies in the loop (said once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from mtl import checks
from mtl.architectures.base import Architecture, TrunkFactory, register_architecture
from mtl.gramian import unbatchable
from mtl.trunks import Trunk

logger = logging.getLogger(__name__)

Between = Callable[[int, torch.Tensor], torch.Tensor]  # (stage l, outputs of stage l-1) -> inputs of stage l


def trunk_stages(trunk: Trunk, name: str) -> int:
    """The number of stages of ``trunk``; a ValueError naming ``architecture.name`` when it lists none."""
    try:
        stages = trunk.stages()
    except NotImplementedError:
        stages = []
    if not stages:
        raise ValueError(
            f"architecture.name={name} runs the trunk stage by stage, but trunk {type(trunk).__name__} lists no "
            "stages(). Use architecture.name=hard, or a trunk with stages (seed_net, multi_lenet, mlp, resnet18, "
            "mobilenet_v3_small, ...: `mtl list trunks`)."
        )
    return len(stages)


class _Part(nn.Module):
    """Stage ``index`` of ``trunk`` (or its ``forward_head`` for None) as a module, so that
    ``functional_call`` can run it on a copy's parameters."""

    def __init__(self, trunk: Trunk, index: int | None):
        super().__init__()
        self.trunk = trunk
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_head(x) if self.index is None else self.trunk.stages()[self.index](x)


class TrunkCopies(nn.ModuleList):
    """Trunk copies (state-dict keys ``<i>.*``) run stage by stage, the copies of a stage batched."""

    def __init__(self, trunks: list[Trunk], batched: bool | None = None):
        super().__init__(trunks)
        if batched is not None and not isinstance(batched, bool):
            raise ValueError(
                "architecture.batched must be true (one vmap call per stage), false (a loop over the copies) "
                f"or null (vmap on CUDA, the loop on CPU), got {batched!r}."
            )
        self.batched = batched  # set to False when vmap fails on this trunk

    def forward(self, x: torch.Tensor, counts: list[int], between: Between) -> torch.Tensor:
        """Copies ``0..counts[l]-1`` run stage l: stage 0 on ``x``, stage l on ``between(l, y)``
        where y ``[counts[l-1], B, ...]`` holds the outputs of stage l-1 and the result has
        ``counts[l]`` rows. Returns each last-stage copy's ``forward_head``: ``[counts[-1], B, ...]``."""
        if len(self) > 1 and (x.is_cuda if self.batched is None else self.batched):
            try:
                return self.batched_forward(x, counts, between)
            except RuntimeError as e:
                if not unbatchable(e):
                    raise
                logger.warning("%s: vmap cannot batch the trunk copies (%s); running them in a loop.", type(self[0]).__name__, e)
                self.batched = False
        return self.looped_forward(x, counts, between)

    def batched_forward(self, x: torch.Tensor, counts: list[int], between: Between) -> torch.Tensor:
        used = self[: max(counts)]
        params = [dict(c.named_parameters()) for c in used]
        buffers = [dict(c.named_buffers()) for c in used]
        stacked = {f"trunk.{k}": torch.stack([p[k] for p in params]) for k in params[0]}
        stacked_buffers = {f"trunk.{k}": torch.stack([b[k] for b in buffers]) for k in buffers[0]}
        state = {**stacked, **stacked_buffers}
        base = used[0]

        def run(index: int | None, count: int, y: torch.Tensor, shared_input: bool) -> torch.Tensor:
            part = _Part(base, index)
            in_dims = (0, None if shared_input else 0)
            call = vmap(lambda s, v: functional_call(part, s, (v,)), in_dims=in_dims, randomness="different")
            return call({k: v[:count] for k, v in state.items()}, y)

        y = run(0, counts[0], x, True)
        for stage in range(1, len(counts)):
            y = run(stage, counts[stage], between(stage, y), False)
        y = run(None, counts[-1], y, False)
        if self.training:
            with torch.no_grad():
                for i, b in enumerate(buffers):
                    for k, v in b.items():
                        v.copy_(stacked_buffers[f"trunk.{k}"][i])
        return y

    def looped_forward(self, x: torch.Tensor, counts: list[int], between: Between) -> torch.Tensor:
        y = torch.stack([self[i].stages()[0](x) for i in range(counts[0])])
        for stage in range(1, len(counts)):
            inputs = between(stage, y)
            y = torch.stack([self[i].stages()[stage](inputs[i]) for i in range(counts[stage])])
        return torch.stack([self[i].forward_head(y[i]) for i in range(counts[-1])])

    def last_groups(self, count: int) -> list[nn.Parameter]:
        """The last layer group's parameters of the first ``count`` copies."""
        return [p for c in self[:count] for p in c.layer_groups()[-1][1].parameters()]


def mix(weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out[t] = Σ_s weights[t, s] y[s]`` for stacked activations ``y`` ``[S, B, ...]``."""
    return torch.einsum("ts,s...->t...", weights.to(y.dtype), y)


def _by_source(
    inputs: dict[str, torch.Tensor], represent: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """``represent`` (``[B, ...] -> [T, B, ...]``) of each source's batch; sources of one input
    shape run as one batch (one call per stage, not one per source)."""
    batches = list(inputs.values())
    if len(batches) > 1 and len({tuple(x.shape[1:]) for x in batches}) == 1:
        return list(represent(torch.cat(batches)).split([len(x) for x in batches], dim=1))
    return [represent(x) for x in batches]


class _Copied(Architecture):
    """Shared code of the architectures made of trunk copies: ``represent(x) -> [T, B, ...]``,
    row t being task t's representation (tasks in ``self.tasks`` order)."""

    copies: TrunkCopies

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_groups(self, inputs: dict[str, torch.Tensor], members: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        row = {t: i for i, t in enumerate(self.tasks)}
        outputs = {}
        for name, z in zip(inputs, _by_source(inputs, self.represent)):
            outputs.update({t: self.heads[t](z[row[t]]) for t in members[name]})
        return outputs


@register_architecture("cross_stitch")
class CrossStitch(_Copied):
    """Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert 2016, CVPR, "Cross-stitch
    networks for multi-task learning"): a column (trunk copy) per task, and cross-stitch units
    that mix the columns' activations, x̃_t = Σ_s α_ts x_s, after each stage but the last and
    after the trunk's head (``forward_head``; the paper's units follow pooling and fc layers).
    Task t's head reads x̃_t of the last unit.

    One scalar α per pair of tasks and unit, the paper's unit written as one matrix of scalars
    (channel-wise α, as some reimplementations use, is not offered: a scalar unit fits any stage
    output, maps, vectors or tokens, and needs no channel count after the head). Initialised to α_tt = ``self_weight``
    and α_ts = (1 - self_weight) / (T - 1), the paper's (0.9, 0.1) for two tasks (the identity
    for one task). Columns come from ``make_trunk``: the same pretrained weights (the paper
    starts both networks from one ImageNet model), or independent random initialisations.

    Every column and every inner unit is reached by every task's loss through the units, so
    they are the shared parameters; there is no single shared representation. The last unit's
    row t (``out_mix.<t>``) reaches task t alone, so it is task t's own, with its head.
    """

    def __init__(
        self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory,
        self_weight: float = 0.9, batched: bool | None = None,
    ):
        super().__init__(heads)
        stages = trunk_stages(trunk, "cross_stitch")
        checks.number(self_weight, "architecture.self_weight", 0, 1, low_open=True)
        count = len(self.tasks)
        self.copies = TrunkCopies([trunk] + [make_trunk() for _ in range(count - 1)], batched)
        alpha = self.initial_alpha(count, self_weight)
        self.units = nn.ParameterList(nn.Parameter(alpha.clone()) for _ in range(stages - 1))
        self.out_mix = nn.ParameterDict({t: nn.Parameter(alpha[i].clone()) for i, t in enumerate(self.tasks)})

    @staticmethod
    def initial_alpha(count: int, self_weight: float) -> torch.Tensor:
        other = (1 - self_weight) / (count - 1) if count > 1 else 0.0
        alpha = torch.full((count, count), other)
        return alpha.fill_diagonal_(1 - other * (count - 1))

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        count = len(self.tasks)
        y = self.copies(x, [count] * (len(self.units) + 1), lambda stage, y: mix(self.units[stage - 1], y))
        return mix(torch.stack(list(self.out_mix.values())), y)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.copies.parameters(), *self.units.parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Each column's last layer group."""
        return self.copies.last_groups(len(self.tasks))

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [*h.parameters(), self.out_mix[t]] for t, h in self.heads.items()}


@register_architecture("ltb")
class LearningToBranch(_Copied):
    """Learning to Branch (Guo, Lee & Ulbricht 2020, ICML, "Learning to Branch for Multi-Task
    Learning"): a tree over the trunk's stages. Level l has ``branches[l]`` nodes, node n a copy
    of stage l; level 0 reads the input, and each node of level l > 0 (then each task) picks a
    parent in the level before with learnt logits θ_n: x_n^l = Σ_p d_np y_p^(l-1),
    y_n^l = stage_l^(n)(x_n^l), and task t reads z_t = Σ_n d_tn head^(n)(y_n^L).

    The parent weights are d_n = softmax((θ_n + g) / τ), g ~ Gumbel(0, 1), in training (the
    Gumbel-softmax relaxation at a fixed temperature ``tau``: the contract passes no step count
    to anneal it; set ``model.tau`` between stages to anneal), and d_n = onehot(argmax θ_n) in
    eval mode: the learnt tree. θ starts at 0 (every parent equally likely). The trunk's ``forward_head`` belongs to
    the last level's nodes.

    ``branches`` (one count per stage, default T at every stage: the full search space) may only
    widen towards the tasks (a narrower level would leave nodes without children), each count
    from 1 to T. Node n of every level is a stage of copy n (``make_trunk``), so copy n's stages
    below its first level are never read (zero gradient; memory only).

    Under the relaxation every node is reached by every task (d > 0), so all copies and the
    logits of the inner levels are shared parameters; the last level's logits of task t
    (``choice.<t>``) are its own. No single shared representation.
    """

    def __init__(
        self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory,
        branches: list[int] | None = None, tau: float = 1.0, batched: bool | None = None,
    ):
        super().__init__(heads)
        stages = trunk_stages(trunk, "ltb")
        count = len(self.tasks)
        self.branches = self.checked_branches(branches, stages, count)
        self.tau = checks.number(tau, "architecture.tau", 0, low_open=True)
        self.copies = TrunkCopies([trunk] + [make_trunk() for _ in range(self.branches[-1] - 1)], batched)
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(c, p)) for p, c in zip(self.branches, self.branches[1:]))
        self.choice = nn.ParameterDict({t: nn.Parameter(torch.zeros(self.branches[-1])) for t in self.tasks})

    @staticmethod
    def checked_branches(branches: list[int] | None, stages: int, tasks: int) -> list[int]:
        if branches is None:
            return [tasks] * stages
        fix = (
            f"give one node count per trunk stage ({stages}), each from 1 to the number of tasks ({tasks}), "
            f"never decreasing, e.g. {[1] * (stages - 1) + [tasks]}"
        )
        if isinstance(branches, (str, bytes)) or not hasattr(branches, "__len__") or len(branches) != stages:
            raise ValueError(f"architecture.branches={branches!r}: {fix}.")
        for i, b in enumerate(branches):
            checks.number(b, f"architecture.branches[{i}]", 1, tasks, integer=True)
        if any(b < a for a, b in zip(branches, branches[1:])):
            raise ValueError(f"architecture.branches={list(branches)} narrows: {fix}.")
        return list(branches)

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's parent weights d: a Gumbel-softmax sample in training, the argmax in eval."""
        if self.training:
            return F.gumbel_softmax(logits, tau=self.tau, dim=-1)
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        y = self.copies(x, self.branches, lambda stage, y: mix(self.weights(self.logits[stage - 1]), y))
        return mix(self.weights(torch.stack(list(self.choice.values()))), y)

    def tree(self) -> list[list[int]]:
        """The argmax tree: per level after the first, each node's parent (then each task's)."""
        return [row.argmax(-1).tolist() for row in [*self.logits, torch.stack(list(self.choice.values()))]]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.copies.parameters(), *self.logits.parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last layer group of each copy the last level uses."""
        return self.copies.last_groups(self.branches[-1])

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [*h.parameters(), self.choice[t]] for t, h in self.heads.items()}
