"""One training step, one object per kind of update; the trainer calls it and knows no weighting kind.

``build_step`` picks ``LossStep`` for a loss-level weighting (one backward of the weighted
total) and ``EngineStep`` for a gradient-level one (per-task gradients through
``mtl.engine.GradientEngine``). Both keep the contract of ``Step``:

- ``step(inputs, targets) -> losses``: zero the gradients; forward, task losses, weighting
  and backward; under torchrun the ranks' mean gradient; ``GradientClip``; the optimizer
  step; the weighting's own update after it (FAMO); the LR schedule's step. A non-finite
  loss or gradient raises ``NonFiniteError`` with no update applied (the LR schedule still
  steps: a skipped step is a step);
- ``on_epoch_end()``: the epoch's mean training loss of each task to the weighting (DWA);
- ``diagnostics()``: task weights, and for gradient methods per-task gradient norms and
  pairwise cosines, for the log;
- ``state_dict()`` / ``load_state_dict()``: the running losses and the step count (with
  the weighting's own state, a checkpoint part of its own, a resumed run continues exactly).

``running`` holds each task's mean training loss since the last log line and over the epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtl.affinity import LookaheadAffinity, check_affinity
from mtl.architectures import Architecture
from mtl.distributed import Context
from mtl.engine import GradientEngine, NonFiniteError, jacobian
from mtl.losses import task_losses
from mtl.recipes import Recipe
from mtl.task import Task
from mtl.weighting import GradientWeighting, GramianWeighting, Weighting

Batch = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


class Feed:
    """Each step's batches: ``next(sources)`` draws one batch of each named input source and
    returns ``(inputs, targets, samples)``, inputs keyed by source and targets by task, each
    rank's shard under torchrun and 4-D inputs in channels_last when asked."""

    def __init__(self, sources: dict[str, Any], groups: dict[str, list[str]], dist: Context, channels_last: bool = False):
        self.sources, self.groups, self.dist = sources, groups, dist
        self.channels_last = channels_last
        # The common case (one process, default layout) takes the batches as drawn.
        self._plain = not dist.active and not channels_last

    def next(self, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        inputs, targets, samples = {}, {}, 0
        for name in names:
            x, *ys = self.sources[name].next()
            samples += len(x)
            if self._plain:
                inputs[name] = x
                targets.update(zip(self.groups[name], ys))
                continue
            x = self.dist.shard(x)
            inputs[name] = x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x
            targets.update((task, self.dist.shard(y)) for task, y in zip(self.groups[name], ys))
        return inputs, targets, samples


class RunningLosses:
    """Each task's summed training loss and step count since the last log line (row 0) and
    over the epoch (row 1): the sums stay on the device (no host sync per step), one add per
    step. A step with every task present adds to one count per row; only a step missing tasks
    (a sampling scheduler, partial labels) walks the tasks."""

    def __init__(self, tasks: list[str], device: torch.device):
        self.tasks = tasks
        self.sums = torch.zeros(2, len(tasks), device=device)
        self.full, self.partial = [0, 0], [[0] * len(tasks), [0] * len(tasks)]

    def add(self, vector: torch.Tensor, present: dict[str, Any]) -> None:
        """``vector``: the step's losses in task order, 0 for a task absent from ``present``."""
        self.sums += vector.detach()
        if len(present) == len(self.tasks):
            self.full[0] += 1
            self.full[1] += 1
            return
        for row in self.partial:
            for i, task in enumerate(self.tasks):
                if task in present:
                    row[i] += 1

    def counts(self, row: int) -> list[int]:
        return [self.full[row] + c for c in self.partial[row]]

    def means(self, row: int) -> dict[str, float]:
        """Row 0 (the log interval) as {task: mean} over the tasks seen, then cleared: one host read."""
        sums = self.sums[row].tolist()
        means = {t: s / c for t, s, c in zip(self.tasks, sums, self.counts(row)) if c}
        self._clear(row)
        return means

    def epoch_means(self) -> torch.Tensor:
        """Row 1 as a ``[T]`` tensor (0 for a task never seen), then cleared."""
        means = self.sums[1] / torch.tensor(self.counts(1), device=self.sums.device).clamp(min=1)
        self._clear(1)
        return means

    def _clear(self, row: int) -> None:
        self.sums[row].zero_()
        self.full[row] = 0
        self.partial[row] = [0] * len(self.tasks)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "counts": [self.counts(0), self.counts(1)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.copy_(state["sums"])  # a copy: the state's tensor may be another run's live one
        self.full, self.partial = [0, 0], [list(c) for c in state["counts"]]


class GradientClip:
    """The gradients' last pass before the optimizer step: caps, clipping and the finiteness check.

    One norm per gradient tensor (one foreach kernel) serves all three, in this order:

    - ``cap`` > 0: the trunk's gradient is scaled to norm ≤ ``cap`` (Nash-MTL's update-norm
      cap: its official code calls ``clip_grad_norm_`` on the shared parameters);
    - ``clip`` > 0 (``trainer.grad_clip``): the whole model's gradient, the capped trunk's
      included, is scaled to norm ≤ ``clip``;
    - a NaN or inf in a loss or any gradient (the model's, or a weighting's own parameters')
      makes the step non-finite: the caller skips it or stops.

    A scale is min(1, max / (norm + 1e-6)), torch's ``clip_grad_norm_``. Under torchrun the
    gradients are the ranks' mean already, so every rank computes the same norms and no other
    all-reduce is needed. One host read per step: a NaN update must never reach the weights."""

    def __init__(self, trunk: list[nn.Parameter], heads: list[nn.Parameter], own: list[nn.Parameter], cap: float = 0.0, clip: float = 0.0):
        self.trunk, self.heads, self.own = trunk, heads, own
        self.cap, self.clip = cap, clip

    def __call__(self, losses: dict[str, torch.Tensor], vector: torch.Tensor | None = None) -> str | None:
        """Caps and clips the gradients in place; what is not finite, else None (then nothing was scaled).

        ``vector``: the losses stacked, where the caller has them already."""
        trunk = [p for p in self.trunk if p.grad is not None]
        model = trunk + [p for p in self.heads if p.grad is not None]
        grads = [p.grad for p in model] + [p.grad for p in self.own if p.grad is not None]
        values = (vector if vector is not None else torch.stack(list(losses.values()))).detach().float()
        # torch's own get_total_norm uses this kernel; torch.foreach.norm is its public name from 2.15 on.
        norms = torch.stack(torch._foreach_norm(grads)).float() if grads else values.new_zeros(0)
        # Every norm is >= 0, so their sum with the losses' is finite exactly when each term is.
        if not bool(torch.isfinite(values.sum() + norms.sum())):
            bad = [f"task {n!r} loss {v}" for n, v in zip(losses, torch.stack(list(losses.values())).tolist()) if not math.isfinite(v)]
            if bad:
                return "non-finite loss: " + ", ".join(bad)
            return f"non-finite gradient (model gradient norm {float(torch.linalg.vector_norm(norms[: len(model)]))}) with finite losses"
        if self.cap and trunk:
            trunk_norm = torch.linalg.vector_norm(norms[: len(trunk)])
            torch.nn.utils.clip_grads_with_norm_(trunk, self.cap, trunk_norm)
            # The capped trunk's tensor norms, for the model's norm below without another pass.
            norms = torch.cat([norms[: len(trunk)] * (self.cap / (trunk_norm + 1e-6)).clamp(max=1.0), norms[len(trunk) :]])
        if self.clip and model:
            torch.nn.utils.clip_grads_with_norm_(model, self.clip, torch.linalg.vector_norm(norms[: len(model)]))
        return None


class Step:
    """The part of a training step every kind of update shares; ``_backward`` is each kind's own."""

    def __init__(
        self,
        model: Architecture,
        tasks: dict[str, Task],
        groups: dict[str, list[str]],
        weighting: Weighting,
        optimizer: torch.optim.Optimizer,
        lr_schedule: torch.optim.lr_scheduler.LRScheduler,
        recipe: Recipe,
        dist: Context,
        device: torch.device,
        bf16: bool = False,
        grad_clip: float = 0.0,
        affinity_every: int = 0,
    ):
        self.model, self.tasks, self.groups, self.weighting = model, tasks, groups, weighting
        self.optimizer, self.lr_schedule, self.recipe, self.dist = optimizer, lr_schedule, recipe, dist
        self.device_type, self.bf16 = device.type, bf16
        self.count = 0  # steps taken, skipped ones included
        self.running = RunningLosses(weighting.tasks, device)
        shared = model.shared_parameters()
        in_shared = {id(p) for p in shared}
        own = [p for p in model.parameters() if id(p) not in in_shared]
        self.clip = GradientClip(shared, own, list(weighting.parameters()), cap=weighting.max_norm, clip=grad_clip or 0.0)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._all_tasks = len(weighting.tasks)
        self.affinity = Affinity(self, affinity_every) if affinity_every else None

    def step(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One update from one batch; the task losses. Raises ``NonFiniteError`` (nothing applied)."""
        if self.affinity is not None and self.affinity.times is not None:
            return self.affinity.timed(lambda: self._update(inputs, targets))
        return self._update(inputs, targets)

    def _update(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        try:
            measure = self.affinity is not None and self.count % self.affinity.every == 0
            with self._autocast():
                losses, vector = self._backward(inputs, targets, measure)
            if measure:
                if bool(torch.isfinite(vector).all()):
                    self.affinity.measure(inputs, targets)
                else:  # not measured: the step is skipped or stops the run below, as any non-finite step
                    self.affinity.discard()
            if self.dist.active:
                self.dist.mean_([p.grad for p in self._params if p.grad is not None])
            problem = self.clip(losses, vector)
            if problem is not None:
                raise NonFiniteError(problem)
            self.optimizer.step()
            self._after_update(inputs, targets, vector)
            self.running.add(vector, losses)
            return losses
        except NonFiniteError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            self.lr_schedule.step()
            self.count += 1

    def _autocast(self):
        # Entering a disabled torch.autocast still costs tens of microseconds a step.
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _backward(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], measure: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward, weighting and backward; the task losses and their vector in weighting order.
        ``measure``: the affinity's per-task gradients are taken from this forward, before the backward."""
        raise NotImplementedError

    def _after_update(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], vector: torch.Tensor) -> None:
        """After the optimizer step (a loss-level weighting's own update)."""

    def task_losses(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each task's masked mean loss; under torchrun the global batch's (``Context.global_losses``),
        each rank weighted by its number of labelled samples of the task."""
        losses = task_losses(self.tasks, outputs, targets)
        if not self.dist.active:
            return losses
        return self.dist.global_losses(losses, {t: self.tasks[t].valid_mask(targets[t]).sum() for t in losses})

    def penalty(self) -> torch.Tensor | None:
        """The recipe's penalty (L2-SP) plus the architecture's own term (DSelect-k's entropy), where there are any."""
        terms = [t for t in (self.recipe.penalty(self.model), self.model.penalty()) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def vector(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every task in weighting order; a task absent from this step (only with weightings
        that allow it, see Weighting.requires_all_tasks) contributes 0."""
        if len(losses) == self._all_tasks:
            return torch.stack([losses[t] for t in self.weighting.tasks])
        zero = next(iter(losses.values())).new_zeros(())
        return torch.stack([losses.get(t, zero) for t in self.weighting.tasks])

    def on_epoch_end(self) -> None:
        self.weighting.on_epoch_end(self.running.epoch_means())

    def diagnostics(self) -> dict[str, float]:
        weights = self._weights()
        out = {} if weights is None else {f"weights/{t}": float(v) for t, v in zip(self.weighting.tasks, weights.tolist())}
        return out if self.affinity is None else {**out, **self.affinity.interval()}

    def summary(self) -> dict[str, Any]:
        """What the stage's results.json gets from the step: the run's mean affinity, where measured."""
        return {} if self.affinity is None else self.affinity.summary()

    def _weights(self) -> torch.Tensor | None:
        """The current task weights (None where there are none)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The step's own state; the weighting's is a part of the checkpoint of its own (``TrainState``)."""
        affinity = None if self.affinity is None else self.affinity.state_dict()
        return {"running": self.running.state_dict(), "count": self.count, "affinity": affinity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running.load_state_dict(state["running"])
        self.count = state["count"]
        if self.affinity is not None and state["affinity"] is not None:
            self.affinity.load_state_dict(state["affinity"])


class LossStep(Step):
    """A loss-level weighting: one backward of ``weighting(losses)`` (plus the penalty: the recipe's, the architecture's)."""

    def _backward(self, inputs, targets, measure=False):
        losses = self.task_losses(self.model.forward_groups(inputs, self.groups), targets)
        vector = self.vector(losses)
        if measure:
            self.affinity.gradients(vector)
        total = self.weighting(vector)
        penalty = self.penalty()
        (total if penalty is None else total + penalty).backward()
        return losses, vector

    def _after_update(self, inputs, targets, vector):
        after = None
        if self.weighting.wants_losses_after_step:
            with torch.no_grad(), self._autocast():
                after = self.vector(self.task_losses(self.model.forward_groups(inputs, self.groups), targets))
        self.weighting.update(vector.detach(), after)

    def _weights(self) -> torch.Tensor | None:
        return self.weighting.weights()


class EngineStep(Step):
    """A gradient-level weighting: per-task gradients, the method's aggregation and the
    update, by ``GradientEngine`` (``engine.every``, ``engine.jacobian_chunk``, ``engine.staged_gramian``)."""

    def __init__(self, *args: Any, every: int = 1, chunk: int = 0, staged: bool = True, record_every: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.affinity is not None:
            raise ValueError("the lookahead affinity is measured in LossStep (a loss-level weighting), not in EngineStep.")
        self.engine = GradientEngine(self.model, self.weighting, every=every, chunk=chunk, ctx=self.dist, record_every=record_every, staged=staged)

    def _backward(self, inputs, targets, measure=False):
        members = {n: self.groups[n] for n in inputs}
        losses = self.engine.backward(inputs, members, targets, self.task_losses, self.count, self.penalty)
        return losses, self.vector(losses)

    def _weights(self) -> torch.Tensor | None:
        return self.engine.diagnostics.get("weights")

    def state_dict(self) -> dict[str, Any]:
        """With the engine's last task weights, which ``engine.every > 1`` reuses between recomputations."""
        return {**super().state_dict(), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.engine.load_state_dict(state["engine"])

    def diagnostics(self) -> dict[str, float]:
        out = super().diagnostics()
        found, tasks = self.engine.diagnostics, self.weighting.tasks
        if "norms" in found:
            out.update({f"grad_norm/{t}": v for t, v in zip(tasks, found["norms"].tolist())})
            cos = found["cosines"].tolist()
            out.update({f"grad_cos/{a}/{b}": cos[i][j] for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j})
        return out


class Affinity:
    """TAG's lookahead inter-task affinity (``mtl.affinity.LookaheadAffinity``; Fifty et al.
    2021) at every ``every``-th step of a loss-level step: each task's gradient of the shared
    parameters from the step's own forward, a step of the run's optimizer on each alone, every
    task's loss after it on the same batch, then the state restored bit for bit (training is
    the same with or without it). Z is summed on the device; ``interval()`` gives the mean since
    the last log line, ``summary()`` the run's.

    ``record()`` (``mtl group``) also keeps each measurement (its step, LR, Z and the losses
    before and after, on the device until ``rows()`` reads them) and times every step, measured
    or not, for the cost of the measurement; both are checkpointed with the sums. Without it the
    step pays for neither."""

    def __init__(self, step: Step, every: int):
        self.step, self.every = step, every
        T = len(step.weighting.tasks)
        self.sums = torch.zeros(2, T, T, device=step.running.sums.device)  # row 0: since the last log; row 1: the run
        self.counts = [0, 0]
        self._grads: list[list[torch.Tensor]] | None = None
        self.records: list[dict[str, Any]] | None = None
        self.times: dict[str, list[float]] | None = None  # seconds per step: "affinity" (measured) and "plain"

    def record(self) -> None:
        self.records, self.times = [], {"plain": [], "affinity": []}

    def _lookahead(self) -> LookaheadAffinity:
        # Built per measurement: the trainable shared parameters change with a recipe's epochs.
        model = self.step.model
        return LookaheadAffinity(self.step.optimizer, [p for p in model.shared_parameters() if p.requires_grad], list(model.buffers()))

    def gradients(self, vector: torch.Tensor) -> None:
        self._grads = self._lookahead().gradients(vector)

    def discard(self) -> None:
        """Drop the gradients ``gradients`` took: a step with a non-finite loss is not measured."""
        self._grads = None

    def measure(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
        step, tasks = self.step, self.step.weighting.tasks

        def evaluate() -> torch.Tensor:
            with step._autocast():
                return step.vector(step.task_losses(step.model.forward_groups(inputs, step.groups), targets))

        z, before, after = self._lookahead()(self._grads, evaluate)
        self._grads = None
        check_affinity(z, before, after, tasks, step.count)
        self.sums += z.to(self.sums.dtype)
        self.counts = [c + 1 for c in self.counts]
        if self.records is not None:
            self.records.append({"step": step.count, "lr": step.optimizer.param_groups[0]["lr"], "z": z, "before": before, "after": after})

    def timed(self, update: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``update()`` (one step), its wall time added to the measured or the plain steps'. On a
        GPU the device is synchronised before and after, so that the time is the step's own work;
        a step that raises (a skipped non-finite step) is not counted."""
        kind = "affinity" if self.step.count % self.every == 0 else "plain"
        device = self.sums.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.times[kind].append(time.perf_counter() - start)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per recorded measurement and pair of tasks: step, lr, from (the task stepped
        on), onto (the task measured), affinity, loss_before, loss_after."""
        tasks = self.step.weighting.tasks
        out = []
        for r in self.records or []:
            z, before, after = r["z"].tolist(), r["before"].tolist(), r["after"].tolist()
            out += [{"step": r["step"], "lr": r["lr"], "from": a, "onto": b, "affinity": z[i][j], "loss_before": before[j],
                     "loss_after": after[i][j]} for i, a in enumerate(tasks) for j, b in enumerate(tasks)]
        return out

    def _means(self, row: int) -> dict[tuple[str, str], float]:
        tasks = self.step.weighting.tasks
        mean = (self.sums[row] / self.counts[row]).tolist()
        return {(a, b): mean[i][j] for i, a in enumerate(tasks) for j, b in enumerate(tasks)}

    def interval(self) -> dict[str, float]:
        """``affinity/<from>/<onto>``: the mean Z since the last call (nothing when none was measured)."""
        if not self.counts[0]:
            return {}
        out = {f"affinity/{a}/{b}": v for (a, b), v in self._means(0).items()}
        self.sums[0].zero_()
        self.counts[0] = 0
        return out

    def summary(self) -> dict[str, Any]:
        if not self.counts[1]:
            return {}
        matrix: dict[str, dict[str, float]] = {}
        for (a, b), v in self._means(1).items():
            matrix.setdefault(a, {})[b] = v
        return {"affinity": matrix, "affinity_steps": self.counts[1], "affinity_every": self.every}

    def state_dict(self) -> dict[str, Any]:
        recorded = {} if self.records is None else {"records": self.records, "times": self.times}
        return {"sums": self.sums, "counts": list(self.counts), **recorded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.copy_(state["sums"])
        self.counts = list(state["counts"])
        if self.records is not None and "records" in state:
            self.records = list(state["records"])
            self.times = {kind: list(seconds) for kind, seconds in state["times"].items()}


def build_step(model: Architecture, tasks: dict[str, Task], groups: dict[str, list[str]], weighting: Weighting, *args: Any,
               engine: dict[str, Any] | None = None, **kwargs: Any) -> Step:
    """The step of ``weighting``'s kind: ``EngineStep`` (with the ``engine`` settings: every,
    chunk, staged, record_every) for a ``GradientWeighting``, else ``LossStep``; the other
    arguments are ``Step``'s."""
    if isinstance(weighting, GradientWeighting):
        return EngineStep(model, tasks, groups, weighting, *args, **(engine or {}), **kwargs)
    return LossStep(model, tasks, groups, weighting, *args, **kwargs)


def backward(losses: dict[str, torch.Tensor], shared: list[torch.Tensor] | torch.Tensor, weighting: Weighting | None = None) -> torch.Tensor | None:
    """One multi-task update into ``.grad``, for your own training loop: the trainer's update
    without its forward, clipping or optimizer step.

    ``losses``: each task's scalar loss, keyed by ``weighting.tasks``. ``shared``: the
    parameters every task reaches (the trunk's; a weighting's parameter mode), or the shared
    features, one tensor every task's loss is computed from (its representation mode; MGDA-UB
    takes only this). ``weighting``: a built weighting of these tasks
    (``WEIGHTINGS.get(name)(tasks)``); None sums the losses.

    - Loss-level: one backward of ``weighting(L)``, L = [L_1, ..., L_T] in task order.
    - Gradient-level: o = ``weighting.transform_losses(L)``, J = ∂o/∂shared ``[T, D]``, the
      method's ``aggregate(J)``. Task weights w whose method weighs the heads too (MGDA,
      UPGrad, ...): one backward of Σ_t w_t o_t. Otherwise (PCGrad, CAGrad, IMTL-G, ...) the
      shared parameters (or, through the features, everything below them) get the method's
      gradient d (or Σ_t w_t ∇o_t) and every other parameter a loss reaches (a head) the
      gradient of Σ_t o_t, i.e. of its own task's objective. With features, Σ_t o_t is
      back-propagated and then d − Σ_t ∇o_t through the features: the trunk gets d, by linearity.

    Gradients add to ``.grad`` as ``loss.backward()`` does. Returns the task weights where the
    method gives any. One process: under torchrun, average ``.grad`` over ranks afterwards.
    A weighting's own update after the optimizer step (FAMO's ``update``, DWA's
    ``on_epoch_end``) is yours to call, as ``LossStep`` does. Raises ``NonFiniteError`` on
    a NaN or inf task gradient, before the method sees it, and ``ValueError`` when ``shared``
    does not fit the method's modes."""
    tasks = weighting.tasks if weighting is not None else list(losses)
    L = torch.stack([losses[t] for t in tasks])
    if not isinstance(weighting, GradientWeighting):
        (L.sum() if weighting is None else weighting(L)).backward()
        return None if weighting is None else weighting.weights()
    features = shared if isinstance(shared, torch.Tensor) and not isinstance(shared, nn.Parameter) else None
    if features is None and weighting.mode == "representation":
        raise ValueError(f"{type(weighting).__name__} takes its gradients w.r.t. the shared features (mode representation): "
                         "pass the trunk's output tensor as shared, not its parameters.")
    if features is not None and "representation" not in type(weighting).modes:
        raise ValueError(f"{type(weighting).__name__} takes its gradients w.r.t. the shared parameters; pass a list of them as shared.")
    shared = [features] if features is not None else [p for p in shared if p.requires_grad]
    weighting.observe(L.detach())
    objectives = weighting.transform_losses(L)
    if not shared:  # a frozen trunk: each head learns from its own objective
        objectives.sum().backward()
        return None
    J = jacobian(objectives, shared)
    finite = torch.isfinite(J.sum(dim=1))
    if not bool(finite.all()):
        raise NonFiniteError("non-finite gradient of " + ", ".join(f"task {t!r}" for t, ok in zip(tasks, finite.tolist()) if not ok))
    result = weighting.aggregate(J)
    weights = None if result.weights is None else result.weights.to(objectives.dtype)
    if result.gradient is None and not (isinstance(weighting, GramianWeighting) and not weighting.weigh_heads):
        (weights * objectives).sum().backward()
        return weights
    gradient = result.gradient if result.gradient is not None else weights.to(J.dtype) @ J
    if features is not None:
        objectives.sum().backward(retain_graph=True)
        features.backward((gradient - J.sum(dim=0)).view_as(features).to(features.dtype))
        return weights
    before = [p.grad for p in shared]
    # Every parameter gets Σ_t ∇o_t (a head: its own objective's); the shared ones then get the method's instead.
    objectives.sum().backward()
    offset = 0
    for p, prior in zip(shared, before):
        g = gradient[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        p.grad = g if prior is None else prior + g
    return weights
