"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), read from a local torchvision root.

Layout (what ``torchvision.datasets.CIFAR10/100(root, download=True)`` leaves)::

    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    <root>/cifar-100-python/train, test, meta

The batch files are Python pickles. Unpickling an untrusted file can run any code, so
they are read with an unpickler that builds nothing but numpy arrays, lists and dicts.
"""

from __future__ import annotations

import codecs
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from mtl.data import subsample
from mtl.task import ClassificationTask, Splits, register_task

# The only callables a CIFAR pickle names: numpy's array and dtype reconstruction (the
# files were written by Python 2 with numpy 1, whose module numpy 2 renamed to
# numpy._core), and codecs.encode, which a Python 3 protocol-2 pickle uses for bytes.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class UnsafePickleError(ValueError):
    """A pickle names a callable outside SAFE_GLOBALS."""


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.path}: refused to unpickle {module}.{name}: a CIFAR file holds only numpy arrays, "
                "lists and dicts, so this file is corrupt or not what it claims to be (it may be malicious)."
            ) from None


def read_batch(path: Path, label_keys: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8 images ``[N, 3, 32, 32]`` and the named label arrays of one CIFAR pickle."""
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # a truncated or foreign file fails in many ways; name the file
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict, found {type(raw).__name__}.")
    # Python 2 wrote str keys; loaded as bytes they are b"data", b"labels", ...
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    missing = [k for k in ("data", *label_keys) if k not in entries]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} entry (it has {', '.join(map(str, entries))}).")
    data = entries["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be a uint8 array [N, 3072], found {getattr(data, 'shape', type(data))}.")
    labels = {k: np.asarray(entries[k], dtype=np.int64) for k in label_keys}
    for key, values in labels.items():
        if values.shape != (len(data),):
            raise ValueError(f"{path}: {len(data)} images but {values.shape} {key!r}.")
    # Each row holds the 1024 red, then green, then blue values of a 32×32 image, row-major.
    return data.reshape(-1, 3, 32, 32), labels


@lru_cache(maxsize=8)
def _read_cached(path: Path, label_keys: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    data, labels = read_batch(path, label_keys)
    return torch.from_numpy(data.copy()), {k: torch.from_numpy(v) for k, v in labels.items()}


class _CIFAR(ClassificationTask):
    """Shared by cifar10 and cifar100: the official test set, val carved from train."""

    input_shape = (3, 32, 32)
    needs_data_root = True  # data not bundled with a pip package: the registry-wide contract test skips it
    folder: str  # torchvision's folder under the root
    archive: str  # the torchvision dataset class, whose download URL and checksum we use
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_keys: tuple[str, ...]  # every label list a batch file must hold
    label_key: str  # the one this task predicts
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, num_classes: int, root: str | None = None, download: bool = False, **kwargs: Any):
        super().__init__(num_classes=num_classes, **kwargs)
        self.root = root
        self.download = download

    def _how_to_get(self) -> str:
        return (
            f"Expected layout: <root>/{self.folder}/ holding {', '.join(self.train_files + self.test_files)} "
            f"and {self.meta_file}. Get it on a machine with internet with "
            f"`python -c \"from torchvision.datasets import {self.archive}; {self.archive}('ROOT', download=True)\"` and copy "
            f"ROOT/{self.folder} here, or set download=true where the internet is reachable."
        )

    def find_folder(self) -> Path:
        if not self.root:
            raise FileNotFoundError(f"task {self.name!r} needs root=PATH, a torchvision CIFAR root. {self._how_to_get()}")
        folder = Path(self.root).expanduser() / self.folder
        if not folder.is_dir() and self.download:
            import torchvision.datasets
            from torchvision.datasets.utils import download_and_extract_archive

            source = getattr(torchvision.datasets, self.archive)
            download_and_extract_archive(source.url, str(folder.parent), filename=source.filename, md5=source.tgz_md5)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist. {self._how_to_get()}")
        for name in self.train_files + self.test_files + (self.meta_file,):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing. {self._how_to_get()}")
        return folder

    def _read(self, folder: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cached(folder / name, self.label_keys) for name in files]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1][self.label_key] for p in parts])
        if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < self.num_outputs:
            raise ValueError(f"{folder}: {self.label_key} outside 0..{self.num_outputs - 1}.")
        return x, y

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> normalized float32, in place after the one conversion (no second float copy)."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return images.float().div_(255.0).sub_(mean).div_(std)

    def build_datasets(self) -> Splits:
        folder = self.find_folder()
        x_train, y_train = self._read(folder, self.train_files)
        x_test, y_test = self._read(folder, self.test_files)
        n_val = round(len(x_train) * self.val_fraction)
        if not 1 <= n_val < len(x_train):
            raise ValueError(f"val_fraction {self.val_fraction} of {len(x_train)} training images leaves an empty split.")
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(self.split_seed))
        train = subsample(perm[n_val:], self.train_fraction, self.subset_seed)
        val = perm[:n_val]
        # Index the uint8 images first, so float copies exist only for the kept samples.
        parts = ((x_train[train], y_train[train]), (x_train[val], y_train[val]), (x_test, y_test))
        return Splits(*(TensorDataset(self._to_float(x), y) for x, y in parts))

    def input_key(self) -> tuple:
        # cifar100's fine and coarse tasks on one root see the same images in the same order.
        root = str(Path(self.root).expanduser().resolve()) if self.root else None
        return (self.folder, root, self.split_seed, self.val_fraction, self.train_fraction, self.subset_seed)


@register_task("cifar10")
class CIFAR10(_CIFAR):
    """CIFAR-10, 10 classes, 3×32×32; official 10k test set, val carved from the 50k train by split_seed.

    Metrics: accuracy (primary) and macro F1, higher is better. ``val_fraction`` of the
    50,000 training images (default 5,000) form the validation split, drawn by
    ``split_seed``; ``test_fraction`` does not apply. ``root``: a torchvision root (see
    the module docstring); ``download=true`` fetches the archive into it with torchvision.
    Inputs are float32 (60k images take 737 MB).
    """

    folder = "cifar-10-batches-py"
    archive = "CIFAR10"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_keys = ("labels",)
    label_key = "labels"
    # Per-channel mean and std of the 50k training images, pixels in [0, 1].
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str | None = None, download: bool = False, **kwargs: Any):
        super().__init__(num_classes=10, root=root, download=download, **kwargs)


@register_task("cifar100")
class CIFAR100(_CIFAR):
    """CIFAR-100, 100 fine classes (or 20 coarse superclasses: label=coarse), 3×32×32; official test set.

    Metrics: accuracy (primary) and macro F1, higher is better. Splits as for cifar10:
    ``val_fraction`` of the 50,000 training images by ``split_seed``, the official 10,000
    test images as test. ``label``: ``fine`` (100 classes) or ``coarse`` (20 superclasses);
    a fine and a coarse task on one root share their inputs (one batch, one trunk pass).
    """

    folder = "cifar-100-python"
    archive = "CIFAR100"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_keys = ("fine_labels", "coarse_labels")
    # Per-channel mean and std of the 50k training images, pixels in [0, 1].
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def __init__(self, label: str = "fine", root: str | None = None, download: bool = False, **kwargs: Any):
        classes = {"fine": 100, "coarse": 20}
        if label not in classes:
            raise ValueError(f"cifar100: label must be 'fine' (100 classes) or 'coarse' (20 superclasses), got {label!r}.")
        super().__init__(num_classes=classes[label], root=root, download=download, **kwargs)
        self.label = label
        self.label_key = f"{label}_labels"
