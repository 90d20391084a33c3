"""sklearn's 8×8 handwritten digits (1,797 real samples from other writers than MNIST's)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from mtl.data import tensor_splits
from mtl.task import ClassificationTask, Splits, register_task
from tasks.mnist import MNIST_MEAN, MNIST_STD


@lru_cache(maxsize=4)
def load_sklearn_digits(size: int, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[1797, 1, size, size]`` in [0, 1], bilinearly resized from 8×8; with
    ``margin`` the digit fills the centre ``size - 2*margin`` pixels (MNIST's own layout
    puts a 20×20 digit in a 28×28 frame, margin 4)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    inner = size - 2 * margin
    if inner < 1:
        raise ValueError(f"margin {margin} leaves no room in a {size}×{size} image.")
    x = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False).clamp(0, 1)
    x = F.pad(x, (margin,) * 4)
    return x, torch.as_tensor(data.target, dtype=torch.long)


@register_task("digits")
class Digits(ClassificationTask):
    """sklearn 8×8 digits, 10 classes, resized to size×size (default 28), split 70/10/20 by split_seed.

    Pixels are normalized with MNIST's mean and std, as a trunk pretrained on MNIST expects;
    ``normalize: false`` gives them in [0, 1], for a trunk that normalises its inputs itself
    (efficientnet_lite0 with its default input_mean 0 and input_std 1)."""

    def __init__(self, size: int = 28, margin: int = 0, normalize: bool = True, **kwargs: Any):
        super().__init__(num_classes=10, **kwargs)
        self.size = size
        self.margin = margin
        self.normalize = normalize
        self.input_shape = (1, size, size)

    def build_datasets(self) -> Splits:
        x, y = load_sklearn_digits(self.size, self.margin)
        return tensor_splits((x - MNIST_MEAN) / MNIST_STD if self.normalize else x, y, self)
