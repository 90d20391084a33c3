"""Hard parameter sharing (Caruana 1997): one trunk every task reads, and a head per task."""

from __future__ import annotations

import torch
from torch import nn

from mtl.architectures.base import Architecture, TrunkFactory, register_architecture
from mtl.heads import LinearHead, MultiLabelHead
from mtl.trunks import Trunk


@register_architecture("hard")
class MultiTaskModel(Architecture):
    """Hard parameter sharing (Caruana 1997, "Multitask learning"): y_t = h_t(f(x)), one trunk f
    shared whole, a head h_t per task. State-dict keys are ``trunk.*`` and ``heads.<task>.*``.
    The shared representation is the trunk's output f(x)."""

    shares_representation = True

    def __init__(self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory | None = None):
        super().__init__(heads, trunk)

    def forward(self, x: torch.Tensor, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One input batch shared by ``tasks`` (all heads by default)."""
        return self.apply_heads(self.cut(self.trunk(x)), tasks or list(self.heads))

    def eval_outputs(self, x: torch.Tensor, tasks: list[str]) -> dict[str, torch.Tensor]:
        """One trunk call; each head on its own (unfused), as evaluation always ran them."""
        features = self.trunk(x)
        return {t: self.heads[t](features) for t in tasks}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.layer_groups()[-1][1].parameters())

    def forward_groups(self, inputs: dict[str, torch.Tensor], members: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """Each source's input batch, for the tasks it feeds (``members``). Inputs of one
        shape go through the trunk in one call (one kernel launch per layer, not one per
        source); tasks of one source share its features."""
        names = list(inputs)
        if len(names) == 1:
            features = [self.cut(self.trunk(inputs[names[0]]))]
        elif len({tuple(x.shape[1:]) for x in inputs.values()}) == 1:
            features = self.cut(self.trunk(torch.cat([inputs[n] for n in names]))).split([len(inputs[n]) for n in names])
        else:
            features = [self.cut(self.trunk(inputs[n])) for n in names]
        outputs: dict[str, torch.Tensor] = {}
        for n, f in zip(names, features):
            outputs.update(self.apply_heads(f, members[n]))
        return outputs

    def apply_heads(self, features: torch.Tensor, tasks: list[str]) -> dict[str, torch.Tensor]:
        """The heads of ``tasks`` on shared features. Linear heads of one shape run fused: their
        weights stacked into one batched einsum (one kernel for T heads instead of T), with the
        parameters, state-dict keys and gradients of the separate heads unchanged."""
        fusable = [t for t in tasks if _fusable(self.heads[t])]
        by_shape: dict[tuple, list[str]] = {}
        for t in fusable:
            by_shape.setdefault(tuple(self.heads[t].fc.weight.shape), []).append(t)
        outputs = {}
        for group in by_shape.values():
            if len(group) < 2:
                continue
            heads = [self.heads[t] for t in group]
            weight = torch.stack([h.fc.weight for h in heads])  # [T, O, F]
            bias = torch.stack([h.fc.bias for h in heads])  # [T, O]
            x = heads[0].to_vector(features)
            fused = torch.einsum("bf,tof->tbo", x, weight.to(x.dtype)) + bias.to(x.dtype)[:, None, :]
            outputs.update(zip(group, fused.unbind(0)))
        for t in tasks:
            if t not in outputs:
                outputs[t] = self.heads[t](features)
        return {t: outputs[t] for t in tasks}


def _fusable(head: nn.Module) -> bool:
    # Per-head dropout masks differ, so dropout heads fuse only when dropout is inactive.
    return type(head) in (LinearHead, MultiLabelHead) and (not head.training or head.dropout.p == 0)
