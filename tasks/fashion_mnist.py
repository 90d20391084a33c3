"""Fashion-MNIST (Xiao et al. 2017): the full 60,000 training and 10,000 test images.

The four IDX files are looked for, in order, in the ``root`` argument (a folder holding
them, or a torchvision root whose ``FashionMNIST/raw/`` holds them), then where the
Debian package ``dataset-fashion-mnist`` installs them; ``download=True`` fetches them
into ``root`` with torchvision where the internet is reachable.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from mtl.data import subsample
from mtl.task import ClassificationTask, Splits, register_task

# Fashion-MNIST's pixel mean and std over the training images (values in [0, 1]).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530

# Where `apt-get install dataset-fashion-mnist` puts the gzipped IDX files (found with
# `dpkg -L dataset-fashion-mnist`, Debian/Ubuntu package 0.0~git20200523).
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_UINT8 = 0x08  # IDX type code of unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped when its name ends in ``.gz``).

    IDX layout: two zero bytes, a type byte, the number of dimensions, then one
    big-endian uint32 per dimension, then the data. Anything else, or a file whose
    length disagrees with its header, raises ValueError naming the file.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise ValueError(f"{path}: cannot read it as an IDX file: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()}).")
    if data[2] != _UINT8:
        raise ValueError(f"{path}: IDX type 0x{data[2]:02x}, expected 0x08 (unsigned bytes).")
    if data[3] != ndim:
        raise ValueError(f"{path}: {data[3]} dimensions, expected {ndim}.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header.")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path}: {len(data)} bytes, but its header {dims} needs {expected} (truncated or wrong file)."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | None = None, download: bool = False) -> Path:
    """The folder holding the four Fashion-MNIST files; FileNotFoundError says where it looked.

    A given ``root`` is the only place searched (a wrong root is an error, not silently
    replaced by another copy); without one, the Debian package's folder.
    """
    candidates = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root else [DEBIAN_ROOT]
    missing = {}
    for folder in candidates:
        missing[folder] = [stem for stem in FILES.values() if _file_in(folder, stem) is None]
        if not missing[folder]:
            return folder
    if download:
        if not root:
            raise ValueError("fashion_mnist: download=true needs root=PATH, the folder to download into.")
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root, train=True, download=True)
        return Path(root) / "FashionMNIST" / "raw"
    looked = "; ".join(
        f"{folder} lacks {', '.join(str(folder / s) + '[.gz]' for s in stems)}"
        if folder.is_dir()
        else f"{folder} does not exist"
        for folder, stems in missing.items()
    )
    raise FileNotFoundError(
        f"Fashion-MNIST not found: {looked}. Get it with `apt-get install dataset-fashion-mnist` "
        f"(installs {DEBIAN_ROOT}), or pass root=PATH to a folder with the four files "
        f"({', '.join(s + '.gz' for s in FILES.values())}), "
        "or download=true with root=PATH where the internet is reachable."
    )


@lru_cache(maxsize=1)
def load_fashion_mnist(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 train images ``[N, 28, 28]``, train labels, test images, test labels (read once
    per process; callers must not modify them in place)."""
    paths = {key: _file_in(folder, stem) for key, stem in FILES.items()}
    arrays = {key: read_idx(p, 3 if key.endswith("images") else 1) for key, p in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{paths[f'{split}_images']}: images are {images.shape[1:]}, expected 28×28.")
        if len(images) != len(labels):
            raise ValueError(f"{folder}: {len(images)} {split} images but {len(labels)} labels.")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{paths[f'{split}_labels']}: label {labels.max()} outside 0..9.")
    # np.frombuffer arrays are read-only; copy so torch owns writable memory.
    return tuple(torch.from_numpy(arrays[key].copy()) for key in FILES)  # type: ignore[return-value]


def fashion_splits(folder: Path, val_fraction: float, split_seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and labels of train / val (carved from the official training set by
    ``split_seed``) / test (the official test set)."""
    x_train, y_train, x_test, y_test = load_fashion_mnist(folder)
    n_val = round(len(x_train) * val_fraction)
    if not 1 <= n_val < len(x_train):
        raise ValueError(f"val_fraction {val_fraction} of {len(x_train)} training images leaves an empty split.")
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(split_seed))
    train, val = perm[n_val:], perm[:n_val]
    return {"train": (x_train[train], y_train[train]), "val": (x_train[val], y_train[val]), "test": (x_test, y_test)}


def to_float(images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]``, normalized with Fashion-MNIST's mean
    and std (``normalize=False``: pixels in [0, 1]); in place after the one conversion so 70k
    images never hold two float copies."""
    x = images.unsqueeze(1).float().div_(255.0)
    return x.sub_(FASHION_MEAN).div_(FASHION_STD) if normalize else x


@register_task("fashion_mnist")
class FashionMNIST(ClassificationTask):
    """Fashion-MNIST 10 classes, 70k images 1×28×28; official test set; val carved from train.

    Metrics: accuracy (primary) and macro F1, higher is better. ``val_fraction`` of the
    60,000 training images (default 6,000) form the validation split, drawn by
    ``split_seed``; the official 10,000 test images are the test split, so
    ``test_fraction`` is ignored. ``root``/``download``: see the module docstring.
    ``normalize: false`` gives pixels in [0, 1], for a trunk that normalises its inputs
    itself (efficientnet_lite0 with its default input_mean 0 and input_std 1).
    """

    input_shape = (1, 28, 28)
    needs_data_root = True  # data not bundled with a pip package: the registry-wide contract test skips it

    def __init__(self, root: str | None = None, download: bool = False, normalize: bool = True, **kwargs: Any):
        super().__init__(num_classes=10, **kwargs)
        self.root = root
        self.download = download
        self.normalize = normalize

    def build_datasets(self) -> Splits:
        parts = fashion_splits(find_fashion_mnist(self.root, self.download), self.val_fraction, self.split_seed)
        x, y = parts["train"]
        keep = subsample(torch.arange(len(x)), self.train_fraction, self.subset_seed)
        parts["train"] = (x[keep], y[keep])
        return Splits(*(TensorDataset(to_float(x, self.normalize), y.long()) for x, y in parts.values()))
