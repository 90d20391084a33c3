"""Weightings: how per-task losses become one update of the shared parameters.

A weighting is an ``nn.Module`` so that methods with learnable or running state keep it
in ``state_dict()`` (checkpointed and resumed with the model).
"""

from __future__ import annotations

import torch
from torch import nn

from mtl.registry import Registry


class Weighting(nn.Module):
    """Base class: ``forward(losses) -> scalar`` to back-propagate, from ``{task: loss}``."""

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


WEIGHTINGS: Registry[Weighting] = Registry("weighting", Weighting)
register_weighting = WEIGHTINGS.register


@register_weighting("equal")
class EqualWeighting(Weighting):
    """Equal weights: L = Σ_t L_t (reduction="sum") or L = (1/T) Σ_t L_t (reduction="mean")."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"weighting.reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.reduction = reduction

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.stack(list(losses.values())).sum()
        return total / len(losses) if self.reduction == "mean" else total
