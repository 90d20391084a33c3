"""Everything a resumed run needs, listed once: ``TrainState.state_dict`` is a step checkpoint.

The counters (epochs and steps done, skipped steps, the best epoch, the wall time) live
here; the stateful parts of the run (model, optimizer, LR schedule, weighting, the step with its
running losses, task scheduler, batch sources) are asked for their own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from mtl import checkpoint
from mtl.config import to_dict


# The layout of TrainState.state_dict; raised when a part's state changes shape, so that a
# checkpoint of another layout is refused with a message instead of a KeyError mid-restore.
# 2: the step's state includes the gradient engine's reused task weights.
FORMAT = 2


@dataclass
class TrainState:
    parts: dict[str, Any]  # name -> an object with state_dict() / load_state_dict()
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps (skipped non-finite steps included)
    skipped: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"score": -float("inf"), "epoch": 0})
    wall_time: float = 0.0

    COUNTERS = ("epoch", "step", "skipped", "best", "wall_time")

    def state_dict(self, cfg: DictConfig) -> dict[str, Any]:
        return {
            **{name: part.state_dict() for name, part in self.parts.items()},
            **{name: getattr(self, name) for name in self.COUNTERS},
            "rng": checkpoint.rng_state(),
            "config": to_dict(cfg),
            "format": FORMAT,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        for name in self.COUNTERS:
            setattr(self, name, state[name])
        checkpoint.set_rng_state(state["rng"])


class Sources:
    """The batch sources as one part: ``{source: state}``."""

    def __init__(self, sources: dict[str, Any]):
        self.sources = sources

    def state_dict(self) -> dict[str, Any]:
        return {n: s.state_dict() for n, s in self.sources.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, s in self.sources.items():
            s.load_state_dict(state[n])


class Schedule:
    """The LR schedule as a part that restores only its step count: the schedule itself comes
    from the current config, so a run resumed with more epochs stretches its schedule
    instead of replaying the old one."""

    def __init__(self, schedule):
        self.schedule = schedule

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = len(self.schedule.optimizer.param_groups)
        self.schedule.load_state_dict({**state, "lr_lambdas": [None] * groups})
