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

    def forward_groups(self, inputs: dict[str, torch.Tensor], members: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """Each source's input batch, for the tasks it feeds (``members``). Inputs of one
        shape go through the trunk in one call (one kernel launch per layer, not one per
        source); tasks of one source share its features."""
        names = list(inputs)
        if len({tuple(x.shape[1:]) for x in inputs.values()}) == 1:
            features = self.trunk(torch.cat([inputs[n] for n in names])).split([len(inputs[n]) for n in names])
        else:
            features = [self.trunk(inputs[n]) for n in names]
        return {t: self.heads[t](f) for n, f in zip(names, features) for t in members[n]}
