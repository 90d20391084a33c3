"""Task schedulers: which tasks feed each training step, and what an epoch is."""

from __future__ import annotations

from typing import Mapping

from mtl.registry import Registry


class TaskScheduler:
    """Base class: ``tasks_for_step(step)`` names the tasks whose batches a step trains on;
    ``steps_per_epoch`` fixes the length of an epoch. Built from the tasks' batches per
    pass over their training sets, ``{task: n_batches}``."""

    def __init__(self, batches_per_pass: Mapping[str, int]):
        if not batches_per_pass:
            raise ValueError("a scheduler needs at least one task")
        self.batches_per_pass = dict(batches_per_pass)
        self.tasks = list(batches_per_pass)

    @property
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def tasks_for_step(self, step: int) -> list[str]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


SCHEDULERS: Registry[TaskScheduler] = Registry("scheduler", TaskScheduler)
register_scheduler = SCHEDULERS.register


@register_scheduler("all")
class AllTasks(TaskScheduler):
    """Every task each step (the joint-training default). Epoch = one pass over the largest
    task's training set; smaller tasks start a new, reshuffled pass when theirs ends."""

    @property
    def steps_per_epoch(self) -> int:
        return max(self.batches_per_pass.values())

    def tasks_for_step(self, step: int) -> list[str]:
        return self.tasks
