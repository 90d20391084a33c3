"""Architectures: how tasks share parameters (``mtl list architectures``)."""

from mtl.architectures.base import ARCHITECTURES, Architecture, register_architecture

__all__ = ["ARCHITECTURES", "Architecture", "register_architecture"]
