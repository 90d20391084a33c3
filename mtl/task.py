"""The Task contract: what a researcher writes to add a learning problem.

A task owns its data (train/val/test), its head (built on the trunk's features), its
per-sample loss and its streaming metrics, each with a direction. Missing labels
(partial labels) are marked in the target with ``MISSING_LABEL`` (integer targets) or
NaN (float targets); such samples count in neither the loss nor the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch
import torch.nn.functional as F
import torchmetrics
from torch.utils.data import Dataset

from mtl.registry import Registry

MISSING_LABEL = -100
"""Target value of an integer label that is absent (PyTorch's ``ignore_index`` default)."""


@dataclass
class Splits:
    """A task's three datasets; each item is ``(input, target)``."""

    train: Dataset
    val: Dataset
    test: Dataset

    def items(self) -> list[tuple[str, Dataset]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


class TaskArgumentError(ValueError):
    """A task argument out of its range: ``key`` (the config key of the task node) and ``detail``."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key} {detail}")
        self.key = key
        self.detail = detail


SEED_LIMIT = 2**32  # numpy's and Python's generators take seeds in [0, 2^32)


def check_split_arguments(
    *, val_fraction: Any, test_fraction: Any, split_seed: Any, train_fraction: Any, subset_seed: Any
) -> None:
    """The shared Task arguments, in range; run on construction and again by the contract
    check (a subclass may have overwritten them in its own ``__init__``)."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction), ("train_fraction", train_fraction)):
        # bool is an int to Python: `train_fraction: true` would keep the whole split.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TaskArgumentError(key, f"must be a number, got {value!r} ({type(value).__name__}).")
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise TaskArgumentError(key, f"must be in (0, 1), got {value}.")
    if val_fraction + test_fraction >= 1:
        raise TaskArgumentError(
            "val_fraction", f"+ test_fraction must be < 1 to leave a training split, got {val_fraction + test_fraction}."
        )
    if not 0 < train_fraction <= 1:
        raise TaskArgumentError("train_fraction", f"must be in (0, 1] (the share of the training split kept), got {train_fraction}.")
    for key, value in (("split_seed", split_seed), ("subset_seed", subset_seed)):
        if value is None and key == "subset_seed":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
            raise TaskArgumentError(key, f"must be an integer in [0, 2^32), got {value!r}.")


class Task:
    """Base class of tasks. Subclasses set ``num_outputs`` and ``primary_metric`` and
    implement ``build_datasets``; ``loss`` and ``metrics`` come from the subclasses below.

    Constructor arguments every task shares (config keys of a task node):
      val_fraction, test_fraction: share of the data held out, when the source has no
        fixed split; split_seed fixes the split (kept apart from the training seed so
        every run of a comparison is scored on the same test set);
      train_fraction: share of the training split kept (labelled-data experiments), drawn
        with subset_seed (default: split_seed), so a comparison can vary the labelled
        subset with its seeds while every run keeps the same val and test sets.
    """

    num_outputs: int
    primary_metric: str
    input_shape: tuple[int, ...] | None = None
    default_head: str = "linear"
    # Data not bundled with a pip package (read from a local root): the registry-wide
    # contract tests leave such a task to its own tests on a tiny tree in its real layout.
    needs_data_root: bool = False

    def __init__(
        self,
        *,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        train_fraction: float = 1.0,
        subset_seed: int | None = None,
    ):
        check_split_arguments(
            val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
            train_fraction=train_fraction, subset_seed=subset_seed,
        )
        self.name = type(self).__name__
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.train_fraction = train_fraction
        self.subset_seed = split_seed if subset_seed is None else subset_seed

    def build_datasets(self) -> Splits:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss, shape ``[B]``; the framework masks missing labels and averages."""
        raise NotImplementedError

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        """Fresh streaming metrics; each must set ``higher_is_better``."""
        raise NotImplementedError

    def head_config(self) -> dict[str, Any]:
        return {"name": self.default_head}

    def metric_inputs(self, output: torch.Tensor) -> torch.Tensor:
        """What the metrics are updated with: the head's output, or e.g. probabilities."""
        return output

    def input_key(self) -> Hashable | None:
        """Tasks returning the same key (not None) promise identical inputs, split for split
        and in the same order (e.g. MultiMNIST left and right): the trainer then draws one
        batch for all of them and runs the trunk once on it."""
        return None

    def check_targets(self, targets: torch.Tensor, output_shape: tuple[int, ...]) -> None:
        """Raise ValueError, naming the fix, when ``targets`` (``[N, ...]``, one split's) cannot
        meet a head output of ``output_shape`` per sample in this task's loss. Run before
        training: the loss would otherwise fail mid-run, or on a GPU as a device-side assert
        that names nothing. The base class knows no loss; the subclasses below check theirs."""

    def valid_mask(self, target: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: True where the sample has a label for this task."""
        flat = target.reshape(len(target), -1)
        if target.is_floating_point():
            return ~torch.isnan(flat).any(dim=1)
        return (flat != MISSING_LABEL).all(dim=1)

    def masked_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over labelled samples, without a host sync (0 when none is labelled)."""
        return masked_mean_loss(self, output, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def masked_mean_loss(task: Task, output: torch.Tensor, target: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """``task.loss`` averaged over the labelled samples (``task.valid_mask``), 0 where none is:
    sum_i m_i l_i / max(1, sum_i m_i). With ``groups=T`` the rows are T stacked tasks' batches
    and the result is ``[T]``, one mean per task (``mtl.losses`` batches same-kind tasks so).
    The one place the masking is written; no host sync."""
    mask = task.valid_mask(target)
    # Missing targets are replaced by 0 so the loss stays finite and in range; they are
    # then weighted by 0.
    safe = torch.where(mask.view(-1, *([1] * (target.dim() - 1))), target, torch.zeros_like(target))
    per_sample = task.loss(output, safe)
    if per_sample.shape != mask.shape:
        raise ValueError(
            f"task {task.name!r}: loss() must return one value per sample, shape {tuple(mask.shape)}, "
            f"got {tuple(per_sample.shape)}."
        )
    weight = mask.to(per_sample.dtype)
    if groups is None:
        return (per_sample * weight).sum() / weight.sum().clamp(min=1)
    weight = weight.view(groups, -1)
    return (per_sample.view(groups, -1) * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def _labelled(targets: torch.Tensor) -> torch.Tensor:
    """The target values that are labels, i.e. neither MISSING_LABEL nor NaN, flattened."""
    keep = targets != MISSING_LABEL
    if targets.is_floating_point():
        keep &= ~torch.isnan(targets)
    return targets[keep]


def _size(task: Task, key: str, given: int | None, default: int | None = None) -> int:
    """A size argument (num_classes, num_labels, num_outputs): the config's value, else the
    subclass's class attribute of that name, else ``default``."""
    value = given if given is not None else getattr(type(task), key, default)
    if value is None:
        raise TaskArgumentError(key, f"is missing: set it in the task's config node, or as a class attribute ({key} = ...) of {type(task).__name__}.")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskArgumentError(key, f"must be a positive integer, got {value!r}.")
    return value


class ClassificationTask(Task):
    """Single-label classification: cross-entropy; accuracy (higher is better).

    ``num_classes`` comes from the config node or a class attribute of the subclass."""

    primary_metric = "accuracy"

    def __init__(self, num_classes: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_outputs = _size(self, "num_classes", num_classes)

    def check_targets(self, targets: torch.Tensor, output_shape: tuple[int, ...]) -> None:
        if type(self).loss is not ClassificationTask.loss:
            return  # a loss of the task's own: its own contract
        classes, per_sample = output_shape[0], tuple(targets.shape[1:])
        if per_sample != tuple(output_shape[1:]):
            raise ValueError(
                f"targets have shape {per_sample} per sample, but cross-entropy on the head's {classes} class "
                f"scores needs one class index per sample (shape {tuple(output_shape[1:])}): give class indices, "
                "not one-hot vectors; several binary labels per sample are a MultiLabelTask."
            )
        labels = _labelled(targets)
        fractional = labels[labels != labels.round()] if labels.is_floating_point() else labels[:0]
        if len(fractional):
            raise ValueError(f"class labels must be whole numbers (class indices 0..{classes - 1}), got {fractional[0].item()}.")
        outside = labels[(labels < 0) | (labels >= classes)]
        if len(outside):
            if outside.min() < 0:
                bad, fix = int(outside.min()), f"labels are 0..{classes - 1}, and a missing label is MISSING_LABEL ({MISSING_LABEL})"
            else:
                bad, fix = int(outside.max()), f"set num_classes to at least {int(outside.max()) + 1}, or fix the labels"
            raise ValueError(
                f"label {bad} is outside the head's {classes} classes 0..{classes - 1} "
                f"({len(outside)} of {len(labels)} labels); {fix}."
            )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float(), target.long(), reduction="none")

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        return {
            "accuracy": MulticlassAccuracy(self.num_outputs, average="micro"),
            "macro_f1": MulticlassF1Score(self.num_outputs, average="macro"),
        }


class MultiLabelTask(Task):
    """Independent binary labels: BCE with logits (mean over labels); accuracy and macro F1.

    ``num_labels`` comes from the config node or a class attribute of the subclass."""

    primary_metric = "accuracy"
    default_head = "multilabel"

    def __init__(self, num_labels: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_outputs = _size(self, "num_labels", num_labels)

    def check_targets(self, targets: torch.Tensor, output_shape: tuple[int, ...]) -> None:
        if type(self).loss is not MultiLabelTask.loss:
            return
        per_sample = tuple(targets.shape[1:])
        if per_sample != tuple(output_shape):
            raise ValueError(
                f"targets have shape {per_sample} per sample, but the head's output has shape {tuple(output_shape)}: a multi-label "
                f"target holds one 0/1 per label, shape [N, num_labels] with num_labels={self.num_outputs}; set "
                "num_labels to the targets' label count, or fix the targets."
            )
        labels = _labelled(targets)
        outside = labels[(labels < 0) | (labels > 1)]
        if len(outside):
            raise ValueError(
                f"multi-label targets must lie in [0, 1] (1 = the label applies; NaN or {MISSING_LABEL} = missing), "
                f"got {outside[0].item()} ({len(outside)} of {len(labels)} values)."
            )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(output.float(), target.float(), reduction="none").mean(dim=1)

    def metric_inputs(self, output: torch.Tensor) -> torch.Tensor:
        # torchmetrics applies a sigmoid only when a batch has values outside [0, 1]: logits
        # that all fall inside would be thresholded at 0.5 instead of logit 0.
        return torch.sigmoid(output)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        from torchmetrics.classification import MultilabelAccuracy, MultilabelF1Score

        return {
            "accuracy": MultilabelAccuracy(self.num_outputs, average="micro"),
            "macro_f1": MultilabelF1Score(self.num_outputs, average="macro"),
        }


class RegressionTask(Task):
    """Real-valued targets: mean squared error loss; MAE (primary) and RMSE, lower is better.

    ``num_outputs`` comes from the config node or a class attribute of the subclass (default 1)."""

    primary_metric = "mae"
    default_head = "regression"

    def __init__(self, num_outputs: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_outputs = _size(self, "num_outputs", num_outputs, default=1)

    def check_targets(self, targets: torch.Tensor, output_shape: tuple[int, ...]) -> None:
        if type(self).loss is not RegressionTask.loss:
            return
        per_sample = tuple(targets.shape[1:])
        if per_sample != tuple(output_shape):
            # mse_loss would broadcast [B] against [B, 1] into [B, B] with only a warning.
            raise ValueError(
                f"targets have shape {per_sample} per sample, but the head's output has shape {tuple(output_shape)} "
                f"(num_outputs={self.num_outputs}); they must match: targets [N] for one output, [N, k] for "
                "num_outputs=k. Set num_outputs to the targets' size, or reshape the targets."
            )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        err = F.mse_loss(output.float(), target.float(), reduction="none")
        return err.reshape(len(err), -1).mean(dim=1)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        return {
            "mae": torchmetrics.MeanAbsoluteError(),
            "rmse": torchmetrics.MeanSquaredError(squared=False),
        }


TASKS: Registry[Task] = Registry("task", Task, builtins=("tasks",))
register_task = TASKS.register
