"""Small trunks: the CNNs of the classic MTL papers and an MLP for tabular tasks."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl import checks
from mtl.trunks.base import Trunk, register_trunk


class _LeNetConvs(Trunk):
    """conv 1→10 5×5, pool, conv 10→20 5×5 (+Dropout2d), pool, fc 320→50: 28×28 inputs.
    Two stages (the pooled conv maps, [10, 12, 12] and [20, 4, 4]); the fc is its head."""

    input_hint = "(C, 28, 28) images"

    def __init__(self, in_channels: int = 1, features: int = 50, dropout: float = 0.5):
        super().__init__()
        checks.number(in_channels, "trunk.in_channels", 1, integer=True)
        checks.number(features, "trunk.features", 1, integer=True)
        checks.probability(dropout, "trunk.dropout")
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, so 20 * 4 * 4 = 320 inputs.
        self.fc = nn.Linear(320, features)

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        return [("conv1", self.conv1), ("conv2", self.conv2), ("fc", self.fc)]

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [
            lambda x: F.relu(F.max_pool2d(self.conv1(x), 2)),
            lambda x: F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2)),
        ]

    @property
    def feature_info(self) -> list[dict]:
        # Valid 5x5 convolutions shrink the maps by 4 before each 2x2 pool: 28 -> 12 -> 4, so a
        # stage's map is a little smaller than input / reduction.
        return [
            {"module": "conv1", "num_chs": self.conv1.out_channels, "reduction": 2},
            {"module": "conv2", "num_chs": self.conv2.out_channels, "reduction": 4},
        ]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(features.flatten(1)))


@register_trunk("seed_net")
class SeedNet(_LeNetConvs):
    """The seed example's CNN (PyTorch MNIST example): 2 convs + fc 320→50, dropout on features."""

    def __init__(self, in_channels: int = 1, features: int = 50, dropout: float = 0.5):
        super().__init__(in_channels, features, dropout)
        self.feature_dropout = nn.Dropout(dropout)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature_dropout(super().forward_head(features))


@register_trunk("multi_lenet")
class MultiLeNet(_LeNetConvs):
    """Shared part of Multi-LeNet (Sener & Koltun 2018, MultiMNIST); pair with an `mlp` head (50→50→10)."""


@register_trunk("mlp")
class MLP(Trunk):
    """Multi-layer perceptron for tabular (or flattened) inputs: Linear+ReLU(+Dropout) per hidden size."""

    input_hint = "(in_features,) vectors"

    def __init__(self, in_features: int, hidden: Sequence[int] = (64, 64), dropout: float = 0.0):
        super().__init__()
        checks.number(in_features, "trunk.in_features", 1, integer=True)
        hidden = checks.sizes(hidden, "trunk.hidden")
        checks.probability(dropout, "trunk.dropout")
        sizes = [in_features, *hidden]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)) for a, b in zip(sizes, sizes[1:])
        )

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        first, *rest = self.layers
        return [lambda x: first(x.flatten(1)), *rest]

    @property
    def feature_info(self) -> list[dict]:
        return [{"module": f"layers.{i}", "num_chs": layer[0].out_features, "reduction": None} for i, layer in enumerate(self.layers)]
