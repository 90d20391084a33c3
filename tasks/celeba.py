"""CelebA (Liu et al. 2015): 202,599 aligned face images with 40 binary attributes, read
from a local torchvision root, with the official train/val/test partition.

Layout (what ``torchvision.datasets.CelebA(root, download=True)`` leaves)::

    <root>/celeba/img_align_celeba/000001.jpg ...
    <root>/celeba/list_attr_celeba.txt      line 1: image count; line 2: the 40 attribute
                                            names; then "<file> v1 .. v40", v = 1 or -1
    <root>/celeba/list_eval_partition.txt   "<file> 0|1|2" (train / val / test)

Two forms: ``celeba``, one multi-label task over the 40 attributes (or a subset), and
``celeba_attribute``, a binary task on one attribute. Every CelebA task on the same root,
size and labelled subset shares its inputs, so 40 attribute tasks draw one batch and run
the trunk once (as in Sener & Koltun 2018).

Inputs: the aligned 178×218 images, shorter side resized to ``size`` then centre-cropped
to ``size``×``size``: the central 178×178 square, which holds the whole aligned face
(Sener & Koltun resize the full 178×218 image to 64×64, changing its aspect). Normalized
with ImageNet's mean and std: the MTL literature has no standard CelebA statistics, and
pretrained trunks expect ImageNet's.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchmetrics

from mtl.data import subsample
from mtl.registry import closest
from mtl.task import ClassificationTask, MultiLabelTask, Splits, TaskArgumentError, register_task
from tasks.office import ImageFiles, image_transform

# The 40 attributes, in the order of list_attr_celeba.txt.
ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip

IMAGES, ATTR_FILE, PARTITION_FILE = "img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"
SPLITS = ("train", "val", "test")  # partition codes 0, 1, 2
HOW_TO_GET = (
    "Expected layout: <root>/celeba/ holding img_align_celeba/*.jpg, list_attr_celeba.txt and "
    "list_eval_partition.txt. Get it with `torchvision.datasets.CelebA('ROOT', download=True)` on a machine "
    "with internet (it downloads from Google Drive, which may refuse when over quota), or download those files "
    "from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and unzip img_align_celeba.zip into <root>/celeba/."
)


# The primary metric a CelebA task can be selected and compared on: "accuracy", or "f1", each
# attribute's positive-class F1, as FAMO's CelebA benchmark (Liu et al. 2023) reports it.
PRIMARY = ("accuracy", "f1")


def check_metric(metric: str) -> str:
    if metric not in PRIMARY:
        raise TaskArgumentError("metric", f"must be 'accuracy' or 'f1' (each attribute's positive-class F1, FAMO's CelebA metric), got {metric!r}.")
    return metric


class PositiveClassF1(torchmetrics.classification.BinaryF1Score):
    """F1 of the positive class (target 1) from two-class scores, the predicted class their
    argmax: F1 = 2·TP / (2·TP + FP + FN), 0 when TP + FP + FN = 0 (torchmetrics' counts and
    zero division). FAMO's CelebA metric (Liu et al. 2023, NeurIPS; their code,
    experiments/celeba/trainer.py, thresholds one sigmoid output at 0.5: the same decision as
    the argmax of two logits, but for exact ties, counted as negatives by both)."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.argmax(dim=1), target)


def check_attribute(name: str) -> int:
    """The column of attribute ``name``; ValueError with close matches when there is none."""
    if name in ATTRIBUTES:
        return ATTRIBUTES.index(name)
    near = [a for a in ATTRIBUTES if a.lower() == name.lower()] or closest(name, ATTRIBUTES)
    hint = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
    raise ValueError(f"CelebA has no attribute {name!r}.{hint} The 40 attributes: {', '.join(ATTRIBUTES)}.")


def find_celeba(root: str | None) -> Path:
    if not root:
        raise FileNotFoundError(f"CelebA tasks need root=PATH, a torchvision root. {HOW_TO_GET}")
    folder = Path(root).expanduser() / "celeba"
    for path in (folder, folder / IMAGES, folder / ATTR_FILE, folder / PARTITION_FILE):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist. {HOW_TO_GET}")
    return folder


def parse_attributes(path: Path) -> tuple[list[str], torch.Tensor]:
    """File names and their attributes as 0/1 (from 1/-1), uint8 ``[N, 40]``, in file order."""
    lines = path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}: line 1 must be the image count, line 2 the attribute names.")
    header = lines[1].split()
    if sorted(header) != sorted(ATTRIBUTES):
        raise ValueError(f"{path}: line 2 must name CelebA's 40 attributes, found {header[:5]}... ({len(header)} names).")
    order = [header.index(a) for a in ATTRIBUTES]
    files, values = [], []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(ATTRIBUTES) + 1 or not set(fields[1:]) <= {"1", "-1"}:
            raise ValueError(f"{path}, line {number}: expected a file name and 40 values of 1 or -1, got {line!r}.")
        files.append(fields[0])
        values += fields[1:]
    if len(files) != int(lines[0]):
        raise ValueError(f"{path}: line 1 announces {lines[0].strip()} images but {len(files)} follow.")
    present = np.array(values, dtype=str).reshape(len(files), len(ATTRIBUTES)) == "1"
    return files, torch.from_numpy(present[:, order].astype(np.uint8))


def parse_partition(path: Path) -> dict[str, int]:
    """File name -> 0 (train), 1 (val) or 2 (test)."""
    partition = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}, line {number}: expected '<file> 0|1|2', got {line!r}.")
        partition[fields[0]] = int(fields[1])
    return partition


@lru_cache(maxsize=2)
def read_celeba(folder: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Image paths, 0/1 attributes ``[N, 40]`` and partition codes ``[N]`` (read once per
    process; callers must not modify them in place)."""
    files, attributes = parse_attributes(folder / ATTR_FILE)
    partition = parse_partition(folder / PARTITION_FILE)
    unlisted = [f for f in files if f not in partition]
    if unlisted:
        raise ValueError(f"{folder / PARTITION_FILE} does not list {len(unlisted)} images of {ATTR_FILE}, e.g. {unlisted[0]}.")
    if files and not (folder / IMAGES / files[0]).is_file():
        # Unzipping img_align_celeba.zip inside img_align_celeba/ nests it one level too deep.
        raise FileNotFoundError(f"{folder / IMAGES / files[0]} does not exist. {HOW_TO_GET}")
    codes = torch.tensor([partition[f] for f in files], dtype=torch.long)
    return [str(folder / IMAGES / f) for f in files], attributes, codes


def celeba_splits(root: str | None, size: int, columns: Sequence[int] | int, train_fraction: float, subset_seed: int) -> Splits:
    """The official train/val/test images of ``root`` with the given attribute column(s) as
    0/1 targets; ``train_fraction`` of train drawn by ``subset_seed``."""
    paths, attributes, codes = read_celeba(find_celeba(root))
    transform = image_transform(size)
    datasets = []
    for code, split in enumerate(SPLITS):
        idx = (codes == code).nonzero().squeeze(1)
        if split == "train":
            idx = subsample(idx, train_fraction, subset_seed)
        datasets.append(ImageFiles([paths[i] for i in idx.tolist()], attributes[idx][:, columns].long(), transform))
    return Splits(*datasets)


def celeba_input_key(root: str | None, size: int, train_fraction: float, subset_seed: int) -> tuple:
    resolved = str(Path(root).expanduser().resolve()) if root else None
    return ("celeba", resolved, size, train_fraction, subset_seed)


@register_task("celeba")
class CelebA(MultiLabelTask):
    """CelebA, 40 binary face attributes (or a subset: attributes=[...]) as one multi-label task, 3×size×size.

    Metrics: accuracy over all labels and macro F1 (the mean over the attributes of each
    one's positive-class F1), higher is better; ``metric`` picks the primary one, which model
    selection (``select_on: primary_mean``) and Δm% over primary metrics use: ``accuracy``
    (default) or ``f1`` (macro F1, FAMO's CelebA metric, Liu et al. 2023). Splits: the official partition (162,770 / 19,867 / 19,962 images);
    ``val_fraction``, ``test_fraction`` and ``split_seed`` do not apply to it, only
    ``train_fraction`` (with ``subset_seed``). ``size`` defaults to 64 (crop: see the
    module docstring).
    """

    needs_data_root = True  # data not bundled with a pip package: the registry-wide contract test skips it

    def __init__(self, root: str | None = None, attributes: Sequence[str] | None = None, size: int = 64,
                 metric: str = "accuracy", **kwargs: Any):
        self.primary_metric = {"accuracy": "accuracy", "f1": "macro_f1"}[check_metric(metric)]
        names = list(ATTRIBUTES if attributes is None else attributes)
        if not names:
            raise ValueError("celeba: attributes must name at least one attribute (or be left out for all 40).")
        self.columns = [check_attribute(a) for a in names]
        super().__init__(num_labels=len(names), **kwargs)
        self.attributes = names
        self.root = root
        self.size = size
        self.input_shape = (3, size, size)

    def build_datasets(self) -> Splits:
        return celeba_splits(self.root, self.size, self.columns, self.train_fraction, self.subset_seed)

    def input_key(self) -> tuple:
        return celeba_input_key(self.root, self.size, self.train_fraction, self.subset_seed)


@register_task("celeba_attribute")
class CelebAAttribute(ClassificationTask):
    """CelebA, one binary face attribute (attribute: Smiling, ...) as a 2-class task, 3×size×size.

    Metrics: accuracy and macro F1 over the two classes, higher is better; with ``metric:
    f1`` also ``f1``, the positive-class F1 (:class:`PositiveClassF1`, FAMO's CelebA metric,
    Liu et al. 2023), as the primary metric, which model selection (``select_on:
    primary_mean``: the mean over the attributes, FAMO's choice) and Δm% over primary metrics
    use; ``metric: accuracy`` (default) keeps accuracy primary. Target 1 where the attribute is
    present. Splits: the official partition, as for
    ``celeba`` (``val_fraction``, ``test_fraction``, ``split_seed`` do not apply). All
    CelebA tasks with the same root, size, train_fraction and subset_seed share inputs.
    """

    needs_data_root = True  # data not bundled with a pip package: the registry-wide contract test skips it

    def __init__(self, attribute: str, root: str | None = None, size: int = 64, metric: str = "accuracy", **kwargs: Any):
        self.primary_metric = check_metric(metric)
        self.column = check_attribute(attribute)
        super().__init__(num_classes=2, **kwargs)
        self.attribute = attribute
        self.root = root
        self.size = size
        self.input_shape = (3, size, size)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        metrics = super().metrics()
        if self.primary_metric == "f1":
            metrics["f1"] = PositiveClassF1()
        return metrics

    def build_datasets(self) -> Splits:
        return celeba_splits(self.root, self.size, self.column, self.train_fraction, self.subset_seed)

    def input_key(self) -> tuple:
        return celeba_input_key(self.root, self.size, self.train_fraction, self.subset_seed)
