"""Weightings: loss-level and gradient-level multi-task methods (``mtl list weightings``)."""

from mtl.weighting.base import (
    WEIGHTINGS,
    Aggregation,
    GradientWeighting,
    LossWeighting,
    Weighting,
    register_weighting,
)

__all__ = ["WEIGHTINGS", "Aggregation", "GradientWeighting", "LossWeighting", "Weighting", "register_weighting"]
