"""The step contract (mtl.step): one object per kind of update, every weighting hook declared."""

import copy
import functools

import pytest
import torch

from mtl.config import load_config
from mtl.step import EngineStep, LossStep, RunningLosses, backward, build_step
from mtl.weighting import WEIGHTINGS, GradientWeighting, Weighting

from conftest import MULTI_MNIST, QUICKSTART, quick


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_has_every_hook_the_steps_call(name):
    """The steps call these on any weighting of their kind, never ``hasattr`` first."""
    cls = WEIGHTINGS.get(name)
    assert issubclass(cls, Weighting)
    assert callable(cls.on_epoch_end) and isinstance(cls.max_norm, float) and isinstance(cls.requires_all_tasks, bool)
    if issubclass(cls, GradientWeighting):
        assert callable(cls.observe) and callable(cls.transform_losses)
    else:
        assert callable(cls.update) and callable(cls.weights) and isinstance(cls.wants_losses_after_step, bool)


@pytest.mark.parametrize("name, kind", [("equal", LossStep), ("famo", LossStep), ("mgda", EngineStep), ("pcgrad", EngineStep)])
def test_the_trainer_gets_the_step_of_its_weightings_kind(name, kind, tmp_path):
    from mtl.trainer import Trainer

    t = Trainer(load_config(QUICKSTART, quick(tmp_path / "run", 1, 2, f"weighting.name={name}", "engine.every=2")))
    assert type(t.update) is kind and t.update.weighting is t.weighting
    if kind is EngineStep:
        assert t.update.engine.every == 2
    for _ in range(2):
        t._train_step()
    assert t.update.count == t.step == 2
    means = t.update.running.means(0)
    assert set(means) == set(t.tasks) and all(v > 0 for v in means.values())


def test_running_losses_count_each_task_only_where_it_trained():
    running = RunningLosses(["a", "b"], torch.device("cpu"))
    running.add(torch.tensor([1.0, 0.0]), {"a": None})  # a sampling scheduler's step without b
    running.add(torch.tensor([3.0, 5.0]), {"a": None, "b": None})
    assert running.means(0) == {"a": 2.0, "b": 5.0}
    assert running.means(0) == {}  # cleared by the read
    torch.testing.assert_close(running.epoch_means(), torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(running.epoch_means(), torch.tensor([0.0, 0.0]))


def test_the_step_state_resumes_its_running_losses_and_count(tmp_path):
    from mtl.trainer import Trainer

    cfg = load_config(QUICKSTART, quick(tmp_path / "run", 1, 4, "weighting.name=dwa"))
    a = Trainer(cfg)
    for _ in range(3):
        a._train_step()
    b = Trainer(load_config(QUICKSTART, quick(tmp_path / "other", 1, 4, "weighting.name=dwa")))
    b.update.load_state_dict(a.update.state_dict())
    assert b.update.count == 3
    torch.testing.assert_close(b.update.running.sums, a.update.running.sums)
    assert b.update.running.means(0) == a.update.running.means(0)


@functools.cache
def _trainer_and_batch(*extra):
    from mtl.trainer import Trainer

    t = Trainer(load_config(QUICKSTART, quick("/tmp/unused-step-run", 1, 1, "trunk.dropout=0.0", *extra)))
    inputs, targets, _ = t.feed.next(list(t.sources))
    return t, inputs, targets


def _public_backward_cases():
    """Every registered weighting: loss-level ones, gradient ones in their parameter mode and in representation mode where they have it."""
    for name in WEIGHTINGS.names():
        cls = WEIGHTINGS.get(name)
        if not issubclass(cls, GradientWeighting):
            yield pytest.param(name, None, id=f"{name}-loss")
            continue
        for mode in [next((m for m in cls.modes if m != "representation"), None), "representation" if "representation" in cls.modes else None]:
            if mode is not None:
                yield pytest.param(name, mode, id=f"{name}-{mode}")


@pytest.mark.parametrize("name, mode", list(_public_backward_cases()))
def test_the_public_backward_gives_the_trainers_update(name, mode):
    """``mtl.step.backward`` on the task losses fills every .grad as the trainer's step does,
    for every registered weighting: w.r.t. the trunk's parameters, or its output features in
    representation mode (MultiMNIST's left/right tasks, which share one input)."""
    t, inputs, targets = _trainer_and_batch(*(MULTI_MNIST if mode == "representation" else ()))
    cls = WEIGHTINGS.get(name)
    torch.manual_seed(0)
    method = (cls(list(t.tasks)) if mode is None else cls(list(t.tasks), mode=mode)).to(t.device)
    twin = copy.deepcopy(method)  # the same state (seeded draws, GradNorm's first losses) for the second update
    step = build_step(t.model, t.tasks, t.groups, method, t.optimizer, t.update.lr_schedule, t.recipe, t.dist, t.device)
    t.model.zero_grad(set_to_none=True)
    step._backward(inputs, targets)
    expected = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    t.model.zero_grad(set_to_none=True)
    if mode == "representation":
        ((source, x),) = inputs.items()
        shared = t.model.trunk(x)
        outputs = t.model.apply_heads(shared, t.groups[source])
    else:
        shared = step.engine._shared() if mode is not None else list(t.model.trunk.parameters())
        outputs = t.model.forward_groups(inputs, t.groups)
    backward(step.task_losses(outputs, targets), shared, twin)
    got = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_public_backward_names_what_shared_must_be():
    t, inputs, targets = _trainer_and_batch()
    losses = t.update.task_losses(t.model.forward_groups(inputs, t.groups), targets)
    with pytest.raises(ValueError, match="pass the trunk's output tensor as shared"):
        backward(losses, list(t.model.trunk.parameters()), WEIGHTINGS.get("mgda_ub")(list(t.tasks)))
    features = t.model.trunk(next(iter(inputs.values())))
    with pytest.raises(ValueError, match="pass a list of them as shared"):
        backward(losses, features, WEIGHTINGS.get("gradnorm")(list(t.tasks)))


def test_the_engines_reused_weights_resume_with_the_step(tmp_path):
    """``engine.every=2``: the step after a resume reuses the weights computed before it, as the uninterrupted run does."""
    from mtl.trainer import Trainer

    overrides = ("weighting.name=mgda", "engine.every=2")
    a = Trainer(load_config(QUICKSTART, quick(tmp_path / "a", 1, 4, *overrides)))
    a._train_step()  # step 0 computes the weights; step 1 would reuse them
    saved = a.update.engine._weights.clone()
    b = Trainer(load_config(QUICKSTART, quick(tmp_path / "b", 1, 4, *overrides)))
    assert b.update.engine._weights is None
    b.update.load_state_dict(copy.deepcopy(a.update.state_dict()))
    torch.testing.assert_close(b.update.engine._weights, saved)


def test_a_checkpoint_of_an_older_training_state_layout_is_refused_with_the_fix(tmp_path):
    from mtl import checkpoint
    from mtl.cli import main
    from mtl.config import ConfigError
    from mtl.trainer import Trainer

    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *quick(run, 1, 2)]) == 0
    (path,) = checkpoint.step_checkpoints(run / "checkpoints")
    state = checkpoint.load(path)
    del state["format"]  # as written before the layout had a number
    checkpoint.save(state, path)
    with pytest.raises(ConfigError, match=r"resume: .* another version of mtl \(training-state format 1, this one reads 2\).*init_from="):
        Trainer(load_config(QUICKSTART, quick(run, 2, 2, "resume=true")))


def test_a_non_finite_loss_at_a_measured_affinity_step_is_skipped_not_measured(tmp_path):
    """With trainer.on_nonfinite=skip, a NaN loss at a step that measures TAG's affinity is an
    ordinary skipped step (NonFiniteError, nothing applied), not a NonFiniteAffinity that ends the run."""
    from mtl.engine import NonFiniteError
    from mtl.trainer import Trainer

    t = Trainer(load_config(QUICKSTART, quick(tmp_path / "run", 1, 4, "engine.affinity_every=1", "trainer.on_nonfinite=skip")))
    inputs, targets, _ = t.feed.next(list(t.sources))
    before = [p.detach().clone() for p in t.model.parameters()]
    poisoned = {name: torch.full_like(x, float("nan")) for name, x in inputs.items()}
    with pytest.raises(NonFiniteError):
        t.update.step(poisoned, targets)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert t.update.affinity.counts == [0, 0]
    t.update.step(inputs, targets)  # the next measured step measures
    assert t.update.affinity.counts == [1, 1]
