"""Per-task results: evaluation over a split, model selection score, the printed table."""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torchmetrics

from mtl import checkpoint, distributed
from mtl.data import eval_batches
from mtl.model import MultiTaskModel
from mtl.task import Task

# {task: {metric: value}}
TaskMetrics = dict[str, dict[str, float]]


@torch.no_grad()
def evaluate(
    model: MultiTaskModel, tasks: dict[str, Task], datasets: dict[str, Any], batch_size: int, device: torch.device
) -> TaskMetrics:
    """Streaming metrics (and the mean loss) of each task over its dataset; missing labels skipped.

    Under torchrun every rank evaluates its own contiguous share of each dataset (every
    sample once over all ranks, uneven sizes included), so every rank must call this; the
    loss sums of all tasks are summed over ranks in one all-reduce, and each metric's states
    by torchmetrics' own synchronisation in ``compute`` (sum-type states would count a
    sample once per rank if every rank evaluated the whole split). Every rank returns the
    same results."""
    ctx = distributed.current()
    was_training = model.training
    model.eval()
    metrics = {name: {k: m.to(device) for k, m in _metrics(task).items()} for name, task in tasks.items()}
    for metric in (m for task_metrics in metrics.values() for m in task_metrics.values()):
        metric.reset()
    # Per task: the labelled samples' loss sum and their number.
    sums = torch.zeros(len(tasks), 2, device=device)
    for i, (name, task) in enumerate(tasks.items()):
        for x, y in eval_batches(datasets[name], batch_size, device, part=(ctx.rank, ctx.world)):
            out = model(x, [name])[name].float()
            scores = task.metric_inputs(out)
            mask = task.valid_mask(y)
            n = mask.sum()
            sums[i, 0] += task.masked_loss(out, y) * n
            sums[i, 1] += n
            if n.item() > 0:  # metrics reject empty batches; evaluation may sync
                for metric in metrics[name].values():
                    metric.update(scores[mask], y[mask])
    if ctx.active:
        dist.all_reduce(sums)
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
