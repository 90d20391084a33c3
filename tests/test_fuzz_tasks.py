"""Malformed task classes, written as a user would after the README's "Define a task".

Each case is the README's DigitParity with one mistake (a mutation kind and a parameter),
written to a file and named by import path in a config; ``mtl validate`` and, when that
passes, a two-step ``mtl train`` run in this process. A case must end in exit 0, or in exit 2
with at most 3 lines on stderr and no traceback, within a time limit; and a mistake must
never be accepted. Hypothesis draws the cases: MTL_FUZZ_EXAMPLES sets how many (default 25).
``python tests/test_fuzz_tasks.py`` runs every case once and prints the counts per outcome.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_harness import run_cli

TEMPLATE = '''
import math

import torch
import torch.nn.functional as F
import torchmetrics
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from mtl import MISSING_LABEL, ClassificationTask, RegressionTask, Splits, Task, tensor_splits
from tasks.digits import load_sklearn_digits


class Odd(torchmetrics.Metric):
    """A metric of the user's own: the share of odd predictions."""

    higher_is_better = {direction}

    def __init__(self):
        super().__init__()
        self.add_state("odd", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, scores, target):
        self.odd += (scores.argmax(1) % 2).sum()
        self.n += len(target)

    def compute(self):
        return {compute}


class Parity({base}):
    """Is the digit odd? sklearn digits at 28x28, two classes."""

{attrs}
{init}
{datasets_def}
        images, digits = load_sklearn_digits(size=28)
        labels = digits % 2
{data}
        s = tensor_splits(images, labels, self)
{after}
        return {splits}

{loss_def}
{loss}

{metrics_def}
        return {metrics}
{extra}
'''

DEFAULTS = {
    "base": "Task",
    "direction": "True",
    "compute": "self.odd / self.n",
    "attrs": '    num_outputs = 2\n    default_head = "linear"\n    primary_metric = "accuracy"',
    "init": "",
    "data": "",
    "after": "",
    "splits": "s",
    "loss_def": "    def loss(self, output, target):",
    "loss": '        return F.cross_entropy(output, target, reduction="none")',
    "metrics": '{"accuracy": MulticlassAccuracy(num_classes=2, average="micro")}',
    "metrics_def": "    def metrics(self):",
    "datasets_def": "    def build_datasets(self):",
    "extra": "",
}
LOSS = 'F.cross_entropy(output, target, reduction="none")'
ATTRS = DEFAULTS["attrs"]


@dataclass(frozen=True)
class Case:
    kind: str
    param: str
    slots: dict = field(hash=False, compare=False)
    wrong: bool = True  # a mistake, which must not train
    overrides: tuple = ()

    def source(self) -> str:
        return TEMPLATE.format(**{**DEFAULTS, **self.slots})


def _loss(expr: str) -> dict:
    return {"loss": f"        return {expr}"}


def _data(line: str) -> dict:
    return {"data": textwrap.indent(line, " " * 8)}


def _after(line: str) -> dict:
    return {"after": textwrap.indent(line, " " * 8)}


def _replace_split(split: str, expr: str) -> dict:
    """Replace one split's targets after the split: ``expr`` of ``y`` (that split's targets)."""
    return _after(f"x, y = s.{split}.tensors\ns.{split} = TensorDataset(x, {expr})")


def _metric_class(direction: str = "True", compute: str = "self.odd / self.n") -> dict:
    return {"direction": direction, "compute": compute, "metrics": '{"accuracy": MulticlassAccuracy(num_classes=2, average="micro"), "odd": Odd()}'}


def _cases() -> list[Case]:
    cases = []

    def add(kind: str, params: dict[str, dict], wrong: bool = True) -> None:
        cases.extend(Case(kind, p, slots, wrong) for p, slots in params.items())

    # Correct tasks: the README's and its documented variants must train.
    add("ok", {
        "readme": {},
        "classification_task_num_classes_attribute": {"base": "ClassificationTask", "attrs": "    num_classes = 2", "loss_def": "", "loss": "", "metrics": 'super().metrics()'},
        "partial_labels_10pct": _data("labels[::10] = MISSING_LABEL"),
        "partial_labels_90pct": _data("labels[torch.arange(len(labels)) % 10 != 0] = MISSING_LABEL"),
        "label_smoothing": _loss('F.cross_entropy(output, target, reduction="none", label_smoothing=0.1)'),
        "own_metric_too": _metric_class(),
        "lower_is_better_metric": _metric_class(direction="False"),
        "f1_too": {"metrics": '{"accuracy": MulticlassAccuracy(num_classes=2, average="micro"), "f1": MulticlassF1Score(num_classes=2, average="macro")}'},
        "regression": {"base": "RegressionTask", "attrs": "", "data": textwrap.indent("labels = digits.float()", " " * 8), "loss_def": "", "loss": "", "metrics": "super().metrics()"},
        "val_overlaps_train_a_little": _after("x, y = s.val.tensors\ntx, ty = s.train.tensors\ns.val = TensorDataset(torch.cat([x, tx[:3]]), torch.cat([y, ty[:3]]))"),
        "mlp_head": {"attrs": ATTRS.replace('"linear"', '"mlp"')},
    }, wrong=False)
    cases.append(Case("ok", "classification_task_num_classes_in_config", {"base": "ClassificationTask", "attrs": "", "loss_def": "", "loss": "", "metrics": "super().metrics()"}, False, ("tasks.x.num_classes=2",)))

    add("loss_signature", {
        "one_argument": {"loss_def": "    def loss(self, output):", "loss": "        return output.sum(1)"},
        "three_arguments": {"loss_def": "    def loss(self, output, target, weight):"},
        "no_self": {"loss_def": "    @staticmethod\n    def loss(output):", "loss": "        return output.sum(1)"},
        "not_a_method": {"loss_def": "    loss = 0.5", "loss": ""},
    })
    add("loss_raises", {e: {"loss": f"        raise {e}('my loss failed')"} for e in ("RuntimeError", "ValueError", "KeyError", "TypeError", "NotImplementedError")} | {
        "zero_division": _loss("1 / 0"),
        "attribute": _loss("self.weights * output"),
        "index": _loss("output[:, 5]"),
        "import": {"loss": "        import not_a_module_xyz\n        return output"},
    })
    add("loss_reduction", {r: _loss(f'F.cross_entropy(output, target, reduction="{r}")') for r in ("mean", "sum")} | {
        "default_reduction": _loss("F.cross_entropy(output, target)"),
        "mean_of_per_sample": _loss(f"{LOSS}.mean()"),
    })
    add("loss_shape", {
        "column": _loss(f"{LOSS}[:, None]"),
        "per_class": _loss("-F.log_softmax(output, dim=1)"),
        "first_only": _loss(f"{LOSS}[:1]"),
        "doubled": _loss(f"torch.cat([{LOSS}, {LOSS}])"),
        "per_output": _loss("(output - F.one_hot(target, 2).float()) ** 2"),
    })
    add("loss_dtype", {
        "long": _loss(f"{LOSS}.long()"), "int": _loss(f"{LOSS}.int()"), "bool": _loss(f"{LOSS} > 0"),
        "rounded_long": _loss(f"{LOSS}.round().to(torch.int64)"),
    })
    add("loss_detached", {
        "detach": _loss(f"{LOSS}.detach()"),
        "new_tensor": _loss(f"torch.tensor({LOSS}.tolist())"),
        "data": _loss(f"{LOSS}.data"),
        "rewrapped": _loss(f"{LOSS}.detach().clone().requires_grad_()"),
        "no_grad": {"loss": f"        with torch.no_grad():\n            return {LOSS}"},
        "argmax": _loss("(output.argmax(1) != target).float()"),
        "round": _loss("(output.softmax(1)[:, 1].round() - target).abs()"),
    })
    add("loss_negative", {
        "negated": _loss(f"-{LOSS}"), "times_minus_two": _loss(f"-2 * {LOSS}"), "log_prob": _loss("F.log_softmax(output, 1).gather(1, target[:, None])[:, 0]"),
        "shifted": _loss(f"{LOSS} - 10"),
    })
    add("loss_nonfinite", {
        "nan": _loss(f"{LOSS} + float('nan')"), "inf": _loss(f"{LOSS} + float('inf')"), "divide_by_zero": _loss(f"{LOSS} / 0"),
        "log_zero": _loss(f"{LOSS} - torch.log(output[:, 0] * 0)"),
    })
    add("loss_not_tensor", {
        "item": _loss(f"{LOSS}.sum().item()"), "list": _loss(f"{LOSS}.tolist()"), "none": _loss("None"), "number": _loss("1.0"),
        "tuple": _loss(f"({LOSS}, 0)"), "dict": _loss(f"{{'ce': {LOSS}}}"),
    })
    add("labels_float", {
        "float": _data("labels = labels.float()"), "double": _data("labels = labels.double()"),
        "halves": {"base": "ClassificationTask", "attrs": "    num_classes = 2", "loss_def": "", "loss": "", "metrics": "super().metrics()", **_data("labels = labels.float() + 0.5")},
        "one_hot": _data("labels = F.one_hot(labels, 2)"),
    })
    add("labels_beyond", {
        **{f"digits_num_outputs_{k}": {"attrs": ATTRS.replace("= 2", f"= {k}"), **_data("labels = digits"),
                                       "metrics": f'{{"accuracy": MulticlassAccuracy(num_classes={k}, average="micro")}}'} for k in (2, 5, 9)},
        "plus_one": _data("labels = labels + 1"),
        "one_in_test": _replace_split("test", "torch.where(torch.arange(len(y)) == len(y) - 1, 7, y)"),
        "classification_task": {"base": "ClassificationTask", "attrs": "    num_classes = 2", "loss_def": "", "loss": "", "metrics": "super().metrics()", **_data("labels = digits")},
    })
    add("labels_negative", {"minus_one": _data("labels = labels - 1"), "minus_two_some": _data("labels[::7] = -2")})
    add("labels_missing", {
        "all": _data("labels = torch.full_like(labels, MISSING_LABEL)"),
        **{split: _replace_split(split, "torch.full_like(y, MISSING_LABEL)") for split in ("train", "val", "test")},
    })
    add("splits_not_disjoint", {
        "train_train_test": {"splits": "Splits(s.train, s.train, s.test)"},
        "train_val_train": {"splits": "Splits(s.train, s.val, s.train)"},
        "val_twice": {"splits": "Splits(s.train, s.val, s.val)"},
        "all_data_thrice": {"after": textwrap.indent("full = TensorDataset(images, labels)", " " * 8), "splits": "Splits(full, full, full)"},
        "test_copy_of_train": {"after": textwrap.indent("x, y = s.train.tensors", " " * 8), "splits": "Splits(s.train, s.val, TensorDataset(x.clone(), y.clone()))"},
    })
    add("train_too_small", {
        "one_sample": _after("x, y = s.train.tensors\ns.train = TensorDataset(x[:1], y[:1])"),
        "empty": _after("x, y = s.train.tensors\ns.train = TensorDataset(x[:0], y[:0])"),
    })
    add("shared_argument_in_init", {
        f"{k}_{v}": {"init": f"    def __init__(self, **kwargs):\n        super().__init__(**kwargs)\n        self.{k} = {v}\n"}
        for k, v in (("train_fraction", "0"), ("train_fraction", "-0.5"), ("train_fraction", "True"), ("val_fraction", "0"), ("split_seed", "-1"), ("test_fraction", "1"))
    })
    add("metrics_wrong", {
        "list": {"metrics": "[MulticlassAccuracy(num_classes=2)]"},
        "function": {"metrics": '{"accuracy": lambda o, t: (o.argmax(1) == t).float().mean()}'},
        "number": {"metrics": '{"accuracy": 0.5}'},
        "class_not_instance": {"metrics": '{"accuracy": MulticlassAccuracy}'},
        "empty": {"metrics": "{}"},
        "none": {"metrics": "None"},
        "bare_metric": {"metrics": "MulticlassAccuracy(num_classes=2)"},
        "shared_instance": {"metrics": "self._m", "init": "    def __init__(self, **kwargs):\n        super().__init__(**kwargs)\n        self._m = {'accuracy': MulticlassAccuracy(num_classes=2)}\n"},
        "vector_metric": {"metrics": '{"accuracy": MulticlassAccuracy(num_classes=2, average="none")}'},
    })
    add("metric_direction", {"none": _metric_class(direction="None"), "string": _metric_class(direction="'yes'")})
    add("metric_value", {
        "nan": _metric_class(compute="torch.tensor(float('nan'))"), "inf": _metric_class(compute="self.odd / 0"),
        "raises": _metric_class(compute="self.missing"), "vector": _metric_class(compute="torch.stack([self.odd, self.n])"),
        "string": _metric_class(compute="'high'"),
    })
    add("primary_metric", {
        p: {"attrs": ATTRS.replace('primary_metric = "accuracy"', f"primary_metric = {p}")} for p in ('"acc"', '"Accuracy"', "3", "None")
    } | {"missing": {"attrs": ATTRS.replace('    primary_metric = "accuracy"', "")}})
    add("missing_method", {
        "loss": {"loss_def": "", "loss": ""},
        "metrics": {"metrics_def": "    def metric(self):"},
        "build_datasets": {"datasets_def": "    def build_dataset(self):"},
    })
    add("num_outputs", {
        p: {"attrs": ATTRS.replace("num_outputs = 2", f"num_outputs = {p}")} for p in ("0", "-1", '"2"', "2.5", "None", "True")
    } | {"missing": {"attrs": ATTRS.replace("    num_outputs = 2\n", "")}})
    add("valid_mask", {
        "float": {"extra": "\n    def valid_mask(self, target):\n        return torch.ones(len(target))"},
        "all_false": {"extra": "\n    def valid_mask(self, target):\n        return torch.zeros(len(target), dtype=torch.bool)"},
        "column": {"extra": "\n    def valid_mask(self, target):\n        return (target != MISSING_LABEL)[:, None]"},
        "raises": {"extra": "\n    def valid_mask(self, target):\n        raise RuntimeError('no mask')"},
        "none": {"extra": "\n    def valid_mask(self, target):\n        return None"},
        "wrong_length": {"extra": "\n    def valid_mask(self, target):\n        return (target != MISSING_LABEL)[1:]"},
    })
    add("build_datasets_wrong", {
        "raises": _data("raise RuntimeError('download failed')"),
        "tuple": {"splits": "(s.train, s.val, s.test)"},
        "none": {"splits": "None"},
        "dict": {"splits": "{'train': s.train, 'val': s.val, 'test': s.test}"},
        "lists_of_numbers": {"splits": "Splits([1, 2, 3], [4, 5], [6, 7])"},
        "inputs_only": {"splits": "Splits(*(TensorDataset(d.tensors[0]) for _, d in s.items()))"},
        "key_error": _data("labels = {}['labels']"),
    })
    add("inputs_wrong", {
        "uint8": _data("images = (images * 255).to(torch.uint8)"),
        "long": _data("images = images.long()"),
        "double": _data("images = images.double()"),
        "no_channel": _data("images = images[:, 0]"),
        "val_other_size": _after("x, y = s.val.tensors\ns.val = TensorDataset(x[..., :20, :20], y)"),
        "declared_shape_differs": {"attrs": ATTRS + "\n    input_shape = (1, 32, 32)"},
    })
    add("init_wrong", {
        "raises": {"init": "    def __init__(self, **kwargs):\n        super().__init__(**kwargs)\n        raise RuntimeError('boom')\n"},
        "zero_division": {"init": "    def __init__(self, **kwargs):\n        super().__init__(**kwargs)\n        self.scale = 1 / 0\n"},
        "unknown_super_argument": {"init": "    def __init__(self, **kwargs):\n        super().__init__(foo=1, **kwargs)\n"},
        "no_super": {"init": "    def __init__(self, **kwargs):\n        self.scale = 2\n"},
    })
    add("metric_inputs", {
        "raises": {"extra": "\n    def metric_inputs(self, output):\n        raise ValueError('no scores')"},
        "one_row": {"extra": "\n    def metric_inputs(self, output):\n        return output[:1]"},
        "none": {"extra": "\n    def metric_inputs(self, output):\n        return None"},
    })
    add("head_config", {
        "string": {"extra": "\n    def head_config(self):\n        return 'linear'"},
        "unknown_head": {"extra": "\n    def head_config(self):\n        return {'name': 'nope'}"},
        "negative_hidden": {"extra": "\n    def head_config(self):\n        return {'name': 'mlp', 'hidden': [-1]}"},
        "raises": {"extra": "\n    def head_config(self):\n        raise KeyError('head')"},
    })
    add("input_key", {
        "unhashable": {"extra": "\n    def input_key(self):\n        return ['digits']"},
        "raises": {"extra": "\n    def input_key(self):\n        raise RuntimeError('no key')"},
    })
    # Task arguments in the config, on the README's task.
    cases.extend(
        Case("config_argument", o, {}, True, (f"tasks.x.{o}",))
        for o in ("train_fraction=true", "split_seed=-1", "split_seed=4294967296", "train_fraction=0", "val_fraction=1.5", "subset_seed=-3", "train_fraction=.nan", "test_fraction=false")
    )
    return cases


CASES = _cases()
TIME_LIMIT_S = 300  # generous: two CPU cores shared by several processes


@dataclass
class Outcome:
    stage: str  # validate | train
    result: str  # ran | clean_error | traceback | bad_exit | hang
    detail: str

    def label(self, case: Case) -> str:
        if self.result == "ran":
            return "WRONG ACCEPTED (trained)" if case.wrong else "ran"
        if self.result == "clean_error":
            return f"clean error in {self.stage}" if case.wrong else f"CORRECT TASK REFUSED in {self.stage}"
        return f"{self.result.upper()} in {self.stage}"


def _run(argv: list[str]) -> tuple[str, str]:
    """``mtl <argv>`` in this process: (result, detail)."""
    r = run_cli(argv, TIME_LIMIT_S)
    if r.hang:
        return "hang", f"no exit after {TIME_LIMIT_S} s"
    if r.escaped:  # what a user would see as a raw traceback
        return "traceback", r.escaped.splitlines()[0]
    if r.code == 0:
        return "ran", ""
    if r.code == 2 and len(r.lines) <= 3 and "Traceback" not in r.stderr:
        return "clean_error", r.lines[-1] if r.lines else ""
    return "bad_exit", f"exit {r.code}, {len(r.lines)} lines: {r.stderr[-300:]}"


_counter = itertools.count()


def run_case(case: Case, folder: Path) -> Outcome:
    """The case's class in a module of its own (a unique name: Python caches imported modules),
    validated, then trained for two steps when validation passes."""
    module = f"fuzz_task_{os.getpid()}_{next(_counter)}"
    (folder / f"{module}.py").write_text(case.source())
    run = folder / f"{module}_run"
    config = folder / f"{module}.yaml"
    config.write_text(textwrap.dedent(f"""\
        output_dir: {run}
        seed: 0
        device: cpu
        tasks:
          x: {{name: "{module}:Parity"}}
        trunk: {{name: seed_net}}
        trainer: {{epochs: 1, steps_per_epoch: 2, batch_size: 32, eval_batch_size: 2048}}
        logging: {{progress_bar: false, wandb: {{mode: disabled}}}}
        """))
    if folder.as_posix() not in sys.path:
        sys.path.insert(0, folder.as_posix())
    for stage in ("validate", "train"):
        result, detail = _run([stage, str(config), *case.overrides])
        if result != "ran":
            return Outcome(stage, result, detail)
    return Outcome("train", "ran", "")


def _check(case: Case, outcome: Outcome) -> None:
    assert outcome.result in ("ran", "clean_error"), f"{case.kind}/{case.param}: {outcome.result} in {outcome.stage}: {outcome.detail}"
    if case.wrong:
        assert outcome.result == "clean_error" and outcome.stage == "validate", (
            f"{case.kind}/{case.param}: a mistake passed validate ({outcome.label(case)}; {outcome.detail})"
        )
    else:
        assert outcome.result == "ran", f"{case.kind}/{case.param}: a correct task was refused: {outcome.detail}"


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# Two correct tasks train by default; the others with the slow tests (each trains).
FAST = ("readme", "classification_task_num_classes_attribute")


@pytest.mark.parametrize(
    "param", [c.param if c.param in FAST else pytest.param(c.param, marks=pytest.mark.slow) for c in CASES if c.kind == "ok"]
)
def test_correct_tasks_train(folder, one_thread, param):
    case = next(c for c in CASES if c.kind == "ok" and c.param == param)
    _check(case, run_case(case, folder))


@settings(max_examples=int(os.environ.get("MTL_FUZZ_EXAMPLES", "25")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from([c for c in CASES if c.wrong]))
def test_malformed_tasks_get_one_clean_line(folder, one_thread, case):
    _check(case, run_case(case, folder))


def main() -> None:
    """Every case once; the counts per outcome (and each bad outcome) on stdout."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("WANDB_MODE", None)
    from mtl.task import TASKS

    TASKS.names()  # the task library registers itself on this first lookup
    from tasks.digits import load_sklearn_digits

    load_sklearn_digits(28)  # the first load (sklearn's import) is not any case's time
    counts: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as d:
        for case in CASES:
            outcome = run_case(case, Path(d))
            label = outcome.label(case)
            counts[label] += 1
            print(f"{case.kind}/{case.param}: {label}: {outcome.detail}", flush=True)
    print(f"\n{len(CASES)} task classes ({sum(c.wrong for c in CASES)} with a mistake):")
    for label, n in counts.most_common():
        print(f"  {n:4d}  {label}")


if __name__ == "__main__":
    main()
