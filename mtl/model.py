"""The multi-task model: one shared trunk and an ``nn.ModuleDict`` of task heads."""

from __future__ import annotations

import torch
from torch import nn

from mtl.trunks import Trunk


class MultiTaskModel(nn.Module):
    """Trunk + heads keyed by task name. State-dict keys are ``trunk.*`` and ``heads.<task>.*``."""

    def __init__(self, trunk: Trunk, heads: dict[str, nn.Module]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: torch.Tensor, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One input batch shared by ``tasks`` (all heads by default)."""
        features = self.trunk(x)
        return {t: self.heads[t](features) for t in (tasks or list(self.heads))}

    def forward_batches(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each task's own input batch. Inputs of one shape go through the trunk in one
        call (one kernel launch per layer instead of one per task)."""
        shapes = {tuple(x.shape[1:]) for x in inputs.values()}
        if len(shapes) > 1:
            return {t: self.heads[t](self.trunk(x)) for t, x in inputs.items()}
        tasks = list(inputs)
        features = self.trunk(torch.cat([inputs[t] for t in tasks]))
        chunks = features.split([len(inputs[t]) for t in tasks])
        return {t: self.heads[t](f) for t, f in zip(tasks, chunks)}

