"""Bad input fails before training, with one message that names the problem and the fix.

Each case is a row of ``CASES``: what makes the input bad (overrides of a tiny wine run, a
config file, files written beside it, a command line) and the substrings the error must
contain. Every row runs the real command line, ``mtl.cli.main``, and must exit with code 2,
print its message on stderr without a traceback, and leave the run directory as it found it:
nothing is written before the checks pass.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import yaml

from mtl import tensor_splits
from mtl.cli import main
from mtl.task import ClassificationTask, MultiLabelTask, RegressionTask, Splits
from mtl.trunks import TRUNKS

pytestmark = pytest.mark.usefixtures("one_thread")

# -- tasks with bad data, named in configs by import path ------------------------------

X = torch.randn(60, 13, generator=torch.Generator().manual_seed(0))  # wine-shaped inputs for the mlp trunk
INDEX = torch.arange(len(X))


class _ThreeClasses(ClassificationTask):
    def __init__(self, **kwargs):
        super().__init__(num_classes=3, **kwargs)


class LabelsBeyondClasses(_ThreeClasses):
    def build_datasets(self) -> Splits:
        return tensor_splits(X, INDEX % 5, self)


class NegativeLabels(_ThreeClasses):
    def build_datasets(self) -> Splits:
        return tensor_splits(X, INDEX % 3 - 1, self)


class FractionalLabels(_ThreeClasses):
    def build_datasets(self) -> Splits:
        return tensor_splits(X, (INDEX % 3) * 0.5, self)


class OneHotLabels(_ThreeClasses):
    def build_datasets(self) -> Splits:
        return tensor_splits(X, F.one_hot(INDEX % 3, 3), self)


class EmptyValidation(_ThreeClasses):
    def build_datasets(self) -> Splits:
        full = tensor_splits(X, INDEX % 3, self)
        return Splits(full.train, torch.utils.data.Subset(full.val, []), full.test)


class WideRegressionTargets(RegressionTask):
    """One output configured, three values per target."""

    def build_datasets(self) -> Splits:
        return tensor_splits(X, torch.randn(len(X), 3), self)


class TooFewLabels(MultiLabelTask):
    """Four labels configured, three per target."""

    def __init__(self, **kwargs):
        super().__init__(num_labels=4, **kwargs)

    def build_datasets(self) -> Splits:
        return tensor_splits(X, torch.ones(len(X), 3), self)


def here(name: str) -> str:
    return f"{__name__}:{name}"


# -- files some cases need --------------------------------------------------------------


def seed_net_weights(tmp: Path, config: Path) -> None:
    torch.save(TRUNKS.get("seed_net")().state_dict(), tmp / "seed_net.pt")


def wider_mlp_weights(tmp: Path, config: Path) -> None:
    torch.save(TRUNKS.get("mlp")(in_features=13, hidden=[32]).state_dict(), tmp / "mlp32.pt")


def garbage_file(tmp: Path, config: Path) -> None:
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint\x00\x01\x02")


def pickled_module(tmp: Path, config: Path) -> None:
    torch.save({"trunk": torch.nn.Linear(13, 16)}, tmp / "pickled.pt")  # a module, not its state dict


def cifar_root_without_batches(tmp: Path, config: Path) -> None:
    (tmp / "cifar" / "train").mkdir(parents=True)


def office_root_without_images(tmp: Path, config: Path) -> None:
    (tmp / "office" / "amazon" / "back_pack").mkdir(parents=True)  # the images/ level is missing


def finished_run(tmp: Path, config: Path) -> None:
    """A real run in the output directory, for the cases that meet one."""
    assert main(["train", str(config)]) == 0


# -- the cases --------------------------------------------------------------------------

TINY = {
    "output_dir": "{tmp}/run",
    "device": "cpu",
    "tasks": {"wine": {}},
    "trunk": {"name": "mlp", "in_features": 13, "hidden": [16]},
    "trainer": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 16},
    "logging": {"progress_bar": False, "wandb": {"mode": "disabled"}},
}
TWO_INPUTS = {**TINY, "tasks": {"a": {"name": "wine"}, "b": {"name": "wine", "split_seed": 1}}}


@dataclass
class Case:
    id: str
    args: list[str]  # after the config path: key=value overrides; "{tmp}" is the test's folder
    expect: tuple[str, ...]  # the error must contain each: the key or thing at fault, and the fix
    config: dict | str = field(default_factory=lambda: TINY)  # YAML content, as a mapping or as text
    prepare: Callable[[Path, Path], None] | None = None  # writes what the case needs, given (folder, config)
    command: str = "train"
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None  # why the case cannot be shown on this machine, if it cannot


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


CASES = [
    # The command line and the config file.
    Case("unknown_subcommand", [], ("invalid choice: 'trian'", "choose from", "validate"), command="trian"),
    Case("missing_config_file", [], ("not found", "check the path"), config="MISSING"),
    Case("yaml_syntax_error", [], ("not valid YAML", "line 3, column 1", "expected ',' or '}'"),
         config="output_dir: x\ntasks: {wine: {}\ntrunk: {name: mlp}\n"),
    Case("yaml_not_a_mapping", [], ("top level must be a mapping",), config="- wine\n- mlp\n"),
    Case("duplicate_task_names", [], ("duplicate key 'wine'", "line 4", "also on line 3", "each with name: <task>"),
         config="output_dir: '{tmp}/run'\ntasks:\n  wine: {}\n  wine: {split_seed: 1}\ntrunk: {name: mlp, in_features: 13}\n"),
    Case("override_without_equals", ["trainer.epochs"], ("override 'trainer.epochs' must be key=value",)),
    Case("override_not_yaml", ["trainer.optimizer={name:adam,betas:[0.9]}"],
         ("not valid YAML", "space after each ':'", "'trainer.optimizer={name: sgd, lr: 0.1}'")),
    Case("override_mapping_without_spaces", ["trainer.optimizer={name:sgd}"],
         ("'name:sgd' reads as one key", "{name: sgd}")),
    # Keys, types and values of the run schema.
    Case("unknown_key", ["trainer.epoch=2"], ("trainer.epoch: unknown key", "Did you mean 'epochs'")),
    Case("unknown_nested_key", ["logging.wandb.mod=online"], ("logging.wandb.mod: unknown key", "Did you mean 'mode'")),
    Case("wrong_type", ["trainer.batch_size=big"], ("trainer.batch_size", "'big'", "could not be converted to Integer")),
    Case("section_not_a_mapping", ["trainer=5"], ("trainer: must be a mapping", "trainer.epochs=VALUE")),
    Case("component_not_a_mapping", ["trunk=mlp"], ("trunk: must be a mapping", "write trunk: {name: mlp}")),
    Case("list_given_a_number", ["compare.seeds=3"], ("compare.seeds: must be a list", "compare.seeds=[3]")),
    Case("missing_required_value", ["~trunk"], ("required value missing: trunk", "set it in the YAML or as key=value")),
    Case("no_tasks", [], ("tasks: define at least one task",), config={**TINY, "tasks": {}}),
    Case("zero_epochs", ["trainer.epochs=0"], ("trainer.epochs: must be >= 1",)),
    Case("zero_batch_size", ["trainer.batch_size=0"], ("trainer.batch_size: must be >= 1",)),
    Case("negative_lr", ["trainer.optimizer.lr=-0.1"], ("trainer.optimizer.lr: must be > 0", "trainer.optimizer.lr=0.001")),
    Case("bad_precision", ["trainer.precision=fp16"], ("trainer.precision: must be fp32 or bf16",)),
    Case("bad_device_name", ["device=gpu"], ("device: must be auto, cpu, cuda or cuda:N",)),
    Case("cuda_without_gpu", ["device=cuda"], ("no CUDA GPU is visible", "use device=cpu or device=auto"),
         skip="a GPU is visible" if torch.cuda.is_available() else None),
    Case("select_on_unknown_metric", ["trainer.select_on=wine/acc"],
         ("trainer.select_on: task 'wine' has no metric 'acc'", "accuracy, macro_f1, loss")),
    # Components: names, arguments and their types.
    Case("unknown_task", ["tasks.wine.name=wien"], ("unknown task 'wien'", "Did you mean 'wine'", "Available:", "mnist")),
    Case("unknown_trunk", ["trunk.name=mpl"], ("unknown trunk 'mpl'", "Did you mean 'mlp'", "Available:", "resnet18")),
    Case("unknown_head", ["tasks.wine.head.name=lineer"], ("tasks.wine.head: unknown head 'lineer'", "Did you mean 'linear'", "Available:")),
    Case("unknown_weighting", ["weighting.name=pcgrd"], ("unknown weighting 'pcgrd'", "Did you mean 'pcgrad'", "Available:")),
    Case("unknown_scheduler", ["scheduler.name=roundrobin"], ("unknown scheduler 'roundrobin'", "Did you mean 'round_robin'", "Available:")),
    Case("unknown_optimizer", ["trainer.optimizer.name=adamm"], ("unknown optimizer 'adamm'", "Did you mean 'adam'", "Available:")),
    Case("unknown_lr_schedule", ["trainer.lr_schedule.name=cosin"], ("unknown lr_schedule 'cosin'", "Did you mean 'cosine'")),
    Case("unknown_recipe", ["recipe.name=finetune"], ("unknown recipe 'finetune'", "Did you mean 'fine_tune'")),
    Case("unknown_argument", ["tasks.wine.split_sed=1"], ("tasks.wine.split_sed: unknown argument", "Did you mean 'split_seed'")),
    Case("argument_of_wrong_type", ["tasks.wine.split_seed=x"], ("tasks.wine.split_seed: expected int", "got 'x'")),
    Case("missing_argument", ["~trunk.in_features"], ("trunk.in_features: required argument is missing",)),
    Case("argument_the_task_sets_itself", ["tasks.wine.num_classes=5"], ("tasks.wine.num_classes", "sets num_classes itself; remove this key")),
    Case("import_path_to_nothing", ["tasks.wine.name=no_such_module:Task"], ("tasks.wine", "cannot import module 'no_such_module'")),
    Case("missing_plugin", ["imports=[no_such_plugin]"], ("imports[0]: cannot import 'no_such_plugin'", "looked up from the working directory")),
    # Data: fractions, roots and layouts, labels and targets.
    Case("fraction_out_of_range", ["tasks.wine.train_fraction=1.5"], ("tasks.wine: train_fraction must be in (0, 1]", "got 1.5")),
    Case("held_out_fractions_too_large", ["tasks.wine.val_fraction=0.5", "tasks.wine.test_fraction=0.5"],
         ("tasks.wine: val_fraction + test_fraction must be < 1",)),
    Case("split_too_small", ["tasks.wine.val_fraction=0.001"],
         ("tasks.wine", "val_fraction 0.001", "142/0/36", "leave each split at least one sample")),
    Case("empty_split", [f"tasks.wine.name={here('EmptyValidation')}"],
         ("tasks.wine (test_bad_input:EmptyValidation): the val split is empty", "at least one sample")),
    Case("data_root_missing", ["tasks.wine.name=celeba"], ("tasks.wine", "need root=PATH", "Expected layout: <root>/celeba/")),
    Case("data_root_wrong_layout", ["tasks.wine.name=cifar10", "tasks.wine.root={tmp}/cifar"],
         ("cifar/cifar-10-batches-py does not exist", "Expected layout: <root>/cifar-10-batches-py/"), prepare=cifar_root_without_batches),
    Case("domain_folder_wrong_layout", ["tasks.wine.name=office31", "tasks.wine.domain=amazon", "tasks.wine.root={tmp}/office"],
         ("amazon/images does not exist", "Expected layout: <root>/<amazon|dslr|webcam>/images/<class>/*.jpg"),
         prepare=office_root_without_images),
    Case("dense_data_root_missing", ["tasks.wine.name=nyuv2_semantic", "tasks.wine.root={tmp}/nyuv2"],
         ("NYUv2: folder", "not found", "set the task's root to the unzipped folder")),
    Case("label_beyond_the_classes", [f"tasks.wine.name={here('LabelsBeyondClasses')}"],
         ("tasks.wine (test_bad_input:LabelsBeyondClasses): train split: label 4 is outside the head's 3 classes 0..2", "set num_classes to at least 5")),
    Case("negative_label", [f"tasks.wine.name={here('NegativeLabels')}"],
         ("label -1 is outside the head's 3 classes", "a missing label is MISSING_LABEL (-100)")),
    Case("fractional_label", [f"tasks.wine.name={here('FractionalLabels')}"],
         ("class labels must be whole numbers", "got 0.5")),
    Case("one_hot_labels", [f"tasks.wine.name={here('OneHotLabels')}"],
         ("targets have shape (3,) per sample", "one class index per sample", "not one-hot")),
    Case("regression_target_shape", [f"tasks.wine.name={here('WideRegressionTargets')}"],
         ("targets have shape (3,) per sample", "num_outputs=1", "Set num_outputs to the targets' size")),
    Case("multilabel_target_shape", [f"tasks.wine.name={here('TooFewLabels')}"],
         ("targets have shape (3,) per sample", "head's output has shape (4,)", "set num_labels")),
    Case("input_shape_not_the_trunks", ["trunk.in_features=10"],
         ("tasks.wine: its inputs have shape (13,)", "expects (in_features,) vectors")),
    # Weights: pretrained and from files.
    Case("torchvision_weights_not_cached", ["trunk={name: resnet18, weights: IMAGENET1K_V1, download: false}", "~trunk.in_features", "~trunk.hidden"],
         ("pretrained weights not found at {tmp}/torch/hub/checkpoints/resnet18-", "set TORCH_HOME", "trunk.checkpoint=PATH"),
         env={"TORCH_HOME": "{tmp}/torch"}),
    Case("unknown_weights_name", ["trunk={name: resnet18, weights: IMAGENET1K_V9}", "~trunk.in_features", "~trunk.hidden"],
         ("trunk.weights='IMAGENET1K_V9' is not a weights name for resnet18", "Valid: IMAGENET1K_V1")),
    Case("timm_weights_offline", ["trunk={name: timm, model_name: resnet10t, pretrained: true}", "~trunk.in_features", "~trunk.hidden"],
         ("not in the local Hugging Face cache", "cannot be reached", "trunk.pretrained_file=PATH"),
         skip="the Hugging Face Hub is reachable" if _hub_reachable() else None),
    Case("checkpoint_of_another_architecture", ["trunk.checkpoint={tmp}/seed_net.pt"],
         ("trunk.checkpoint: no key of", "checkpoint for another architecture", "Point trunk.checkpoint at weights of this trunk"),
         prepare=seed_net_weights),
    Case("checkpoint_of_another_width", ["trunk.checkpoint={tmp}/mlp32.pt"],
         ("checkpoint (32, 13) vs trunk (16, 13)", "set the trunk arguments the file was saved with"), prepare=wider_mlp_weights),
    Case("corrupt_checkpoint", ["trunk.checkpoint={tmp}/garbage.pt"],
         ("trunk.checkpoint: cannot read", "garbage.pt", "re-save the weights with torch.save(model.state_dict(), PATH)"),
         prepare=garbage_file),
    Case("pickled_checkpoint", ["trunk.checkpoint={tmp}/pickled.pt"],
         ("trunk.checkpoint: cannot read", "pickled objects, which would run code when loaded, are refused", "re-save the weights"),
         prepare=pickled_module),
    Case("checkpoint_not_found", ["trunk.checkpoint={tmp}/nothing.pt"], ("trunk.checkpoint: file not found", "Fix the path in trunk.checkpoint")),
    Case("corrupt_init_from", ["init_from={tmp}/garbage.pt"], ("init_from: cannot read", "re-save the weights"), prepare=garbage_file),
    Case("init_from_a_bare_trunk", ["init_from={tmp}/seed_net.pt"],
         ("init_from:", "not a checkpoint of this framework", "use trunk.checkpoint for a trunk alone"), prepare=seed_net_weights),
    # Methods that do not fit the setup.
    Case("weighting_mode_unknown", ["weighting={name: pcgrad, mode: bogus}"],
         ("weighting.mode must be one of parameters, representation for PCGrad", "got 'bogus'")),
    Case("weighting_mode_on_a_loss_method", ["weighting.mode=representation"],
         ("weighting.mode: unknown argument for EqualWeighting",)),
    Case("representation_mode_with_separate_inputs", ["weighting={name: pcgrad, mode: representation}"],
         ("weighting.mode: representation needs one shared representation", "separate inputs (a, b)", "Use weighting.mode=parameters"),
         config=TWO_INPUTS),
    Case("weighting_needs_every_task_each_step", ["weighting.name=dwa", "scheduler.name=round_robin"],
         ("weighting: 'dwa' needs every task's loss at every step", "use scheduler.name=all"), config=TWO_INPUTS),
    Case("compare_target_not_a_task", ["compare.targets=[wien]"],
         ("compare.targets: task 'wien' is not defined under tasks", "Did you mean 'wine'"), command="compare"),
    # `mtl validate` reports through the same path.
    Case("validate_unknown_key", ["trainer.batch=8"], ("trainer.batch: unknown key", "Did you mean 'batch_size'"), command="validate"),
    Case("validate_label_beyond_the_classes", [f"tasks.wine.name={here('LabelsBeyondClasses')}"],
         ("label 4 is outside the head's 3 classes", "set num_classes to at least 5"), command="validate"),
    # A run already in the output directory.
    Case("output_dir_holds_a_run", [], ("already holds a run", "pass resume=true to continue it, or choose another output_dir"),
         prepare=finished_run),
    Case("resume_with_another_config", ["resume=true", "trainer.batch_size=8"],
         ("resume:", "trainer.batch_size", "resume with the config in its run directory"), prepare=finished_run),
]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def _fill(value, tmp: Path):
    """``value`` with "{tmp}" replaced by the test's folder, through mappings and lists."""
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    return value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.skip(c.skip)] if c.skip else []) for c in CASES])
def test_bad_input_fails_before_training_with_the_fix(case: Case, tmp_path, capsys, monkeypatch):
    for name, value in case.env.items():
        monkeypatch.setenv(name, _fill(value, tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would override TORCH_HOME
    config = tmp_path / "config.yaml"
    if case.config != "MISSING":
        text = case.config if isinstance(case.config, str) else yaml.safe_dump(case.config, sort_keys=False)
        config.write_text(_fill(text, tmp_path))
    if case.prepare:
        case.prepare(tmp_path, config)
    capsys.readouterr()
    run_dir = tmp_path / "run"
    before = _files(run_dir)

    try:
        code = main([case.command, str(config), *_fill(case.args, tmp_path)])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err

    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mtl") and "error:" in last, err
    if case.command in ("train", "compare", "validate"):
        assert len(err.strip().splitlines()) == 1, f"one line, not:\n{err}"
    for part in _fill(list(case.expect), tmp_path):
        assert part in err, f"{part!r} not in:\n{err}"
    assert _files(run_dir) == before, "nothing may be written to the run directory before training"


def test_every_case_has_a_unique_id_and_the_issue_needs_25():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25
