import math

import pytest
import torch

from mtl.optim import LR_SCHEDULES, build_lr_schedule, build_optimizer
from mtl.registry import ComponentError


def _lrs(node, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer({"name": "sgd", "lr": 1.0}, [p])
    sched = build_lr_schedule(node, opt, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_with_warmup_by_hand():
    # 2 warmup steps: 1/2, 2/2; then 4 cosine steps: 0.5 (1 + cos(pi k / 4)) for k = 0..3
    lrs = _lrs({"name": "cosine", "warmup_steps": 2}, 6)
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)


def test_linear_step_constant():
    assert _lrs({"name": "linear", "end_factor": 0.0}, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert _lrs({"name": "step", "step_size": 2, "gamma": 0.5}, 5) == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    assert _lrs({"name": "constant"}, 3) == pytest.approx([1, 1, 1])


def test_schedule_keeps_per_group_lr_ratios():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    sched = build_lr_schedule({"name": "linear"}, opt, 4)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.75, 0.075])


def test_bad_optimizer_arguments_are_named():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ComponentError, match="trainer.optimizer.learning_rate: unknown argument"):
        build_optimizer({"name": "adam", "learning_rate": 0.1}, [p])
    with pytest.raises(ComponentError, match="unknown optimizer 'adma'. Did you mean 'adam'"):
        build_optimizer({"name": "adma"}, [p])


def test_every_lr_schedule_starts_finite():
    for name in LR_SCHEDULES.names():
        kwargs = {"step_size": 1} if name == "step" else {}
        assert all(math.isfinite(v) for v in _lrs({"name": name, **kwargs}, 3))
