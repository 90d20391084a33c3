"""Trunks: shared feature extractors, by registered name or import path."""

from __future__ import annotations

from typing import Any

from mtl.registry import build
from mtl.trunks.base import TRUNKS, Trunk, register_trunk
from mtl.trunks.loading import load_trunk_checkpoint


def build_trunk(node: dict[str, Any], where: str = "trunk") -> Trunk:
    """Build ``{name: ..., checkpoint: PATH?, **kwargs}``; a checkpoint is loaded after building."""
    node = dict(node)
    checkpoint = node.pop("checkpoint", None)
    trunk = build(TRUNKS, node, where)
    if checkpoint:
        load_trunk_checkpoint(trunk, str(checkpoint), where=f"{where}.checkpoint")
    return trunk


__all__ = ["TRUNKS", "Trunk", "build_trunk", "load_trunk_checkpoint", "register_trunk"]
