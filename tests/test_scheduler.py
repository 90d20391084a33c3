"""Task schedulers against their formulas, and shared-input sources in the trainer."""

import json
from collections import Counter

import pytest
import torch

from mtl.cli import main
from mtl.config import ConfigError, load_config
from mtl.scheduler import SCHEDULERS, Sources
from mtl.task import ClassificationTask
from mtl.data import tensor_splits
from tasks.digits import load_sklearn_digits

from conftest import QUICKSTART, quick

SIZES = {"a": 100, "b": 400, "c": 1600}
BATCHES = {"a": 2, "b": 8, "c": 32}
REQUIRED = {"weighted": {"weights": {"a": 1.0, "b": 1.0, "c": 2.0}}}


def make(name, seed=0, epochs=1, **kwargs):
    sources = Sources(samples=SIZES, batches=BATCHES, seed=seed, epochs=epochs)
    return SCHEDULERS.get(name)(sources, **{**REQUIRED.get(name, {}), **kwargs})


def draws(scheduler, steps, start=0):
    return [tuple(scheduler.tasks_for_step(s)) for s in range(start, start + steps)]


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler_is_deterministic_and_resumes_its_sequence(name):
    a, b = make(name, seed=3), make(name, seed=3)
    assert draws(a, 50) == draws(b, 50)
    state = a.state_dict()
    expected = draws(a, 50, start=50)
    c = make(name, seed=99)
    c.load_state_dict(state)
    assert draws(c, 50, start=50) == expected
    assert all(set(d) <= set(SIZES) and d for d in expected)
    assert a.steps_per_epoch >= 1


def frequencies(name, steps=20000, **kwargs):
    counts = Counter(t for d in draws(make(name, **kwargs), steps) for t in d)
    return {t: counts[t] / steps for t in SIZES}


def assert_close(freq, expected, tol=0.015):
    for t, p in expected.items():
        assert abs(freq[t] - p) < tol, (t, freq[t], p)


def test_uniform_and_proportional_frequencies():
    assert_close(frequencies("uniform"), {t: 1 / 3 for t in SIZES})
    assert_close(frequencies("proportional"), {"a": 100 / 2100, "b": 400 / 2100, "c": 1600 / 2100})


def test_temperature_with_and_without_cap():
    # tau = 2: p ∝ sqrt(n) = 10, 20, 40 -> 1/7, 2/7, 4/7
    assert_close(frequencies("temperature", tau=2.0), {"a": 1 / 7, "b": 2 / 7, "c": 4 / 7})
    # cap 400: sizes 100, 400, 400 -> sqrt: 10, 20, 20 -> 0.2, 0.4, 0.4
    assert_close(frequencies("temperature", tau=2.0, cap=400), {"a": 0.2, "b": 0.4, "c": 0.4})
    # tau = 1 is proportional
    s = make("temperature", tau=1.0)
    assert torch.allclose(s.probabilities(0), make("proportional").probabilities(0))


def test_annealed_goes_from_proportional_towards_uniform():
    s = make("annealed", epochs=5, alpha_end=0.2)
    per_epoch = s.steps_per_epoch
    assert s.alpha(0) == 1.0 and s.alpha(per_epoch * 4) == pytest.approx(0.2)
    assert s.alpha(per_epoch * 2) == pytest.approx(1 - 0.8 * 2 / 4)
    assert torch.allclose(s.probabilities(0), make("proportional").probabilities(0))
    last = s.probabilities(per_epoch * 4)
    w = torch.tensor([100.0, 400.0, 1600.0], dtype=torch.float64) ** 0.2
    assert torch.allclose(last, w / w.sum())


def test_weighted_frequencies():
    assert_close(frequencies("weighted"), {"a": 0.25, "b": 0.25, "c": 0.5})


def test_all_round_robin_and_sequential_orders():
    assert draws(make("all"), 2) == [("a", "b", "c")] * 2
    assert make("all").steps_per_epoch == 32
    assert draws(make("round_robin"), 4) == [("a",), ("b",), ("c",), ("a",)]
    seq = draws(make("sequential"), 42)
    assert seq == [("a",)] * 2 + [("b",)] * 8 + [("c",)] * 32
    assert make("sequential").steps_per_epoch == 42
    assert draws(make("sequential"), 1, start=42) == [("a",)]  # around again


def test_a_fixed_epoch_length_overrides_the_natural_one():
    sources = Sources(samples=SIZES, batches=BATCHES, fixed_epoch=7)
    assert SCHEDULERS.get("all")(sources).steps_per_epoch == 7
    assert SCHEDULERS.get("uniform")(sources).steps_per_epoch == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "temperature", "tau": 0.0}, "scheduler.tau must be > 0"),
        ({"name": "temperature", "tau": -1.0}, "scheduler.tau must be > 0"),
        ({"name": "temperature", "cap": 0}, "scheduler.cap must be >= 1"),
        ({"name": "annealed", "alpha_end": 1.5}, "scheduler.alpha_end must be in"),
        ({"name": "weighted", "weights": {"a": 1, "b": 1, "c": 1, "d": 1}}, "names 'd', which is not a task"),
        ({"name": "weighted", "weights": {"a": 1}}, "gives no weight for b, c"),
        ({"name": "weighted", "weights": {"a": 0, "b": 0, "c": 0}}, "not all 0"),
    ],
)
def test_bad_scheduler_parameters(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        SCHEDULERS.get(name)(Sources(samples=SIZES, batches=BATCHES), **kwargs)


def test_bad_scheduler_parameters_fail_before_training(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", QUICKSTART, *quick(out), "scheduler={name: weighted, weights: {mnist: 1, cifar: 2}}"]) == 2
    err = capsys.readouterr().err
    assert "scheduler" in err and "'cifar', which is not a task" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["temperature", "annealed"])
def test_sampling_schedulers_train_and_resume_exactly(tmp_path, scheduler):
    args = [f"scheduler.name={scheduler}", "trainer.lr_schedule.name=constant", "trainer.lr_schedule.warmup_steps=0"]
    assert main(["train", QUICKSTART, *quick(tmp_path / "full", 3, 5, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 2, 5, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 3, 5, *args, "resume=true")]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    part = json.loads((tmp_path / "part" / "results.json").read_text())
    assert part["splits"] == full["splits"]


# -- shared inputs ---------------------------------------------------------------------


class _DigitsShared(ClassificationTask):
    def input_key(self):
        return ("digits28", self.split_seed)

    def build_datasets(self):
        x, y = load_sklearn_digits(28)
        return tensor_splits(x, self.target(y), self)


class DigitLabel(_DigitsShared):
    def __init__(self, **kwargs):
        super().__init__(num_classes=10, **kwargs)

    def target(self, y):
        return y


class DigitParity(_DigitsShared):
    def __init__(self, **kwargs):
        super().__init__(num_classes=2, **kwargs)

    def target(self, y):
        return y % 2


def _shared_tasks(extra=""):
    module = DigitLabel.__module__
    return [
        "~tasks.mnist",
        "~tasks.digits",
        f"tasks.label.name={module}:DigitLabel",
        f"tasks.parity.name={module}:DigitParity{extra}",
    ]


def test_shared_input_tasks_take_one_batch_and_one_trunk_call(tmp_path, monkeypatch):
    from mtl.trainer import Trainer

    cfg = load_config(QUICKSTART, quick(tmp_path / "run", 1, 3, *_shared_tasks()))
    trainer = Trainer(cfg)
    assert trainer.groups == {"label+parity": ["label", "parity"]}
    calls = []
    trunk_forward = type(trainer.model.trunk).forward

    def counting(self, x):
        calls.append(len(x))
        return trunk_forward(self, x)

    monkeypatch.setattr(type(trainer.model.trunk), "forward", counting)
    results = trainer.fit()
    train_calls = calls[:3]
    assert train_calls == [64, 64, 64]  # one batch of 64 images feeds both heads
    assert set(results["tasks"]) == {"label", "parity"}


def test_shared_input_key_with_different_inputs_is_refused(tmp_path):
    from mtl.trainer import Trainer

    cfg = load_config(QUICKSTART, quick(tmp_path / "run", 1, 3, *_shared_tasks(), "tasks.parity.train_fraction=0.5"))
    with pytest.raises(ConfigError, match="tasks.parity: declares the same input_key as tasks.label but its train inputs differ"):
        Trainer(cfg)
