"""The trunk contract: a shared feature extractor with named layer groups and readable stages.

The feature methods follow timm's model contract (``forward_features``, ``forward_head``,
``forward_intermediates``, ``feature_info``), so dense heads and per-task attention (MTAN)
can read any trunk's per-stage features the way they read a timm model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mtl.registry import Registry


class TrunkInputError(RuntimeError):
    """Inputs of a kind the trunk cannot take (text given to an image trunk, images to a text
    trunk, a text longer than the trunk's limit). A RuntimeError, as torch's own shape errors
    are, so the builders report it with the key of the task whose inputs they are."""


class Trunk(nn.Module):
    """Shared feature extractor: ``forward(x) -> features`` of shape ``[B, *feature_shape]``.

    Subclasses implement ``layer_groups`` and the feature methods:

    - ``stages()``: the callables that ``forward_features`` applies in turn (the stem, then
      each stage); stage i's output is intermediate i. ``forward_features(x)`` is their
      composition: the last stage's unpooled output (a map ``[B, C, h, w]`` for image trunks).
    - ``forward_head(features)``: what ``forward`` makes of them (global pooling, a trunk's
      own fc layer); ``forward(x) = forward_head(forward_features(x))``.
    - ``feature_info``: per stage, ``{"module": name, "num_chs": C, "reduction": r}`` as timm
      describes its models: channels, and the stage's total stride relative to the network's
      input (None for stages without spatial dimensions: vectors, tokens).
    - ``forward_intermediates(x, indices)``: ``(final features, [stage outputs])``.

    A trunk may override ``forward`` or ``forward_intermediates`` instead (timm models, text
    encoders). ``layer_groups`` lists the trunk's modules from the input (stem) to the output
    (last block); freezing, gradual unfreezing and layer-wise learning rates work on these groups.
    ``pretrained_cfg`` describes loaded pretrained weights (source, input mean/std), None otherwise.
    """

    pretrained_cfg: dict | None = None
    takes_text = False  # True for trunks that read UTF-8 text rows (mtl.trunks.text_rows.encode_texts)

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError(
            f"{type(self).__name__} lists no stages(): define stages() (and feature_info) to give it "
            "forward_features and forward_intermediates, or override those."
        )

    @property
    def feature_info(self) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} describes no feature_info (channels and reduction of each stage).")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, intermediates_only: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """``(forward_features(x), [output of each stage in indices])``, or the list alone with
        ``intermediates_only`` (which stops after the last stage taken). ``indices`` as timm
        takes them: None for every stage, an int n for the last n, a list for those stages
        (negative ones count from the end)."""
        stages = self.stages()
        take = take_indices(len(stages), indices)
        out = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                out.append(x)
            if intermediates_only and i == take[-1]:
                break
        return out if intermediates_only else (x, out)

    @torch.no_grad()
    def feature_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the features for one input of ``input_shape`` (a dry run, no grad)."""
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            out = self(torch.zeros(1, *input_shape, device=device))
        finally:
            self.train(was_training)
        return tuple(out.shape[1:])


def take_indices(count: int, indices: int | Sequence[int] | None) -> list[int]:
    """The stages ``forward_intermediates`` returns, in order: all of ``count`` for None, the
    last n for an int n, else the listed ones (negative from the end), as timm's
    ``feature_take_indices`` reads them (written here: timm is an optional dependency).
    A ValueError names the valid range."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= count:
            raise ValueError(f"indices={indices}: the last n stages, with n from 1 to {count} (this trunk has {count} stages).")
        return list(range(count - indices, count))
    taken = [i + count if isinstance(i, int) and i < 0 else i for i in indices]
    bad = [i for i, t in zip(indices, taken) if isinstance(i, bool) or not isinstance(i, int) or not 0 <= t < count]
    if bad or not taken:
        raise ValueError(f"indices={list(indices)}: stage indices from {-count} to {count - 1} (this trunk has {count} stages).")
    return sorted(set(taken))


TRUNKS: Registry[Trunk] = Registry(
    "trunk", Trunk, builtins=(
        "mtl.trunks.small", "mtl.trunks.torchvision", "mtl.trunks.timm", "mtl.trunks.efficientnet_lite", "mtl.trunks.text"
    ),
)
register_trunk = TRUNKS.register
