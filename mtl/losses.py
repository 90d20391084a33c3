"""The per-task losses of a step, tasks with the same loss function in one vectorized op.

``Task.masked_loss`` computes one task's mean loss over its labelled samples
(``mtl.task.masked_mean_loss``, which also serves the stacked case here). With many
tasks of one kind (T classification heads of one shape, as in multi-attribute or
multi-digit problems), T separate calls cost T sets of kernel launches; here the outputs
``[T, B, ...]`` and targets of such tasks are stacked and their losses computed at once,
giving the same ``[T]`` values and gradients. Tasks whose class overrides the loss or the
masking keep their own ``masked_loss`` (their loss may depend on the instance).
"""

from __future__ import annotations

import torch

from mtl.task import ClassificationTask, MultiLabelTask, RegressionTask, Task, masked_mean_loss

# Losses that depend on the output and target only, so one task's function serves all.
_PURE_LOSSES = {ClassificationTask.loss, MultiLabelTask.loss, RegressionTask.loss}


def _group_key(task: Task, output: torch.Tensor, target: torch.Tensor) -> tuple | None:
    cls = type(task)
    if cls.loss not in _PURE_LOSSES or cls.masked_loss is not Task.masked_loss or cls.valid_mask is not Task.valid_mask:
        return None
    return (cls.loss, output.shape, output.dtype, output.device, target.shape, target.dtype)


def task_losses(tasks: dict[str, Task], outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each task's masked mean loss, in ``targets``' order; equal to ``tasks[t].masked_loss``."""
    groups: dict[tuple, list[str]] = {}
    for name, target in targets.items():
        key = _group_key(tasks[name], outputs[name], target)
        groups.setdefault(key if key is not None else (name,), []).append(name)
    losses: dict[str, torch.Tensor] = {}
    for names in groups.values():
        if len(names) == 1:
            losses[names[0]] = tasks[names[0]].masked_loss(outputs[names[0]], targets[names[0]])
            continue
        output = torch.stack([outputs[n] for n in names]).flatten(0, 1)
        target = torch.stack([targets[n] for n in names]).flatten(0, 1)
        means = masked_mean_loss(tasks[names[0]], output, target, groups=len(names))
        losses.update(zip(names, means.unbind(0)))
    return {n: losses[n] for n in targets}
