"""evaluate(): each task's metric objects are built once and reset before every evaluation."""

import pytest
import torch
from torch.utils.data import TensorDataset

from mtl.model import MultiTaskModel
from mtl.results import directions, evaluate
from mtl.task import ClassificationTask
from mtl.trunks import TRUNKS


class Identity(TRUNKS.base):
    def forward(self, x):
        return x


class Pass(torch.nn.Module):
    def forward(self, x):
        return x


class CountingTask(ClassificationTask):
    built = 0

    def metrics(self):
        CountingTask.built += 1
        return super().metrics()


def test_metrics_are_built_once_and_reset_between_evaluations():
    task = CountingTask(num_classes=3)
    model = MultiTaskModel(Identity(), {"toy": Pass()})
    cpu = torch.device("cpu")
    right = TensorDataset(torch.eye(3), torch.tensor([0, 1, 2]))
    wrong = TensorDataset(torch.eye(3), torch.tensor([1, 2, 0]))
    CountingTask.built = 0
    first = evaluate(model, {"toy": task}, {"toy": right}, 2, cpu)
    assert directions({"toy": task}) == {"toy": {"accuracy": "max", "macro_f1": "max", "loss": "min"}}
    second = evaluate(model, {"toy": task}, {"toy": wrong}, 2, cpu)
    third = evaluate(model, {"toy": task}, {"toy": right}, 2, cpu)
    assert CountingTask.built == 1
    assert first["toy"]["accuracy"] == third["toy"]["accuracy"] == 1.0
    assert second["toy"]["accuracy"] == 0.0  # nothing left over from the first evaluation
    assert first["toy"]["loss"] == pytest.approx(third["toy"]["loss"])
