"""The task contract, for every registered task, and the Task base's masking of missing labels."""

import pytest
import torch
import torch.nn.functional as F

from mtl.builders import build_heads, build_tasks
from mtl.config import resolve
from mtl.heads import HEADS
from mtl.results import evaluate
from mtl.task import MISSING_LABEL, TASKS, ClassificationTask, RegressionTask
from mtl.trunks import TRUNKS


# Tasks whose data is not bundled with a pip package are checked on tiny trees in their
# real layout by tests/test_task_library_*.py.
BUNDLED = [n for n in TASKS.names() if not getattr(TASKS.get(n), "needs_data_root", False)]


@pytest.fixture(scope="module", params=BUNDLED)
def task_and_splits(request):
    task = TASKS.get(request.param)()
    task.name = request.param
    return task, task.build_datasets()


def test_datasets_are_nonempty_and_shaped_as_declared(task_and_splits):
    task, splits = task_and_splits
    for split, ds in splits.items():
        assert len(ds) > 0, split
        x, y = ds[0]
        if task.input_shape is not None:
            assert tuple(x.shape) == tuple(task.input_shape)


def test_split_sizes_follow_the_fractions_and_are_stable(task_and_splits):
    task, splits = task_and_splits
    n = sum(len(ds) for _, ds in splits.items())
    assert len(splits.val) == round(n * task.val_fraction)
    assert len(splits.test) == round(n * task.test_fraction)
    again = type(task)()
    for (_, a), (_, b) in zip(splits.items(), again.build_datasets().items()):
        assert torch.equal(a.tensors[1], b.tensors[1]) and torch.equal(a.tensors[0], b.tensors[0])


def test_head_loss_and_metrics_fit_the_data(task_and_splits):
    task, splits = task_and_splits
    x, y = splits.train.tensors[0][:8], splits.train.tensors[1][:8]
    head = HEADS.get(task.head_config()["name"])((50,), task.num_outputs)
    out = head(torch.randn(len(x), 50))
    loss = task.masked_loss(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    metrics = task.metrics()
    assert task.primary_metric in metrics
    for name, metric in metrics.items():
        assert metric.higher_is_better is not None, name
        metric.update(out.detach(), y)
        assert torch.isfinite(metric.compute())


class ToyClassification(ClassificationTask):
    def __init__(self):
        super().__init__(num_classes=3)


def test_missing_labels_count_in_neither_loss_nor_metrics():
    task = ToyClassification()
    out = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [5.0, 0.0, 0.0]])
    y = torch.tensor([0, 2, MISSING_LABEL, MISSING_LABEL])
    expected = F.cross_entropy(out[:2], y[:2])
    assert torch.allclose(task.masked_loss(out, y), expected)
    all_missing = torch.full((4,), MISSING_LABEL)
    assert task.masked_loss(out, all_missing).item() == 0.0


def test_nan_targets_are_missing_for_float_tasks():
    task = RegressionTask()
    out = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([1.5, float("nan"), 2.0])
    assert torch.allclose(task.masked_loss(out, y), torch.tensor((0.25 + 1.0) / 2))


def test_evaluate_skips_missing_labels():
    from torch.utils.data import TensorDataset

    from mtl.model import MultiTaskModel

    task = ToyClassification()
    task.name = "toy"

    class Identity(TRUNKS.base):
        def forward(self, x):
            return x

    class Pass(torch.nn.Module):
        def forward(self, x):
            return x

    model = MultiTaskModel(Identity(), {"toy": Pass()})
    logits = torch.eye(3).repeat(2, 1)  # predicts 0,1,2,0,1,2
    y = torch.tensor([0, 1, 0, MISSING_LABEL, MISSING_LABEL, MISSING_LABEL])
    res = evaluate(model, {"toy": task}, {"toy": TensorDataset(logits, y)}, 4, torch.device("cpu"))
    assert res["toy"]["accuracy"] == pytest.approx(2 / 3)


def test_task_fraction_arguments_are_checked():
    with pytest.raises(ValueError, match="train_fraction"):
        ClassificationTask(num_classes=2, train_fraction=0)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        ClassificationTask(num_classes=2, val_fraction=0.5, test_fraction=0.5)


def test_train_fraction_keeps_a_seeded_share():
    cfg = resolve({"output_dir": "x", "trunk": {"name": "seed_net"}, "tasks": {"digits": {"train_fraction": 0.1}}})
    tasks, _ = build_tasks(cfg)
    full = TASKS.get("digits")().build_datasets()
    part = tasks["digits"].build_datasets()
    per_class = torch.bincount(full.train.tensors[1])
    assert len(part.train) == sum(max(1, round(int(n) * 0.1)) for n in per_class)  # stratified
    assert set(part.train.tensors[1].tolist()) == set(range(10))
    assert torch.equal(part.test.tensors[1], full.test.tensors[1])


def test_head_override_merges_into_the_default_head():
    cfg = resolve(
        {"output_dir": "x", "trunk": {"name": "seed_net"}, "tasks": {"mnist": {"head": {"name": "mlp", "hidden": [50]}}, "digits": {"head": {"dropout": 0.3}}}}
    )
    tasks, heads = build_tasks(cfg)
    # A named head is the config's own node (with the resolved defaults); an unnamed one tunes the task's default head.
    assert heads == {"mnist": {"name": "mlp", "hidden": [50], "dropout": 0.0}, "digits": {"name": "linear", "dropout": 0.3}}
    trunk = TRUNKS.get("seed_net")()
    splits = {n: t.build_datasets() for n, t in tasks.items()}
    built = build_heads(trunk, tasks, heads, splits)
    assert type(built["mnist"]).__name__ == "MLPHead"


def test_multilabel_metrics_see_probabilities():
    from mtl.task import MultiLabelTask

    task = MultiLabelTask(num_labels=2)
    metric = task.metrics()["accuracy"]
    logits = torch.tensor([[0.2, 0.9], [0.1, 0.3]])  # all inside [0, 1]: still logits, all positive
    metric.update(task.metric_inputs(logits), torch.tensor([[1, 1], [1, 1]]))
    assert metric.compute() == 1.0
