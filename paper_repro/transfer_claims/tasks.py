"""Fashion-MNIST restricted to some classes: the within-dataset transfer split (classes 0-4 as
source, 5-9 as target), named in configs by import path
(``paper_repro.transfer_claims.tasks:FashionClasses``)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import TensorDataset

from mtl.data import subsample
from mtl.task import Splits
from tasks.fashion_mnist import FashionMNIST, fashion_splits, find_fashion_mnist, to_float


class FashionClasses(FashionMNIST):
    """Fashion-MNIST images of ``classes`` only, relabelled 0..len(classes)-1 in that order.

    Splits as the fashion_mnist task (val carved from the official training set by
    ``split_seed``, test = the official test images of those classes); ``train_fraction``
    subsamples the kept training images. Accuracy (primary) and macro F1.
    """

    def __init__(self, classes: Sequence[int] = (0, 1, 2, 3, 4), **kwargs: Any):
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
            raise ValueError(f"classes must be distinct labels in 0..9, got {classes}.")
        super().__init__(**kwargs)
        self.classes = classes
        self.num_outputs = len(classes)

    def build_datasets(self) -> Splits:
        parts = fashion_splits(find_fashion_mnist(self.root, self.download), self.val_fraction, self.split_seed)
        relabel = torch.full((10,), -1, dtype=torch.long)
        relabel[self.classes] = torch.arange(len(self.classes))
        out = {}
        for split, (x, y) in parts.items():
            keep = relabel[y.long()] >= 0
            out[split] = (x[keep], relabel[y.long()][keep])
        x, y = out["train"]
        kept = subsample(torch.arange(len(x)), self.train_fraction, self.subset_seed)
        out["train"] = (x[kept], y[kept])
        return Splits(*(TensorDataset(to_float(x), y) for x, y in out.values()))
