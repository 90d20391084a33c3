"""MTAN: one shared trunk and, per task, a soft attention mask on each of its stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl.architectures.base import Architecture, TrunkFactory, register_architecture
from mtl.trunks import Trunk


def stage_channels(trunk: Trunk) -> list[int]:
    """Channels of each stage's feature map; a ValueError naming ``architecture.name`` for a
    trunk that describes no stages, or whose stages give no maps."""
    try:
        info = trunk.feature_info
    except NotImplementedError:
        info = []
    if not info:
        raise ValueError(
            f"architecture.name=mtan attends to the trunk's stage features, but trunk {type(trunk).__name__} "
            "describes none (feature_info). Use architecture.name=hard, or a trunk with stages "
            "(seed_net, resnet18, mobilenet_v3_small, timm, ...: `mtl list trunks`)."
        )
    flat = [d["module"] for d in info if d.get("reduction") is None]
    if flat:
        raise ValueError(
            f"architecture.name=mtan needs feature maps [C, h, w] at every stage, but trunk {type(trunk).__name__}'s "
            f"stages {flat} give vectors or tokens (feature_info reduction None). Use architecture.name=cross_stitch "
            "or ltb (which mix any stage output), or hard, with this trunk."
        )
    return [d["num_chs"] for d in info]


def _attention(in_channels: int, channels: int) -> nn.Sequential:
    # The authors' attention layer (lorenmt/mtan): g = conv1x1-BN-ReLU, h = conv1x1-BN-sigmoid.
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.Sigmoid(),
    )


def _transfer(in_channels: int, channels: int) -> nn.Sequential:
    # The authors' shared block f between stages: conv3x3-BN-ReLU.
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())


@register_architecture("mtan")
class MTAN(Architecture):
    """Multi-Task Attention Network (Liu, Johns & Davison 2019, CVPR, "End-to-End Multi-Task
    Learning with Attention"): the shared trunk's stage outputs u^j feed every task; task t
    keeps, per stage, the features its soft attention mask selects:
    a_t^1 = h_t^1(g_t^1(u^1)) ⊙ u^1 and a_t^j = h_t^j(g_t^j([u^j ; pool(f^j(a_t^(j-1)))])) ⊙ u^j for j > 1.

    Here g = conv1x1-BN-ReLU and h = conv1x1-BN-sigmoid of task t's own (the authors' code),
    f^j a conv3x3-BN-ReLU from stage j-1's channels to stage j's, shared by the tasks as in the
    paper, and pool an adaptive max-pool to u^j's size (the paper max-pools by 2). Task t's
    head reads ``trunk.forward_head(a_t^J)`` (global pooling, or a trunk's own fc), shaped like
    the trunk's output, so any head works. The paper's mask reads a block's first layer and
    gates its last; the trunk contract gives stage outputs only, so both are u^j here.

    Stages come from ``forward_intermediates`` and ``feature_info`` (channels), so timm trunks
    and torchvision ResNets work; stages without maps (vectors, tokens) are refused.
    ``self.trunk`` is the given trunk: pretrained weights and trunk recipes apply unchanged.
    Shared parameters: the trunk and the f^j. No single shared representation
    (``shares_representation`` False): every stage's u^j is shared, and the trunk's own
    ``forward_head`` parameters (seed_net's fc) act after the masks, beyond any shared tensor.
    """

    def __init__(self, trunk: Trunk, heads: dict[str, nn.Module], make_trunk: TrunkFactory | None = None):
        channels = stage_channels(trunk)
        super().__init__(heads, trunk)
        self.transfer = nn.ModuleList(_transfer(a, b) for a, b in zip(channels, channels[1:]))
        self.attention = nn.ModuleDict({
            t: nn.ModuleList(_attention(c if j == 0 else 2 * c, c) for j, c in enumerate(channels)) for t in self.tasks
        })

    def attend(self, task: str, stages: list[torch.Tensor]) -> torch.Tensor:
        """Task ``task``'s representation from the shared stage outputs."""
        a = None
        for j, (u, mask) in enumerate(zip(stages, self.attention[task])):
            gate_input = u if a is None else torch.cat([u, F.adaptive_max_pool2d(self.transfer[j - 1](a), u.shape[-2:])], 1)
            a = mask(gate_input) * u
        return self.trunk.forward_head(a)

    def forward_groups(self, inputs: dict[str, torch.Tensor], members: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """The trunk runs once on sources of one input shape (concatenated), once per source otherwise."""
        batches = list(inputs.values())
        if len(batches) > 1 and len({tuple(x.shape[1:]) for x in batches}) == 1:
            joint = self.trunk.forward_intermediates(torch.cat(batches), intermediates_only=True)
            per_source = zip(*(u.split([len(x) for x in batches]) for u in joint))
        else:
            per_source = (self.trunk.forward_intermediates(x, intermediates_only=True) for x in batches)
        outputs = {}
        for name, stages in zip(inputs, per_source):
            outputs.update({t: self.heads[t](self.attend(t, list(stages))) for t in members[name]})
        return outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.transfer.parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.layer_groups()[-1][1].parameters())

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [*h.parameters(), *self.attention[t].parameters()] for t, h in self.heads.items()}
