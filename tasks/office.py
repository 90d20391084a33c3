"""Office-31 (Saenko et al. 2010) and Office-Home (Venkateswara et al. 2017): one task per
domain, the same classes in every domain, each domain with its own images (multi-input
multi-task learning, as in LibMTL's Office benchmarks).

Layouts, as the archives extract::

    Office-31:   <root>/<amazon|dslr|webcam>/images/<class>/*.jpg           (31 classes)
    Office-Home: <root>/<Art|Clipart|Product|Real_World>/<class>/*.jpg      (65 classes)

Images are read lazily from disk (a plain Dataset, batched through a DataLoader).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from mtl.data import split_indices, subsample
from mtl.registry import did_you_mean
from mtl.task import ClassificationTask, Splits, register_task

# ImageNet's per-channel mean and std (pixels in [0, 1]): the statistics pretrained trunks expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def center_square(image: Image.Image) -> Image.Image:
    """The central square of side ``min(width, height)``."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def image_transform(size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Callable:
    """PIL image -> normalized float ``[3, size, size]``: the central square, resized to
    ``size``×``size`` (the same pixels as resizing the shorter side to ``size`` and centre
    cropping, without resampling across the crop's edge); no augmentation."""
    from torchvision import transforms

    return transforms.Compose(
        [transforms.Lambda(center_square), transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


class ImageFiles(Dataset):
    """Item i is ``(transform(image at paths[i]), targets[i])``; images are read when asked for."""

    def __init__(self, paths: Sequence[str], targets: torch.Tensor, transform: Callable):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} images but {len(targets)} targets.")
        self.paths = list(paths)
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def target(self, i: int) -> torch.Tensor:
        return self.targets[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[i]) as image:
            # Some files are greyscale or CMYK; the trunk wants three channels.
            x = self.transform(image.convert("RGB"))
        return x, self.targets[i]


class _OfficeDomain(ClassificationTask):
    """One domain of an Office dataset; subclasses name the dataset, its domains and layout."""

    needs_data_root = True  # data not bundled with a pip package: the registry-wide contract test skips it
    dataset: str
    domains: tuple[str, ...]
    num_classes: int
    layout: str
    how_to_get: str

    def __init__(
        self,
        domain: str,
        root: str | None = None,
        size: int = 224,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        **kwargs: Any,
    ):
        if domain not in self.domains:
            raise ValueError(
                f"{self.dataset} has no domain {domain!r}.{did_you_mean(domain, self.domains)} "
                f"Valid domains: {', '.join(self.domains)}."
            )
        # LibMTL's Office benchmarks split each domain 60/20/20; so do these defaults.
        super().__init__(num_classes=self.num_classes, val_fraction=val_fraction, test_fraction=test_fraction, **kwargs)
        self.domain = domain
        self.root = root
        self.size = size
        self.input_shape = (3, size, size)

    def domain_folders(self, root: Path, domain: str) -> list[Path]:
        """Where a domain's class folders may be (the first that exists is used)."""
        raise NotImplementedError

    def _layout(self) -> str:
        return f"Expected layout: {self.layout}. {self.how_to_get}"

    def _find(self, root: Path, domain: str) -> Path | None:
        return next((p for p in self.domain_folders(root, domain) if p.is_dir()), None)

    def classes(self, root: Path) -> list[str]:
        """This domain's class names, sorted; every other domain present must have the same."""
        own = self._find(root, self.domain)
        if own is None:
            raise FileNotFoundError(f"{self.domain_folders(root, self.domain)[0]} does not exist. {self._layout()}")
        classes = sorted(p.name for p in own.iterdir() if p.is_dir())
        if len(classes) != self.num_classes:
            raise ValueError(f"{own}: {len(classes)} class folders, but {self.dataset} has {self.num_classes}. {self._layout()}")
        for domain in self.domains:
            folder = self._find(root, domain)
            if domain == self.domain or folder is None:
                continue
            theirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
            if theirs != classes:
                only_here, only_there = sorted(set(classes) - set(theirs)), sorted(set(theirs) - set(classes))
                raise ValueError(
                    f"{self.dataset}: domain {domain!r} ({folder}) has other classes than {self.domain!r}: "
                    f"missing {only_here or 'none'}, extra {only_there or 'none'}. Every domain needs the same class folders."
                )
        return classes

    def build_datasets(self) -> Splits:
        if not self.root:
            raise FileNotFoundError(f"task {self.name!r} needs root=PATH, the {self.dataset} folder. {self._layout()}")
        root = Path(self.root).expanduser()
        classes = self.classes(root)
        folder = self._find(root, self.domain)
        paths, labels = [], []
        for label, name in enumerate(classes):
            images = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"{folder / name} holds no images (*.jpg). {self._layout()}")
            paths += [str(p) for p in images]
            labels += [label] * len(images)
        targets = torch.tensor(labels)
        train, val, test = split_indices(len(paths), self.val_fraction, self.test_fraction, self.split_seed)
        train = subsample(train, self.train_fraction, self.subset_seed)
        transform = image_transform(self.size)
        return Splits(*(ImageFiles([paths[i] for i in idx.tolist()], targets[idx], transform) for idx in (train, val, test)))


@register_task("office31")
class Office31(_OfficeDomain):
    """Office-31, one domain (domain: amazon|dslr|webcam), 31 classes, 3×size×size (default 224), split 60/20/20.

    Metrics: accuracy (primary) and macro F1, higher is better. Classes are the class
    folders sorted by name; the split is drawn by ``split_seed`` from the domain's images.
    Inputs: shorter side resized to ``size``, centre crop, ImageNet mean/std.
    """

    dataset = "Office-31"
    domains = ("amazon", "dslr", "webcam")
    num_classes = 31
    layout = "<root>/<amazon|dslr|webcam>/images/<class>/*.jpg"
    how_to_get = (
        "Download domain_adaptation_images.tar.gz from the Office-31 page "
        "(https://faculty.cc.gatech.edu/~judy/domainadapt/) and extract it into root."
    )

    def domain_folders(self, root: Path, domain: str) -> list[Path]:
        return [root / domain / "images"]


@register_task("office_home")
class OfficeHome(_OfficeDomain):
    """Office-Home, one domain (domain: Art|Clipart|Product|Real_World), 65 classes, 3×size×size, split 60/20/20.

    Metrics: accuracy (primary) and macro F1, higher is better. Classes are the class
    folders sorted by name; the split is drawn by ``split_seed`` from the domain's images.
    Inputs: shorter side resized to ``size`` (default 224), centre crop, ImageNet mean/std.
    """

    dataset = "Office-Home"
    domains = ("Art", "Clipart", "Product", "Real_World")
    num_classes = 65
    layout = "<root>/<Art|Clipart|Product|Real_World>/<class>/*.jpg"
    how_to_get = (
        "Download OfficeHomeDataset_10072016.zip from https://www.hemanthdv.org/officeHomeDataset.html "
        "and extract it so that root holds the four domain folders."
    )

    def domain_folders(self, root: Path, domain: str) -> list[Path]:
        # The official archive names the last domain "Real World"; many copies rename it Real_World.
        return [root / domain, root / domain.replace("_", " ")]
