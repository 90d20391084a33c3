"""Task heads: small modules on the trunk's features, built from its feature shape.

A head is built as ``Head(in_shape, num_outputs, **kwargs)`` where ``in_shape`` is the
trunk's feature shape (without the batch dimension). Feature maps are average-pooled
over their spatial dimensions before a vector head.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from mtl.registry import Registry


class Head(nn.Module):
    """Base class of task heads: ``forward(features) -> task output``."""

    def __init__(self, in_shape: Sequence[int], num_outputs: int):
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"a head needs num_outputs >= 1, got {num_outputs}.")
        self.in_shape = tuple(in_shape)
        self.num_outputs = num_outputs

    @property
    def in_features(self) -> int:
        return self.in_shape[0] if len(self.in_shape) > 1 else math.prod(self.in_shape)

    @staticmethod
    def to_vector(x: torch.Tensor) -> torch.Tensor:
        # [B, C, *spatial] -> [B, C] by global average pooling; [B, C] unchanged.
        return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x


HEADS: Registry[Head] = Registry("head", Head)
register_head = HEADS.register


@register_head("linear")
class LinearHead(Head):
    """One linear layer: logits for classification (also multi-label) or values for regression."""

    def __init__(self, in_shape: Sequence[int], num_outputs: int, dropout: float = 0.0):
        super().__init__(in_shape, num_outputs)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.in_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.to_vector(x)))


@register_head("mlp")
class MLPHead(Head):
    """Hidden Linear+ReLU(+Dropout) layers, then a linear output (Multi-LeNet's head: hidden=[50])."""

    def __init__(self, in_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (256,), dropout: float = 0.0):
        super().__init__(in_shape, num_outputs)
        sizes = [self.in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(sizes[-1], num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.to_vector(x))


@register_head("multilabel")
class MultiLabelHead(LinearHead):
    """One logit per label, for independent binary labels (train with BCE, threshold at 0)."""


@register_head("regression")
class RegressionHead(LinearHead):
    """Linear regression output; a single output is squeezed to shape [B] to match a [B] target."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.squeeze(-1) if self.num_outputs == 1 else out
