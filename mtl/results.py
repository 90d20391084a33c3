"""Per-task results: evaluation over a split, model selection score, the printed table."""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from typing import Any

import torch
import torchmetrics
from torch.utils.data import Dataset

from mtl import checkpoint, distributed
from mtl.architectures import Architecture
from mtl.data import eval_batches, shared_input_groups, shared_inputs
from mtl.task import Task

# {task: {metric: value}}
TaskMetrics = dict[str, dict[str, float]]


@torch.no_grad()
def evaluate(
    model: Architecture,
    tasks: dict[str, Task],
    datasets: dict[str, Any],
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    groups: dict[str, list[str]] | None = None,
) -> TaskMetrics:
    """Streaming metrics (and the mean loss) of each task over its dataset; missing labels skipped.

    Tasks that share their inputs (``groups``, default ``mtl.data.shared_input_groups``: one
    ``input_key``, as the joint training loader groups them) are evaluated together: the
    trunk runs once per input batch and every member's head reads its features (one trunk
    call per batch instead of one per task: 40 times fewer for CelebA's attributes). Each head
    runs on its own, as it did with one trunk call per task, so the numbers do not change.
    Datasets that read files go through a DataLoader with ``num_workers`` workers, pinned
    when ``device`` is a GPU. No host sync per batch: the labels that mask the loss and the
    metrics are counted on the host, where the batches come from; losses are summed on the device.

    Under torchrun every rank evaluates its own contiguous share of each dataset (every
    sample once over all ranks, uneven sizes included), so every rank must call this; the
    loss sums of all tasks are reduced over ranks in one all-reduce (``mtl.distributed``),
    and each metric's states by torchmetrics' own synchronisation in ``compute`` (sum-type
    states would count a sample once per rank if every rank evaluated the whole split).
    Every rank returns the same results."""
    ctx = distributed.current()
    was_training = model.training
    model.eval()
    groups = shared_input_groups(tasks) if groups is None else groups
    metrics = {name: {k: m.to(device) for k, m in _metrics(task).items()} for name, task in tasks.items()}
    for metric in (m for task_metrics in metrics.values() for m in task_metrics.values()):
        metric.reset()
    # Per task: the labelled samples' loss sum and their number.
    sums = torch.zeros(len(tasks), 2, device=device)
    row = {name: i for i, name in enumerate(tasks)}
    pin = device.type == "cuda"
    for members in groups.values():
        dataset = _group_dataset(members, datasets)
        for x, *ys in eval_batches(dataset, batch_size, (ctx.rank, ctx.world), num_workers, pin):
            outputs = model.eval_outputs(x.to(device, non_blocking=True), members)
            for name, y_host in zip(members, ys):
                task = tasks[name]
                mask = task.valid_mask(y_host)  # on the host: counting it needs no device sync
                n = int(mask.sum())
                if n == 0:  # metrics reject empty batches; the loss sum gains 0
                    continue
                y = y_host.to(device, non_blocking=True)
                out = outputs[name].float()
                sums[row[name], 0] += task.masked_loss(out, y) * n
                sums[row[name], 1] += n
                scores = task.metric_inputs(out)
                if n < len(mask):
                    # index_select with host-made indices: boolean indexing on the device would sync.
                    keep = mask.nonzero().squeeze(1).to(device, non_blocking=True)
                    scores, y = scores.index_select(0, keep), y.index_select(0, keep)
                for metric in metrics[name].values():
                    metric.update(scores, y)
    # A mean over ranks keeps the ratio loss_sum / labelled of the sums (and 0 labelled stays 0).
    ctx.mean_([sums])
    results: TaskMetrics = {}
    for (name, task_metrics), (loss_sum, labelled) in zip(metrics.items(), sums.tolist()):
        if labelled == 0:  # the same on every rank: all or none of them synchronise the metrics
            results[name] = {k: math.nan for k in [*task_metrics, "loss"]}
            continue
        with warnings.catch_warnings():
            # A rank whose share holds no labelled sample has no update; its zero states still count.
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
            results[name] = {k: float(m.compute()) for k, m in task_metrics.items()}
        results[name]["loss"] = loss_sum / labelled
    model.train(was_training)
    return results


def _group_dataset(members: list[str], datasets: dict[str, Any]) -> Dataset:
    """One dataset of items ``(x, y_1, ..., y_k)`` for tasks that share their inputs; a
    ValueError naming them when their splits differ in size (then they cannot share inputs)."""
    sizes = {name: len(datasets[name]) for name in members}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"tasks {', '.join(members)} declare one input_key but their splits differ in size ({sizes}); shared-input "
            "tasks must build identical inputs (same data, size, split_seed and train_fraction)."
        )
    return shared_inputs([datasets[name] for name in members])


# Each task's metric objects, built once: building a classification task's two torchmetrics
# objects costs about 3 ms on a CPU, and the trainer evaluates and ranks (directions) every epoch.
_TASK_METRICS: weakref.WeakKeyDictionary[Task, dict[str, torchmetrics.Metric]] = weakref.WeakKeyDictionary()


def _metrics(task: Task) -> dict[str, torchmetrics.Metric]:
    """``task.metrics()``, built on the first call (an evaluation resets them before use)."""
    metrics = _TASK_METRICS.get(task)
    if metrics is None:
        metrics = _TASK_METRICS[task] = task.metrics()
    return metrics


def directions(tasks: dict[str, Task]) -> dict[str, dict[str, str]]:
    """``{task: {metric: "max" | "min"}}``; the loss is always "min"."""
    out = {}
    for name, task in tasks.items():
        out[name] = {k: "max" if m.higher_is_better else "min" for k, m in _metrics(task).items()}
        out[name]["loss"] = "min"
    return out


def selection_score(metrics: TaskMetrics, select_on: str, tasks: dict[str, Task]) -> float:
    """Higher is better. primary_mean: mean over tasks of the primary metric, negated where
    lower is better (meaningful when the primary metrics share a scale, e.g. accuracies);
    loss: minus the summed validation losses; task/metric: that metric, signed by direction."""
    dirs = directions(tasks)

    def signed(task: str, metric: str) -> float:
        value = metrics[task][metric]
        return value if dirs[task][metric] == "max" else -value

    if select_on == "primary_mean":
        # A task without a labelled validation sample (NaN) must not freeze the selection.
        values = [v for v in (signed(t, task.primary_metric) for t, task in tasks.items()) if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan
    if select_on == "loss":
        return -sum(m["loss"] for m in metrics.values())
    task, _, metric = select_on.partition("/")
    return signed(task, metric)


def flatten(split: str, metrics: TaskMetrics) -> dict[str, float]:
    """``{f"{split}/{task}/{metric}": value}``, the logged names."""
    return {f"{split}/{t}/{k}": v for t, ms in metrics.items() for k, v in ms.items()}


def format_table(results: dict[str, Any]) -> str:
    """Per-task table: one row per task and metric, one column per split."""
    splits = [s for s in ("train", "val", "test") if s in results["splits"]]
    rows = [["task", "metric", *splits]]
    for task, info in results["tasks"].items():
        for metric in info["directions"]:
            arrow = "↑" if info["directions"][metric] == "max" else "↓"
            star = "*" if metric == info["primary_metric"] else ""
            values = [results["splits"][s][task].get(metric, math.nan) for s in splits]
            rows.append([task, f"{metric}{star} {arrow}", *(f"{v:.4f}" for v in values)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _finite(data: Any) -> Any:
    # JSON has no NaN: a metric that could not be computed is written as null.
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def write_text(text: str, path: str | os.PathLike) -> None:
    """Atomic write (``mtl.checkpoint.write_atomic``, fsync included): a reader never sees half a file."""
    checkpoint.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(data: Any, path: str | os.PathLike) -> None:
    write_text(json.dumps(_finite(data), indent=2, allow_nan=False), path)
