"""evaluate(): metric objects built once and reset before every evaluation; one trunk call per
shared input batch, with the numbers of a per-task evaluation."""

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from mtl.heads import LinearHead
from mtl.model import MultiTaskModel
from mtl.results import directions, evaluate
from mtl.task import MISSING_LABEL, ClassificationTask
from mtl.trunks import TRUNKS, build_trunk


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


# --- one trunk call per shared input batch ---------------------------------------------------------


class Attribute(ClassificationTask):
    """Tasks of one input_key share their inputs, as CelebA's attributes do."""

    def input_key(self):
        return "faces"


class Faces(Dataset):
    """The same samples as a file dataset would serve them (no tensors behind it)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def target(self, i):
        return self.y[i]


def shared_case(file_datasets: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g)
    labels = {f"a{i}": torch.randint(0, 3, (10,), generator=g) for i in range(3)}
    labels["a1"][[2, 7]] = MISSING_LABEL  # partial labels: a batch of 4 holds 3, another 4
    labels["a2"][4:8] = MISSING_LABEL  # a batch without a label
    tasks = {name: Attribute(num_classes=3) for name in labels}
    tasks["alone"] = ClassificationTask(num_classes=3)  # no input_key: its own trunk calls
    labels["alone"] = torch.randint(0, 3, (10,), generator=g)
    make = Faces if file_datasets else TensorDataset
    datasets = {name: make(x, y) for name, y in labels.items()}
    torch.manual_seed(0)
    trunk = build_trunk({"name": "mlp", "in_features": 4, "hidden": [8]})
    model = MultiTaskModel(trunk, {name: LinearHead((8,), 3) for name in tasks})
    return model, tasks, datasets


@pytest.mark.parametrize("file_datasets", [False, True], ids=["tensors", "files"])
def test_shared_inputs_run_the_trunk_once_per_batch_with_the_per_task_numbers(file_datasets):
    model, tasks, datasets = shared_case(file_datasets)
    cpu = torch.device("cpu")
    # The reference: each task alone, one trunk call per task and batch.
    reference = {name: evaluate(model, {name: task}, {name: datasets[name]}, 4, cpu)[name] for name, task in tasks.items()}
    calls = []
    handle = model.trunk.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        together = evaluate(model, tasks, datasets, 4, cpu)
    finally:
        handle.remove()
    assert together == reference  # exactly: the same features and heads, batch for batch
    # Batches of 4, 4, 2: once for the three attributes, once for the task alone.
    assert calls == [4, 4, 2] * 2
    assert 0 < together["a2"]["loss"] and together["a1"]["accuracy"] != together["a0"]["accuracy"]


def test_tasks_of_one_input_key_with_splits_of_other_sizes_are_refused():
    model, tasks, datasets = shared_case(False)
    datasets["a1"] = TensorDataset(torch.zeros(9, 4), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tasks a0, a1, a2 declare one input_key but their splits differ in size"):
        evaluate(model, tasks, datasets, 4, torch.device("cpu"))
