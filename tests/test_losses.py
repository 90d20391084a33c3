"""Vectorized per-task losses equal each task's own masked_loss, in values and gradients."""

import math

import torch
import torch.nn.functional as F

from mtl.losses import task_losses
from mtl.task import MISSING_LABEL, ClassificationTask, MultiLabelTask, RegressionTask, masked_mean_loss


class Smoothed(ClassificationTask):
    """A task whose loss depends on the instance: never batched with the others."""

    def __init__(self, smoothing: float, **kwargs):
        super().__init__(4, **kwargs)
        self.smoothing = smoothing

    def loss(self, output, target):
        return F.cross_entropy(output, target, reduction="none", label_smoothing=self.smoothing)


def _check(tasks, outputs, targets):
    leaves = {n: o.detach().requires_grad_() for n, o in outputs.items()}
    batched = task_losses(tasks, leaves, targets)
    assert list(batched) == list(targets)
    torch.stack(list(batched.values())).sum().backward()
    got = {n: leaves[n].grad for n in leaves}
    leaves = {n: o.detach().requires_grad_() for n, o in outputs.items()}
    separate = {n: tasks[n].masked_loss(leaves[n], y) for n, y in targets.items()}
    torch.stack(list(separate.values())).sum().backward()
    for n in targets:
        torch.testing.assert_close(batched[n], separate[n])
        torch.testing.assert_close(got[n], leaves[n].grad)
    return batched


def test_classification_tasks_with_missing_labels():
    g = torch.Generator().manual_seed(0)
    tasks = {f"t{i}": ClassificationTask(4) for i in range(5)}
    outputs = {n: torch.randn(6, 4, generator=g) for n in tasks}
    targets = {n: torch.randint(0, 4, (6,), generator=g) for n in tasks}
    targets["t1"][:3] = MISSING_LABEL
    targets["t3"][:] = MISSING_LABEL  # no label at all: loss 0, as masked_loss gives
    losses = _check(tasks, outputs, targets)
    assert losses["t3"].item() == 0.0
    # By hand for t1: the mean cross-entropy of its 3 labelled samples.
    expected = F.cross_entropy(outputs["t1"][3:], targets["t1"][3:])
    assert math.isclose(losses["t1"].item(), expected.item(), rel_tol=1e-6)


def test_multilabel_regression_and_mixed_kinds():
    g = torch.Generator().manual_seed(1)
    tasks = {"a": MultiLabelTask(3), "b": MultiLabelTask(3), "r": RegressionTask(2), "s": RegressionTask(2), "c": ClassificationTask(3)}
    outputs = {n: torch.randn(5, 3 if n in "abc" else 2, generator=g) for n in tasks}
    targets = {
        "a": torch.randint(0, 2, (5, 3), generator=g).float(),
        "b": torch.randint(0, 2, (5, 3), generator=g).float(),
        "r": torch.randn(5, 2, generator=g),
        "s": torch.randn(5, 2, generator=g),
        "c": torch.randint(0, 3, (5,), generator=g),
    }
    targets["b"][1] = float("nan")
    targets["s"][0, 1] = float("nan")
    _check(tasks, outputs, targets)


def test_a_task_with_its_own_loss_keeps_it():
    g = torch.Generator().manual_seed(2)
    tasks = {"plain": ClassificationTask(4), "smooth": Smoothed(0.2), "smooth2": Smoothed(0.0)}
    outputs = {n: torch.randn(6, 4, generator=g) for n in tasks}
    targets = {n: torch.randint(0, 4, (6,), generator=g) for n in tasks}
    losses = _check(tasks, outputs, targets)
    assert losses["smooth"].item() != losses["smooth2"].item()


def test_masked_mean_loss_by_hand():
    """Two regression tasks stacked as groups of two rows: squared errors 1, (unlabelled) and
    9, 16; means 1 (one labelled sample) and 12.5; the whole batch's mean is 26/3."""
    task = RegressionTask(1)
    output = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    torch.testing.assert_close(masked_mean_loss(task, output, target, groups=2), torch.tensor([1.0, 12.5]))
    torch.testing.assert_close(masked_mean_loss(task, output, target), torch.tensor(26 / 3))
    assert masked_mean_loss(task, output[1:2], target[1:2]).item() == 0.0  # nothing labelled
