"""Task schedulers: which tasks feed each training step, and what an epoch is.

A scheduler sees the training sources (a task, or tasks that share one input batch) with
their sizes, and names the sources each step trains on. Sampling schedulers draw from
their own generator, seeded by the run's seed, so a run (and a resumed run, through
``state_dict``) draws the same sequence. The data of every source is reshuffled on every
pass (``mtl.data.BatchSource``); nothing caches an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from mtl import checks
from mtl.registry import Registry


@dataclass(frozen=True)
class Sources:
    """What a scheduler is built from: per source, training samples and batches per pass."""

    samples: Mapping[str, int]
    batches: Mapping[str, int]
    seed: int = 0
    epochs: int = 1
    fixed_epoch: int | None = None  # trainer.steps_per_epoch, when the config fixes it

    @property
    def names(self) -> list[str]:
        return list(self.samples)


class TaskScheduler:
    """Base class. ``tasks_for_step(step)`` names the sources a step trains on, called once
    per step in order; ``steps_per_epoch`` is the epoch's length."""

    def __init__(self, sources: Sources):
        if not sources.samples:
            raise ValueError("a scheduler needs at least one task")
        self.sources = sources
        self.names = sources.names
        self.generator = torch.Generator().manual_seed(sources.seed)

    @property
    def steps_per_epoch(self) -> int:
        return self.sources.fixed_epoch or self.natural_epoch()

    def natural_epoch(self) -> int:
        """Default for schedulers that train one source per step: as many steps as one pass
        over every source's data together."""
        return sum(self.sources.batches.values())

    def tasks_for_step(self, step: int) -> list[str]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


SCHEDULERS: Registry[TaskScheduler] = Registry("scheduler", TaskScheduler)
register_scheduler = SCHEDULERS.register


class SamplingScheduler(TaskScheduler):
    """One source per step, drawn with probabilities ``probabilities(step)``."""

    def probabilities(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def tasks_for_step(self, step: int) -> list[str]:
        index = torch.multinomial(self.probabilities(step), 1, generator=self.generator).item()
        return [self.names[index]]

    def _sizes(self) -> torch.Tensor:
        return torch.tensor([float(self.sources.samples[n]) for n in self.names], dtype=torch.float64)


@register_scheduler("all")
class AllTasks(TaskScheduler):
    """Every task each step (joint training). Epoch = one pass over the largest task's
    training set; a smaller task starts a new, reshuffled pass when its own ends."""

    def natural_epoch(self) -> int:
        return max(self.sources.batches.values())

    def tasks_for_step(self, step: int) -> list[str]:
        return self.names


@register_scheduler("round_robin")
class RoundRobin(TaskScheduler):
    """One task per step, in turn: task (step mod T). Epoch = the batches of all tasks' passes together."""

    def tasks_for_step(self, step: int) -> list[str]:
        return [self.names[step % len(self.names)]]


@register_scheduler("uniform")
class Uniform(SamplingScheduler):
    """One task per step, drawn uniformly: p_t = 1/T."""

    def probabilities(self, step: int) -> torch.Tensor:
        return torch.full((len(self.names),), 1.0 / len(self.names), dtype=torch.float64)


@register_scheduler("proportional")
class Proportional(SamplingScheduler):
    """One task per step, drawn proportionally to its training-set size: p_t = n_t / Σ n."""

    def probabilities(self, step: int) -> torch.Tensor:
        sizes = self._sizes()
        return sizes / sizes.sum()


@register_scheduler("temperature")
class Temperature(SamplingScheduler):
    """Temperature sampling (Arivazhagan et al. 2019): p_t ∝ min(n_t, cap)^(1/τ).
    τ = 1 is proportional, τ → ∞ uniform; cap (optional) limits the largest sets."""

    def __init__(self, sources: Sources, tau: float = 2.0, cap: int | None = None):
        super().__init__(sources)
        checks.number(tau, "scheduler.tau", 0, low_open=True)
        if cap is not None:
            checks.number(cap, "scheduler.cap", 1, integer=True)
        self.tau = tau
        self.cap = cap

    def probabilities(self, step: int) -> torch.Tensor:
        sizes = self._sizes()
        if self.cap is not None:
            sizes = sizes.clamp(max=self.cap)
        weights = sizes ** (1.0 / self.tau)
        return weights / weights.sum()


@register_scheduler("annealed")
class Annealed(SamplingScheduler):
    """Annealed sampling (Stickland & Murray 2019, "BERT and PALs"): p_t ∝ n_t^α with
    α = 1 − (1 − alpha_end)·(e − 1)/(E − 1) at epoch e of E (1-based): proportional at the
    first epoch, towards uniform (alpha_end = 0) at the last; the paper uses alpha_end = 0.2."""

    def __init__(self, sources: Sources, alpha_end: float = 0.2):
        super().__init__(sources)
        checks.number(alpha_end, "scheduler.alpha_end", 0, 1)
        self.alpha_end = alpha_end

    def alpha(self, step: int) -> float:
        epochs = self.sources.epochs
        epoch = min(step // self.steps_per_epoch, epochs - 1) + 1
        return 1.0 - (1.0 - self.alpha_end) * (epoch - 1) / max(epochs - 1, 1)

    def probabilities(self, step: int) -> torch.Tensor:
        weights = self._sizes() ** self.alpha(step)
        return weights / weights.sum()


@register_scheduler("weighted")
class Weighted(SamplingScheduler):
    """One task per step with fixed probabilities: p_t = w_t / Σ w (weights: {task: w})."""

    def __init__(self, sources: Sources, weights: Mapping[str, float]):
        super().__init__(sources)
        unknown = [t for t in weights if t not in self.names]
        if unknown:
            raise ValueError(f"scheduler.weights names {unknown[0]!r}, which is not a task of this stage ({', '.join(self.names)}).")
        missing = [t for t in self.names if t not in weights]
        if missing:
            raise ValueError(f"scheduler.weights gives no weight for {', '.join(missing)}.")
        for task, w in weights.items():
            checks.number(w, f"scheduler.weights.{task}", 0)
        if not sum(weights.values()) > 0:
            raise ValueError("scheduler.weights must be >= 0 and not all 0.")
        self.weights = torch.tensor([float(weights[n]) for n in self.names], dtype=torch.float64)

    def probabilities(self, step: int) -> torch.Tensor:
        return self.weights / self.weights.sum()


@register_scheduler("sequential")
class Sequential(TaskScheduler):
    """Tasks one after another, a curriculum in config order: the first task for its batches
    per pass, then the next, and around again. Epoch = the batches of all passes together."""

    def tasks_for_step(self, step: int) -> list[str]:
        position = step % self.natural_epoch()
        for name in self.names:
            position -= self.sources.batches[name]
            if position < 0:
                return [name]
        return [self.names[-1]]
