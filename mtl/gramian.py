"""The Gramian G = JJᵀ of the task gradients w.r.t. the trunk parameters, stage by stage, without J.

A ``GramianWeighting`` needs only G, but J ``[T, D]`` holds T copies of the trunk's gradient.
Here the trunk's backward is split at *cuts*: module outputs that every path of the autograd
graph from the objectives to the parameters below passes through (the outputs of a
ResNet's blocks, of an MLP's layers; not a convolution inside a residual block, which the
skip connection bypasses). Walking down the stages, each gets the batched gradients of the
objectives w.r.t. its top (the identity rows for the objectives themselves) and returns
those w.r.t. its parameters θ_k, ``J_k [T, |θ_k|]``, and w.r.t. its bottom cut. Then
G = Σ_k J_k J_kᵀ, since the columns of J are partitioned by the stages.

Peak memory is T × the largest stage's parameters (plus T × one cut's activations), not
T × all of them; the work is that of one batched backward, in one call per stage.

A tensor v is a cut when no edge of the graph jumps over it: nodes are numbered in a
topological order (``topological_order``: an edge a → b, a consumed b's output, has b < a),
and v is a cut iff no edge has b < v < a, no later node takes another output of v's node,
and no parameter is consumed on both sides of v. In any topological order that test is
sound: from the objectives (the largest number) a path to a node below v that avoids v
must cross v's number on an edge, so "no edge crosses" means everything numbered below v
is reached through v. The order here follows the forward's module outputs (nodes first
reached from an earlier output get smaller numbers), close to the creation order, so a node
of a later layer is rarely numbered below an earlier cut (which would only miss that cut).
"""

from __future__ import annotations

import bisect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)
_said: set[str] = set()  # the ops already reported as unbatchable, each said once per process


def unbatchable(error: RuntimeError) -> bool:
    """True for the error of autograd's vectorized backward on an op it cannot batch (legacy
    vmap's "Batching rule not implemented for aten::..." or "vmap: ..."); False for anything
    else, out-of-memory first: a row-by-row retry would hide it or run out again, slower."""
    text = str(error)
    return not isinstance(error, torch.OutOfMemoryError) and ("Batching rule not implemented" in text or text.startswith("vmap:"))


@contextmanager
def recording(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the tensor outputs of ``module`` and its submodules during a forward: candidate cuts."""
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            outputs.append(output)

    handles = [m.register_forward_hook(keep) for m in module.modules()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Stage:
    """The parameters between ``top`` (None: the objectives) and the cut ``bottom`` (None: the input)."""

    top: torch.Tensor | None
    params: list[nn.Parameter]
    bottom: torch.Tensor | None


def topological_order(root: torch.autograd.graph.Node, firsts: list[torch.autograd.graph.Node]) -> dict:
    """``{node: number}`` for the graph below ``root``: children before parents, numbered in a
    post-order walk from each of ``firsts`` in turn (the module outputs in forward order), then
    from ``root``. Public autograd API only (``next_functions``); leaves (AccumulateGrad) are
    not numbered."""
    number: dict = {}
    for start in [*firsts, root]:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in number:
                continue
            if expanded:  # every child is numbered by now: a DAG never reaches a node from below it
                number[node] = len(number)
                continue
            stack.append((node, True))
            stack += [(c, False) for c, _ in node.next_functions if c is not None and getattr(c, "variable", None) is None and c not in number]
    return number


def plan(objectives: torch.Tensor, candidates: list[torch.Tensor], shared: list[nn.Parameter]) -> list[Stage] | None:
    """The stages from the objectives down to the lowest ``shared`` parameter, or None when
    the graph has no cut that splits ``shared`` (one stage would be J itself).

    Stages are merged from the top while their total stays within the largest single stage:
    fewer backward calls, the same peak memory."""
    root = objectives.grad_fn
    if root is None or not candidates:
        return None
    wanted = {id(p) for p in shared}
    order = topological_order(root, [t.grad_fn for t in candidates])
    spans: list[tuple[int, int]] = []  # the numbers of the two ends of each edge between graph nodes
    taken: dict[int, set[int]] = {}  # node number -> the output indices later nodes consume
    consumers: dict[int, list[int]] = {}  # id(param) -> numbers of the nodes that consume it
    reached = {root}  # the nodes below the objectives, each visited once
    stack = [root]
    while stack:
        node = stack.pop()
        a = order[node]
        for child, index in node.next_functions:
            if child is None:
                continue
            if getattr(child, "variable", None) is not None:  # AccumulateGrad: a leaf
                consumers.setdefault(id(child.variable), []).append(a)
                continue
            b = order[child]
            spans.append((b, a))
            taken.setdefault(b, set()).add(index)
            if child not in reached:
                reached.add(child)
                stack.append(child)

    # Candidates by node number, one tensor per node (in-place ops leave several module
    # outputs on one tensor); only nodes the objectives reach.
    by_number: dict[int, torch.Tensor] = {}
    for tensor in candidates:
        if tensor.grad_fn in reached and tensor.grad_fn is not root:
            by_number[order[tensor.grad_fn]] = tensor
    numbers = sorted(by_number)
    invalid = [0] * (len(numbers) + 1)  # a difference array over the sorted candidates

    def bar(low: int, high: int) -> None:
        """Candidates numbered strictly between low and high are not cuts."""
        i, j = bisect.bisect_right(numbers, low), bisect.bisect_left(numbers, high)
        if i < j:
            invalid[i] += 1
            invalid[j] -= 1

    for b, a in spans:
        bar(b, a)
    for key, seqs in consumers.items():
        if key in wanted:
            # Consumers at or below v's node are below v: a parameter used on both sides bars v.
            bar(min(seqs) - 1, max(seqs))
    cuts, running = [], 0
    for i, number in enumerate(numbers):
        running += invalid[i]
        tensor = by_number[number]
        if running == 0 and taken.get(number, {tensor.output_nr}) == {tensor.output_nr}:
            cuts.append(number)
    if not cuts:
        return None

    # Stage s holds the parameters consumed in (cuts[s-1], cuts[s]]; stage len(cuts) is the top.
    members: list[list[nn.Parameter]] = [[] for _ in range(len(cuts) + 1)]
    for p in shared:
        if id(p) in consumers:
            members[bisect.bisect_left(cuts, min(consumers[id(p)]))].append(p)
    sizes = [sum(p.numel() for p in group) for group in members]
    lowest = next((s for s, size in enumerate(sizes) if size), None)
    if lowest is None or lowest == len(cuts):
        return None
    largest = max(sizes)
    stages: list[Stage] = []
    top: torch.Tensor | None = None
    group: list[nn.Parameter] = []
    total = 0
    for s in range(len(cuts), lowest - 1, -1):
        if group and total + sizes[s] > largest:
            bottom = by_number[cuts[s]]  # the cut above stage s
            stages.append(Stage(top, group, bottom))
            top, group, total = bottom, [], 0
        group += members[s]
        total += sizes[s]
    stages.append(Stage(top, group, None))
    return stages if len(stages) > 1 else None


def vjp_rows(
    output: torch.Tensor, rows: torch.Tensor, inputs: list[torch.Tensor], chunk: int = 0
) -> Iterator[tuple[int, int, list[torch.Tensor | None]]]:
    """``(start, stop, grads)``: the vector-Jacobian products of ``output`` with ``rows[start:stop]``
    w.r.t. ``inputs``, each ``[stop - start, *input.shape]`` (None: the input is unused).

    One vectorized backward per ``chunk`` rows (0: all at once), so the transient memory (the
    batched activation gradients) grows with the chunk. Where autograd cannot vmap an op
    (``unbatchable``), one backward per row from there on; any other error is raised."""
    size = chunk or len(rows)
    start, batched = 0, True
    while start < len(rows):
        stop = min(start + size, len(rows)) if batched else start + 1
        try:
            if batched:
                grads = torch.autograd.grad(
                    output, inputs, grad_outputs=rows[start:stop], is_grads_batched=True, retain_graph=True, allow_unused=True
                )
            else:
                grads = torch.autograd.grad(output, inputs, grad_outputs=rows[start], retain_graph=True, allow_unused=True)
                grads = [None if g is None else g.unsqueeze(0) for g in grads]
        except RuntimeError as e:
            if not batched or not unbatchable(e):
                raise
            reason = str(e).strip().splitlines()[0]
            if reason not in _said:
                _said.add(reason)
                logger.warning("mtl: autograd cannot vectorize this backward (%s); one backward per row instead, slower.", reason)
            batched = False
            continue
        yield start, stop, list(grads)
        start = stop


def write_rows(block: torch.Tensor, grads: list[torch.Tensor | None], inputs: list[torch.Tensor]) -> None:
    """Copy per-input gradients ``[rows, *shape]`` into the columns of a J block (0 for unused inputs)."""
    offset = 0
    for g, x in zip(grads, inputs):
        columns = block[:, offset : offset + x.numel()]
        if g is None:
            columns.zero_()
        else:
            columns.copy_(g.reshape(len(block), -1))
        offset += x.numel()


def staged_gramian(
    objectives: torch.Tensor, stages: list[Stage], chunk: int = 0, reduce: Callable[[torch.Tensor], None] | None = None
) -> torch.Tensor:
    """``G [T, T]`` = Σ_k J_k J_kᵀ over the stages of ``plan`` (half precision multiplied in
    float32). ``reduce(J_k)`` averages each block in place across ranks first (torchrun)."""
    T = len(objectives)
    rows = torch.eye(T, dtype=objectives.dtype, device=objectives.device)
    upper = objectives
    G = None
    for stage in stages:
        inputs = [*stage.params] + ([stage.bottom] if stage.bottom is not None else [])
        J = torch.empty(T, sum(p.numel() for p in stage.params), dtype=stage.params[0].dtype, device=objectives.device)
        below = torch.empty((T, *stage.bottom.shape), dtype=stage.bottom.dtype, device=objectives.device) if stage.bottom is not None else None
        for start, stop, grads in vjp_rows(upper, rows, inputs, chunk):
            write_rows(J[start:stop], grads[: len(stage.params)], stage.params)
            if below is not None:
                g = grads[-1]
                if g is None:
                    below[start:stop].zero_()
                else:
                    below[start:stop].copy_(g)
        if reduce is not None:
            reduce(J)
        work = J.float() if J.dtype in (torch.float16, torch.bfloat16) else J
        block = work @ work.T
        G = block if G is None else G + block
        del J, work
        upper, rows = stage.bottom, below
    return G
