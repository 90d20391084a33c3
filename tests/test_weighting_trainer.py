"""Every weighting in the trainer, and the gradient engine against plain backward."""

import functools
import json
import math

import pytest
import torch

from mtl.cli import main
from mtl.config import ConfigError, load_config
from mtl.engine import GradientEngine, jacobian
from mtl.losses import task_losses
from mtl.weighting import WEIGHTINGS, Aggregation, GradientWeighting

from conftest import MULTI_MNIST, QUICKSTART, quick



def _default_mode(name):
    cls = WEIGHTINGS.get(name)
    return cls.modes[0] if issubclass(cls, GradientWeighting) else None


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_trains_the_quickstart_tasks(name, tmp_path):
    # The quickstart's tasks have separate inputs: representation-only methods train on
    # MultiMNIST left/right, which share one input batch.
    extra = MULTI_MNIST if _default_mode(name) == "representation" else []
    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *quick(run, 2, 3, f"weighting.name={name}", *extra)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6
    assert all(math.isfinite(m["loss"]) for m in results["splits"]["test"].values())


@pytest.mark.parametrize("name", ["mgda", "imtl_g", "upgrad"])
def test_parameter_mode_methods_also_run_on_the_representation(name, tmp_path):
    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *quick(run, 1, 3, f"weighting.name={name}", "weighting.mode=representation", *MULTI_MNIST)]) == 0


def test_representation_mode_without_shared_inputs_names_the_fix(tmp_path):
    from mtl.trainer import Trainer

    cfg = load_config(QUICKSTART, quick(tmp_path / "run", 1, 3, "weighting.name=mgda_ub"))
    with pytest.raises(ConfigError, match="weighting.mode: representation needs one shared representation.*Use weighting.mode=parameters"):
        Trainer(cfg)


def test_weightings_needing_every_task_refuse_a_sampling_scheduler(tmp_path):
    from mtl.trainer import Trainer

    cfg = load_config(QUICKSTART, quick(tmp_path / "run", 1, 3, "weighting.name=uncertainty", "scheduler.name=uniform"))
    with pytest.raises(ConfigError, match="needs every task's loss at every step; use scheduler.name=all"):
        Trainer(cfg)


def test_unknown_weighting_lists_the_available_ones(tmp_path, capsys):
    assert main(["train", QUICKSTART, *quick(tmp_path / "run"), "weighting.name=pcgard"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'pcgrad'" in err and "Available:" in err and "upgrad" in err


class Ones(GradientWeighting):
    """Weights of one: the engine must reproduce the plain summed backward."""

    def aggregate(self, J):
        return Aggregation(weights=torch.ones(len(J), dtype=J.dtype))


class MeanGradient(GradientWeighting):
    """A combined gradient equal to the sum of the rows: again the plain summed backward."""

    def aggregate(self, J):
        return Aggregation(gradient=J.sum(dim=0))


def _model_and_batch():
    from mtl.trainer import Trainer

    cfg = load_config(QUICKSTART, quick("/tmp/unused-engine-run", 1, 1, "trunk.dropout=0.0"))
    t = Trainer(cfg)
    names = list(t.sources)
    batches = {n: t.sources[n].next() for n in names}
    inputs = {n: b[0] for n, b in batches.items()}
    targets = {task: y for n, b in batches.items() for task, y in zip(t.groups[n], b[1:])}
    return t, inputs, targets


@pytest.mark.parametrize("method", [Ones, MeanGradient])
def test_engine_equals_the_plain_summed_backward(method):
    t, inputs, targets = _model_and_batch()
    model = t.model
    losses = {k: t.tasks[k].masked_loss(v, targets[k]) for k, v in model.forward_groups(inputs, t.groups).items()}
    sum(losses.values()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    engine = GradientEngine(model, method(list(t.tasks)), every=1)
    engine.backward(inputs, t.groups, targets, functools.partial(task_losses, t.tasks), 0, lambda: None)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-6), n


def test_jacobian_rows_are_the_task_gradients():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    objectives = torch.stack([(w**2).sum(), 3 * w[0]])
    J = jacobian(objectives, [w])
    assert torch.equal(J, torch.tensor([[2.0, 4.0], [3.0, 0.0]]))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_jacobian_in_chunks_equals_all_at_once(chunk):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    unused = torch.nn.Parameter(torch.ones(3))  # no task depends on it: its columns are 0
    params = [*net.parameters(), unused]
    objectives = net(torch.randn(7, 4)).pow(2).mean(dim=0)  # 5 task objectives
    J = jacobian(objectives, params)
    expected = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(o, params[:-1], retain_graph=True)]) for o in objectives])
    torch.testing.assert_close(J[:, :-3], expected)
    assert torch.equal(J[:, -3:], torch.zeros(5, 3))
    torch.testing.assert_close(jacobian(objectives, params, chunk), J)


def test_gradient_diagnostics_are_logged(tmp_path):
    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *quick(run, 1, 4, "weighting.name=mgda", "logging.log_every=2")]) == 0
    line = next(json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "grad_cos/mnist/digits" in l)
    assert abs(line["weights/mnist"] + line["weights/digits"] - 1) < 1e-5  # MGDA weights are convex
    assert line["grad_norm/mnist"] > 0 and -1 <= line["grad_cos/mnist/digits"] <= 1


@pytest.mark.parametrize("name", ["mgda", "pcgrad"])
@pytest.mark.parametrize("staged", ["true", "false"])
def test_weights_recomputed_every_k_steps(name, staged, tmp_path, monkeypatch):
    cls = WEIGHTINGS.get(name)
    calls = []
    original = cls.weigh

    def counting(self, G):
        calls.append(1)
        return original(self, G)

    monkeypatch.setattr(cls, "weigh", counting)
    args = [f"weighting.name={name}", "trainer.weighting_every=3", f"trainer.staged_gramian={staged}"]
    assert main(["train", QUICKSTART, *quick(tmp_path / "run", 1, 6, *args)]) == 0
    assert len(calls) == 2  # steps 0 and 3


@pytest.mark.slow
def test_learned_weighting_state_resumes_exactly(tmp_path):
    args = ["weighting.name=uncertainty", "trainer.lr_schedule.name=constant", "trainer.lr_schedule.warmup_steps=0"]
    assert main(["train", QUICKSTART, *quick(tmp_path / "full", 2, 4, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 1, 4, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 2, 4, *args, "resume=true")]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    part = json.loads((tmp_path / "part" / "results.json").read_text())
    assert part["splits"] == full["splits"]


@pytest.mark.parametrize("name", ["equal", "mgda", "pcgrad", "upgrad", "nash_mtl", "famo"])
def test_methods_run_under_bf16_autocast_and_channels_last(name, tmp_path):
    run = tmp_path / "run"
    args = [f"weighting.name={name}", "trainer.precision=bf16", "trainer.channels_last=true"]
    assert main(["train", QUICKSTART, *quick(run, 1, 3, *args)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert all(math.isfinite(m["loss"]) for m in results["splits"]["test"].values())
