"""The trunk contract: a shared feature extractor with named layer groups."""

from __future__ import annotations

import torch
from torch import nn

from mtl.registry import Registry


class TrunkInputError(RuntimeError):
    """Inputs of a kind the trunk cannot take (text given to an image trunk, images to a text
    trunk, a text longer than the trunk's limit). A RuntimeError, as torch's own shape errors
    are, so the builders report it with the key of the task whose inputs they are."""


class Trunk(nn.Module):
    """Shared feature extractor: ``forward(x) -> features`` of shape ``[B, *feature_shape]``.

    Subclasses implement ``forward`` and ``layer_groups``. ``layer_groups`` lists the
    trunk's modules from the input (stem) to the output (last block); freezing, gradual
    unfreezing and layer-wise learning rates work on these groups.
    ``pretrained_cfg`` describes loaded pretrained weights (source, input mean/std), None otherwise.
    """

    pretrained_cfg: dict | None = None
    takes_text = False  # True for trunks that read UTF-8 text rows (mtl.trunks.text_rows.encode_texts)

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

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


TRUNKS: Registry[Trunk] = Registry(
    "trunk", Trunk, builtins=(
        "mtl.trunks.small", "mtl.trunks.torchvision", "mtl.trunks.timm", "mtl.trunks.efficientnet_lite", "mtl.trunks.text"
    ),
)
register_trunk = TRUNKS.register
