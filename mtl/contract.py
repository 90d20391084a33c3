"""The task contract, checked before training on one real batch per split.

A task is user code: its mistakes (a loss of the wrong shape, labels beyond the head, a
metric that is not a metric, test data inside the training split) would otherwise surface
mid-run as a page of torch internals, or never. ``check_definition`` looks at the task's
class before any data is read; ``check_batches`` pushes one batch of each split through
the trunk (eval mode, no grad), the head, ``loss``, ``masked_loss`` and the metrics, the
calls the trainer and the evaluator make. Every failure is a ``TaskContractError``, one
line: ``tasks.<key> (<module>:<Class>): <method>: <what is wrong>; <the fix>``, with the
file:line of the user's own code when the user's method raised.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sysconfig
import traceback
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torchmetrics
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

import mtl
from mtl.config import ConfigError
from mtl.data import _tensors
from mtl.task import MISSING_LABEL, Splits, Task, TaskArgumentError, check_split_arguments


logger = logging.getLogger(__name__)


class TaskContractError(ConfigError):
    """A task breaks its contract; the message names the task, the method, the problem and the fix."""


# Frames in these folders are the library's or a dependency's, never the user's mistake.
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) + os.sep
    for p in {
        os.path.dirname(mtl.__file__),
        os.path.dirname(torch.__file__),
        os.path.dirname(torchmetrics.__file__),
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    }
)


def user_location(error: BaseException) -> str | None:
    """``file:line`` of the innermost frame of ``error``'s traceback in the user's own code."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = str(Path(frame.filename).resolve())
        if frame.filename.startswith("<") or path.startswith(_LIBRARY_DIRS):
            continue
        try:
            shown = os.path.relpath(path)
        except ValueError:  # another drive (Windows)
            shown = path
        return f"{shown if not shown.startswith('..') else path}:{frame.lineno}"
    return None


def describe(key: str, cls: type) -> str:
    return f"tasks.{key} ({cls.__module__}:{cls.__qualname__})"


def first_line(error: BaseException, limit: int | None = 240) -> str:
    """The error's first line, cut at ``limit`` characters (None: never, for messages that end in their fix)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    if isinstance(error, KeyError) and line:
        line = f"key {line}"
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def raised(where: str, method: str, error: BaseException, fix: str = "") -> TaskContractError:
    """The one-line error for an exception raised inside a task's ``method``."""
    at = user_location(error)
    message = f"{where}: {method} raised {type(error).__name__}: {first_line(error)}"
    if at:
        message += f" (at {at})"
    return TaskContractError(message + (f"; {fix}" if fix else ""))


def call(where: str, method: str, fn: Callable[..., Any], *args: Any, fix: str = "") -> Any:
    """``fn(*args)``, a task's method: an exception it raises becomes one line naming the method."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as e:
        raise raised(where, method, e, fix) from e


# -- the class, before any data --------------------------------------------------------

# Methods and the arguments the framework calls them with.
_METHODS = {
    "build_datasets": 0, "loss": 2, "metrics": 0, "head_config": 0, "metric_inputs": 1,
    "input_key": 0, "valid_mask": 1, "masked_loss": 2, "check_targets": 2,
}
_SIGNATURES = {
    "build_datasets": "build_datasets(self) returning Splits(train, val, test), e.g. tensor_splits(x, y, self)",
    "loss": "loss(self, output, target) returning one loss per sample, shape [B]",
    "metrics": "metrics(self) returning {name: torchmetrics.Metric}",
    "head_config": "head_config(self) returning {'name': <head>, ...}",
    "metric_inputs": "metric_inputs(self, output)",
    "input_key": "input_key(self)",
    "valid_mask": "valid_mask(self, target) returning a bool tensor [B]",
    "masked_loss": "masked_loss(self, output, target) returning a scalar",
    "check_targets": "check_targets(self, targets, output_shape)",
}


def check_definition(key: str, task: Task) -> None:
    """What can be checked without data: methods, attributes, shared arguments, metrics."""
    where = describe(key, type(task))
    for method, arity in _METHODS.items():
        fn = getattr(task, method, None)
        if not callable(fn):
            raise TaskContractError(f"{where}: {method} is not a method ({type(fn).__name__}); define {_SIGNATURES[method]}.")
        if method in ("build_datasets", "loss", "metrics") and getattr(type(task), method) is getattr(Task, method):
            raise TaskContractError(f"{where}: {method} is not defined; define {_SIGNATURES[method]}.")
        try:
            inspect.signature(fn).bind(*[None] * arity)
        except TypeError as e:
            raise TaskContractError(f"{where}: {method}{inspect.signature(fn)} cannot be called as the framework calls it ({e}); define {_SIGNATURES[method]}.") from None
        except ValueError:  # no signature (a builtin): left to the call itself
            pass
    shared = {k: getattr(task, k, None) for k in ("val_fraction", "test_fraction", "split_seed", "train_fraction", "subset_seed")}
    if any(v is None for k, v in shared.items() if k != "subset_seed"):
        raise TaskContractError(f"{where}: __init__ did not set the shared Task arguments; call super().__init__(**kwargs) in {type(task).__name__}.__init__.")
    try:
        check_split_arguments(**shared)
    except TaskArgumentError as e:
        raise TaskContractError(f"{where}: __init__: {e.key} {e.detail} It was set in {type(task).__name__}'s own code: set it in the config (tasks.{key}.{e.key}) instead.") from None
    for attr in ("num_outputs", "primary_metric"):
        if not hasattr(task, attr):
            raise TaskContractError(f"{where}: {attr} is not set; set it as a class attribute ({attr} = ...) or in __init__.")
    outputs = task.num_outputs
    if isinstance(outputs, bool) or not isinstance(outputs, int) or outputs < 1:
        raise TaskContractError(
            f"{where}: num_outputs must be a positive integer (the head's output size), got {outputs!r}; set num_outputs as a class attribute or in __init__."
        )
    for attr in ("primary_metric", "default_head"):
        if not isinstance(getattr(task, attr, None), str):
            raise TaskContractError(f"{where}: {attr} must be a string, got {getattr(task, attr, None)!r}; set it as a class attribute.")
    shape = task.input_shape
    if shape is not None and (not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d >= 1 for d in shape)):
        raise TaskContractError(f"{where}: input_shape must be None or a tuple of positive sizes, got {shape!r}.")
    head = call(where, "head_config()", task.head_config)
    if not isinstance(head, Mapping) or not isinstance(head.get("name"), str):
        raise TaskContractError(f"{where}: head_config() must return a mapping with a head 'name' (e.g. {{'name': 'linear'}}), got {head!r}.")
    input_key = call(where, "input_key()", task.input_key)
    if not isinstance(input_key, Hashable):
        raise TaskContractError(f"{where}: input_key() must return None or a hashable value (e.g. a tuple), got {type(input_key).__name__}.")
    check_metrics(where, task)


def check_metrics(where: str, task: Task) -> dict[str, torchmetrics.Metric]:
    """``metrics()``: fresh torchmetrics objects keyed by name, each with a direction, one of
    them the primary metric."""
    metrics = call(where, "metrics()", task.metrics)
    if not isinstance(metrics, Mapping) or not metrics:
        raise TaskContractError(f"{where}: metrics() must return a non-empty dict {{name: torchmetrics.Metric}}, got {summarize(metrics)}.")
    for name, metric in metrics.items():
        if not isinstance(name, str):
            raise TaskContractError(f"{where}: metrics() keys must be metric names (strings), got {name!r}.")
        if not isinstance(metric, torchmetrics.Metric):
            kind = f"the class {metric.__name__}, not an instance" if inspect.isclass(metric) else summarize(metric)
            raise TaskContractError(
                f"{where}: metrics()[{name!r}] must be a torchmetrics.Metric instance, got {kind}; e.g. MulticlassAccuracy(num_classes=...), "
                "or a torchmetrics.Metric subclass of your own."
            )
        if not isinstance(metric.higher_is_better, bool):
            raise TaskContractError(
                f"{where}: metrics()[{name!r}] ({type(metric).__name__}) has no direction (higher_is_better={metric.higher_is_better!r}); "
                "set the class attribute higher_is_better = True or False."
            )
    if task.primary_metric not in metrics:
        raise TaskContractError(
            f"{where}: primary_metric {task.primary_metric!r} is not among its metrics ({', '.join(metrics)}); set primary_metric to one of them."
        )
    again = call(where, "metrics()", task.metrics)
    shared = [n for n, m in metrics.items() if isinstance(again, Mapping) and again.get(n) is m]
    if shared:
        raise TaskContractError(
            f"{where}: metrics() returned the same {shared[0]!r} object twice; it must build new metrics on each call "
            "(each split is scored by its own, and a reused one keeps the previous split's state)."
        )
    return metrics


def summarize(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:59] + '…'}"


# -- one real batch per split ----------------------------------------------------------


def _batch(where: str, split: str, ds: Dataset, indices: list[int]) -> tuple[Any, Any]:
    items = []
    for i in indices:
        item = call(where, f"build_datasets(): the {split} split's item {i}", ds.__getitem__, i)
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TaskContractError(
                f"{where}: build_datasets(): the {split} split's items must be (input, target) pairs, got {summarize(item)}; "
                "e.g. TensorDataset(x, y), or tensor_splits(x, y, self)."
            )
        items.append(item)
    x, y = call(where, f"build_datasets(): batching the {split} split", default_collate, items,
                fix="every input must have one shape and every target another (tensors or numbers)")
    for what, value in (("inputs", x), ("targets", y)):
        if not isinstance(value, torch.Tensor):
            raise TaskContractError(f"{where}: build_datasets(): the {split} split's {what} must be tensors, got {summarize(value)}.")
    return x, y


def _valid_mask(where: str, task: Task, target: torch.Tensor, split: str) -> torch.Tensor:
    mask = call(where, "valid_mask(target)", task.valid_mask, target)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (len(target),):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else summarize(mask)
        raise TaskContractError(
            f"{where}: valid_mask(target) must return a bool tensor of shape [{len(target)}] (True where the sample is labelled), "
            f"got {got} on the {split} split."
        )
    return mask


def _bits(x: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: each sample's values as integers of the same width (their exact bits)."""
    flat = x.reshape(len(x), -1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        return flat
    return flat.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])


def _fingerprints(bits: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``[N]`` int64, one value per sample of ``bits`` (on ``columns`` only, if given): equal
    samples give equal values, distinct ones differ but with negligible probability. Integer
    arithmetic, so no summation order can change a value."""
    if columns is not None:
        bits = bits[:, columns]
    weights = torch.randint(1, 2**62, (bits.shape[1],), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    out = torch.empty(len(bits), dtype=torch.int64)
    for start in range(0, len(bits), 4096):  # bounds the int64 copy of large datasets
        out[start : start + 4096] = (bits[start : start + 4096].long() * weights).sum(dim=1)
    return out


# Splits are first compared on this many fixed columns of each sample (cheap); only samples
# that agree there are compared on all their values.
_PROBE_COLUMNS = 64


def _probe(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's inputs as integer bits, and their fingerprints on the probe columns."""
    bits = _bits(x)
    width = bits.shape[1]
    columns = torch.randperm(width, generator=torch.Generator().manual_seed(0))[:_PROBE_COLUMNS] if width > _PROBE_COLUMNS else None
    return bits, _fingerprints(bits, columns)


def _shared(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For two probed splits: which samples of ``a`` occur in ``b`` and which of ``b`` occur
    in ``a`` (``[N]`` bool each), compared on all values where the probe columns agree."""
    (bits_a, probe_a), (bits_b, probe_b) = a, b
    in_b, in_a = torch.zeros(len(bits_a), dtype=torch.bool), torch.zeros(len(bits_b), dtype=torch.bool)
    if bits_a.shape[1:] != bits_b.shape[1:] or bits_a.dtype != bits_b.dtype:
        return in_b, in_a
    maybe_a, maybe_b = torch.isin(probe_a, probe_b), torch.isin(probe_b, probe_a)
    if maybe_a.any():
        full_a, full_b = _fingerprints(bits_a[maybe_a]), _fingerprints(bits_b[maybe_b])
        in_b[maybe_a], in_a[maybe_b] = torch.isin(full_a, full_b), torch.isin(full_b, full_a)
    return in_b, in_a


def check_disjoint(where: str, splits: Splits) -> None:
    """Identical splits (test data used for training) are an error; a partial overlap is
    warned about. Only in-memory datasets are compared, from their exact input bits."""
    items = splits.items()
    for i, (a, ds_a) in enumerate(items):
        for b, ds_b in items[i + 1 :]:
            if ds_a is ds_b:
                raise TaskContractError(f"{where}: build_datasets() returned the same dataset as its {a} and {b} splits; the splits must be disjoint (e.g. tensor_splits(x, y, self)).")
    inputs = {split: _tensors(ds) for split, ds in items}
    if any(t is None for t in inputs.values()):
        return
    probes = {split: _probe(t[0]) for split, t in inputs.items()}
    names = list(probes)
    overlaps = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            a_in_b, b_in_a = _shared(probes[a], probes[b])
            if len(a_in_b) == len(b_in_a) and a_in_b.all() and b_in_a.all():
                raise TaskContractError(
                    f"{where}: build_datasets(): the {a} and {b} splits hold the same {len(a_in_b)} inputs; "
                    f"{'test' if 'test' in (a, b) else 'validation'} scores would be measured on training data. Split the data "
                    "into disjoint parts, e.g. tensor_splits(x, y, self)."
                )
            if b_in_a.any():
                overlaps.append(f"{int(b_in_a.sum())} of the {len(b_in_a)} {b} inputs occur in the {a} split")
    if overlaps:
        logger.warning("%s: splits overlap: %s; their scores are partly measured on seen data.", where, ", ".join(overlaps))


def check_batches(
    key: str, task: Task, trunk: torch.nn.Module, head: torch.nn.Module, splits: Splits, batch_size: int,
    features: dict[Hashable, torch.Tensor] | None = None,
) -> None:
    """One real batch per split through trunk, head, loss, masked_loss and the metrics.
    ``features``, shared across the calls for one run's tasks, keeps the trunk's features of
    shared-input tasks (one ``input_key``): forty CelebA attributes run the trunk once per split."""
    where = describe(key, type(task))
    check_disjoint(where, splits)
    shapes: dict[str, tuple] = {}
    trunk_mode, head_mode = trunk.training, head.training
    # Eval mode: BatchNorm statistics stay untouched and dropout draws no random numbers,
    # so a run is the same with or without the check.
    trunk.eval()
    head.eval()
    try:
        for split, ds in splits.items():
            _check_split(key, where, task, trunk, head, split, ds, batch_size, shapes, {} if features is None else features)
    finally:
        trunk.train(trunk_mode)
        head.train(head_mode)


def _check_split(key, where, task, trunk, head, split, ds, batch_size, shapes, cache) -> None:
    n = len(ds)
    if split == "train" and n < 2:
        raise TaskContractError(
            f"{where}: build_datasets(): the train split has {n} sample; a model cannot be trained on it. "
            f"Give the train split more data (check tasks.{key}.train_fraction and the data source)."
        )
    in_memory = _tensors(ds)
    targets = in_memory[1] if in_memory is not None else None
    if targets is not None:
        mask = _valid_mask(where, task, targets, split)
        if not mask.any():
            raise TaskContractError(
                f"{where}: the {split} split has no labelled sample ({n} targets, all missing per valid_mask); "
                f"{'nothing would train' if split == 'train' else 'its scores would be NaN'}. Check its targets "
                f"(a missing label is MISSING_LABEL = {MISSING_LABEL} or NaN) and valid_mask."
            )
        labelled = mask.nonzero().flatten()
        indices = labelled[:batch_size].tolist()
    else:
        indices = list(range(min(batch_size, n)))
    if in_memory is not None:  # as the trainer batches it: by indexing the tensors
        index = torch.as_tensor(indices, dtype=torch.long)
        x, y = in_memory[0][index], in_memory[1][index]
    else:
        x, y = _batch(where, split, ds, indices)
    for what, value in (("inputs", x), ("targets", y)):
        per_sample = (tuple(value.shape[1:]), value.dtype)
        seen = shapes.setdefault(what, (split, per_sample))
        if seen[1] != per_sample:
            raise TaskContractError(
                f"{where}: build_datasets(): the {split} {what} are {per_sample[1]} of shape {per_sample[0]} per sample but the "
                f"{seen[0]} {what} are {seen[1][1]} of shape {seen[1][0]}; every split must give the same kind of {what}."
            )
    declared = task.input_shape
    if declared is not None and tuple(declared) != tuple(x.shape[1:]):
        raise TaskContractError(f"{where}: input_shape is {tuple(declared)} but build_datasets() gives inputs of shape {tuple(x.shape[1:])}; fix one of them.")
    mask = _valid_mask(where, task, y, split)
    if not mask.any():
        raise TaskContractError(f"{where}: the first {len(y)} samples of the {split} split have no labelled sample per valid_mask; check its targets and valid_mask.")
    shared = task.input_key()
    # The inputs' shape in the key too: input_key's promise of identical inputs is checked only later.
    slot = None if shared is None else (shared, split, tuple(indices), tuple(x.shape), x.dtype)
    cached = None if slot is None else cache.get(slot)
    try:
        with torch.no_grad():
            features = trunk(x) if cached is None else cached
    except Exception as e:
        raise TaskContractError(
            f"{where}: its {split} inputs ({x.dtype}, shape {tuple(x.shape[1:])} per sample) cannot go through trunk "
            f"{type(trunk).__name__}: {first_line(e)}; give inputs the trunk takes (images as float tensors [C, H, W])."
        ) from e
    if slot is not None:
        cache[slot] = features
    features = features.detach().requires_grad_()
    output = call(where, f"head {type(head).__name__}", head, features)
    out_shape = tuple(output.shape[1:])
    if targets is not None:
        check_targets_fit(where, task, targets, out_shape, split)
    per_sample = call(where, "loss(output, target)", task.loss, output, _filled(y, mask), fix=_label_fix(task, y, out_shape))
    check_per_sample_loss(where, task, per_sample, mask, split, out_shape)
    total = call(where, "masked_loss(output, target)", task.masked_loss, output, y)
    if not isinstance(total, torch.Tensor) or total.dim() != 0 or not total.is_floating_point():
        raise TaskContractError(f"{where}: masked_loss(output, target) must return a float scalar tensor, got {summarize(total)}.")
    if not torch.isfinite(total):
        raise TaskContractError(f"{where}: masked_loss is {total.item()} on the {split} split's first batch; it must be finite.")
    if split == "train":
        check_differentiable(where, total, output)
    check_metric_updates(where, task, output.detach(), y, mask, split)


def _filled(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Targets with the missing ones replaced by 0, as ``masked_loss`` passes them to ``loss``."""
    return torch.where(mask.view(-1, *([1] * (target.dim() - 1))), target, torch.zeros_like(target))


def _label_fix(task: Task, target: torch.Tensor, out_shape: tuple) -> str:
    """A likely fix when class-index targets do not fit the head's class scores."""
    if not out_shape or target.dtype == torch.bool:
        return ""
    if target.is_floating_point():
        if target.dim() == 1 and out_shape[0] > 1:
            return f"the targets are {target.dtype} but the head gives {out_shape[0]} class scores: class indices are integers (labels.long())"
        return ""
    labels = target[target != MISSING_LABEL]
    if len(labels) and int(labels.max()) >= out_shape[0]:
        return f"labels reach {int(labels.max())} but the head has num_outputs={task.num_outputs} scores: set num_outputs to at least {int(labels.max()) + 1}"
    if len(labels) and int(labels.min()) < 0:
        return f"label {int(labels.min())} is negative; labels are 0..{out_shape[0] - 1}, a missing one is MISSING_LABEL ({MISSING_LABEL})"
    return ""


# A custom loss is also run once on every in-memory target with zero outputs (labels beyond
# the head's classes anywhere in a split), unless that costs more than this many values.
_FULL_TARGET_LIMIT = 2**22


def check_targets_fit(where: str, task: Task, targets: torch.Tensor, out_shape: tuple, split: str) -> None:
    """Every target of an in-memory split against the head's output and the task's loss."""
    try:
        task.check_targets(targets, out_shape)
    except ValueError as e:
        raise TaskContractError(f"{where}: {split} split: {e}") from None
    if type(task).check_targets is not Task.check_targets or len(targets) * math.prod(out_shape) > _FULL_TARGET_LIMIT:
        return
    mask = _valid_mask(where, task, targets, split)
    zeros = torch.zeros(len(targets), *out_shape)
    with torch.no_grad():
        call(where, f"loss(output, target) on the {split} split's targets", task.loss, zeros, _filled(targets, mask), fix=_label_fix(task, targets, out_shape))


def check_per_sample_loss(where: str, task: Task, loss: Any, mask: torch.Tensor, split: str, out_shape: tuple) -> None:
    n = len(mask)
    if not isinstance(loss, torch.Tensor):
        raise TaskContractError(f"{where}: loss(output, target) must return a tensor of {n} per-sample losses, got {summarize(loss)}; use reduction='none'.")
    if tuple(loss.shape) != (n,):
        hint = "use reduction='none' (the framework masks missing labels and averages)" if loss.dim() == 0 else (
            f"reduce each sample's values to one, e.g. .reshape({n}, -1).mean(dim=1)" if loss.dim() > 1 and loss.shape[0] == n else "return one value per sample"
        )
        raise TaskContractError(f"{where}: loss(output, target) must return shape [{n}] (one loss per sample), got {list(loss.shape)} on the {split} split; {hint}.")
    if not loss.is_floating_point():
        raise TaskContractError(f"{where}: loss(output, target) returned {loss.dtype} values; a loss must be a float tensor to train (no .long(), .int() or comparisons).")
    values = loss.detach()[mask]
    if not torch.isfinite(values).all():
        bad = values[~torch.isfinite(values)][0].item()
        raise TaskContractError(f"{where}: loss(output, target) is {bad} for a labelled sample of the {split} split's first batch; it must be finite (guard logs and divisions).")
    if (values < 0).any():
        raise TaskContractError(
            f"{where}: loss(output, target) is negative ({values.min().item():.4g}) on the {split} split's first batch; training minimises it, "
            "so a loss must be >= 0 (a negated loss trains the wrong way; weightings such as DWA, GLS and DB-MTL take ratios and logs of losses)."
        )


def check_differentiable(where: str, total: torch.Tensor, output: torch.Tensor) -> None:
    if not total.requires_grad:
        raise TaskContractError(
            f"{where}: the loss does not depend differentiably on the head's output (no gradient: .detach(), .item(), torch.tensor(...) "
            "or an integer step in loss); nothing would train. Compute the loss with torch operations on output."
        )
    (grad,) = torch.autograd.grad(total, output, allow_unused=True)
    if grad is None or not torch.isfinite(grad).all():
        raise TaskContractError(f"{where}: the loss's gradient w.r.t. the head's output is {'missing' if grad is None else 'not finite'}; nothing would train. Compute the loss with torch operations on output.")
    if total.item() > 0 and not grad.any():
        raise TaskContractError(
            f"{where}: the loss's gradient w.r.t. the head's output is zero on the first training batch although the loss is {total.item():.4g} "
            "(argmax, round or a comparison in loss?); nothing would train."
        )


def check_metric_updates(where: str, task: Task, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, split: str) -> None:
    """The metrics updated and computed as the evaluator does, on this batch's labelled samples."""
    metrics = check_metrics(where, task)
    scores = call(where, "metric_inputs(output)", task.metric_inputs, output)
    if not isinstance(scores, torch.Tensor) or len(scores) != len(output):
        raise TaskContractError(f"{where}: metric_inputs(output) must return a tensor with one row per sample ({len(output)}), got {summarize(scores)}.")
    for name, metric in metrics.items():
        call(where, f"metrics()[{name!r}].update(scores, target)", metric.update, scores[mask], target[mask])
        value = call(where, f"metrics()[{name!r}].compute()", metric.compute)
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise TaskContractError(
                f"{where}: metrics()[{name!r}].compute() must give one number, got {summarize(value)}; use a scalar reduction (e.g. average='macro')."
            ) from None
        if not math.isfinite(number):
            raise TaskContractError(f"{where}: metrics()[{name!r}] computed {number} on the {split} split's first batch; a metric must be finite on labelled data.")
