"""Weightings: loss-level and gradient-level multi-task methods (``mtl list weightings``)."""

from mtl.weighting.base import (
    WEIGHTINGS,
    Aggregation,
    GradientWeighting,
    GramianWeighting,
    LossWeighting,
    Weighting,
    register_weighting,
)

__all__ = ["WEIGHTINGS", "Aggregation", "GradientWeighting", "GramianWeighting", "LossWeighting", "Weighting", "register_weighting"]
