"""The task contract, checked before training on one real batch per split (mtl.contract).

Tasks here are named by import path (``test_contract:Name``) as a user's own module would be,
and built through ``build_components``, the path of both ``mtl validate`` and ``mtl train``.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from mtl import MISSING_LABEL, ClassificationTask, RegressionTask, Splits, Task, tensor_splits
from mtl.builders import build_components
from mtl.config import ConfigError, resolve
from mtl.contract import TaskContractError, check_batches, user_location
from mtl.heads import HEADS
from mtl.task import TASKS
from mtl.trunks import Trunk


def load_sklearn_digits(size):
    # Imported late: the task library registers itself when the registry first loads it.
    from tasks.digits import load_sklearn_digits

    return load_sklearn_digits(size)


class DigitParity(Task):
    """The README's "Define a task" example, verbatim but for the name."""

    num_outputs = 2
    default_head = "linear"
    primary_metric = "accuracy"

    def build_datasets(self):
        images, digits = load_sklearn_digits(size=28)
        return tensor_splits(images, digits % 2, self)

    def loss(self, output, target):
        return F.cross_entropy(output, target, reduction="none")

    def metrics(self):
        return {"accuracy": MulticlassAccuracy(num_classes=2, average="micro")}


def _components(cls_name: str, **node):
    cfg = resolve({"output_dir": "x", "trunk": {"name": "seed_net"}, "tasks": {"parity": {"name": f"test_contract:{cls_name}", **node}}})
    return build_components(cfg)


def _error(cls_name: str, **node) -> str:
    with pytest.raises(ConfigError) as info:
        _components(cls_name, **node)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"tasks.parity (test_contract:{cls_name})")
    return message


def test_the_readme_task_passes():
    parts = _components("DigitParity")
    assert set(parts.model.heads) == {"parity"}


# -- issue 14: validate said OK, train died with a traceback --------------------------


class TooFewOutputs(DigitParity):
    num_outputs = 2

    def build_datasets(self):
        images, digits = load_sklearn_digits(size=28)
        return tensor_splits(images, digits, self)  # labels 0..9


class MeanReduction(DigitParity):
    def loss(self, output, target):
        return F.cross_entropy(output, target)


def test_labels_beyond_num_outputs_name_the_fix():
    message = _error("TooFewOutputs")
    assert "loss(output, target)" in message and "set num_outputs to at least 10" in message
    assert "test_contract.py:" in message  # the user's own line, not torch's


def test_a_reduced_loss_names_reduction_none():
    message = _error("MeanReduction")
    assert "(one loss per sample), got []" in message and "reduction='none'" in message


# -- an exception in the user's code: one line, their file:line -----------------------


class LossRaises(DigitParity):
    def loss(self, output, target):
        return output[:, 0] * self.weights  # AttributeError: the user forgot to set weights


def test_an_exception_in_user_code_names_method_and_line():
    message = _error("LossRaises")
    assert "loss(output, target)" in message and "raised AttributeError" in message
    line = LossRaises.loss.__code__.co_firstlineno + 1
    assert f"test_contract.py:{line}" in message


def test_user_location_skips_library_frames():
    try:
        F.cross_entropy(torch.zeros(2, 2), torch.tensor([0, 5]))
    except IndexError as e:
        located = user_location(e)
    assert located is not None and located.endswith(f"test_contract.py:{test_user_location_skips_library_frames.__code__.co_firstlineno + 2}")


# -- wrong tasks that trained silently ------------------------------------------------


class DetachedLoss(DigitParity):
    def loss(self, output, target):
        return F.cross_entropy(output, target, reduction="none").detach()


class NegativeLoss(DigitParity):
    def loss(self, output, target):
        return -F.cross_entropy(output, target, reduction="none")


class LongLoss(DigitParity):
    def loss(self, output, target):
        return F.cross_entropy(output, target, reduction="none").long()


class NaNMetric(torchmetrics.Metric):
    higher_is_better = True

    def __init__(self):
        super().__init__()
        self.add_state("n", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, scores, target):
        self.n += len(target)

    def compute(self):
        return self.n * math.nan


class MetricNaN(DigitParity):
    def metrics(self):
        return {"accuracy": MulticlassAccuracy(num_classes=2), "odd": NaNMetric()}


class FractionInInit(DigitParity):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.train_fraction = 0


class OneTrainSample(DigitParity):
    def build_datasets(self):
        s = super().build_datasets()
        x, y = s.train.tensors
        return Splits(TensorDataset(x[:1], y[:1]), s.val, s.test)


def _all_missing(splits, split):
    ds = getattr(splits, split)
    setattr(splits, split, TensorDataset(ds.tensors[0], torch.full_like(ds.tensors[1], MISSING_LABEL)))
    return splits


class MissingTrain(DigitParity):
    def build_datasets(self):
        return _all_missing(super().build_datasets(), "train")


class MissingVal(DigitParity):
    def build_datasets(self):
        return _all_missing(super().build_datasets(), "val")


class LeakedTest(DigitParity):
    def build_datasets(self):
        s = super().build_datasets()
        x, y = s.train.tensors
        return Splits(s.train, s.val, TensorDataset(x.clone(), y.clone()))


@pytest.mark.parametrize(
    "cls_name, expected",
    [
        ("DetachedLoss", "does not depend differentiably on the head's output"),
        ("NegativeLoss", "is negative"),
        ("LongLoss", "returned torch.int64 values"),
        ("MetricNaN", "metrics()['odd'] computed nan"),
        ("FractionInInit", "__init__: train_fraction must be in (0, 1]"),
        ("OneTrainSample", "the train split has 1 sample"),
        ("MissingTrain", "the train split has no labelled sample"),
        ("MissingVal", "the val split has no labelled sample"),
        ("LeakedTest", "the train and test splits hold the same"),
    ],
)
def test_wrong_tasks_that_trained_silently_are_refused(cls_name, expected):
    assert expected in _error(cls_name)


class ValOverlaps(DigitParity):
    def build_datasets(self):
        s = super().build_datasets()
        (x, y), (tx, ty) = s.val.tensors, s.train.tensors
        return Splits(s.train, TensorDataset(torch.cat([x, tx[:3]]), torch.cat([y, ty[:3]])), s.test)


def test_a_partial_overlap_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mtl.contract"):
        _components("ValOverlaps")
    assert "splits overlap: 3 of the 183 val inputs occur in the train split" in caplog.text


# -- what the framework calls: methods, metrics, masks ------------------------------


class LossOneArgument(DigitParity):
    def loss(self, output):
        return output.sum(1)


class MetricFunction(DigitParity):
    def metrics(self):
        return {"accuracy": lambda output, target: (output.argmax(1) == target).float().mean()}


class Undirected(NaNMetric):
    higher_is_better = None


class MetricWithoutDirection(DigitParity):
    def metrics(self):
        return {"accuracy": MulticlassAccuracy(num_classes=2), "count": Undirected()}


class FloatMask(DigitParity):
    def valid_mask(self, target):
        return torch.ones(len(target))


class SharedMetrics(DigitParity):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._metrics = {"accuracy": MulticlassAccuracy(num_classes=2)}

    def metrics(self):
        return self._metrics


@pytest.mark.parametrize(
    "cls_name, expected",
    [
        ("LossOneArgument", "loss(output) cannot be called as the framework calls it"),
        ("MetricFunction", "must be a torchmetrics.Metric instance, got function"),
        ("MetricWithoutDirection", "has no direction"),
        ("FloatMask", "valid_mask(target) must return a bool tensor"),
        ("SharedMetrics", "returned the same 'accuracy' object twice"),
    ],
)
def test_methods_are_checked_as_the_framework_calls_them(cls_name, expected):
    assert expected in _error(cls_name)


# -- sizes as class attributes, and the shared task arguments -------------------------


class ParityClassification(ClassificationTask):
    num_classes = 2

    def build_datasets(self):
        images, digits = load_sklearn_digits(size=28)
        return tensor_splits(images, digits % 2, self)


class ThreeTargets(RegressionTask):
    num_outputs = 3

    def build_datasets(self):
        x = torch.randn(60, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        return tensor_splits(x, x.flatten(1)[:, :3], self)


def test_sizes_can_be_class_attributes():
    assert ParityClassification().num_outputs == 2
    assert ParityClassification(num_classes=3).num_outputs == 3  # the config wins
    assert ThreeTargets().num_outputs == 3  # not overwritten by the default of 1
    assert _components("ParityClassification").model.heads["parity"].num_outputs == 2
    with pytest.raises(ValueError, match="num_classes is missing"):
        ClassificationTask()


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train_fraction", True, "tasks.parity.train_fraction: expected int or float, got True (bool)"),
        ("train_fraction", 0, "tasks.parity: train_fraction must be in (0, 1]"),
        ("split_seed", -1, "split_seed"),
        ("split_seed", 2**32, "split_seed"),
        ("test_fraction", False, "tasks.parity.test_fraction: expected int or float, got False (bool)"),
    ],
)
def test_task_arguments_name_the_key(key, value, expected):
    with pytest.raises(ConfigError) as info:
        _components("DigitParity", **{key: value})
    assert expected in str(info.value)
    with pytest.raises(ValueError, match=key):
        DigitParity(**{key: value})


# -- every built-in task meets the contract; the check changes nothing ------------------


class Flatten(Trunk):
    """The smallest trunk that takes any input shape."""

    def __init__(self, in_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, 16)

    def forward(self, x):
        return self.fc(x.flatten(1).float())


BUNDLED = [n for n in TASKS.names() if not getattr(TASKS.get(n), "needs_data_root", False)]


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_task_meets_the_contract(name):
    task = TASKS.get(name)()
    task.name = name
    splits = task.build_datasets()
    x = splits.train[0][0]
    trunk = Flatten(x.numel())
    head = HEADS.get(task.head_config()["name"])((16,), task.num_outputs)
    check_batches(name, task, trunk, head, splits, 64)


def test_the_check_changes_no_weight_buffer_or_random_state():
    task = DigitParity()
    splits = task.build_datasets()
    trunk = Flatten(28 * 28)
    head = HEADS.get("mlp")((16,), 2, hidden=[8], dropout=0.5)
    head.train()
    before = {k: v.clone() for k, v in {**trunk.state_dict(), **head.state_dict()}.items()}
    rng = torch.random.get_rng_state()
    check_batches("parity", task, trunk, head, splits, 64)
    assert torch.equal(torch.random.get_rng_state(), rng)
    after = {**trunk.state_dict(), **head.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert head.training and trunk.training


def test_errors_are_config_errors():
    assert issubclass(TaskContractError, ConfigError)


@pytest.mark.parametrize(
    "name, node",
    [("celeba", {"size": 32}), ("celeba_attribute", {"attribute": "Smiling", "size": 32}), ("cifar10", {}), ("office31", {"domain": "amazon", "size": 16})],
)
def test_data_root_tasks_meet_the_contract_on_a_tiny_tree(tmp_path, name, node):
    from test_task_library_images import OFFICE31_CLASSES, write_celeba, write_cifar10, write_office

    write_celeba(tmp_path)
    write_cifar10(tmp_path)
    write_office(tmp_path, ("amazon", "dslr", "webcam"), OFFICE31_CLASSES)
    task = TASKS.get(name)(root=str(tmp_path), **node)
    splits = task.build_datasets()
    trunk = Flatten(splits.train[0][0].numel())
    head = HEADS.get(task.head_config()["name"])((16,), task.num_outputs)
    check_batches(name, task, trunk, head, splits, 64)


def test_split_comparison_is_exact_where_the_probe_columns_agree():
    from mtl.contract import _probe, _shared

    rows = torch.zeros(50, 784)
    rows[:, 700] = torch.arange(50.0)  # equal on almost every column, the probed ones too
    in_b, in_a = _shared(_probe(rows), _probe(torch.cat([rows[:5], rows[5:] + 1])))
    assert in_b.tolist() == [True] * 5 + [False] * 45 and in_a.tolist() == in_b.tolist()


def test_shared_input_tasks_run_the_trunk_once_per_split():
    calls = []

    class Counting(Flatten):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    tasks = {n: TASKS.get(f"multi_mnist_{n}")() for n in ("left", "right")}
    features = {}
    for name, task in tasks.items():
        splits = task.build_datasets()
        trunk = Counting(splits.train[0][0].numel())
        check_batches(name, task, trunk, HEADS.get("linear")((16,), 10), splits, 16, features)
    assert calls == [16, 16, 16]  # left's three splits; right reuses them
