"""TAG's lookahead affinity against closed forms, its restoration of the training state, and
the grouping search against hand-made matrices and brute force."""

import itertools
import math

import pytest
import torch
from torch import nn

from mtl.affinity import LookaheadAffinity, NonFiniteAffinity, check_affinity, grouping_score, select_groups


def quadratic(centres: torch.Tensor, theta: nn.Parameter):
    """L_i(θ) = ½‖θ − c_i‖²: the losses of a linear model with one shared parameter vector."""
    return lambda: 0.5 * ((theta[None, :] - centres) ** 2).sum(dim=1)


def affinity_of(centres, theta0, optimizer_fn, warmup=0):
    theta = nn.Parameter(theta0.clone())
    optimizer = optimizer_fn([theta])
    losses = quadratic(centres, theta)
    for _ in range(warmup):  # real joint steps, so that the optimizer has state (momentum, moments)
        optimizer.zero_grad()
        losses().sum().backward()
        optimizer.step()
    tag = LookaheadAffinity(optimizer, [theta], [])
    z, before, after = tag(tag.gradients(losses()), losses)
    return z, theta, optimizer


def closed_form(centres, theta, step_of):
    """Z_{i→j} = 1 − L_j(θ − step(∇L_i)) / L_j(θ) with ∇L_i = θ − c_i."""
    loss = lambda t, c: 0.5 * float(((t - c) ** 2).sum())  # noqa: E731
    return torch.tensor([[1 - loss(theta - step_of(theta - ci), cj) / loss(theta, cj) for cj in centres] for ci in centres])


def test_sgd_affinity_is_the_closed_form():
    centres = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, -1.0]], dtype=torch.float64)
    theta0 = torch.tensor([0.2, -0.3], dtype=torch.float64)
    lr = 0.1
    z, _, _ = affinity_of(centres, theta0, lambda p: torch.optim.SGD(p, lr=lr))
    torch.testing.assert_close(z, closed_form(centres, theta0, lambda g: lr * g))


def test_momentum_sgd_uses_the_optimizers_rule():
    # After one real step the buffer is b = ∇(ΣL)(θ0); the lookahead on task i is θ − η(μb + ∇L_i),
    # the rule of the authors' code for momentum SGD.
    centres = torch.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=torch.float64)
    theta0 = torch.tensor([0.2, -0.3], dtype=torch.float64)
    lr, mu = 0.05, 0.9
    z, theta, _ = affinity_of(centres, theta0, lambda p: torch.optim.SGD(p, lr=lr, momentum=mu), warmup=1)
    buffer = (2 * theta0 - centres.sum(dim=0))
    expected = closed_form(centres, theta.detach(), lambda g: lr * (mu * buffer + g))
    torch.testing.assert_close(z, expected)


def test_adam_first_step_is_lr_times_the_gradients_sign():
    # Adam's first step is lr · m̂ / (√v̂ + ε) = lr · g / (|g| + ε).
    centres = torch.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=torch.float64)
    theta0 = torch.tensor([0.2, -0.3], dtype=torch.float64)
    lr = 0.01
    z, _, _ = affinity_of(centres, theta0, lambda p: torch.optim.Adam(p, lr=lr, eps=1e-8))
    torch.testing.assert_close(z, closed_form(centres, theta0, lambda g: lr * g / (g.abs() + 1e-8)))


def test_signs_and_symmetry():
    theta0 = torch.zeros(2, dtype=torch.float64)
    c = torch.tensor([1.0, 2.0], dtype=torch.float64)
    same, _, _ = affinity_of(torch.stack([c, c]), theta0, lambda p: torch.optim.SGD(p, lr=0.1))
    assert (same > 0).all() and torch.allclose(same, same.T)  # identical tasks help each other alike
    opposed, _, _ = affinity_of(torch.stack([c, -c]), theta0, lambda p: torch.optim.SGD(p, lr=0.1))
    assert opposed[0, 1] < 0 and opposed[1, 0] < 0 and opposed[0, 0] > 0  # opposed tasks hurt each other
    assert opposed[0, 1] == opposed[1, 0]


class Net(nn.Module):
    """Shared trunk with BatchNorm (running statistics) and dropout (random masks), two heads."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])

    def losses(self, x, y):
        f = self.trunk(x)
        return torch.stack([((h(f).squeeze(1) - y[:, k]) ** 2).mean() for k, h in enumerate(self.heads)])


def train(measure: bool, optimizer_fn, steps=4):
    torch.manual_seed(0)
    net = Net()
    optimizer = optimizer_fn(net.parameters())
    tag = LookaheadAffinity(optimizer, list(net.trunk.parameters()), list(net.buffers()))
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=data), torch.randn(16, 2, generator=data)
        optimizer.zero_grad()
        losses = net.losses(x, y)
        grads = tag.gradients(losses) if measure else None
        losses.sum().backward()
        if measure:
            z, _, _ = tag(grads, lambda: net.losses(x, y))
            assert torch.isfinite(z).all() and (z != 0).any()
        optimizer.step()
    return net, optimizer, torch.get_rng_state()


@pytest.mark.parametrize("optimizer_fn", [
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
], ids=["adamw", "sgd_momentum"])
def test_training_is_bit_identical_with_and_without_the_lookahead(optimizer_fn):
    plain, plain_opt, plain_rng = train(False, optimizer_fn)
    measured, measured_opt, measured_rng = train(True, optimizer_fn)
    for (name, a), b in zip(plain.state_dict().items(), measured.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm running statistics
    for a, b in zip(plain_opt.state.values(), measured_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(plain_rng, measured_rng)  # dropout's masks after the run: the same draws


def test_gradients_and_grad_fields_are_kept():
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    tag = LookaheadAffinity(optimizer, list(net.trunk.parameters()), list(net.buffers()))
    losses = net.losses(x, y)
    grads = tag.gradients(losses)
    losses.sum().backward()
    before = [p.grad.clone() for p in net.parameters()]
    tag(grads, lambda: net.losses(x, y))
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))


def test_non_finite_lookahead_names_the_step_and_tasks():
    z = torch.tensor([[0.1, float("nan")], [0.2, 0.3]])
    after = torch.tensor([[1.0, float("inf")], [1.0, 1.0]])
    with pytest.raises(NonFiniteAffinity, match=r"step 7: the lookahead step on task 'a' alone gives task 'b' a loss of inf"):
        check_affinity(z, torch.ones(2), after, ["a", "b"], 7)
    with pytest.raises(NonFiniteAffinity, match=r"step 3: task 'b' has loss 0.0"):
        check_affinity(z, torch.tensor([1.0, 0.0]), torch.ones(2, 2), ["a", "b"], 3)


# -- selection --------------------------------------------------------------------------


def matrix(tasks, values):
    """Z as a [T, T] tensor from {(from, onto): value}; absent pairs are 0."""
    z = torch.zeros(len(tasks), len(tasks))
    for (a, b), v in values.items():
        z[tasks.index(a), tasks.index(b)] = v
    return z


def test_two_clusters_split_at_two_groups():
    tasks = ["a", "b", "c", "d"]
    z = matrix(tasks, {(x, y): (1.0 if (x in "ab") == (y in "ab") else -1.0) for x in tasks for y in tasks if x != y})
    found = select_groups(z, tasks, 3)
    assert found[1].groups == [["a", "b", "c", "d"]]
    assert found[1].score == pytest.approx(4 * (1 - 2) / 3)
    assert found[2].groups == [["a", "b"], ["c", "d"]] and found[2].score == 4.0
    assert found[3].groups == found[2].groups  # a third group adds nothing: fewer groups win the tie


def test_a_helper_task_is_shared_by_two_groups():
    # b helps a and c; a and c hurt each other: TAG puts b in two groups.
    tasks = ["a", "b", "c"]
    z = matrix(tasks, {("b", "a"): 1.0, ("b", "c"): 1.0, ("a", "c"): -1.0, ("c", "a"): -1.0, ("a", "b"): 0.5, ("c", "b"): 0.5})
    found = select_groups(z, tasks, 2)
    assert found[1].groups == [["a", "b", "c"]] and found[1].score == pytest.approx(0.5)
    assert found[2].groups == [["a", "b"], ["b", "c"]]
    assert found[2].score == pytest.approx(2.5)
    assert found[2].serving == {"a": 0, "b": 0, "c": 1}  # b's tie between its two groups goes to the first


def test_two_tasks_have_one_grouping():
    found = select_groups(torch.tensor([[0.0, -1.0], [-2.0, 0.0]]), ["x", "y"], 2)
    assert found[1].groups == found[2].groups == [["x", "y"]] and found[2].score == -3.0


def brute_force(z, tasks, max_groups):
    """The best score over every collection of at most ``max_groups`` groups of two or more tasks."""
    candidates = [c for r in range(2, len(tasks) + 1) for c in itertools.combinations(tasks, r)]
    best = -math.inf
    for k in range(1, max_groups + 1):
        for collection in itertools.combinations(candidates, k):
            if set().union(*collection) == set(tasks):
                best = max(best, grouping_score(z, tasks, collection).score)
    return best


@pytest.mark.parametrize("T,seed", [(3, 0), (4, 1), (4, 2), (5, 3)])
def test_search_matches_brute_force(T, seed):
    tasks = [f"t{i}" for i in range(T)]
    z = torch.randn(T, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    found = select_groups(z, tasks, min(T, 3))
    for g, grouping in found.items():
        assert len(grouping.groups) <= g
        assert grouping.score == pytest.approx(brute_force(z, tasks, g))
        assert grouping.score == pytest.approx(grouping_score(z, tasks, grouping.groups).score)


def test_ten_tasks_search_is_fast():
    import time

    z = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    start = time.process_time()
    found = select_groups(z, [f"t{i}" for i in range(10)], 4)
    assert time.process_time() - start < 10
    assert [len(found[g].groups) <= g for g in found] == [True] * 4
    assert found[1].score <= found[2].score <= found[3].score <= found[4].score


# -- in the training step (engine.affinity_every) -------------------------------------


def _train(tmp_path, name, *extra):
    from mtl.cli import main

    from conftest import QUICKSTART, quick

    run = tmp_path / name
    assert main(["train", QUICKSTART, *quick(run, 2, 4, "deterministic=true", "logging.log_every=2", *extra)]) == 0
    return run


def test_the_step_measures_affinity_without_changing_training(tmp_path):
    """``engine.affinity_every=3``: steps 0, 3 and 6 of 8 measured, each interval's mean
    logged as affinity/<from>/<onto>, the run's mean in results.json; the trained weights
    and every metric equal a run without it, bit for bit."""
    import json

    plain, measured = _train(tmp_path, "plain"), _train(tmp_path, "measured", "engine.affinity_every=3")
    a, b = (json.loads((r / "results.json").read_text()) for r in (plain, measured))
    assert a["splits"] == b["splits"] and "affinity" not in a
    assert b["affinity_steps"] == 3 and b["affinity_every"] == 3
    assert set(b["affinity"]) == {"mnist", "digits"} and all(set(row) == {"mnist", "digits"} for row in b["affinity"].values())
    ta, tb = (torch.load(r / "trunk.pt", weights_only=True)["trunk"] for r in (plain, measured))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    lines = [json.loads(line) for line in (measured / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "affinity/mnist/digits" in line]
    # Logged every 2 steps, measured at 0, 3 and 6: the intervals ending at steps 2, 4 and 8 hold one each.
    assert [line["step"] for line in logged] == [2, 4, 8]
    mean = sum(line["affinity/mnist/digits"] for line in logged) / 3
    assert b["affinity"]["mnist"]["digits"] == pytest.approx(mean, rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["weighting.name=mgda"], r"engine.affinity_every: .* weighting 'mgda' is gradient-level: use weighting.name=equal"),
    (["scheduler.name=round_robin"], r"engine.affinity_every: .* scheduler 'round_robin' samples tasks: use scheduler.name=all"),
    (["recipe.name=linear_probe"], r"engine.affinity_every: .* recipe 'linear_probe' freezes them in epoch 1: use recipe.name=fine_tune"),
    (["engine.affinity_every=-1"], r"engine.affinity_every: must be >= 0 \(0: no affinity\), got -1"),
])
def test_affinity_in_the_step_refuses_what_it_cannot_measure(tmp_path, extra, message):
    from mtl.config import ConfigError, load_config
    from mtl.trainer import Trainer

    from conftest import QUICKSTART, quick

    overrides = extra if "affinity_every" in extra[0] else ["engine.affinity_every=2", *extra]
    with pytest.raises(ConfigError, match=message):
        Trainer(load_config(QUICKSTART, quick(tmp_path / "run", 1, 2, *overrides)))
