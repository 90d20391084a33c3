"""Transfer recipes against their formulas on hand-sized models, and their use by the trainer.

End-to-end runs use the quickstart's two real tasks at reduced length, with smaller
batches and splits (``SMALL``), so that each run takes a fraction of a second.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl import checkpoint
from mtl.builders import build_components, build_lr_schedule, build_optimizer, build_recipe
from mtl.cli import main
from mtl.config import ConfigError, load_config, resolve
from mtl.heads import LinearHead
from mtl.model import MultiTaskModel
from mtl.recipes import LPFT, RECIPES, GradualUnfreezing, L2SP, LayerwiseLRDecay, LinearProbe, Recipe
from mtl.trainer import Trainer
from mtl.trunks import Trunk

from conftest import QUICKSTART, quick

SMALL = [
    "trainer.batch_size=16",
    *(
        f"tasks.{task}.{key}={value}"
        for task in ("mnist", "digits")
        for key, value in (("train_fraction", 0.05), ("val_fraction", 0.02), ("test_fraction", 0.02))
    ),
]
CONSTANT_LR = ["trainer.lr_schedule.name=constant", "trainer.lr_schedule.warmup_steps=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(run_dir, epochs, steps, *extra):
    return ["train", QUICKSTART, *quick(run_dir, epochs, steps, *SMALL, *extra)]


def _cfg(run_dir, *extra):
    return load_config(QUICKSTART, quick(run_dir, 1, 2, *SMALL, *extra))


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _part(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- a tiny model with BatchNorm and three layer groups ---------------------------------


class TinyTrunk(Trunk):
    """stem (conv+BN) → middle (conv+BN) → pool → last (linear+BN), times a scale in no group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())
        self.middle = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())
        self.last = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        self.scale = nn.Parameter(torch.ones(()))

    def layer_groups(self):
        return [("stem", self.stem), ("middle", self.middle), ("last", self.last)]

    def forward(self, x):
        return self.scale * self.last(self.middle(self.stem(x)).mean(dim=(2, 3)))


GROUPS = ("stem", "middle", "last")


def tiny_model():
    torch.manual_seed(0)
    return MultiTaskModel(TinyTrunk(), {"a": LinearHead((3,), 2), "b": LinearHead((3,), 2)})


def tiny_cfg(recipe=None, optimizer=None, lr_schedule=None):
    return resolve(
        {
            "output_dir": "unused",
            "tasks": {"mnist": {}},
            "trunk": {"name": "seed_net"},
            "recipe": recipe or {"name": "fine_tune"},
            "trainer": {
                "optimizer": optimizer or {"name": "sgd", "lr": 0.1},
                "lr_schedule": lr_schedule or {"name": "constant"},
            },
        }
    )


def start(recipe, model, epoch):
    """What the trainer does at each epoch start."""
    model.train()
    recipe.start_epoch(model, epoch)


def train_step(recipe, model):
    """One training step as the trainer takes it; AdamW so that weight decay would show too."""
    cfg = tiny_cfg(optimizer={"name": "adamw", "lr": 0.1, "weight_decay": 0.1})
    optimizer = build_optimizer(cfg, recipe.param_groups(model))
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,))
    out = model(x)
    loss = F.cross_entropy(out["a"], y) + F.cross_entropy(out["b"], y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def assert_probe_step_trains_only_heads(recipe, model):
    """A training step changes the heads and nothing of the trunk (weights, BN statistics)."""
    trunk_before, heads_before = _clone(model.trunk.state_dict()), _clone(model.heads.state_dict())
    assert any(k.endswith("num_batches_tracked") for k in trunk_before)
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    assert not any(m.training for m in model.trunk.modules())
    assert all(m.training for m in model.heads.modules())
    train_step(recipe, model)
    assert all(p.grad is None for p in model.trunk.parameters())
    assert _equal(model.trunk.state_dict(), trunk_before)
    after = model.heads.state_dict()
    assert all(not torch.equal(after[k], heads_before[k]) for k in after)


def assert_step_trains_everything(recipe, model):
    trunk_before = _clone(model.trunk.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    train_step(recipe, model)
    assert all(p.grad is not None for p in model.trunk.parameters())
    after = model.trunk.state_dict()
    assert all(not torch.equal(after[k], trunk_before[k]) for k in after)  # BN statistics too


def thawed(model):
    """Names of the trunk's trainable layer groups, checking that each group is wholly
    trainable and in train mode, or wholly frozen and in eval mode."""
    out = []
    for name, module in model.trunk.layer_groups():
        grads = {p.requires_grad for p in module.parameters()}
        modes = {m.training for m in module.modules()}
        assert len(grads) == 1 and modes == grads, name
        if grads == {True}:
            out.append(name)
    assert all(p.requires_grad for p in model.heads.parameters())
    assert all(m.training for m in model.heads.modules())
    return tuple(out)


# -- 1. the trainer runs every recipe, builds its optimizer groups, adds its penalty ---------

# seed_net: conv1 1·10·25+10 = 260, conv2 10·20·25+20 = 5020, fc 320·50+50 = 16050;
# each linear head 50·10+10 = 510. Over epochs 0 and 1:
HEADS = 2 * 510
TOTAL = 260 + 5020 + 16050 + HEADS
# Adapters the parameter-efficient recipes add to seed_net, at their defaults:
# lora r = 8 on conv1, conv2, fc: (1·25 + 10)·8 + (10·25 + 20)·8 + (320 + 50)·8 = 5400;
# residual adapters after conv1, conv2 (BN 2C + 1×1 conv C²): 20 + 100 + 40 + 400 = 560;
# ia3 one scale per output channel of conv1, conv2, fc: 10 + 20 + 50, as many as bitfit's biases.
BIASES = 10 + 20 + 50
ADDED = {"lora": 5400, "residual_adapters": 560, "ia3": BIASES}
TRAINABLE = {"linear_probe": HEADS, "gradual_unfreezing": HEADS + 16050, "bitfit": HEADS + BIASES}
TRAINABLE |= {name: HEADS + n for name, n in ADDED.items()}  # others: all


@pytest.mark.parametrize("name", RECIPES.names())
def test_every_registered_recipe_trains_the_quickstart_end_to_end(name, run_dir):
    assert main(_args(run_dir, 2, 2, f"recipe.name={name}")) == 0
    results = _results(run_dir)
    assert results["steps"] == 4
    params = results["parameters"]
    assert 0 < params["trainable"] <= params["total"] == TOTAL + ADDED.get(name, 0)
    assert params["trainable"] == TRAINABLE.get(name, TOTAL)
    for task in ("mnist", "digits"):
        assert torch.isfinite(torch.tensor(results["splits"]["test"][task]["loss"]))


def test_trainer_builds_the_optimizer_from_the_recipe_param_groups(tmp_path):
    cfg = _cfg(tmp_path / "run", *CONSTANT_LR, "recipe.name=layerwise_lr_decay", "recipe.decay=0.5")
    trainer = Trainer(cfg)
    # seed_net's groups conv1, conv2, fc at the quickstart's LR 0.002 · 0.5^(3 - i)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == pytest.approx({"heads": 0.002, "trunk.fc": 0.001, "trunk.conv2": 0.0005, "trunk.conv1": 0.00025})


class PushDigitsBias(Recipe):
    """Fine-tune with a penalty whose gradient, 1000 on each bias of the digits head, swamps the loss's."""

    def penalty(self, model):
        return 1000.0 * model.heads["digits"].fc.bias.sum()


def test_trainer_adds_the_recipe_penalty_to_the_loss_at_every_step(run_dir):
    sgd = ["trainer.optimizer.name=sgd", "trainer.optimizer.lr=0.0001"]
    recipe = f"recipe.name={PushDigitsBias.__module__}:PushDigitsBias"
    assert main(_args(run_dir, 1, 4, *CONSTANT_LR, *sgd, recipe)) == 0
    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    before = build_components(cfg).model.heads["digits"].fc.bias
    after = checkpoint.latest(run_dir / "checkpoints")[1]["model"]["heads.digits.fc.bias"]
    # 4 SGD steps of lr · (1000 + g), |g| ≤ 1 for the mean cross-entropy's bias gradient.
    assert torch.allclose(after - before, torch.full_like(before, -4 * 0.0001 * 1000), atol=4 * 0.0001)


# -- 2. linear probe ----------------------------------------------------------------------


def test_linear_probe_freezes_trunk_weights_and_batchnorm_statistics():
    model, recipe = tiny_model(), LinearProbe()
    recipe.setup(model)
    start(recipe, model, 0)
    assert_probe_step_trains_only_heads(recipe, model)
    start(recipe, model, 5)
    assert_probe_step_trains_only_heads(recipe, model)


# -- 3. LP-FT -----------------------------------------------------------------------------


def test_lp_ft_probes_before_probe_epochs_and_fine_tunes_from_then_on():
    model, recipe = tiny_model(), LPFT(probe_epochs=2)
    recipe.setup(model)
    for epoch in (0, 1):
        start(recipe, model, epoch)
        assert_probe_step_trains_only_heads(recipe, model)
    start(recipe, model, 2)
    assert_step_trains_everything(recipe, model)
    start(recipe, model, 3)
    assert_step_trains_everything(recipe, model)


def test_lp_ft_end_to_end_keeps_the_trunk_through_the_probe_and_fine_tunes_from_the_probed_head(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    overrides = [*CONSTANT_LR, "recipe.name=lp_ft", "recipe.probe_epochs=2"]

    # A copy of each step checkpoint, as written after each epoch.
    save = checkpoint.save

    def keep_each_epoch(state, path):
        save(state, path)
        if path.name.startswith("step-"):
            shutil.copy(path, tmp_path / f"last-{state['epoch']}.pt")

    # The model as each epoch starts (the trainer's own calls, after the parameter count's).
    at_start = {}
    start_epoch = LPFT.start_epoch

    def spy(self, model, epoch):
        start_epoch(self, model, epoch)
        at_start[epoch] = (_clone(model.state_dict()), all(p.requires_grad for p in model.parameters()))

    # Whether the trunk is in train mode (dropout on) at each training step.
    trunk_mode = []
    forward_groups = MultiTaskModel.forward_groups

    def record_mode(self, inputs, members):
        trunk_mode.append(self.trunk.training)
        return forward_groups(self, inputs, members)

    monkeypatch.setattr(checkpoint, "save", keep_each_epoch)
    monkeypatch.setattr(LPFT, "start_epoch", spy)
    monkeypatch.setattr(MultiTaskModel, "forward_groups", record_mode)
    assert main(_args(run_dir, 3, 2, *overrides)) == 0
    assert trunk_mode == [False] * 4 + [True] * 2

    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)  # as the trainer seeds before building the model
    initial = build_components(cfg).model.state_dict()
    after = {e: checkpoint.load(tmp_path / f"last-{e}.pt")["model"] for e in (1, 2, 3)}

    assert _equal(_part(at_start[0][0], "trunk."), _part(initial, "trunk."))
    for epoch in (1, 2):  # the probe: trunk untouched, heads trained
        assert _equal(_part(after[epoch], "trunk."), _part(initial, "trunk."))
        assert not _equal(_part(after[epoch], "heads."), _part(initial, "heads."))
    assert not at_start[1][1]
    probed, fine_tuning = at_start[2]
    assert fine_tuning
    assert _equal(probed, after[2])  # epoch 3 starts from the probed head (and the pretrained trunk)
    assert not _equal(_part(after[3], "trunk."), _part(initial, "trunk."))  # then the trunk trains
    assert _results(run_dir)["parameters"]["trainable"] == TOTAL


# -- 4. gradual unfreezing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "every, schedule",
    [
        (1, [(), ("last",), ("middle", "last"), GROUPS, GROUPS]),
        (2, [(), (), ("last",), ("last",), ("middle", "last"), ("middle", "last"), GROUPS, GROUPS]),
    ],
)
def test_gradual_unfreezing_thaws_one_group_every_epochs_from_the_last(every, schedule):
    model, recipe = tiny_model(), GradualUnfreezing(every=every)
    recipe.setup(model)
    for epoch in range(len(schedule)):  # as the trainer's parameter count does first
        recipe.start_epoch(model, epoch)
    for epoch, expected in enumerate(schedule):
        start(recipe, model, epoch)
        assert thawed(model) == expected, epoch
        everything = expected == GROUPS
        assert model.trunk.scale.requires_grad == everything  # in no group: trains once all do
        assert model.trunk.training  # modules outside the groups (dropout) keep train mode


def test_gradual_unfreezing_step_leaves_frozen_groups_and_their_statistics_unchanged():
    model, recipe = tiny_model(), GradualUnfreezing(every=1)
    start(recipe, model, 1)
    before = _clone(model.trunk.state_dict())
    train_step(recipe, model)
    after = model.trunk.state_dict()
    for name in ("stem.", "middle.", "scale"):
        assert _equal(_part(after, name), _part(before, name))
        assert all(p.grad is None for n, p in model.trunk.named_parameters() if n.startswith(name))
    last = _part(after, "last.")
    assert all(not torch.equal(last[k], _part(before, "last.")[k]) for k in last)


# -- 5. layer-wise LR decay ---------------------------------------------------------------


@pytest.mark.parametrize(
    "lr_schedule, factor",
    [
        ({"name": "linear", "end_factor": 0.0}, 0.75),  # 1 - 1/4 after 1 of 4 steps
        ({"name": "cosine"}, 0.5 * (1 + 0.7071067811865476)),  # 0.5 (1 + cos(π/4))
    ],
)
def test_layerwise_lr_decay_sets_group_lrs_and_the_schedule_keeps_their_ratios(lr_schedule, factor):
    model, recipe = tiny_model(), LayerwiseLRDecay(decay=0.5)
    cfg = tiny_cfg(recipe={"name": "layerwise_lr_decay", "decay": 0.5}, lr_schedule=lr_schedule)
    recipe.setup(model)
    optimizer = build_optimizer(cfg, recipe.param_groups(model))
    # G = 3: heads 0.1; last 0.1·0.5; middle 0.1·0.5²; stem and the ungrouped scale 0.1·0.5³.
    expected = {"heads": 0.1, "trunk.last": 0.05, "trunk.middle": 0.025, "trunk.stem": 0.0125, "trunk.other": 0.0125}
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx(expected)

    owner = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            assert id(p) not in owner
            owner[id(p)] = g["name"]
    assert set(owner) == {id(p) for p in model.parameters()}
    for name, module in model.trunk.layer_groups():
        assert all(owner[id(p)] == f"trunk.{name}" for p in module.parameters())
    assert owner[id(model.trunk.scale)] == "trunk.other"
    assert all(owner[id(p)] == "heads" for p in model.heads.parameters())

    schedule = build_lr_schedule(cfg, optimizer, total_steps=4)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(expected)
    optimizer.step()
    schedule.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({k: v * factor for k, v in expected.items()})


# -- 6. L2-SP -----------------------------------------------------------------------------


def test_l2_sp_penalty_by_hand_is_towards_the_weights_at_setup():
    model, recipe = tiny_model(), L2SP(alpha=0.5, beta=0.25)
    weight = model.trunk.last[0].weight  # 3×2
    with torch.no_grad():
        weight.fill_(1.0)
        for head in model.heads.values():
            head.fc.weight.zero_()
            head.fc.bias.zero_()
        model.heads["a"].fc.weight.fill_(1.0)  # 2×3 ones: ‖·‖² = 6
        model.heads["a"].fc.bias.fill_(2.0)  # 2 twos: ‖·‖² = 8
    recipe.setup(model)
    # Right after setup the trunk term is 0 (the reference is the trunk as set up, not 0):
    # Ω = β/2 · 14 = 1.75.
    assert recipe.penalty(model).item() == 1.75

    with torch.no_grad():
        weight.fill_(1.5)  # Δ = 0.5 on 6 entries: ‖Δ‖² = 1.5
    penalty = recipe.penalty(model)
    assert penalty.item() == 0.5 * 0.5 * 1.5 + 0.5 * 0.25 * 14  # 0.375 + 1.75
    penalty.backward()
    # ∂Ω/∂w_S = α (w_S − w_S⁰), ∂Ω/∂w_H = β w_H
    assert torch.equal(weight.grad, torch.full_like(weight, 0.25))
    others = [p for p in model.trunk.parameters() if p is not weight]
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in others)
    assert torch.equal(model.heads["a"].fc.bias.grad, torch.full((2,), 0.5))
    assert torch.equal(model.heads["b"].fc.weight.grad, torch.zeros(2, 3))


def test_l2_sp_alpha_only_pulls_towards_reference_and_beta_only_decays_heads():
    model = tiny_model()
    trunk_only, heads_only = L2SP(alpha=1.0, beta=0.0), L2SP(alpha=0.0, beta=1.0)
    trunk_only.setup(model)
    heads_only.setup(model)
    heads_norm = sum((p**2).sum() for p in model.heads.parameters())
    assert trunk_only.penalty(model).item() == 0.0
    assert heads_only.penalty(model).item() == pytest.approx(0.5 * heads_norm.item())
    with torch.no_grad():
        model.trunk.scale.add_(2.0)
    assert trunk_only.penalty(model).item() == pytest.approx(0.5 * 4.0)
    assert heads_only.penalty(model).item() == pytest.approx(0.5 * heads_norm.item())


# -- 7. nothing to train --------------------------------------------------------------------


class FreezeAll(Recipe):
    """Trains nothing at all."""

    def start_epoch(self, model, epoch):
        model.requires_grad_(False)


def test_recipe_that_leaves_nothing_to_train_fails_before_training(run_dir, capsys):
    name = f"{FreezeAll.__module__}:FreezeAll"
    assert main(_args(run_dir, 2, 2, f"recipe.name={name}")) == 2
    err = capsys.readouterr().err
    assert f"recipe: {name!r} leaves no parameter to train" in err and "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "node, key",
    [
        ({"name": "lp_ft", "probe_epochs": 0}, "recipe.probe_epochs"),
        ({"name": "layerwise_lr_decay", "decay": 0}, "recipe.decay"),
        ({"name": "layerwise_lr_decay", "decay": 1.5}, "recipe.decay"),
        ({"name": "gradual_unfreezing", "every": 0}, "recipe.every"),
        ({"name": "l2_sp", "alpha": -1}, "recipe.alpha"),
        ({"name": "l2_sp", "beta": -1}, "recipe.beta"),
    ],
)
def test_bad_recipe_argument_is_a_config_error_naming_the_key(node, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        build_recipe(tiny_cfg(recipe=node))
    assert str(e.value).startswith("recipe: ")


def test_bad_recipe_argument_stops_the_cli_before_a_run_directory(run_dir, capsys):
    assert main(_args(run_dir, 2, 2, "recipe.name=lp_ft", "recipe.probe_epochs=0")) == 2
    assert "recipe.probe_epochs must be >= 1" in capsys.readouterr().err
    assert not run_dir.exists()


# -- 8. init_from -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A short first stage on the quickstart; its best checkpoint starts later stages."""
    run_dir = tmp_path_factory.mktemp("stage1") / "run"
    assert main(_args(run_dir, 1, 2)) == 0
    return run_dir / "checkpoints" / "best.pt"


def test_init_from_loads_trunk_and_continuing_heads_and_a_misfit_head_starts_fresh(stage1, tmp_path):
    saved = checkpoint.load(stage1)["model"]
    overrides = [f"init_from={stage1}", "tasks.digits.head.name=mlp"]
    with pytest.warns(UserWarning, match="head of task 'digits'.*does not fit"):
        assert main(_args(tmp_path / "stage2", 1, 2, *overrides)) == 0

    cfg = _cfg(tmp_path / "unused", *overrides)
    torch.manual_seed(cfg.seed)
    with pytest.warns(UserWarning, match="head of task 'digits'"):
        model = build_components(cfg).model.state_dict()
    cfg.init_from = None
    torch.manual_seed(cfg.seed)
    fresh = build_components(cfg).model.state_dict()

    for part in ("trunk.", "heads.mnist."):
        assert _equal(_part(model, part), _part(saved, part))
        assert not _equal(_part(fresh, part), _part(saved, part))  # stage 1 did change them
    assert _equal(_part(model, "heads.digits."), _part(fresh, "heads.digits."))
    assert "net.0.weight" in _part(model, "heads.digits.")


def test_init_from_a_plain_state_dict_is_refused_pointing_to_trunk_checkpoint(stage1, tmp_path):
    plain = tmp_path / "trunk_weights.pt"
    torch.save(_part(checkpoint.load(stage1)["model"], "trunk."), plain)
    with pytest.raises(ConfigError, match=r"^init_from: .*use trunk\.checkpoint") as e:
        build_components(_cfg(tmp_path / "unused", f"init_from={plain}"))
    assert str(plain) in str(e.value)
    # ... and the advice works.
    model = build_components(_cfg(tmp_path / "unused", f"trunk.checkpoint={plain}")).model
    assert _equal(model.trunk.state_dict(), torch.load(plain))


def test_init_from_a_missing_file_is_a_config_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "best.pt"
    with pytest.raises(ConfigError, match=r"^init_from: ") as e:
        build_components(_cfg(tmp_path / "unused", f"init_from={missing}"))
    assert str(missing) in str(e.value) and "not found" in str(e.value)


def test_l2_sp_reference_is_the_trunk_loaded_by_init_from(stage1, tmp_path):
    trainer = Trainer(_cfg(tmp_path / "run", f"init_from={stage1}", "recipe.name=l2_sp", "recipe.beta=0.5"))
    recipe, model = trainer.recipe, trainer.model
    saved = _part(checkpoint.load(stage1)["model"], "trunk.")
    names = [n for n, _ in model.trunk.named_parameters()]
    assert len(recipe.reference) == len(names)
    for name, (param, reference) in zip(names, recipe.reference):
        assert param is model.trunk.get_parameter(name)
        assert torch.equal(reference, saved[name])
    heads = sum((p**2).sum() for p in model.heads.parameters())
    assert recipe.penalty(model).item() == pytest.approx(0.25 * heads.item())
