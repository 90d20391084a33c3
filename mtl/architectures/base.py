"""The architecture contract: which parameters the tasks share, which are each task's own,
and what each task's representation is.

An architecture is built as ``Arch(trunk, heads, make_trunk, **arguments)`` from the
config node ``architecture: {name: ..., ...}``:

- ``trunk``: a built ``Trunk`` (the heads were sized on its features);
- ``heads``: ``{task: head}``; each head reads a task representation shaped like the trunk's
  features, so every head kind works with every architecture;
- ``make_trunk()``: a fresh trunk of the same config (a new random initialisation, or the
  same pretrained weights), for architectures built from several trunk copies (experts,
  columns, branches).

It implements ``forward_groups`` and declares its shared parameters. The gradient engine
reads nothing else: J's columns are ``shared_parameters()`` (``weighting.mode=parameters``),
``last_shared_parameters()`` (``last_shared``, GradNorm's W), or the representation that
``cut`` marks (``representation``, MGDA-UB), which exists only where every task reads one
shared tensor (``shares_representation``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mtl.registry import Registry
from mtl.trunks import Trunk


class Architecture(nn.Module):
    """Base class of architectures. State-dict keys of heads are ``heads.<task>.*``.

    ``trunk`` (an argument of ``__init__``) is the one trunk that every task reads whole (hard
    sharing, MTAN), else None: recipes that freeze or adapt a trunk, the frozen-feature cache
    and transfer checkpoints (``trunk.pt``) need it."""

    shares_representation = False  # True where cut() marks one tensor every task's output depends on

    def __init__(self, heads: dict[str, nn.Module], trunk: Trunk | None = None):
        super().__init__()
        # No class-level default: nn.Module keeps a submodule in _modules, which a class attribute would shadow.
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)
        self._cuts: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def forward_groups(self, inputs: dict[str, torch.Tensor], members: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """Each input source's batch (``inputs``) for the tasks it feeds (``members``): ``{task: output}``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One input batch shared by ``tasks`` (all by default)."""
        return self.forward_groups({"input": x}, {"input": tasks or self.tasks})

    def eval_outputs(self, x: torch.Tensor, tasks: list[str]) -> dict[str, torch.Tensor]:
        """Every task's output on one input batch they share, for evaluation (``mtl.results``)."""
        return self.forward_groups({"input": x}, {"input": tasks})

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters that more than one task's loss reaches (J's columns in parameter mode)."""
        raise NotImplementedError

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last shared layer's parameters (GradNorm's W)."""
        raise NotImplementedError(f"{type(self).__name__} names no last shared layer; weighting.mode=last_shared needs one.")

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Each task's own parameters (its head, and any tower, gate or attention of its own)."""
        return {t: list(h.parameters()) for t, h in self.heads.items()}

    def penalty(self) -> torch.Tensor | None:
        """A loss term of the architecture's own from its last training forward, added to the
        step's objective like a recipe's penalty (DSelect-k's entropy regularizer); None by default."""
        return None

    def cut(self, z: torch.Tensor) -> torch.Tensor:
        """Call on the shared representation where it is formed. Inside ``representation_cuts``
        it returns a detached leaf that requires grad (the engine takes J w.r.t. it and sends
        the combined gradient back through ``z``); otherwise ``z`` itself."""
        if self._cuts is None:
            return z
        leaf = z.detach().requires_grad_()
        self._cuts.append((z, leaf))
        return leaf

    @contextlib.contextmanager
    def representation_cuts(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """``(representation, leaf)`` of every ``cut`` during the forward passes inside."""
        self._cuts = []
        try:
            yield self._cuts
        finally:
            self._cuts = None


TrunkFactory = Callable[[], Trunk]

ARCHITECTURES: Registry[Architecture] = Registry("architecture", Architecture, builtins=(
    "mtl.model", "mtl.architectures.experts", "mtl.architectures.branching", "mtl.architectures.mtan"
))
register_architecture = ARCHITECTURES.register
