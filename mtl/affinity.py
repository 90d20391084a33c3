"""Task affinity grouping (TAG; Fifty et al. 2021): which tasks should share a trunk.

``LookaheadAffinity`` measures, during joint training, how a step on one task's loss
alone would change every task's loss on the same batch; ``select_groups`` turns the mean
affinities into groupings of tasks, one per budget of networks. ``mtl group``
(``mtl.group``) runs both on a config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtl.gramian import vjp_rows


class NonFiniteAffinity(RuntimeError):
    """A lookahead loss (or the loss it is divided by) that makes Z undefined."""


class LookaheadAffinity:
    """Lookahead inter-task affinity (Fifty et al. 2021, "Efficiently Identifying Task
    Groupings for Multi-Task Learning", NeurIPS), the paper's definition:

        Z^t_{i→j} = 1 − L_j(X^t, θ_s^{t+1|i}, θ_j^t) / L_j(X^t, θ_s^t, θ_j^t)

    θ_s^{t+1|i} is the shared parameters after the optimizer's step on task i's loss alone;
    every head θ_j stays at step t; X^t is the step's batch. Z_{i→j} > 0: task i's step
    lowers task j's loss (i helps j); < 0: it raises it.

    The step is the run's own optimizer (``optimizer.step()`` with task i's gradient on the
    shared parameters and none elsewhere), so its rule is the run's: SGD, its momentum, Adam's
    moments and bias correction, AdamW's decay, at the LR of step t. The authors' code does the
    same for its optimizer (momentum SGD: θ + μ·v − η·∇L_i, plain SGD at the first step). It
    divides Z by the LR; the paper's definition, used here, does not (the two differ only when
    the LR changes during the run, which then weighs late, low-LR steps more in the authors' mean).

    L_j before and after are forward passes without gradients in training mode (batch
    statistics, as the authors' code), each from the same random state, so dropout draws the
    same masks for the loss and its lookahead. Afterwards the shared parameters, the
    optimizer's state, every ``.grad``, the buffers (BatchNorm running statistics) and the
    random state are as they were, bit for bit: training with or without the lookahead is
    the same (``tests/test_affinity.py``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, shared: list[nn.Parameter], buffers: list[torch.Tensor]):
        self.optimizer = optimizer
        self.shared = shared
        self.buffers = buffers
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def gradients(self, losses: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each task's gradient w.r.t. the shared parameters, from one batched backward (the
        gradient engine's ``vjp_rows``); a zero where a parameter does not reach the task, as in
        a step on that task alone. The graph is kept for the joint backward."""
        eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
        grads: list[list[torch.Tensor]] = [[] for _ in losses]
        for start, stop, batched in vjp_rows(losses, eye, self.shared):
            for p, g in zip(self.shared, batched):
                for k in range(start, stop):
                    grads[k].append(torch.zeros_like(p) if g is None else g[k - start])
        return grads

    def __call__(self, gradients: list[list[torch.Tensor]], evaluate: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Z`` ``[T, T]`` (row i: the step on task i; column j: the loss of task j), the losses
        before ``[T]`` and after each task's step ``[T, T]``. ``evaluate()`` returns every task's
        loss ``[T]`` on the step's batch under the current parameters."""
        grads = [p.grad for p in self.params]
        params = [p.detach().clone() for p in self.shared]
        state = {p: _clone(self.optimizer.state[p]) for p in self.shared if p in self.optimizer.state}
        buffers = [b.clone() for b in self.buffers]
        devices = [p.device for p in self.shared if p.device.type == "cuda"][:1]
        rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])
        try:
            for p in self.params:
                p.grad = None
            before = self._evaluate(evaluate, rng, devices)
            after = []
            for task_grads in gradients:
                for p, g in zip(self.shared, task_grads):
                    p.grad = g
                self.optimizer.step()
                after.append(self._evaluate(evaluate, rng, devices))
                self._restore(params, state, buffers)
        finally:
            self._restore(params, state, buffers)
            self._set_rng(rng, devices)
            for p, g in zip(self.params, grads):
                p.grad = g
        after_t = torch.stack(after)
        return 1.0 - after_t / before[None, :], before, after_t

    def _evaluate(self, evaluate, rng, devices) -> torch.Tensor:
        self._set_rng(rng, devices)
        with torch.no_grad():
            return evaluate().detach().float()

    @staticmethod
    def _set_rng(rng, devices) -> None:
        torch.set_rng_state(rng[0])
        for d, s in zip(devices, rng[1]):
            torch.cuda.set_rng_state(s, d)

    def _restore(self, params, state, buffers) -> None:
        with torch.no_grad():
            for p, saved in zip(self.shared, params):
                p.copy_(saved)
                p.grad = None
            for b, saved in zip(self.buffers, buffers):
                b.copy_(saved)
        for p in self.shared:
            if p in state:
                self.optimizer.state[p] = _clone(state[p])
            else:
                self.optimizer.state.pop(p, None)


def _clone(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def check_affinity(z: torch.Tensor, before: torch.Tensor, after: torch.Tensor, tasks: Sequence[str], step: int) -> None:
    """Z must be finite: a non-finite lookahead loss, or a zero or non-finite loss before,
    names the step and the tasks."""
    for j, task in enumerate(tasks):
        if not (math.isfinite(before[j]) and before[j] != 0):
            raise NonFiniteAffinity(
                f"step {step}: task {task!r} has loss {float(before[j])} on the step's batch, so its affinity ratio "
                "is undefined; lower trainer.optimizer.lr, or set trainer.grad_clip."
            )
    bad = (~torch.isfinite(after)).nonzero().tolist()
    if bad:
        i, j = bad[0]
        raise NonFiniteAffinity(
            f"step {step}: the lookahead step on task {tasks[i]!r} alone gives task {tasks[j]!r} a loss of "
            f"{float(after[i, j])}; lower trainer.optimizer.lr (the lookahead takes the run's step on one task's "
            "gradient), or set trainer.grad_clip."
        )
    if not bool(torch.isfinite(z).all()):  # a finite ratio can still overflow
        i, j = (~torch.isfinite(z)).nonzero()[0].tolist()
        raise NonFiniteAffinity(f"step {step}: the affinity of task {tasks[i]!r} onto {tasks[j]!r} is {float(z[i, j])}; lower trainer.optimizer.lr.")


# -- selection ------------------------------------------------------------------------

# The exact search enumerates every group with its subsets (3^T pairs): about 5 million at 14 tasks.
MAX_TASKS = 14


@dataclass
class Grouping:
    groups: list[list[str]]  # each a set of tasks trained together, in task order
    score: float  # Σ over tasks of the affinity onto the task from its serving group
    serving: dict[str, int]  # task -> index in groups of the group that serves it
    onto: dict[str, float]  # task -> the affinity onto it from its serving group


def group_affinity(z: torch.Tensor | Sequence[Sequence[float]], group: Sequence[int], onto: int) -> float:
    """The affinity onto task ``onto`` from the other members of ``group``: their mean Z."""
    others = [i for i in group if i != onto]
    return sum(float(z[i][onto]) for i in others) / len(others)


def grouping_score(z, tasks: Sequence[str], groups: Sequence[Sequence[str]]) -> Grouping:
    """A collection of groups scored by TAG's rule: each task is served by the group (of two or
    more tasks) containing it whose affinity onto it is highest; the score sums those."""
    index = {t: k for k, t in enumerate(tasks)}
    serving, onto = {}, {}
    for t in tasks:
        best = None
        for g, members in enumerate(groups):
            if t in members and len(members) > 1:
                value = group_affinity(z, [index[m] for m in members], index[t])
                if best is None or value > best:
                    best, serving[t] = value, g
        if best is None:
            raise ValueError(f"task {t!r} is in no group of two or more tasks")
        onto[t] = best
    return Grouping([list(g) for g in groups], sum(onto.values()), serving, onto)


def select_groups(z, tasks: Sequence[str], max_groups: int) -> dict[int, Grouping]:
    """TAG's network selection (Fifty et al. 2021), for each budget G = 1, ...,
    ``max_groups``: the collection of at most G task groups that maximises the total affinity
    onto the tasks,

        score(C) = Σ_j max_{g ∈ C, j ∈ g} (1 / (|g| − 1)) Σ_{i ∈ g, i ≠ j} Z_{i→j},

    where a task may be in several groups and is served by the best one. As in the authors'
    code, a group of one task serves no task (its score is −10⁶ there), and the affinity onto a
    task is the mean over the group's other members.

    The authors search collections by branch and bound; this search is exact by another
    route. In a best collection, the tasks each group serves partition the tasks, and a part P
    is best served by val(P) = max_{g ⊇ P, |g| ≥ 2} Σ_{j ∈ P} s(g, j). So the best score is the
    best partition into at most ``max_groups`` parts of Σ val(P), found by dynamic programming
    over subsets in O(G · 3^T). Ties go to fewer groups, then to fewer task slots in them.
    """
    T = len(tasks)
    if T < 2:
        raise ValueError("grouping needs at least two tasks")
    if T > MAX_TASKS:
        raise ValueError(f"{T} tasks: the exact search takes 3^T steps and stops at {MAX_TASKS} tasks")
    if not 1 <= max_groups <= T:
        raise ValueError(f"max_groups must be in [1, {T}], got {max_groups}")
    z = [[float(v) for v in row] for row in z]
    full = (1 << T) - 1
    members = [[i for i in range(T) if mask >> i & 1] for mask in range(full + 1)]
    # val[P] = (score, -slots of its group), group: the best serving group of part P.
    val: dict[int, tuple[float, int]] = {}
    serve: dict[int, int] = {}
    for g in range(1, full + 1):
        if len(members[g]) < 2:
            continue
        s = {j: group_affinity(z, members[g], j) for j in members[g]}
        sums = {0: 0.0}
        sub = g
        order = []
        while sub:  # every non-empty submask of g, each after the submask without its lowest task
            order.append(sub)
            sub = (sub - 1) & g
        for p in reversed(order):
            low = p & -p
            sums[p] = sums[p ^ low] + s[low.bit_length() - 1]
            key = (sums[p], -len(members[g]))
            if p not in val or key > val[p]:
                val[p], serve[p] = key, g
    # best[mask] with at most k parts: (score, -groups, -slots), and the parts.
    best: dict[int, tuple[tuple[float, int, int], tuple[int, ...]]] = {0: ((0.0, 0, 0), ())}
    results = {}
    for budget in range(1, max_groups + 1):
        layer = dict(best)
        for mask in range(1, full + 1):
            low = mask & -mask
            rest = mask ^ low
            sub = rest
            while True:
                part = sub | low
                tail = best.get(mask ^ part)
                if tail is not None:
                    (score, groups, slots), parts = tail
                    v, s = val[part]
                    key = (score + v, groups - 1, slots + s)
                    if mask not in layer or key > layer[mask][0]:
                        layer[mask] = (key, parts + (part,))
                if sub == 0:
                    break
                sub = (sub - 1) & rest
        best = layer
        # Parts served by one group merge into it: the same score with fewer groups.
        chosen = sorted({serve[p] for p in best[full][1]}, key=lambda g: members[g])
        results[budget] = grouping_score(z, tasks, [[tasks[i] for i in members[g]] for g in chosen])
    return results
