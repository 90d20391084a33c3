"""Any timm model as a trunk: built with ``num_classes=0`` so forward returns pooled features;
its own ``forward_features`` / ``forward_intermediates`` / ``feature_info`` are the trunk's."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from mtl.registry import ComponentError, did_you_mean
from mtl.trunks.base import Trunk, register_trunk, take_indices
from mtl.trunks.loading import extract_state_dict, load_state, offline_weights_hint, per_channel, read_checkpoint

logger = logging.getLogger(__name__)


def _names(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """A pretrained_cfg entry that may hold one module name or several, as a tuple."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


# What timm's load_state_dict_from_hf looks for in a model's hub repository.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def unreachable_hub(model_name: str, timeout: float = 3.0) -> str | None:
    """The hub repository's URL when timm would fetch ``model_name``'s weights from the Hugging
    Face Hub, the local cache lacks them and the hub cannot be reached; else None. Checked
    first because offline, huggingface_hub retries for about a minute before it gives up."""
    import timm.models
    from huggingface_hub import constants, try_to_load_from_cache

    repo = getattr(timm.models.get_pretrained_cfg(model_name), "hf_hub_id", None)
    if not repo or constants.HF_HUB_OFFLINE:  # offline mode fails fast by itself
        return None
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in _HUB_FILES):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return f"{constants.ENDPOINT}/{repo}"
    return None


def timm_layer_groups(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's coarse parameter groups (stem, stages or blocks, head), as used for its layer-wise LR decay.

    Each group holds the largest submodules whose parameters all fall in it, e.g. ``layer1``.
    """
    from timm.models import group_parameters

    matcher = getattr(model, "group_matcher", None)
    if matcher is not None:
        spec = matcher(coarse=True)
    else:
        # A few models (PiT, MetaFormer, CSATv2) define no grouping: one group per top-level
        # child, in registration order; parameters of the model itself go with the first.
        top = [name for name, _ in model.named_children()]

        def spec(name: str) -> int:
            first = name.split(".")[0]
            return top.index(first) if first in top else 0

    group_of = group_parameters(model, spec, reverse=True)
    members: dict[int, dict[str, nn.Module]] = {}
    loose: dict[int, dict[str, nn.Parameter]] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, param in module.named_parameters(recurse=False):
            loose.setdefault(group_of[prefix + name], {})[prefix + name] = param
        for name, child in module.named_children():
            indices = {i for p, i in group_of.items() if p.startswith(f"{prefix}{name}.")}
            if len(indices) == 1:
                members.setdefault(indices.pop(), {})[prefix + name] = child
            elif indices:
                visit(f"{prefix}{name}.", child)

    visit("", model)
    groups = []
    for index in sorted({*members, *loose}):
        modules = nn.ModuleList(members.get(index, {}).values())
        if index in loose:
            # Parameters held by a module that spans groups (ViT's cls_token, pos_embed) get a
            # holder; it is not registered anywhere, so state-dict keys do not change.
            holder = nn.Module()
            for name, param in loose[index].items():
                holder.register_parameter(name.replace(".", "_"), param)
            modules.append(holder)
        name = "+".join([*members.get(index, {}), *loose.get(index, {})])
        groups.append(("stem" if index == 0 else name, modules))
    return groups


class TimmModelTrunk(Trunk):
    """A trunk around a timm model ``self.model`` (built with ``num_classes=0``): timm's own
    ``forward_features``, ``forward_head`` (global pooling, unless ``self.pool`` is False),
    ``forward_intermediates`` and ``feature_info``, on the inputs after ``preprocess``."""

    pool = True

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        return timm_layer_groups(self.model)

    @property
    def feature_info(self) -> list[dict]:
        info = getattr(self.model, "feature_info", None) or []
        return [{**d, "module": f"model.{d['module']}"} for d in info]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.preprocess(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features) if self.pool else features

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, intermediates_only: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        if not hasattr(self.model, "forward_intermediates") or not self.feature_info:
            raise NotImplementedError(
                f"timm's {type(self.model).__name__} has no forward_intermediates (or feature_info) in timm {_timm_version()}; "
                "update timm (pip install -U timm) or choose another trunk.model_name."
            )
        # Checked here so that a wrong index gets this trunk's message, not timm's assertion.
        take = take_indices(len(self.feature_info), indices)
        return self.model.forward_intermediates(self.preprocess(x), indices=take, intermediates_only=intermediates_only)


def _timm_version() -> str:
    import timm

    return timm.__version__


@register_trunk("timm")
class TimmTrunk(TimmModelTrunk):
    """Any timm model (see timm.list_models()) as a trunk: pooled features (pool=false keeps
    timm's forward_features), timm's own layer groups and stages."""

    input_hint = "(C, H, W) images, e.g. (3, 224, 224)"

    def __init__(
        self, model_name: str, pretrained: bool = False, pretrained_file: str | None = None, in_channels: int = 3, pool: bool = True
    ):
        """``pretrained_file`` (a timm state dict, .pth/.bin or .safetensors) implies pretrained weights."""
        super().__init__()
        self.pool = pool
        try:
            import timm
        except ImportError:
            raise ComponentError("trunk.name=timm needs the timm package: pip install timm") from None
        # "hf-hub:org/name" and similar are resolved by timm itself.
        if ":" not in model_name and not timm.is_model(model_name):
            hint = did_you_mean(model_name, timm.list_models())
            raise ComponentError(f"trunk.model_name={model_name!r} is not a timm model.{hint} See timm.list_models().")
        fetch = pretrained and not pretrained_file
        hub = unreachable_hub(model_name) if fetch else None
        if hub:
            raise ComponentError(
                f"trunk.pretrained=true: the weights of timm model {model_name!r} are not in the local Hugging Face "
                f"cache and {hub} cannot be reached (offline?). Download the weights file there elsewhere "
                "(model.safetensors) and set trunk.pretrained_file=PATH, or fill the cache (HF_HOME) where the hub is reachable. "
                + offline_weights_hint()
            )
        try:
            self.model = timm.create_model(model_name, pretrained=fetch, num_classes=0, in_chans=in_channels)
        except Exception as e:
            if not fetch:
                raise
            raise ComponentError(
                f"trunk.pretrained=true: could not get pretrained weights for timm model {model_name!r} "
                f"({e}). Offline? Download the weights file elsewhere (from the model's Hugging Face repo, "
                "timm/...) and set trunk.pretrained_file=PATH; HF_HUB_OFFLINE=1 makes timm fail fast offline. "
                + offline_weights_hint()
            ) from e
        if pretrained_file:
            self._load_file(pretrained_file, in_channels)
        self.pretrained_cfg = None
        if pretrained or pretrained_file:
            cfg = self.model.pretrained_cfg
            self.pretrained_cfg = {
                **cfg,
                **({"file": pretrained_file} if pretrained_file else {}),
                "mean": per_channel(list(cfg["mean"]), in_channels),
                "std": per_channel(list(cfg["std"]), in_channels),
            }

    def _load_file(self, path: str, in_channels: int) -> None:
        """Load a timm checkpoint of this model, adapted as timm adapts its own pretrained weights."""
        from timm.models import adapt_input_conv

        where = "trunk.pretrained_file"
        state = extract_state_dict(read_checkpoint(path, where), path, where)
        cfg = self.model.pretrained_cfg
        classifier = tuple(f"{name}." for name in _names(cfg.get("classifier")))
        dropped = [k for k in state if k.startswith(classifier)]
        state = {k: v for k, v in state.items() if k not in dropped}
        if dropped:
            logger.info("timm trunk: dropped the classifier (%s) from %s.", ", ".join(dropped), path)
        for conv in _names(cfg.get("first_conv")):
            key = f"{conv}.weight"
            if key in state and state[key].shape != self.model.get_submodule(conv).weight.shape:
                state[key] = adapt_input_conv(in_channels, state[key])
        load_state(self.model, state, path, where, f"timm {cfg.get('architecture', '')}".strip())
