"""Task heads: small modules on the trunk's features, built from its feature shape.

A head is built as ``Head(in_shape, num_outputs, **kwargs)`` where ``in_shape`` is the
trunk's feature shape (without the batch dimension). Feature maps are average-pooled
over their spatial dimensions before a vector head; the dense head keeps them and
predicts per pixel.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl import checks
from mtl.registry import Registry


class Head(nn.Module):
    """Base class of task heads: ``forward(features) -> task output``.

    ``per_pixel`` heads need feature maps ``[B, C, h, w]`` and return maps ``[B, num_outputs, H, W]``.
    """

    per_pixel = False

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
        self.dropout = nn.Dropout(checks.probability(dropout, "head.dropout"))
        self.fc = nn.Linear(self.in_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.to_vector(x)))


@register_head("mlp")
class MLPHead(Head):
    """Hidden Linear+ReLU(+Dropout) layers, then a linear output (Multi-LeNet's head: hidden=[50])."""

    def __init__(self, in_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (256,), dropout: float = 0.0):
        super().__init__(in_shape, num_outputs)
        checks.probability(dropout, "head.dropout")
        sizes = [self.in_features, *checks.sizes(hidden, "head.hidden", "[256]", allow_empty=True)]
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


@register_head("dense")
class DenseHead(Head):
    """Per-pixel decoder on a feature map: conv3x3-BN-ReLU, conv1x1, bilinear upsampling to out_size.
    The map is the trunk's ``forward_features`` (any image trunk with ``pool=false``).

    ``[B, C, h, w] -> [B, num_outputs, *out_size]``; the task supplies ``out_size`` (its image
    size) through ``head_config()``.
    """

    per_pixel = True

    def __init__(self, in_shape: Sequence[int], num_outputs: int, out_size: Sequence[int], hidden: int = 256):
        super().__init__(in_shape, num_outputs)
        if len(self.in_shape) != 3:
            raise ValueError(self._needs_maps(self.in_shape))
        if len(out_size) != 2 or min(out_size) < 1:
            raise ValueError(f"out_size must be [height, width], got {list(out_size)}.")
        checks.number(hidden, "head.hidden", 1, integer=True)
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.net = nn.Sequential(
            nn.Conv2d(self.in_shape[0], hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_outputs, 1),
        )

    @staticmethod
    def _needs_maps(shape: Sequence[int]) -> str:
        return (
            f"the dense head needs feature maps [C, h, w] from the trunk, got features of shape {tuple(shape)}: "
            "set trunk.pool=false on an image trunk (resnet*, mobilenet_v3_*, efficientnet_b0, efficientnet_lite0, timm) "
            "to keep its last feature map."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(self._needs_maps(x.shape[1:]))
        return F.interpolate(self.net(x), size=self.out_size, mode="bilinear", align_corners=False)
