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


@pytest.mark.parametrize(
    "weighting, fix, advised",
    [
        (["weighting.name=mgda", "weighting.mode=representation"], "Use weighting.mode=parameters", ["weighting.mode=parameters"]),
        # MGDA-UB has no parameter mode: advising one would send the user to a second refusal.
        (["weighting.name=mgda_ub"], "'mgda_ub' works on a shared representation only; use weighting.name=mgda", ["weighting.name=mgda"]),
    ],
)
def test_representation_mode_without_shared_inputs_names_a_fix_that_works(weighting, fix, advised, tmp_path):
    from mtl.trainer import Trainer

    cfg = load_config(QUICKSTART, quick(tmp_path / "run", 1, 3, *weighting))
    with pytest.raises(ConfigError, match=f"weighting.mode: representation needs one shared representation.*{fix}"):
        Trainer(cfg)
    Trainer(load_config(QUICKSTART, quick(tmp_path / "run", 1, 3, *weighting, *advised)))


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
    args = [f"weighting.name={name}", "engine.every=3", f"engine.staged_gramian={staged}"]
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


@functools.cache
def _model_and_batch_for(extra):
    """A trainer's model and one batch, built once per config (the tests only read gradients)."""
    from mtl.trainer import Trainer

    cfg = load_config(QUICKSTART, quick("/tmp/unused-engine-run", 1, 1, "trunk.dropout=0.0", *extra))
    t = Trainer(cfg)
    batches = {n: t.sources[n].next() for n in t.sources}
    inputs = {n: b[0] for n, b in batches.items()}
    targets = {task: y for n, b in batches.items() for task, y in zip(t.groups[n], b[1:])}
    return t, inputs, targets


def _own_head_gradients(t, inputs, targets):
    """Each task's head parameters and the gradient of that task's own loss w.r.t. them."""
    losses = task_losses(t.tasks, t.model.forward_groups(inputs, t.groups), targets)
    out = {}
    for task, loss in losses.items():
        params = [p for p in t.model.heads[task].parameters() if p.requires_grad]
        out[task] = (params, torch.autograd.grad(loss, params, retain_graph=True))
    return out


@pytest.mark.parametrize("name", ["imtl_g", "aligned_mtl"])
@pytest.mark.parametrize("mode, extra, staged", [("parameters", (), True), ("parameters", (), False), ("representation", tuple(MULTI_MNIST), False)])
def test_heads_get_their_own_gradient_whatever_the_task_weights(name, mode, extra, staged):
    """IMTL-G's and Aligned-MTL's weights can be negative: Σ_t w_t L_t would then train a head to
    increase its own loss. Each head gets its own loss's gradient, when the weights are computed
    (step 0) and when they are reused (step 1, engine.every=2); the shared update is Σ_t w_t g_t."""
    torch.manual_seed(0)
    t, inputs, targets = _model_and_batch_for(extra)
    method = WEIGHTINGS.get(name)(list(t.tasks), mode=mode)
    engine = GradientEngine(t.model, method, every=2, staged=staged)
    for step in (0, 1):
        expected = _own_head_gradients(t, inputs, targets)
        t.model.zero_grad(set_to_none=True)
        engine.backward(inputs, t.groups, targets, functools.partial(task_losses, t.tasks), step, lambda: None)
        for task, (params, grads) in expected.items():
            for p, g in zip(params, grads):
                torch.testing.assert_close(p.grad, g, msg=f"{task} head at step {step}")
    # The trunk's update is the weighted one: Σ_t w_t g_t with the reused weights.
    w = engine._weights
    losses = task_losses(t.tasks, t.model.forward_groups(inputs, t.groups), targets)
    trunk = [p for p in t.model.trunk.parameters() if p.requires_grad]
    weighted = torch.autograd.grad(sum(w[i] * losses[k] for i, k in enumerate(method.tasks)), trunk)
    for p, g in zip(trunk, weighted):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_imtl_g_negative_weight_does_not_make_its_head_ascend():
    # The three gradients, as the gradients of three linear heads on a shared weight
    # vector θ: L_t = a_tᵀθ + ½||φ_t||², so g_t = a_t and IMTL-G's third weight is −0.97.
    from mtl.weighting.surgery import IMTLG

    J = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.1]])
    w = IMTLG(["a", "b", "c"]).weigh(J @ J.T)
    assert w[2] < 0
    from mtl.architectures import Architecture

    class Linear(Architecture):
        def __init__(self):
            super().__init__({})
            self.theta = torch.nn.Parameter(torch.zeros(3))
            self.head = torch.nn.Parameter(torch.ones(3))  # φ_t, one entry per task

        def shared_parameters(self):
            return [self.theta]

    model = Linear()
    theta, head = model.theta, model.head
    losses = J @ theta + 0.5 * head**2
    engine = GradientEngine(model, IMTLG(["a", "b", "c"], mode="parameters"))
    engine._apply(w, losses, [theta], None, None)
    torch.testing.assert_close(theta.grad, w.float() @ J)
    torch.testing.assert_close(head.grad, head.detach())  # ∂L_t/∂φ_t = φ_t: every head descends


def _engine_grads(method, t, inputs, targets):
    t.model.zero_grad(set_to_none=True)
    GradientEngine(t.model, method).backward(inputs, t.groups, targets, functools.partial(task_losses, t.tasks), 0, lambda: None)
    return {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def _clip_case(cap, clip):
    """A trunk gradient (3, 4) (norm 5) and a head gradient (12,), through GradientClip."""
    from mtl.step import GradientClip

    trunk, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    trunk.grad, head.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    problem = GradientClip([trunk], [head], [], cap=cap, clip=clip)({"a": torch.tensor(1.0)})
    return problem, trunk.grad, head.grad


def test_the_update_norm_cap_and_grad_clip_by_hand():
    eps = 1e-6  # torch's clip_grad_norm_: scale min(1, max / (norm + 1e-6))
    # Nash-MTL's cap 1 scales the trunk by 1/5; the head is not capped.
    problem, trunk, head = _clip_case(cap=1.0, clip=0.0)
    assert problem is None
    torch.testing.assert_close(trunk, torch.tensor([3.0, 4.0]) / (5 + eps))
    torch.testing.assert_close(head, torch.tensor([12.0]))
    # Then grad_clip 2 on the whole model: its norm after the cap is √(1 + 144) = √145.
    _, trunk, head = _clip_case(cap=1.0, clip=2.0)
    scale = 2 / (145**0.5 + eps)
    torch.testing.assert_close(trunk, torch.tensor([3.0, 4.0]) / (5 + eps) * scale)
    torch.testing.assert_close(head, torch.tensor([12.0]) * scale)
    # Bounds above the norms change nothing.
    _, trunk, head = _clip_case(cap=6.0, clip=14.0)
    torch.testing.assert_close(trunk, torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(head, torch.tensor([12.0]))


def test_a_non_finite_gradient_is_reported_and_nothing_is_scaled():
    from mtl.step import GradientClip

    trunk, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    trunk.grad, head.grad = torch.tensor([3.0, 4.0]), torch.tensor([float("inf")])
    problem = GradientClip([trunk], [head], [], cap=1.0, clip=1.0)({"a": torch.tensor(1.0)})
    assert problem == "non-finite gradient (model gradient norm inf) with finite losses"
    torch.testing.assert_close(trunk.grad, torch.tensor([3.0, 4.0]))
    problem = GradientClip([trunk], [], [], cap=1.0)({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))})
    assert problem == "non-finite loss: task 'b' loss nan"


def _trainer_step_grads(tmp_path, max_norm):
    from mtl.trainer import Trainer

    extra = ("trunk.dropout=0.0", "weighting.name=nash_mtl", f"weighting.max_norm={max_norm}")
    t = Trainer(load_config(QUICKSTART, quick(tmp_path / f"run-{max_norm}", 1, 1, *extra)))
    t._train_step()  # the gradients stay after the optimizer step, until the next step's zero_grad
    return {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def test_nash_mtl_caps_the_trunk_update_norm_as_the_official_code(tmp_path):
    from mtl.weighting.projection import NashMTL

    assert NashMTL(["a", "b"]).max_norm == 1.0  # the official default
    free = _trainer_step_grads(tmp_path, 0)
    trunk = [n for n in free if n.startswith("trunk.")]
    norm = float(torch.linalg.vector_norm(torch.stack([free[n].norm() for n in trunk])))
    capped = _trainer_step_grads(tmp_path, norm / 2)
    for n in free:
        # The trunk's update scaled to norm/2 (torch's clip_grad_norm_); the heads are not capped.
        scale = (norm / 2) / (norm + 1e-6) if n in trunk else 1.0
        torch.testing.assert_close(capped[n], free[n] * scale, msg=n)


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_nash_mtl_bad_max_norm_names_the_key(value):
    from mtl.weighting.projection import NashMTL

    with pytest.raises(ValueError, match="weighting.max_norm must be >= 0"):
        NashMTL(["a", "b"], max_norm=value)


def test_reused_weights_on_the_representation_take_one_backward_through_the_heads():
    """IMTL-G (weigh_heads False) reusing its weights (engine.every=2): the
    representation gets Σ_t w_t ∇o_t and each head its own objective's gradient, as two
    backward passes gave them, now from one vectorized pass through the heads."""
    from mtl.weighting.surgery import IMTLG

    passes = []

    class Counted(IMTLG):
        def transform_losses(self, losses):
            losses.register_hook(lambda grad: passes.append(grad.shape))  # once per backward through the objectives
            return losses

    t, inputs, targets = _model_and_batch_for(tuple(MULTI_MNIST))
    method = Counted(list(t.tasks), mode="representation")
    engine = GradientEngine(t.model, method, every=2)
    loss_fn = functools.partial(task_losses, t.tasks)
    engine.backward(inputs, t.groups, targets, loss_fn, 0, lambda: None)  # computes the weights
    w = engine._weights
    t.model.zero_grad(set_to_none=True)
    passes.clear()
    engine.backward(inputs, t.groups, targets, loss_fn, 1, lambda: None)  # reuses them
    assert len(passes) == 1
    got = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}

    # The two passes by hand: the weighted sum's gradient of the representation, the plain
    # sum's of the heads, then the trunk's backward from the representation.
    (source,) = inputs
    features = t.model.trunk(inputs[source])
    leaf = features.detach().requires_grad_()
    losses = task_losses(t.tasks, t.model.apply_heads(leaf, t.groups[source]), targets)
    L = torch.stack([losses[n] for n in method.tasks])
    (gradient,) = torch.autograd.grad((w * L).sum(), leaf, retain_graph=True)
    heads = dict(t.model.heads.named_parameters())
    expected = dict(zip((f"heads.{n}" for n in heads), torch.autograd.grad(L.sum(), list(heads.values()))))
    trunk = dict(t.model.trunk.named_parameters())
    expected.update(zip((f"trunk.{n}" for n in trunk), torch.autograd.grad(features, list(trunk.values()), gradient)))
    assert got.keys() == expected.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected[n], msg=n)


@pytest.mark.parametrize("name, mode", [("pcgrad", "parameters"), ("mgda", "parameters"), ("imtl_g", "representation"), ("mgda", "representation")])
def test_a_penalty_adds_its_own_gradient_to_every_engine_update(name, mode):
    """A recipe's or an architecture's penalty Ω: the update with it is the update without it
    plus ∇Ω on every parameter, whichever path the method's aggregation takes (a combined
    gradient, task weights; parameters or representation)."""
    t, inputs, targets = _model_and_batch_for(tuple(MULTI_MNIST) if mode == "representation" else ())
    params = dict(t.model.named_parameters())

    def grads(penalty_fn):
        t.model.zero_grad(set_to_none=True)
        method = WEIGHTINGS.get(name)(list(t.tasks), mode=mode)
        GradientEngine(t.model, method).backward(inputs, t.groups, targets, functools.partial(task_losses, t.tasks), 0, penalty_fn)
        return {n: p.grad.clone() for n, p in params.items()}

    plain = grads(lambda: None)
    penalised = grads(lambda: 0.01 * sum((p**2).sum() for p in params.values()))  # ∇Ω = 0.02 θ everywhere
    for n, p in params.items():
        torch.testing.assert_close(penalised[n], plain[n] + 0.02 * p.detach(), msg=n)
