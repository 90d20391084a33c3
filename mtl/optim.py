"""Optimizers and learning-rate schedules, by name or import path.

An LR schedule is a multiplicative factor of each parameter group's own initial LR,
applied with ``LambdaLR`` once per optimizer step; groups with their own LR (e.g.
layer-wise decay) keep their ratios.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from mtl import checks
from mtl.registry import Registry, build

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer", torch.optim.Optimizer)
OPTIMIZERS.register("sgd")(torch.optim.SGD)
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)


class LRSchedule:
    """Base class: ``self(step) -> factor`` of the initial LR at optimizer step ``step``."""

    def __init__(self, total_steps: int, warmup_steps: int = 0):
        checks.number(warmup_steps, "trainer.lr_schedule.warmup_steps", 0, integer=True)
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.decay(step - self.warmup_steps, max(1, self.total_steps - self.warmup_steps))

    def decay(self, step: int, steps: int) -> float:
        raise NotImplementedError


LR_SCHEDULES: Registry[LRSchedule] = Registry("lr_schedule", LRSchedule)


@LR_SCHEDULES.register("constant")
class Constant(LRSchedule):
    """Constant LR after an optional linear warmup."""

    def decay(self, step: int, steps: int) -> float:
        return 1.0


@LR_SCHEDULES.register("cosine")
class Cosine(LRSchedule):
    """Cosine decay to min_factor × LR over the run (Loshchilov & Hutter 2017, no restarts);
    min_factor in [0, 1]."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0):
        super().__init__(total_steps, warmup_steps)
        self.min_factor = checks.number(min_factor, "trainer.lr_schedule.min_factor", 0, 1)

    def decay(self, step: int, steps: int) -> float:
        progress = min(step / steps, 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@LR_SCHEDULES.register("linear")
class Linear(LRSchedule):
    """Linear decay from the LR to end_factor × LR over the run; end_factor in [0, 1]."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, end_factor: float = 0.0):
        super().__init__(total_steps, warmup_steps)
        self.end_factor = checks.number(end_factor, "trainer.lr_schedule.end_factor", 0, 1)

    def decay(self, step: int, steps: int) -> float:
        return 1 + (self.end_factor - 1) * min(step / steps, 1.0)


@LR_SCHEDULES.register("step")
class Step(LRSchedule):
    """Multiply the LR by gamma (in (0, 1]) every step_size optimizer steps."""

    def __init__(self, total_steps: int, step_size: int, gamma: float = 0.1, warmup_steps: int = 0):
        super().__init__(total_steps, warmup_steps)
        self.step_size = checks.number(step_size, "trainer.lr_schedule.step_size", 1, integer=True)
        self.gamma = checks.number(gamma, "trainer.lr_schedule.gamma", 0, 1, low_open=True)

    def decay(self, step: int, steps: int) -> float:
        return self.gamma ** (step // self.step_size)


def build_optimizer(node: dict[str, Any], params: Iterable[Any]) -> torch.optim.Optimizer:
    return build(OPTIMIZERS, node, "trainer.optimizer", params)


def build_lr_schedule(node: dict[str, Any], optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = build(LR_SCHEDULES, node, "trainer.lr_schedule", total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
