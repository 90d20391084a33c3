"""The weighting contract: how per-task losses become one update of the shared parameters.

Two kinds, one small class per method:

- ``LossWeighting``: ``forward(losses) -> scalar``, one backward (equal, uncertainty, DWA, ...).
- ``GradientWeighting``: ``aggregate(J) -> Aggregation`` on the per-task gradients ``J``
  ``[T, D]``, which the gradient engine computes w.r.t. the shared representation
  (``mode="representation"``), the shared parameters (``"parameters"``) or the last shared
  layer group (``"last_shared"``). A method returns a combined gradient in J's space, or
  task weights only, in which case the engine back-propagates Σ_t w_t L_t (exact for every
  shared parameter, and memory-light).
- ``GramianWeighting``: a gradient method whose update is Σ_t w_t g_t with weights that are
  a function of the Gramian ``G = JJᵀ`` alone (``weigh(G) -> w``). The engine can then
  compute G stage by stage without ever holding J (``mtl.gramian``).

``losses`` is always ``[T]`` in ``self.tasks`` order. Methods other than ``equal`` need every
task's loss at every step (``requires_all_tasks``): the trainer checks the scheduler.
A weighting is an ``nn.Module``: learnable parameters (uncertainty log-variances) train with
the model, and buffers (loss history, EMA statistics, generators' draws) are checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mtl.registry import Registry


class Weighting(nn.Module):
    """Base class of weightings, built as ``Method(tasks, **hyper_parameters)``."""

    requires_all_tasks = True
    # A cap on the norm of the shared parameters' gradient after the backward (Nash-MTL's; 0: none).
    max_norm = 0.0

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        if not tasks:
            raise ValueError("a weighting needs at least one task")
        self.tasks = list(tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def on_epoch_end(self, epoch_losses: torch.Tensor) -> None:
        """Each task's mean training loss over the epoch just ended (DWA's history)."""


def checked_max_norm(value: float) -> float:
    """A method's cap of the shared update's norm (``Weighting.max_norm``), checked: >= 0."""
    if not value >= 0:
        raise ValueError(f"weighting.max_norm must be >= 0 (0: no cap), got {value!r}.")
    return float(value)


class LossWeighting(Weighting):
    """``forward(losses [T]) -> scalar`` to back-propagate once."""

    wants_losses_after_step = False  # FAMO: the same batch's losses after the update

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights(self) -> torch.Tensor | None:
        """The current task weights, for the diagnostics log (None where there are none)."""
        return None

    def update(self, losses: torch.Tensor, after: torch.Tensor | None = None) -> None:
        """After the optimizer step: this step's detached losses, and with
        ``wants_losses_after_step`` the same batch's losses under the updated model."""


@dataclass
class Aggregation:
    """A gradient method's result: a combined gradient ``[D]`` in J's space, and/or task weights ``[T]``."""

    gradient: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.gradient is None and self.weights is None:
            raise ValueError("an aggregation needs a gradient or weights")


class GradientWeighting(Weighting):
    """``aggregate(J [T, D]) -> Aggregation`` on per-task gradients. ``modes`` lists where the
    paper allows the gradients to be taken; the first is the default."""

    modes: tuple[str, ...] = ("parameters", "representation")

    def __init__(self, tasks: Sequence[str], mode: str | None = None):
        super().__init__(tasks)
        mode = mode or self.modes[0]
        if mode not in self.modes:
            raise ValueError(f"weighting.mode must be one of {', '.join(self.modes)} for {type(self).__name__}, got {mode!r}.")
        self.mode = mode

    def observe(self, losses: torch.Tensor) -> None:
        """This step's detached losses ``[T]``, before ``aggregate`` or ``weigh`` (GradNorm's
        L_t(0), MGDA's loss normalization)."""

    def transform_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """The per-task objectives whose gradients form J (DB-MTL takes log losses)."""
        return losses

    def aggregate(self, J: torch.Tensor) -> Aggregation:
        raise NotImplementedError


def compute_dtype(J: torch.Tensor) -> torch.dtype:
    """Half-precision gradients are combined in float32."""
    return torch.float32 if J.dtype in (torch.float16, torch.bfloat16) else J.dtype


class GramianWeighting(GradientWeighting):
    """A gradient method whose update is d = Σ_t w_t g_t, with ``w = weigh(G)``, G = JJᵀ.

    ``weigh_heads``: True (MGDA, UPGrad, ...) means the weights weigh the task objectives
    everywhere, so the heads too get Σ_t w_t ∇o_t (one backward of Σ_t w_t o_t); False (PCGrad,
    GradVac, CAGrad) means d is a modified gradient of the shared parameters only, and each
    head gets the gradient of its own objective, as in those papers' code.
    """

    weigh_heads = True

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        """Task weights ``[T]`` from the Gramian ``[T, T]`` (float32 or float64)."""
        raise NotImplementedError

    def aggregate(self, J: torch.Tensor) -> Aggregation:
        work = J.to(compute_dtype(J))
        w = self.weigh(work @ work.T).to(work.dtype)
        if self.weigh_heads:
            return Aggregation(weights=w.to(J.dtype))
        return Aggregation(gradient=(w @ work).to(J.dtype), weights=w.to(J.dtype))


WEIGHTINGS: Registry[Weighting] = Registry(
    "weighting", Weighting, builtins=("mtl.weighting.loss_level", "mtl.weighting.surgery", "mtl.weighting.projection", "mtl.weighting.recent")
)
register_weighting = WEIGHTINGS.register
