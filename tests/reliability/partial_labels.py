"""A task with half of its training labels missing, for the torchrun tests: the two shards of
a global batch then hold different numbers of labelled samples."""

import torch
from torch.utils.data import TensorDataset

from mtl.task import MISSING_LABEL, Splits
from tasks.digits import Digits


class PartialDigits(Digits):
    """sklearn digits with a fixed random half of the training labels set to MISSING_LABEL."""

    def build_datasets(self) -> Splits:
        splits = super().build_datasets()
        x, y = splits.train.tensors
        drop = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < 0.5
        return Splits(TensorDataset(x, torch.where(drop, MISSING_LABEL, y)), splits.val, splits.test)
