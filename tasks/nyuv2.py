"""NYUv2 (Silberman et al. 2012) for multi-task learning: 13-class semantic segmentation, depth
and surface normals, in the preprocessed layout of Liu et al. 2019 (MTAN), which LibMTL,
Nash-MTL and FAMO read too:

    <root>/train/{image,label,depth,normal}/<i>.npy   795 scenes, i = 0 .. 794
    <root>/val/{image,label,depth,normal}/<i>.npy     654 scenes: the official test set

image float32 H×W×3 RGB in [0, 1]; label H×W, classes 0..12 and -1 = unlabelled; depth H×W×1
in metres, 0 = no measurement; normal H×W×3 unit vectors, 0 = none; all at 288×384.

Splits: val is a ``val_fraction`` of the train folder drawn with ``split_seed``; test is the
``val`` folder (so ``test_fraction`` is not used). The three tasks share their inputs
(``input_key``): with one root, size and split, a joint run reads each image once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch.utils.data import Dataset

from mtl import dense
from mtl.data import subsample
from mtl.task import Splits, Task, register_task

HOW_TO_GET = (
    "Get the preprocessed NYUv2 of MTAN (Liu et al. 2019, https://github.com/lorenmt/mtan): download "
    "https://www.dropbox.com/s/p2nn02wijg7peiy/nyuv2.zip, unzip it and set the task's root to the unzipped "
    "folder, which holds train/ and val/, each with image/, label/, depth/ and normal/ folders of 0.npy, 1.npy, ..."
)

# The images are RGB in [0, 1]; ImageNet's mean and std put them on the scale that the
# ImageNet-pretrained trunks expect.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def count_samples(root: Path, split: str, field: str) -> int:
    """Number of samples in ``root/split``, checking that its ``image`` and ``field`` folders
    both hold ``0.npy .. (n-1).npy``; a missing folder or file is named in the error."""
    folder = root / split
    for path in (root, folder, folder / "image", folder / field):
        if not path.is_dir():
            raise FileNotFoundError(f"NYUv2: folder {path} not found. {HOW_TO_GET}")
    n = sum(name.endswith(".npy") for name in os.listdir(folder / "image"))
    if n == 0:
        raise FileNotFoundError(f"NYUv2: no .npy files in {folder / 'image'}. {HOW_TO_GET}")
    for sub in ("image", field):
        present = set(os.listdir(folder / sub))
        missing = [f"{i}.npy" for i in range(n) if f"{i}.npy" not in present]
        if missing:
            raise FileNotFoundError(
                f"NYUv2: {folder / sub / missing[0]} not found ({len(missing)} of 0.npy .. {n - 1}.npy missing "
                f"in {folder / sub}). {HOW_TO_GET}"
            )
    return n


def _load(path: Path) -> torch.Tensor:
    # Mapped, then copied once into a writable array (torch.from_numpy warns on read-only memory).
    return torch.from_numpy(np.array(np.load(path, mmap_mode="r")))


def _resize(t: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``[C, H, W]`` to ``[C, *size]``; float, as interpolate needs."""
    if tuple(t.shape[-2:]) == size:
        return t.float()
    kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(t[None].float(), size=size, mode=mode, **kwargs)[0]


class NYUv2Folder(Dataset):
    """``(image [3, H, W], target)`` for the given sample numbers of one split folder, read
    lazily. Targets: label ``[H, W]`` long, depth ``[1, H, W]``, normal ``[3, H, W]``.

    Images are resized bilinearly; targets by nearest neighbour ("nearest-exact", which
    unlike "nearest" keeps pixel centres aligned), so classes stay classes, invalid-pixel
    zeros stay zero and normals keep unit length.
    """

    def __init__(self, folder: Path, indices: Sequence[int], field: str, size: tuple[int, int]):
        self.folder = folder
        self.indices = list(indices)
        self.field = field
        self.size = size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(i), self.target(i)

    def image(self, i: int) -> torch.Tensor:
        image = _load(self.folder / "image" / f"{self.indices[i]}.npy").permute(2, 0, 1)
        return (_resize(image, self.size, "bilinear") - IMAGENET_MEAN) / IMAGENET_STD

    def target(self, i: int) -> torch.Tensor:
        target = _load(self.folder / self.field / f"{self.indices[i]}.npy")
        if self.field == "label":
            return _resize(target[None], self.size, "nearest-exact")[0].long()
        return _resize(target.permute(2, 0, 1), self.size, "nearest-exact")


class NYUv2Task(Task):
    """One NYUv2 task; subclasses name the target folder (``field``), loss and metrics.

    Args: root, the folder holding train/ and val/; size, the (height, width) images and
    targets are resized to (default: the stored 288×384); the Task arguments (val_fraction,
    split_seed, train_fraction, subset_seed; test_fraction is unused, the test set is fixed).
    """

    field: str
    default_head = "dense"
    needs_data_root = True  # reads a local copy; the registry-wide tests skip it, its own tests use a tiny tree

    def __init__(self, root: str = "data/nyuv2", size: Sequence[int] = (288, 384), **kwargs: Any):
        super().__init__(**kwargs)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be [height, width], got {list(size)}.")
        self.root = Path(root).expanduser()
        self.size = (int(size[0]), int(size[1]))
        self.input_shape = (3, *self.size)

    def input_key(self) -> Hashable:
        split = (self.val_fraction, self.split_seed, self.train_fraction, self.subset_seed)
        return ("nyuv2", str(self.root.resolve()), self.size, *split)

    def head_config(self) -> dict[str, Any]:
        return {"name": "dense", "out_size": list(self.size)}

    def build_datasets(self) -> Splits:
        n_train = count_samples(self.root, "train", self.field)
        n_test = count_samples(self.root, "val", self.field)
        n_val = round(n_train * self.val_fraction)
        if not 1 <= n_val < n_train:
            raise ValueError(f"val_fraction {self.val_fraction} of {n_train} training scenes leaves train or val empty.")
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.split_seed))
        train = subsample(perm[n_val:].sort().values, self.train_fraction, self.subset_seed)
        val = perm[:n_val].sort().values

        def folder(split: str, indices: torch.Tensor) -> NYUv2Folder:
            return NYUv2Folder(self.root / split, indices.tolist(), self.field, self.size)

        return Splits(folder("train", train), folder("train", val), folder("val", torch.arange(n_test)))

    def valid_pixels(self, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def valid_mask(self, target: torch.Tensor) -> torch.Tensor:
        # A sample is missing only when none of its pixels is labelled; the loss and the
        # metrics skip unlabelled pixels themselves.
        return self.valid_pixels(target).flatten(1).any(dim=1)


@register_task("nyuv2_semantic")
class NYUv2Semantic(NYUv2Task):
    """NYUv2 13-class segmentation (MTAN .npy layout, root=...); miou (primary) and pixel_acc, higher is better.

    Loss: cross-entropy over labelled pixels. Metrics over the labelled pixels of a split,
    from one confusion matrix: miou, the mean IoU of the classes present in targets or
    predictions; pixel_acc, the share of pixels classified right.
    """

    field = "label"
    num_outputs = 13
    primary_metric = "miou"

    def valid_pixels(self, target: torch.Tensor) -> torch.Tensor:
        return dense.labelled_pixels(target)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dense.cross_entropy_per_sample(output, target)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        return {"miou": dense.MeanIoU(self.num_outputs), "pixel_acc": dense.PixelAccuracy(self.num_outputs)}


@register_task("nyuv2_depth")
class NYUv2Depth(NYUv2Task):
    """NYUv2 depth in metres (MTAN .npy layout, root=...); abs_err (primary) and rel_err, lower is better.

    Loss: L1 over measured pixels (depth > 0). Metrics over the measured pixels of a split:
    abs_err, mean |pred - depth|; rel_err, mean |pred - depth| / depth.
    """

    field = "depth"
    num_outputs = 1
    primary_metric = "abs_err"

    def valid_pixels(self, target: torch.Tensor) -> torch.Tensor:
        return dense.depth_pixels(target)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dense.l1_per_sample(output, target)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        return {"abs_err": dense.DepthError(), "rel_err": dense.DepthError(relative=True)}


@register_task("nyuv2_normal")
class NYUv2Normal(NYUv2Task):
    """NYUv2 surface normals (MTAN .npy layout, root=...); angle error mean (primary), median, shares within 11.25/22.5/30°.

    Loss: 1 - cosine similarity between the L2-normalised prediction and the true normal,
    over pixels with a normal. Metrics over those pixels of a split, in degrees:
    mean_angle and median_angle (lower is better); within_11_25, within_22_5, within_30,
    the shares of pixels with an error below 11.25, 22.5 and 30 degrees (higher is better).
    """

    field = "normal"
    num_outputs = 3
    primary_metric = "mean_angle"

    def valid_pixels(self, target: torch.Tensor) -> torch.Tensor:
        return dense.normal_pixels(target)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dense.cosine_per_sample(output, target)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        return {
            "mean_angle": dense.AngleMean(),
            "median_angle": dense.AngleMedian(),
            "within_11_25": dense.AngleWithin(11.25),
            "within_22_5": dense.AngleWithin(22.5),
            "within_30": dense.AngleWithin(30.0),
        }
