from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtl.builders import build_components
from mtl.config import ConfigError, load_config, resolve, to_dict

from conftest import QUICKSTART, ROOT

BASE = {"output_dir": "x", "tasks": {"mnist": {}}, "trunk": {"name": "seed_net"}}


def _bundled(path):
    """A config whose tasks all use data that pip packages bring (the others, e.g. NYUv2, are
    validated by their task-library tests on a tiny tree in the real layout)."""
    from mtl.task import TASKS

    tasks = OmegaConf.load(path).tasks
    return not any(getattr(TASKS.get((node or {}).get("name", key)), "needs_data_root", False) for key, node in tasks.items())


SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


def test_configs_needing_local_data_are_covered_elsewhere():
    local = {p.name for p in SHIPPED if not _bundled(p)}
    assert local == {"nyuv2.yaml", "pretrained_text.yaml", "pretrained_vision.yaml"}, "validate a new data-root config on a tiny tree in its task-library test"


@pytest.mark.parametrize("path", [str(p.relative_to(ROOT)) for p in SHIPPED if _bundled(p)])
def test_every_shipped_config_validates(path):
    cfg = load_config(ROOT / path)
    parts = build_components(cfg)
    assert set(parts.model.heads) == set(cfg.tasks)
    if "compare" in OmegaConf.load(ROOT / path):
        from mtl.compare import Grid

        Grid(cfg).preflight()


def test_overrides_apply_and_types_are_converted():
    cfg = load_config(QUICKSTART, ["trainer.epochs=3", "trainer.optimizer.lr=0.1", "tasks.digits.size=16", "~tasks.mnist"])
    assert cfg.trainer.epochs == 3 and isinstance(cfg.trainer.epochs, int)
    assert cfg.trainer.optimizer.lr == 0.1
    assert list(cfg.tasks) == ["digits"] and cfg.tasks.digits.size == 16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.epoch=3"], "trainer.epoch: unknown key. Did you mean 'epochs'?"),
        (["seeed=1"], "seeed: unknown key. Did you mean 'seed'?"),
        (["logging.wandb.mod=online"], "logging.wandb.mod: unknown key. Did you mean 'mode'?"),
        (["trainer.epochs=three"], "trainer.epochs: Value 'three'"),
        (["trainer.epochs=0"], "trainer.epochs: must be >= 1"),
        (["logging.wandb.mode=onlin"], "logging.wandb.mode: must be one of online, offline, disabled"),
        (["device=gpu"], "device: must be auto, cpu, cuda or cuda:N"),
        (["trainer.select_on=mnst/accuracy"], "trainer.select_on: .* Did you mean 'mnist'"),
        (["~trunk.name"], "trunk.name: missing"),
        (["~output_dir"], "required value missing: output_dir"),
        (["epochs"], "override 'epochs' must be key=value"),
        (["~trainer.nope"], "~trainer.nope: no such key"),
        (["engine.every=0"], "engine.every: must be >= 1"),
        (["engine.jacobian_chunk=-1"], "engine.jacobian_chunk: must be >= 0"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, overrides)


def test_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ntrainer: {epoch: 2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: trainer.epoch: unknown key"):
        load_config(bad)
    bad.write_text("output_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": {"mnst": {}}}, "unknown task 'mnst'. Did you mean 'mnist'"),
        ({"tasks": {"mnist": {"split_sed": 1}}}, "tasks.mnist.split_sed: unknown argument .* Did you mean 'split_seed'"),
        ({"tasks": {"mnist": {"val_fraction": 1.5}}}, r"tasks.mnist.*val_fraction.*must be in"),
        ({"tasks": {"mnist": {"head": {"name": "linaer"}}}}, "unknown head 'linaer'. Did you mean 'linear'"),
        ({"tasks": {"mnist": {"head": {"hiden": [3]}}}}, "tasks.mnist.head.hiden: unknown argument"),
        ({"trunk": {"name": "resnet19"}}, "unknown trunk 'resnet19'. Did you mean"),
        ({"trunk": {"name": "mlp"}}, "trunk.in_features: required argument is missing"),
        ({"trunk": {"name": "seed_net", "in_channels": 3}}, "tasks.mnist: its inputs have shape \\(1, 28, 28\\)"),
        ({"tasks": {"digits": {"size": 16}}}, "tasks.digits: its inputs have shape \\(1, 16, 16\\).*28"),
        ({"weighting": {"name": "equall"}}, "unknown weighting 'equall'"),
        ({"weighting": {"name": "equal", "reduction": "max"}}, "weighting: weighting.reduction must be"),
        ({"trainer": {"select_on": "mnist/acc"}}, "trainer.select_on: task 'mnist' has no metric 'acc'"),
        ({"trunk": {"name": "seed_net", "checkpoint": "/no/such/file.pt"}}, "trunk.checkpoint.*/no/such/file.pt"),
    ],
)
def test_bad_components_fail_before_training(change, message):
    raw = OmegaConf.to_container(OmegaConf.merge(BASE, change))
    with pytest.raises(ConfigError, match=message):
        build_components(resolve(raw))


def test_cuda_without_gpu_is_a_clear_error():
    import torch

    from mtl.builders import resolve_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible; this checks the message shown without one")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible; use device=cpu"):
        resolve_device("cuda")


def test_resolved_config_round_trips(tmp_path):
    from mtl.config import save_config

    cfg = load_config(QUICKSTART, ["seed=5"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_a_written_mapping_replaces_the_default_instead_of_merging():
    cfg = resolve({**BASE, "trainer": {"optimizer": {"name": "sgd"}}, "compare": {"regimes": {"joint": {}}}})
    sgd = dict(cfg.trainer.optimizer)
    assert sgd["name"] == "sgd" and "betas" not in sgd and sgd["lr"] == 0.001  # SGD's own default lr, not Adam's arguments
    assert list(cfg.compare.regimes) == ["joint"]
    adam = dict(resolve(BASE).trainer.optimizer)
    assert adam["name"] == "adam" and adam["lr"] == 1e-3 and "momentum" not in adam


def test_checkpoint_of_a_smaller_architecture_fails_before_training(tmp_path):
    import torch

    from mtl.trunks import TRUNKS

    path = tmp_path / "resnet18.pt"
    torch.save({"trunk": TRUNKS.get("resnet18")(in_channels=1).state_dict()}, path)
    raw = OmegaConf.to_container(OmegaConf.merge(BASE, {"trunk": {"name": "resnet34", "in_channels": 1, "checkpoint": str(path)}}))
    with pytest.raises(ConfigError, match=r"trunk.checkpoint: .*lacks \d+ weights of the configured trunk"):
        build_components(resolve(raw))


def test_component_argument_types_are_checked():
    raw = OmegaConf.to_container(OmegaConf.merge(BASE, {"tasks": {"digits": {"size": "abc"}}}))
    with pytest.raises(ConfigError, match=r"tasks.digits.size: expected int, got 'abc'"):
        build_components(resolve(raw))


def test_imports_register_user_components(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(
        "from mtl import register_task\nfrom tasks.digits import Digits\n\n"
        "@register_task('my_digits')\nclass MyDigits(Digits):\n    '''Digits under another name.'''\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = OmegaConf.to_container(OmegaConf.merge(BASE, {"imports": ["my_plugin"], "tasks": {"my_digits": {}}}))
    raw["tasks"] = {"my_digits": {}}
    assert set(build_components(resolve(raw)).model.heads) == {"my_digits"}
    with pytest.raises(ConfigError, match=r"imports\[0\]: cannot import 'nope_xyz'"):
        build_components(resolve({**BASE, "imports": ["nope_xyz"]}))


def test_yaml_numbers_with_an_exponent_are_floats(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as the string '1e-3'; torch then failed comparing it with 0.
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\ntasks: {mnist: {}}\ntrunk: {name: seed_net}\n"
                    "trainer: {optimizer: {name: adamw, lr: 1e-3, weight_decay: 5e-4, eps: 1.5E8}}\n")
    optimizer = load_config(path).trainer.optimizer
    assert (optimizer.lr, optimizer.weight_decay, optimizer.eps) == (1e-3, 5e-4, 1.5e8)
    path.write_text("output_dir: x\ntasks: {mnist: {}}\ntrunk: {name: seed_net}\ntrunk: {name: mlp}\n")
    with pytest.raises(ConfigError, match="duplicate key 'trunk'"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed=-1"], r"seed: a seed must be an integer in \[0, 2\^32\), got -1"),
        (["seed=4294967296"], r"seed: a seed must be an integer in \[0, 2\^32\)"),
        (["tasks.digits.split_seed=-1"], r"tasks.digits.split_seed: a seed must be an integer in \[0, 2\^32\)"),
        (["compare.seeds=[0, 18446744073709551616]"], r"compare.seeds\[1\]: a seed must be an integer"),
        (["trainer.optimizer.lr=.inf"], "trainer.optimizer.lr: inf is not a finite number"),
        (["trainer.grad_clip=.nan"], "trainer.grad_clip: nan is not a finite number"),
        (["scheduler={name: temperature, tau: .inf}"], "scheduler.tau: inf is not a finite number"),
        (["trainer.optimizer.lr='0.1'"], r"trainer.optimizer.lr: expected a number, got '0.1' \(str\); write it unquoted"),
        (["trainer.optimizer.weight_decay=-0.1"], "trainer.optimizer.weight_decay: must be >= 0"),
        (["trainer.optimizer.betas=[0.9, 1.5]"], r"trainer.optimizer.betas: must be two numbers in \[0, 1\)"),
        (["trainer.device_data_limit_mb=-1"], "trainer.device_data_limit_mb: must be >= 0"),
        (["output_dir=''"], "output_dir: is empty"),
        (["compare.fractions=[]"], "compare.fractions: list at least one"),
        (["compare.fractions=[1.5]"], r"compare.fractions\[0\]: 1.5 is outside \(0, 1\]"),
        (["compare.fractions=[0.5, [0]]"], r"compare.fractions\[1\]: must be a number in \(0, 1\], got \[0\]"),
        (["imports=[[x]]"], r"imports\[0\]: must name a module to import"),
        (["compare.seeds=[]"], "compare.seeds: list at least one seed"),
        (["compare.seeds=[1, 1]"], "compare.seeds: each seed once"),
        (["compare.regimes.joint=2.5"], "compare.regimes.joint: must be a mapping"),
        (["compare.regimes.sequential=[1, 2]"], "compare.regimes.sequential: must be a mapping"),
        (["compare.regimes.sequential.recipes=[2.5]"], r"compare.regimes.sequential.recipes\[0\]: must be a recipe name"),
        (["compare.stages={target: 5}"], "compare.stages.target: must be a mapping of config overrides"),
        (["compare.seeds[7]=1"], r"override 'compare.seeds\[7\]=1': compare.seeds\[7\]: list index out of range"),
        (["trainer=[x]"], "trainer: must be a mapping"),
        (["tasks.mnist.head=.nan"], "tasks.mnist.head: nan is not a finite number"),
        (["tasks.mnist.head='0.5'"], "tasks.mnist.head: must be a mapping"),
        (["trunk.name=[1]"], "trunk.name: must be a registered name"),
    ],
)
def test_wrong_numbers_and_shapes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, overrides)


def test_a_list_item_is_set_by_its_index():
    # A dotlist merge turned compare.seeds[2]=8 into a mapping {'2': 8}, which OmegaConf could not merge into the list.
    assert list(load_config(QUICKSTART, ["compare.seeds[2]=8"]).compare.seeds) == [0, 1, 8]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trunk={name: mlp, in_features: 784, hidden: [-4]}"], r"trunk: trunk.hidden\[0\] must be >= 1 \(an integer\), got -4"),
        (["trunk={name: mlp, in_features: 784, hidden: [0]}"], r"trunk.hidden\[0\] must be >= 1"),
        (["trunk={name: mlp, in_features: 784, hidden: []}"], "trunk.hidden must list layer sizes"),
        (["trunk.features=0"], r"trunk.features must be >= 1 \(an integer\), got 0"),
        (["trunk.dropout=true"], r"trunk.dropout: expected int or float, got True \(bool\)"),
        (["trunk.dropout=1"], r"trunk.dropout must be in \[0, 1\)"),
        (["tasks.mnist.head={name: mlp, hidden: [-1]}"], r"tasks.mnist.head: head.hidden\[0\] must be >= 1"),
        (["tasks.mnist.head={name: mlp, hidden: [0]}"], r"head.hidden\[0\] must be >= 1"),
        (["tasks.mnist.head.dropout=1.5"], r"tasks.mnist.head: head.dropout must be in \[0, 1\)"),
    ],
)
def test_component_arguments_out_of_range_fail_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_components(load_config(QUICKSTART, ["~compare", *overrides]))


def test_resolved_config_holds_every_components_effective_arguments():
    cfg = load_config(QUICKSTART, ["scheduler={name: temperature}", "tasks.digits.head={name: mlp}"])
    assert dict(cfg.scheduler) == {"name": "temperature", "tau": 2.0, "cap": None}
    assert cfg.trainer.optimizer.betas == [0.9, 0.999] and cfg.trainer.optimizer.lr == 0.002
    assert cfg.trunk.dropout == 0.5 and cfg.weighting.reduction == "sum"
    assert cfg.tasks.digits.size == 28 and cfg.tasks.mnist.val_fraction == 0.1
    assert list(cfg.tasks.digits.head.hidden) == [256]
    # What a subclass passes to its base itself (Digits: num_classes=10) is no config argument.
    assert "num_classes" not in cfg.tasks.digits
    # Resolving the saved config again changes nothing (a resume compares the two).
    assert to_dict(resolve(to_dict(cfg))) == to_dict(cfg)


def test_a_stage_that_names_another_component_does_not_inherit_its_arguments(tmp_path):
    from mtl.compare import plan, stage_config

    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "recipe={name: lp_ft, probe_epochs: 3}",
                                   "compare.regimes={sequential: {recipes: [linear_probe]}}", "compare.seeds=[0]", "compare.fractions=[1.0]"])
    cell = next(c for c in plan(cfg) if c.recipe == "linear_probe")
    stage = stage_config(cfg, cell, 1, tmp_path / "t", {}, ["digits"])
    assert to_dict(stage.recipe) == {"name": "linear_probe"}


@pytest.mark.parametrize(
    "old, new",
    [("trainer.weighting_every=3", "engine.every=3"), ("trainer.jacobian_chunk=2", "engine.jacobian_chunk=2"),
     ("trainer.staged_gramian=false", "engine.staged_gramian=False")],
)
def test_the_gradient_engines_old_trainer_keys_name_their_new_place(old, new, tmp_path):
    with pytest.raises(ConfigError, match=f"{old.split('=')[0]}: moved to {new.split('=')[0]}; write {new} instead"):
        load_config(QUICKSTART, [old])
    path = tmp_path / "old.yaml"
    path.write_text(f"output_dir: x\ntasks: {{mnist: {{}}}}\ntrunk: {{name: seed_net}}\ntrainer: {{{old.split('.')[1].replace('=', ': ')}}}\n")
    with pytest.raises(ConfigError, match=f"moved to {new.split('=')[0]}"):
        load_config(path)
    cfg = load_config(QUICKSTART, [new])
    key, value = new.split("=")
    assert str(OmegaConf.select(cfg, key)) == value
