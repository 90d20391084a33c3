"""Loss-level weightings: one backward of a combination of the task losses."""

from __future__ import annotations

from typing import Sequence

import torch

from mtl.weighting.base import LossWeighting, register_weighting


@register_weighting("equal")
class EqualWeighting(LossWeighting):
    """Equal weights: L = Σ_t L_t (reduction="sum") or L = (1/T) Σ_t L_t (reduction="mean")."""

    requires_all_tasks = False  # a task missing from a step contributes 0

    def __init__(self, tasks: Sequence[str], reduction: str = "sum"):
        super().__init__(tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"weighting.reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.reduction = reduction

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        total = losses.sum()
        return total / self.num_tasks if self.reduction == "mean" else total

    def weights(self) -> torch.Tensor:
        value = 1.0 / self.num_tasks if self.reduction == "mean" else 1.0
        return torch.full((self.num_tasks,), value)
