"""The architecture contract, for every registered architecture (``mtl list architectures``):
the parameter partition the engine relies on, evaluation against training outputs, the
representation cut, and every registered weighting training with every architecture."""

import functools
import math

import pytest
import torch

from mtl.architectures import ARCHITECTURES, Architecture
from mtl.builders import build_run, check_weighting
from mtl.config import ConfigError, load_config
from mtl.distributed import Context
from mtl.step import build_step
from mtl.trainer import Trainer
from mtl.weighting import WEIGHTINGS, GradientWeighting

from conftest import MULTI_MNIST, QUICKSTART, quick

# Tiny models: one thread is as fast, and the module-scoped fixture restores the count after this file.
pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ARCHITECTURES.names()
CPU = torch.device("cpu")


@functools.cache
def _run(arch, shared_input=False):
    """One stage's built run per architecture (quickstart's seed_net; MultiMNIST for one shared input), built once."""
    extra = (*MULTI_MNIST,) if shared_input else ()
    cfg = load_config(QUICKSTART, quick("/tmp/unused-arch-run", 1, 2, f"architecture.name={arch}", "trunk.dropout=0.0", "device=cpu", *extra))
    run = build_run(cfg, Context(), CPU)
    inputs, targets, _ = run.feed.next(list(run.sources))
    return cfg, run, inputs, targets


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_and_task_parameters_partition_the_model(arch):
    _, run, _, _ = _run(arch)
    model = run.model
    shared = {id(p) for p in model.shared_parameters()}
    own = [id(p) for params in model.task_parameters().values() for p in params]
    assert shared and len(set(own)) == len(own), "a parameter listed for two tasks is shared"
    assert not shared & set(own)
    assert shared | set(own) == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.last_shared_parameters()} <= shared


@pytest.mark.parametrize("arch", [a for a in ARCHS if ARCHITECTURES.get(a).eval_outputs is not Architecture.eval_outputs])
def test_evaluation_outputs_equal_the_training_forward(arch):
    """An architecture's own evaluation path (hard sharing: unfused heads) gives the training
    forward's outputs; the others evaluate through forward_groups itself."""
    _, run, inputs, _ = _run(arch, shared_input=True)
    model = run.model.eval()
    try:
        ((source, x),) = inputs.items()
        tasks = run.groups[source]
        with torch.no_grad():
            trained = model.forward_groups(inputs, run.groups)
            evaluated = model.eval_outputs(x, tasks)
        assert evaluated.keys() == set(tasks)
        for t in tasks:
            torch.testing.assert_close(evaluated[t], trained[t], msg=t)
    finally:
        model.train()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_representation_cut_is_one_tensor_every_task_reads(arch):
    """Inside ``representation_cuts`` an architecture that shares a representation marks one
    tensor on one input batch; every task's output depends on it and nothing below it is reached."""
    _, run, inputs, _ = _run(arch, shared_input=True)
    model = run.model
    with model.representation_cuts() as cuts:
        outputs = model.forward_groups(inputs, run.groups)
    if not model.shares_representation:
        assert cuts == []
        return
    ((features, leaf),) = cuts
    assert leaf.is_leaf and leaf.requires_grad and features.grad_fn is not None
    for t, out in outputs.items():
        (g,) = torch.autograd.grad(out.float().sum(), leaf, retain_graph=True)
        assert g.abs().sum() > 0, f"task {t!r} does not read the cut"
    # Below the cut, only the representation's own backward reaches the shared parameters.
    total = sum(o.float().sum() for o in outputs.values())
    reached = torch.autograd.grad(total, model.shared_parameters(), allow_unused=True)
    assert all(g is None or not g.abs().sum() for g in reached)


def _cases():
    for arch in ARCHS:
        for name in WEIGHTINGS.names():
            yield pytest.param(arch, name, id=f"{arch}-{name}")


@pytest.mark.parametrize("arch, name", list(_cases()))
def test_every_weighting_trains_with_every_architecture(arch, name):
    """Two real steps (forward, weighting, backward, optimizer step) of the weighting in its
    default mode; representation-only methods on MultiMNIST's shared input. Where the
    architecture has no representation every task reads, the refusal is checked instead."""
    cls = WEIGHTINGS.get(name)
    representation = issubclass(cls, GradientWeighting) and cls.modes[0] == "representation"
    cfg, run, inputs, targets = _run(arch, shared_input=representation)
    torch.manual_seed(0)
    weighting = cls(list(run.tasks))
    if representation and not run.model.shares_representation:
        with pytest.raises(ConfigError, match=f"architecture {arch!r} has none"):
            check_weighting(cfg, weighting, run.scheduler, run.groups, run.model)
        return
    check_weighting(cfg, weighting, run.scheduler, run.groups, run.model)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    optimizer = torch.optim.SGD(params + list(weighting.parameters()), lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = build_step(run.model, run.tasks, run.groups, weighting, optimizer, schedule, run.recipe, Context(), CPU)
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        losses = step.step(inputs, targets)
        assert set(losses) == set(run.tasks) and all(math.isfinite(float(v.detach())) for v in losses.values())
    moved = [not torch.equal(b, p) for b, p in zip(before, params)]
    assert any(moved), "no parameter changed"


def test_an_unknown_architecture_names_the_key_and_the_choices(tmp_path):
    cfg = load_config(QUICKSTART, quick(tmp_path / "run", 1, 2, "architecture.name=mmeo"))
    with pytest.raises(ConfigError, match=r"architecture.*'mmeo'.*mmoe"):
        Trainer(cfg)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "hard"])
def test_recipes_of_one_trunk_refuse_architectures_of_several(arch, tmp_path):
    if _run(arch)[1].model.trunk is not None:
        pytest.skip(f"{arch} has one trunk: every recipe applies to it")
    cfg = load_config(QUICKSTART, quick(tmp_path / "run", 1, 2, f"architecture.name={arch}", "recipe.name=linear_probe"))
    with pytest.raises(ConfigError, match="recipe.name: 'linear_probe' freezes or adapts one trunk.*recipe.name=fine_tune"):
        Trainer(cfg)


def test_mtl_train_runs_a_non_hard_architecture_end_to_end(tmp_path):
    from mtl.cli import main

    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *quick(run, 1, 2, "architecture.name=mmoe", "architecture.experts=2")]) == 0
    assert (run / "results.json").exists() and not (run / "trunk.pt").exists()


def _plan(tmp_path, regime):
    from mtl.compare import plan

    cfg = load_config(QUICKSTART, quick(tmp_path / "grid", 1, 2, "compare.seeds=[0]", "compare.fractions=[1.0]",
                                        "~compare.regimes.single_task", "~compare.regimes.sequential", f"compare.regimes.joint={regime}"))
    return plan(cfg)


def test_a_joint_regime_over_architectures_plans_one_cell_each(tmp_path):
    cells = _plan(tmp_path, "{architectures: [hard, {name: mmoe, experts: 3}]}")
    assert [c.label for c in cells] == ["joint/hard", "joint/mmoe"]
    assert [c.stages[0].overrides["architecture"] for c in cells] == [{"name": "hard"}, {"name": "mmoe", "experts": 3}]
    assert all(c.stages[0].tasks == ["mnist", "digits"] for c in cells)


@pytest.mark.parametrize("regime, message", [
    ("{architectures: [hard, mmeo]}", r"compare.regimes.joint.architectures\[1\]: 'mmeo' is not a registered architecture. Did you mean 'mmoe'"),
    ("{architectures: []}", r"compare.regimes.joint.architectures: a list of architectures"),
    ("{kind: sequential, architectures: [mmoe]}", r"compare.regimes.joint.architectures: only a joint regime takes architectures"),
])
def test_bad_architecture_lists_name_the_key(tmp_path, regime, message):
    with pytest.raises(ConfigError, match=message):
        _plan(tmp_path, regime)


def test_the_step_adds_the_architectures_own_penalty():
    """DSelect-k's entropy term reaches the step's objective through ``Step.penalty``."""
    _, run, inputs, _ = _run("dselect_k")
    run.model.train()
    run.model.forward_groups(inputs, run.groups)
    term = run.step.penalty()
    assert term is not None and term.requires_grad and float(term) > 0
    assert run.step.penalty() is None  # read once per forward
