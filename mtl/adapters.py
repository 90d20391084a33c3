"""What the parameter-efficient recipes (``mtl.recipes``: lora, ia3, bitfit, residual_adapters)
build on: the trunk layers they may target, adapter injection, and checkpoints that hold only
what a recipe trains.

LoRA and IA3 come from Hugging Face ``peft`` (an optional extra: ``pip install 'mtl[peft]'``),
injected into the trunk in place with its public ``inject_adapter_in_model``: any trunk, not
only a transformers model. Residual adapters (Rebuffi et al. 2017) are a small module here,
run by a forward hook on the layer they follow, so that the trunk's modules, their attributes
and the base weights' state-dict keys stay as they were.

Targets are chosen as peft chooses them: ``target_modules`` is a regular expression that must
match a module's whole dotted name (``'.*\\.(query|value)'``), or a list of names, each matching
a module whose name is that name or ends with ``.`` + that name (``[conv1, fc]``). Each list
entry must match a layer the recipe can adapt; otherwise the error lists those layers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mtl.config import ConfigError

PEFT_INSTALL = "pip install 'mtl[peft]'"


def require_peft(recipe: str) -> Any:
    """The peft module, or a ConfigError saying how to install it (checked when the recipe is built)."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"recipe: {recipe!r} needs the peft library, which is not installed; run {PEFT_INSTALL}.") from None
    return peft


# -- which layers a recipe may adapt -------------------------------------------------------


def describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}→{module.out_features}"
    if isinstance(module, nn.Conv2d):
        k = "×".join(map(str, module.kernel_size))
        groups = f", groups {module.groups}" if module.groups > 1 else ""
        return f"Conv2d {module.in_channels}→{module.out_channels} {k}{groups}"
    return type(module).__name__


def layers(trunk: nn.Module, accept: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    """The trunk's modules that ``accept`` takes, by dotted name, in definition order."""
    return {name: m for name, m in trunk.named_modules() if name and accept(m)}


def check_patterns(value: Any, key: str) -> str | list[str] | None:
    """``value`` if it is a target pattern by the module docstring's rules (None: every layer);
    else a ValueError naming ``key``."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{key}: {value!r} is not a regular expression ({e}).") from None
        return value
    if isinstance(value, Sequence) and value and all(isinstance(p, str) and p for p in value):
        return list(value)
    raise ValueError(f"{key} must be a regular expression or a list of module names, e.g. [conv1, fc]; got {value!r}.")


def select(candidates: dict[str, nn.Module], patterns: str | Sequence[str] | None, key: str, what: str) -> list[str]:
    """The names in ``candidates`` that ``patterns`` (checked by ``check_patterns``) picks (None: all of them), by peft's rules
    (module docstring). A pattern that picks nothing is a ConfigError naming ``key`` and
    listing the candidates, described as ``what`` ("Linear and Conv2d (groups 1) layers")."""

    def refuse(problem: str) -> ConfigError:
        listed = "; ".join(f"{n} ({describe(m)})" for n, m in candidates.items())
        return ConfigError(f"{key}: {problem}. The trunk's {what}: {listed}.")

    if patterns is None:
        return list(candidates)
    if isinstance(patterns, str):
        chosen = [n for n in candidates if re.fullmatch(patterns, n)]
        if not chosen:
            raise refuse(f"the regular expression {patterns!r} matches the whole name of none of the trunk's {what}")
        return chosen
    chosen = []
    for pattern in patterns:
        hits = [n for n in candidates if n == pattern or n.endswith("." + pattern)]
        if not hits:
            raise refuse(f"{pattern!r} names none of the trunk's {what}")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in candidates if n in chosen]


def exact(names: Sequence[str]) -> str:
    """A regular expression that peft matches against exactly these module names, no suffixes
    (``(?!)``, which matches nothing, for none)."""
    return "(" + "|".join(re.escape(n) for n in names) + ")" if names else "(?!)"


def linear_or_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def dense_linear_or_conv(module: nn.Module) -> bool:
    """Linear and ungrouped Conv2d layers: peft's LoRA adapts a grouped (depthwise) conv only at
    ranks divisible by its groups, which for a depthwise conv means a rank of its width."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def spatial_conv(module: nn.Module) -> bool:
    """Conv2d layers with a kernel larger than 1×1: where Rebuffi et al. place their adapters."""
    return isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1


def max_rank(module: nn.Module) -> int:
    """The rank of the layer's weight as a matrix: out × in (Linear), out × in·kh·kw (Conv2d)."""
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    kh, kw = module.kernel_size
    return min(module.out_channels, module.in_channels // module.groups * kh * kw)


def inject(trunk: nn.Module, peft_config: Any) -> None:
    import peft

    peft.inject_adapter_in_model(peft_config, trunk)


# -- residual adapters ----------------------------------------------------------------------


class ResidualAdapter(nn.Module):
    """Series residual adapter (Rebuffi, Bilen & Vedaldi 2017), applied to a conv's output y:

        y ↦ y + W ∗ BN(y),   W a 1×1 convolution C → C without bias,

    as the authors' code places it (their ``conv1x1`` in series mode). W starts at zero, so the
    adapted trunk starts as the pretrained one."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.conv(self.norm(y))

    def after(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        """The forward hook on the adapted conv. A bound method: a deep copy of the trunk copies
        the hook with its adapter, and the copy's conv calls the copy's adapter."""
        return self(output)


def add_residual_adapters(trunk: nn.Module, names: Sequence[str]) -> nn.ModuleDict:
    """A ``ResidualAdapter`` after each named conv, held by ``trunk.residual_adapters`` (state
    keys ``residual_adapters.<conv name, dots as __>.*``), on the conv's device and dtype."""
    adapters = nn.ModuleDict()
    for name in names:
        conv = trunk.get_submodule(name)
        adapter = ResidualAdapter(conv.out_channels).to(device=conv.weight.device, dtype=conv.weight.dtype)
        adapters[name.replace(".", "__")] = adapter
        conv.register_forward_hook(adapter.after)
    trunk.residual_adapters = adapters
    return adapters


# -- checkpoints of what a recipe trains ----------------------------------------------------


def base_reference(trunk: nn.Module) -> dict[str, Any]:
    """What a checkpoint of trained parameters needs beside them: the trunk's class, the
    pretrained weights it was built from (its ``pretrained_cfg``), and a SHA-256 of its whole
    state (names, dtypes, shapes, bytes) before any adapter, to refuse another base."""
    h = hashlib.sha256()
    for name, t in sorted(trunk.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    cfg = getattr(trunk, "pretrained_cfg", None)
    plain = (str, int, float, bool, type(None), list, tuple)
    weights = {k: v for k, v in cfg.items() if isinstance(v, plain)} if isinstance(cfg, dict) else None
    kind = type(trunk)
    return {"trunk": f"{kind.__module__}.{kind.__qualname__}", "weights": weights, "sha256": h.hexdigest()}
