"""torchvision classifiers as trunks: the classifier is dropped, forward returns pooled features
(or, with ``pool=False``, the last feature map, for dense heads). ``forward_intermediates``
gives the map of each stage (where the resolution halves next), as timm's models do.

Pretrained weights come from torchvision's weights enums and the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), and the trunk's state-dict keys are torchvision's own
(minus the classifier), so a torchvision checkpoint loads without renaming.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from mtl.registry import ComponentError
from mtl.trunks.base import Trunk, register_trunk
from mtl.trunks.loading import extract_state_dict, load_state, offline_weights_hint, per_channel, read_checkpoint

logger = logging.getLogger(__name__)

# Seconds without progress before a weights download gives up, so an offline machine that
# drops packets fails instead of waiting on the OS's TCP timeouts.
DOWNLOAD_TIMEOUT_S = 30.0


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB first-conv weights for ``in_channels`` inputs, as timm does.

    One channel sums over RGB (a grey image seen as R=G=B gives the same response);
    other counts repeat RGB and rescale by ``3 / in_channels`` to keep the activation scale.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _fresh_conv(conv: nn.Conv2d, in_channels: int, **overrides: int) -> nn.Conv2d:
    """``conv`` rebuilt for ``in_channels`` inputs, initialised as torchvision initialises convs."""
    args = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding)
    new = nn.Conv2d(in_channels, conv.out_channels, bias=conv.bias is not None, **{**args, **overrides})
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _weights_file(url: str, download: bool) -> str:
    """Path of ``url``'s file in the torch hub cache, downloading it if allowed."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if os.path.isfile(path):
        return path
    fix = (
        f"Copy the file ({url}) to {path}, set TORCH_HOME to a folder whose hub/checkpoints/ holds it, "
        "or set trunk.weights=null and trunk.checkpoint=PATH."
    )
    if not download:
        raise ComponentError(f"pretrained weights not found at {path} (trunk.download=false). {fix}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(previous or DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, path)
    except Exception as e:
        raise ComponentError(f"could not download {url} ({e}); no pretrained weights at {path}. {fix}") from e
    finally:
        socket.setdefaulttimeout(previous)
    return path


class TorchvisionTrunk(Trunk):
    """A torchvision classifier without its classifier; subclasses pick the modules to keep."""

    input_hint = "(C, H, W) images"
    first_conv = ""  # state-dict prefix of the input conv
    classifier = ""  # state-dict prefix of the dropped classifier

    def __init__(self, arch: str):
        super().__init__()
        self.arch = arch
        self.pretrained_cfg: dict | None = None

    def load_pretrained(self, weights: str, in_channels: int, download: bool, skip: tuple[str, ...] = ()) -> None:
        """Load torchvision's ``weights`` (all but the ``skip`` keys) and set ``pretrained_cfg``."""
        enum = torchvision.models.get_model_weights(self.arch)
        if weights not in enum.__members__:
            raise ComponentError(
                f"trunk.weights={weights!r} is not a weights name for {self.arch}. "
                f"Valid: {', '.join(enum.__members__)} (or null for random init). {offline_weights_hint()}"
            )
        chosen = enum[weights]
        path = _weights_file(chosen.url, download)
        state = extract_state_dict(read_checkpoint(path, "trunk.weights"), path, "trunk.weights")
        dropped = [k for k in state if k.startswith(self.classifier + ".")]
        state = {k: v for k, v in state.items() if k not in dropped and k not in skip}
        logger.info("%s: dropped the classifier (%s) from %s.", self.arch, ", ".join(dropped), path)
        conv_key = self.first_conv + ".weight"
        if in_channels != 3 and conv_key in state:
            state[conv_key] = adapt_input_conv(state[conv_key], in_channels)
        load_state(self, state, path, "trunk.weights", self.arch, may_lack=skip)
        transform = chosen.transforms()
        self.pretrained_cfg = {
            "weights": f"{type(chosen).__name__}.{chosen.name}",
            "file": path,
            "mean": per_channel(list(transform.mean), in_channels),
            "std": per_channel(list(transform.std), in_channels),
            "resize_size": list(transform.resize_size),
            "crop_size": list(transform.crop_size),
        }


class ResNetTrunk(TorchvisionTrunk):
    """torchvision ResNet up to global average pooling, or up to layer4's feature map
    ``[C, H/32, W/32]`` with ``pool=False`` (for per-pixel heads)."""

    input_hint = "(C, H, W) images, e.g. (3, 224, 224); small_input=true for 32x32"
    first_conv = "conv1"
    classifier = "fc"

    def __init__(
        self, arch: str, weights: str | None, in_channels: int, small_input: bool, download: bool, pool: bool = True
    ):
        super().__init__(arch)
        self.pool = pool
        self.small_input = small_input
        net = torchvision.models.get_model(arch, weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool
        if small_input:
            # CIFAR-style stem keeps 32x32 inputs from shrinking to 1x1 before layer4. Its 3x3
            # conv1 cannot take the pretrained 7x7 weights, so loading leaves it initialised (and warns).
            self.conv1 = _fresh_conv(net.conv1, in_channels, kernel_size=3, stride=1, padding=1)
            self.maxpool = nn.Identity()
        elif in_channels != 3:
            self.conv1 = _fresh_conv(net.conv1, in_channels)
        if weights:
            skip = ("conv1.weight",) if small_input else ()
            self.load_pretrained(weights, in_channels, download, skip)

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [("stem", stem)] + [(f"layer{i}", getattr(self, f"layer{i}")) for i in range(1, 5)]

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        # As timm's ResNets: the stem's activation (before the max-pool), then each layer.
        return [
            lambda x: self.relu(self.bn1(self.conv1(x))),
            lambda x: self.layer1(self.maxpool(x)),
            self.layer2,
            self.layer3,
            self.layer4,
        ]

    @property
    def feature_info(self) -> list[dict]:
        width = type(self.layer1[0]).expansion  # 1 for BasicBlock, 4 for Bottleneck
        channels = [self.conv1.out_channels, 64 * width, 128 * width, 256 * width, 512 * width]
        # small_input's stem neither strides nor max-pools.
        reductions = [1, 1, 2, 4, 8] if self.small_input else [2, 4, 8, 16, 32]
        names = ["relu", "layer1", "layer2", "layer3", "layer4"]
        return [{"module": n, "num_chs": c, "reduction": r} for n, c, r in zip(names, channels, reductions)]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(features), 1) if self.pool else features


class FeaturesTrunk(TorchvisionTrunk):
    """torchvision MobileNetV3 / EfficientNet: ``features`` then global average pooling (or, with
    ``pool=False``, the last feature map). A stage ends where the next block strides."""

    input_hint = "(C, H, W) images, e.g. (3, 224, 224)"
    first_conv = "features.0.0"
    classifier = "classifier"

    def __init__(self, arch: str, weights: str | None, in_channels: int, download: bool, pool: bool = True):
        super().__init__(arch)
        self.pool = pool
        net = torchvision.models.get_model(arch, weights=None)
        self.features, self.avgpool = net.features, net.avgpool
        if in_channels != 3:
            self.features[0][0] = _fresh_conv(self.features[0][0], in_channels)
        if weights:
            self.load_pretrained(weights, in_channels, download)
        # No shortcut of these blocks holds a conv (a residual only joins blocks that keep the
        # size), so a block's stride is the product of its convs' strides.
        strides = [_conv_stride(m) for m in self.features]
        self.stage_ends = [i for i in range(len(strides)) if i == len(strides) - 1 or strides[i + 1] > 1]

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        return [("stem", self.features[0])] + [(f"features.{i}", m) for i, m in enumerate(self.features) if i]

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        starts = [0] + [end + 1 for end in self.stage_ends[:-1]]
        return [self.features[a : b + 1] for a, b in zip(starts, self.stage_ends)]

    @property
    def feature_info(self) -> list[dict]:
        info, reduction, start = [], 1, 0
        for end in self.stage_ends:
            blocks = list(self.features[start : end + 1])
            reduction *= math.prod(_conv_stride(m) for m in blocks)
            convs = [c for c in blocks[-1].modules() if isinstance(c, nn.Conv2d)]
            info.append({"module": f"features.{end}", "num_chs": convs[-1].out_channels, "reduction": reduction})
            start = end + 1
        return info

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(features), 1) if self.pool else features


def _conv_stride(module: nn.Module) -> int:
    return math.prod(c.stride[0] for c in module.modules() if isinstance(c, nn.Conv2d))


@register_trunk("resnet18")
def resnet18(
    weights: str | None = None,
    in_channels: int = 3,
    small_input: bool = False,
    download: bool = True,
    pool: bool = True,
) -> Trunk:
    """ResNet-18 (torchvision), 512 features (pooled; pool=false keeps the map); weights e.g. IMAGENET1K_V1, small_input for 32x32."""
    return ResNetTrunk("resnet18", weights, in_channels, small_input, download, pool)


@register_trunk("resnet34")
def resnet34(
    weights: str | None = None,
    in_channels: int = 3,
    small_input: bool = False,
    download: bool = True,
    pool: bool = True,
) -> Trunk:
    """ResNet-34 (torchvision), 512 features (pooled; pool=false keeps the map); weights e.g. IMAGENET1K_V1, small_input for 32x32."""
    return ResNetTrunk("resnet34", weights, in_channels, small_input, download, pool)


@register_trunk("resnet50")
def resnet50(
    weights: str | None = None,
    in_channels: int = 3,
    small_input: bool = False,
    download: bool = True,
    pool: bool = True,
) -> Trunk:
    """ResNet-50 (torchvision), 2048 features (pooled; pool=false keeps the map); weights e.g. IMAGENET1K_V2, small_input for 32x32."""
    return ResNetTrunk("resnet50", weights, in_channels, small_input, download, pool)


@register_trunk("mobilenet_v3_small")
def mobilenet_v3_small(weights: str | None = None, in_channels: int = 3, download: bool = True, pool: bool = True) -> Trunk:
    """MobileNetV3-Small (torchvision), 576 pooled features (pool=false keeps the map); weights e.g. IMAGENET1K_V1."""
    return FeaturesTrunk("mobilenet_v3_small", weights, in_channels, download, pool)


@register_trunk("mobilenet_v3_large")
def mobilenet_v3_large(weights: str | None = None, in_channels: int = 3, download: bool = True, pool: bool = True) -> Trunk:
    """MobileNetV3-Large (torchvision), 960 pooled features (pool=false keeps the map); weights e.g. IMAGENET1K_V2."""
    return FeaturesTrunk("mobilenet_v3_large", weights, in_channels, download, pool)


@register_trunk("efficientnet_b0")
def efficientnet_b0(weights: str | None = None, in_channels: int = 3, download: bool = True, pool: bool = True) -> Trunk:
    """EfficientNet-B0 (torchvision), 1280 pooled features (pool=false keeps the map); weights e.g. IMAGENET1K_V1."""
    return FeaturesTrunk("efficientnet_b0", weights, in_channels, download, pool)
