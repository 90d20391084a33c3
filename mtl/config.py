"""Run configuration: a typed schema for run-level settings, YAML + CLI overrides.

Component nodes (tasks, trunk, heads, optimizer, schedules, weighting, scheduler) are
plain mappings ``{name: <registered name or import path>, **kwargs}``; their kwargs are
checked against the component's signature when it is built (``mtl.builders``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl.registry import did_you_mean


class ConfigError(ValueError):
    """A config problem, reported before anything runs: the key's path and the fix."""


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled; WANDB_MODE in the environment wins
    project: str = "mtl"  # W&B project
    entity: Optional[str] = None  # W&B team or user; None = your default
    group: Optional[str] = None  # runs of one comparison share a group
    job_type: str = "train"  # e.g. the regime
    tags: List[str] = field(default_factory=list)
    name: Optional[str] = None  # run name; None = W&B picks one


@dataclass
class LoggingConfig:
    log_every: int = 20  # steps between training-loss log lines (each costs a host sync)
    progress_bar: bool = True  # tqdm bar with step, per-task losses and samples/s
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainerConfig:
    epochs: int = 10  # an epoch is defined by the task scheduler (see `mtl list schedulers`)
    batch_size: int = 64  # per task, per step
    eval_batch_size: int = 1024
    optimizer: Dict[str, Any] = field(default_factory=lambda: {"name": "adam", "lr": 1e-3})
    lr_schedule: Dict[str, Any] = field(default_factory=lambda: {"name": "constant"})
    grad_clip: Optional[float] = None  # max global gradient norm; None = no clipping
    weighting_every: int = 1  # gradient-level weightings: recompute task weights every k steps, reuse between
    jacobian_chunk: int = 0  # gradient-level weightings: tasks per batched backward (0: all at once; smaller bounds memory)
    # Methods that need only JJᵀ (MGDA, UPGrad, PCGrad, ...), in a parameter mode: compute it stage by
    # stage between the trunk's cuts, never holding all of J (less memory, the same update); false forms J.
    staged_gramian: bool = True
    precision: str = "fp32"  # fp32 | bf16 (autocast in the training forward; evaluation stays fp32)
    channels_last: bool = False  # NHWC memory format for 4-D inputs and the model (faster convs on GPU)
    select_on: str = "primary_mean"  # best epoch by: primary_mean | loss | <task>/<metric> (validation only)
    data_on_device: bool = True  # tensor datasets under device_data_limit_mb live on the device, batched there
    device_data_limit_mb: float = 1024.0  # larger tensor datasets stay on the host; each batch is copied over
    num_workers: int = 0  # DataLoader workers for datasets that read files
    # Fixed epoch length in steps (small sets cycle, large ones are cut); None = the scheduler's epoch.
    steps_per_epoch: Optional[int] = None
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at the end of each epoch only)
    keep_checkpoints: int = 2  # the newest N step checkpoints are kept (plus best.pt); older ones are deleted
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop (with task, step, value) | skip the step (counted)


@dataclass
class CompareConfig:
    """`mtl compare`: regimes x seeds x labelled fractions of the target tasks."""

    name: Optional[str] = None  # W&B group of every cell; None = the output_dir's name
    targets: List[str] = field(default_factory=list)  # target task(s): fine-tuned in sequential, subsampled by fractions
    sources: Optional[List[str]] = None  # source tasks of sequential transfer; None = every task not a target
    fractions: List[float] = field(default_factory=lambda: [1.0])  # labelled fractions of the targets' training sets
    seeds: List[int] = field(default_factory=lambda: [0])
    # {label: {kind: single_task|sequential|joint|stages, recipes: [...] (sequential), stages: [...] (kind stages)}};
    # kind defaults to the label.
    regimes: Dict[str, Any] = field(
        default_factory=lambda: {"single_task": {}, "sequential": {"recipes": ["fine_tune"]}, "joint": {}}
    )
    # Config overrides per stage role, e.g. {source: {trainer: {epochs: 5}}, target: {trainer: {epochs: 10}}};
    # "target" applies to single-task, joint and sequential target stages; a custom stage carries its own.
    stages: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    output_dir: str = MISSING  # run directory: config.yaml, metrics.jsonl, results.json, checkpoints/
    imports: List[str] = field(default_factory=list)  # your modules to import first, so their @register_* names resolve
    tasks: Dict[str, Any] = MISSING  # {task_name: {name: registered name or import path, **kwargs}}
    trunk: Dict[str, Any] = MISSING  # {name: ..., checkpoint: PATH?, **kwargs}
    weighting: Dict[str, Any] = field(default_factory=lambda: {"name": "equal"})
    scheduler: Dict[str, Any] = field(default_factory=lambda: {"name": "all"})
    recipe: Dict[str, Any] = field(default_factory=lambda: {"name": "fine_tune"})  # what trains (`mtl list recipes`)
    init_from: Optional[str] = None  # checkpoint of an earlier stage: its trunk and the heads of tasks that continue
    seed: int = 0  # model init, data order, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    resume: bool = False  # continue the run in output_dir from its last checkpoint
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)  # read by `mtl compare` only


def _check_keys(node: Any, schema: type, path: str) -> None:
    """Unknown keys under a dataclass-typed node, with the closest valid names."""
    if not isinstance(node, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{where}: unknown key.{did_you_mean(str(key), fields)} Valid keys here: {', '.join(fields)}.")
        ftype = fields[key].type
        sub = globals().get(ftype) if isinstance(ftype, str) else ftype
        if dataclasses.is_dataclass(sub):
            if value is not None and not isinstance(value, dict):
                keys = ", ".join(f.name for f in dataclasses.fields(sub))
                raise ConfigError(f"{where}: must be a mapping of settings ({keys}), got {value!r}; e.g. {where}.{keys.split(',')[0]}=VALUE.")
            _check_keys(value, sub, where)
        elif str(ftype).startswith(("Dict", "typing.Dict")) and value is not None and not isinstance(value, dict):
            # OmegaConf's own "Cannot assign str to Dict[str, Any]" names no fix.
            example = f"{where}: {{name: {value}}} (or {where}.name={value})" if isinstance(value, str) else f"{where}: {{name: ..., ...}}"
            raise ConfigError(f"{where}: must be a mapping, got {value!r}; write {example}.")
        elif str(ftype).startswith(("List", "typing.List")) and value is not None and not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list, got {value!r}; write {where}=[{value}] for one item.")


def parse_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` overrides from ``~key`` deletions."""
    sets, deletes = [], []
    for item in overrides:
        if item.startswith("~"):
            deletes.append(item[1:])
        elif "=" in item and not item.startswith("="):
            sets.append(item)
        else:
            raise ConfigError(f"override {item!r} must be key=value (or ~key to delete a key).")
    return sets, deletes


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's loaders keep the last of two equal keys in a mapping; in a config that silently
    drops a task (two ``mnist:`` entries) or a whole section, so it is an error here."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key, line = loader.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"line {line}: duplicate key {key!r} (also on line {seen[key]}); YAML would keep only the last one. "
                "Merge the two entries, or rename one (two tasks of one kind need two keys, each with name: <task>)."
            )
        seen[key] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: where, what, and what it was reading."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = f" ({e.context} that starts on line {e.context_mark.line + 1})" if getattr(e, "context", None) and e.context_mark else ""
    return f"{where}{getattr(e, 'problem', None) or e}{context}."


def _parse_override(item: str) -> DictConfig:
    """One ``key=value`` override; a value that is not YAML, or a flow mapping written without
    the space YAML needs after ':' (``{name:sgd}`` is one key 'name:sgd'), names the override."""
    try:
        parsed = OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}). Put a space after each ':' in a mapping "
            "and quote the whole override for the shell, e.g. 'trainer.optimizer={name: sgd, lr: 0.1}'."
        ) from None
    glued = [k for k in _keys(OmegaConf.to_container(parsed)) if ":" in k]
    if glued:
        key, _, value = glued[0].partition(":")
        raise ConfigError(
            f"override {item!r}: {glued[0]!r} reads as one key with no value; YAML needs a space after ':' "
            f"({{{key}: {value}}}). Quote the whole override for the shell."
        )
    return parsed


def _keys(node: Any) -> list[str]:
    """Every mapping key in a nested container."""
    if isinstance(node, dict):
        return [str(k) for k in node] + [k for v in node.values() for k in _keys(v)]
    if isinstance(node, list):
        return [k for v in node for k in _keys(v)]
    return []


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> DictConfig:
    """Read a YAML config, apply overrides, check it against the schema; raise ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; check the path (relative paths start from {os.getcwd()}).")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
    try:
        return resolve(raw, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def resolve(raw: dict, overrides: list[str] = ()) -> DictConfig:
    sets, deletes = parse_overrides(list(overrides))
    try:
        cfg = OmegaConf.merge(OmegaConf.create(raw), *(_parse_override(item) for item in sets))
        for key in deletes:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not isinstance(node, DictConfig) or leaf not in node:
                raise ConfigError(f"~{key}: no such key to delete.")
            del node[leaf]
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read the config: {e}") from None
    _check_keys(plain, RunConfig, "")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None
    _replace_component_nodes(typed, plain, RunConfig, "")
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"required value missing: {', '.join(missing)} (set it in the YAML or as key=value).")
    check_values(typed)
    return typed


def _replace_component_nodes(typed: DictConfig, plain: dict, schema: type, path: str) -> None:
    """A mapping the user wrote replaces the schema's default mapping instead of merging into
    it: ``trainer.optimizer: {name: sgd}`` must not inherit the default Adam's ``lr``, and
    ``compare.regimes`` lists exactly the regimes the user named. A component mapping without
    a ``name`` merges: it sets arguments of the default component."""
    for f in dataclasses.fields(schema):
        if f.name not in plain:
            continue
        key = f"{path}.{f.name}" if path else f.name
        ftype = globals().get(f.type) if isinstance(f.type, str) and f.type in globals() else f.type
        if dataclasses.is_dataclass(ftype):
            if isinstance(plain[f.name], dict):
                _replace_component_nodes(typed, plain[f.name], ftype, key)
        elif str(f.type).startswith(("Dict", "typing.Dict")) and isinstance(plain[f.name], dict):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            # Without a name the keys tune the default component (trainer.optimizer.lr=0.01 keeps Adam).
            if isinstance(default, dict) and "name" in default and "name" not in plain[f.name]:
                continue
            OmegaConf.update(typed, key, plain[f.name], merge=False)


def _must(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_values(cfg: DictConfig) -> None:
    """Range and choice checks the types alone cannot express."""
    t = cfg.trainer
    _must(t.epochs >= 1, "trainer.epochs", f"must be >= 1, got {t.epochs}.")
    _must(t.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {t.batch_size}.")
    lr = t.optimizer.get("lr")
    _must(not isinstance(lr, (int, float)) or lr > 0, "trainer.optimizer.lr", f"must be > 0, got {lr}; e.g. trainer.optimizer.lr=0.001.")
    _must(t.eval_batch_size >= 1, "trainer.eval_batch_size", f"must be >= 1, got {t.eval_batch_size}.")
    _must(t.grad_clip is None or t.grad_clip > 0, "trainer.grad_clip", f"must be > 0 or null, got {t.grad_clip}.")
    _must(t.steps_per_epoch is None or t.steps_per_epoch >= 1, "trainer.steps_per_epoch", "must be >= 1 or null.")
    _must(t.precision in ("fp32", "bf16"), "trainer.precision", f"must be fp32 or bf16, got {t.precision!r}.")
    _must(t.weighting_every >= 1, "trainer.weighting_every", f"must be >= 1, got {t.weighting_every}.")
    _must(t.checkpoint_every >= 0, "trainer.checkpoint_every", f"must be >= 0 (0: at epoch ends only), got {t.checkpoint_every}.")
    _must(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", f"must be >= 1 (resuming needs one), got {t.keep_checkpoints}.")
    _must(t.on_nonfinite in ("stop", "skip"), "trainer.on_nonfinite", f"must be stop or skip, got {t.on_nonfinite!r}.")
    _must(t.jacobian_chunk >= 0, "trainer.jacobian_chunk", f"must be >= 0 (0: all tasks at once), got {t.jacobian_chunk}.")
    _must(t.num_workers >= 0, "trainer.num_workers", f"must be >= 0, got {t.num_workers}.")
    _must(cfg.logging.log_every >= 1, "logging.log_every", f"must be >= 1, got {cfg.logging.log_every}.")
    modes = ("online", "offline", "disabled")
    _must(cfg.logging.wandb.mode in modes, "logging.wandb.mode", f"must be one of {', '.join(modes)}, got {cfg.logging.wandb.mode!r}.")
    dev = cfg.device
    _must(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "device", f"must be auto, cpu, cuda or cuda:N, got {dev!r}.")
    _must(len(cfg.tasks) >= 1, "tasks", "define at least one task, e.g. tasks: {mnist: {}}.")
    for name, node in cfg.tasks.items():
        _must(node is None or isinstance(node, DictConfig), f"tasks.{name}", "must be a mapping, e.g. {name: mnist}.")
    for key in ("trunk", "weighting", "scheduler", "recipe", "trainer.optimizer", "trainer.lr_schedule"):
        node = OmegaConf.select(cfg, key)
        _must("name" in node, f"{key}.name", "missing: name a registered component (see `mtl list`) or an import path.")
    select = t.select_on
    if select not in ("primary_mean", "loss"):
        task, _, metric = select.partition("/")
        _must(task in cfg.tasks and bool(metric), "trainer.select_on",
              f"must be primary_mean, loss or <task>/<metric> with a configured task, got {select!r}.{did_you_mean(task, cfg.tasks)}")


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    OmegaConf.save(cfg, path, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
