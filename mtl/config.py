"""Run configuration: a typed schema for run-level settings, YAML + CLI overrides.

Component nodes (tasks, trunk, heads, optimizer, schedules, weighting, scheduler) are
plain mappings ``{name: <registered name or import path>, **kwargs}``; their kwargs are
checked against the component's signature when it is built (``mtl.builders``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
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
class EngineConfig:
    """The per-task gradient work of a step: the gradient engine of gradient-level weightings (MGDA,
    PCGrad, UPGrad, ...; loss-level ones ignore its first three keys), and TAG's lookahead affinity."""

    every: int = 1  # recompute the task weights every k steps, reuse them in between
    jacobian_chunk: int = 0  # tasks per batched backward (0: all at once; smaller bounds memory)
    # Methods that need only JJᵀ (MGDA, UPGrad, PCGrad, ...), in a parameter mode: compute it stage by
    # stage between the trunk's cuts, never holding all of J (less memory, the same update); false forms J.
    staged_gramian: bool = True
    # TAG's lookahead inter-task affinity (Fifty et al. 2021) every k steps of a loss-level weighting
    # (0: off): logged as affinity/<from>/<onto>, its mean over the run in results.json. A measured
    # step adds the T tasks' gradients (one batched backward), T lookahead optimizer steps and T + 1
    # no-grad forwards (mtl group chooses groupings from it and prints what it cost).
    affinity_every: int = 0


@dataclass
class CompareConfig:
    """`mtl compare`: regimes x seeds x labelled fractions of the target tasks."""

    name: Optional[str] = None  # W&B group of every cell; None = the output_dir's name
    targets: List[str] = field(default_factory=list)  # target task(s): fine-tuned in sequential, subsampled by fractions
    sources: Optional[List[str]] = None  # source tasks of sequential transfer; None = every task not a target
    fractions: List[float] = field(default_factory=lambda: [1.0])  # labelled fractions of the targets' training sets
    # A list of seeds, or a budget {min: 3, max: 10}: seeds 0, 1, 2, ... added one at a time until every
    # comparison with single-task resolves (mtl.stats.SeedBudget) or max is reached. None: [0].
    seeds: Any = None
    # Fair tuning: {grid: {dotted.key: [values]} (every method), extra: {method: {dotted.key: [values]}},
    # seeds: N}; each cell's last stage is tuned on the validation primary metric over N tuning seeds.
    tune: Optional[Dict[str, Any]] = None
    # {label: {kind: single_task|sequential|joint|stages|groups|merge, recipes: [...] (sequential), architectures: [...]
    # (joint: one cell each), stages: [...] (kinds stages, merge), groups: [[tasks], ...] and serve: {task: group} (kind
    # groups), forgetting: [tasks] (sequential, stages: earlier tasks to evaluate after each later stage), method,
    # coefficients, top_k, drop, seed (kind merge)}}; kind defaults to the label.
    regimes: Dict[str, Any] = field(
        default_factory=lambda: {"single_task": {}, "sequential": {"recipes": ["fine_tune"]}, "joint": {}}
    )
    # Config overrides per stage role, e.g. {source: {trainer: {epochs: 5}}, target: {trainer: {epochs: 10}}};
    # "target" applies to single-task, joint and sequential target stages; a custom stage carries its own.
    stages: Dict[str, Any] = field(default_factory=dict)
    # How the cells run (mtl.executor); never what they compute, so a grid may resume with other values.
    workers: Optional[int] = None  # cells at once: 1 (None) = one after another here; N = N worker processes; ray: None = as the cluster allows
    threads: Optional[int] = None  # torch threads (Ray: CPUs) per cell; None = the cores divided among the workers (Ray: 1)
    executor: str = "local"  # local (this machine) | ray (Ray tasks; pip install 'mtl[ray]')
    ray_address: Optional[str] = None  # executor=ray: a cluster's address (host:port); None = RAY_ADDRESS, else a local Ray instance
    # false: a stage's step checkpoints are deleted once it has finished (a grid never trains a finished stage
    # on); best.pt and trunk.pt stay, which later stages, forgetting and merging read.
    keep_step_checkpoints: bool = True


@dataclass
class RunConfig:
    output_dir: str = MISSING  # run directory: config.yaml, metrics.jsonl, results.json, checkpoints/
    imports: List[str] = field(default_factory=list)  # your modules to import first, so their @register_* names resolve
    tasks: Dict[str, Any] = MISSING  # {task_name: {name: registered name or import path, **kwargs}}
    trunk: Dict[str, Any] = MISSING  # {name: ..., checkpoint: PATH?, **kwargs}
    weighting: Dict[str, Any] = field(default_factory=lambda: {"name": "equal"})
    scheduler: Dict[str, Any] = field(default_factory=lambda: {"name": "all"})
    recipe: Dict[str, Any] = field(default_factory=lambda: {"name": "fine_tune"})  # what trains (`mtl list recipes`)
    architecture: Dict[str, Any] = field(default_factory=lambda: {"name": "hard"})  # how tasks share parameters (`mtl list architectures`)
    init_from: Optional[str] = None  # checkpoint of an earlier stage: its trunk and the heads of tasks that continue
    seed: int = 0  # model init, data order, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    resume: bool = False  # continue the run in output_dir from its last checkpoint
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # gradient-level weightings only
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)  # read by `mtl compare` only
    rank: Optional[Dict[str, Any]] = None  # read by `mtl rank` only (mtl/rank.py checks it)


# Keys that moved: an old config names its key's new place instead of "unknown key".
MOVED = {
    "trainer.weighting_every": "engine.every",
    "trainer.jacobian_chunk": "engine.jacobian_chunk",
    "trainer.staged_gramian": "engine.staged_gramian",
}


def _check_keys(node: Any, schema: type, path: str) -> None:
    """Unknown keys under a dataclass-typed node, with the closest valid names."""
    if not isinstance(node, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if where in MOVED:
            raise ConfigError(f"{where}: moved to {MOVED[where]}; write {MOVED[where]}={_plain(value)} instead.")
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
# YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent, so `lr: 1e-3` was the
# string '1e-3'; YAML 1.2, OmegaConf's own overrides and Python read it as a number.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: where, what, and what it was reading."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = f" ({e.context} that starts on line {e.context_mark.line + 1})" if getattr(e, "context", None) and e.context_mark else ""
    return f"{where}{getattr(e, 'problem', None) or e}{context}."


def _parse_override(item: str) -> tuple[str, Any]:
    """One ``key=value`` override as (key, value); a value that is not YAML, or a flow mapping
    written without the space YAML needs after ':' (``{name:sgd}`` is one key 'name:sgd'),
    names the override."""
    key, _, text = item.partition("=")
    try:
        # OmegaConf's own YAML reading of the value (1e-3 is a float), under a key of ours.
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}). Put a space after each ':' in a mapping "
            "and quote the whole override for the shell, e.g. 'trainer.optimizer={name: sgd, lr: 0.1}'."
        ) from None
    glued = [k for k in _keys(value) if ":" in k]
    if glued:
        head, _, rest = glued[0].partition(":")
        raise ConfigError(
            f"override {item!r}: {glued[0]!r} reads as one key with no value; YAML needs a space after ':' "
            f"({{{head}: {rest}}}). Quote the whole override for the shell."
        )
    return key.strip(), value


def _kind(value: Any) -> str:
    return "mapping" if isinstance(value, dict) else "list" if isinstance(value, list) else "single value"


def _clash(default: Any, given: Any, parts: list | None = None) -> tuple[str, Any, Any]:
    """The first key where ``given`` has a list for a mapping of ``default``, or the reverse
    (what OmegaConf's merge refuses without naming the key)."""
    parts = parts or []
    if isinstance(default, dict) and isinstance(given, dict):
        for key in given:
            found = _clash(default.get(key), given[key], [*parts, key])
            if found[0]:
                return found
    elif {type(default), type(given)} == {dict, list}:
        return _path(parts), default, given
    return "", None, None


def _omegaconf_problem(e: Exception) -> str:
    """OmegaConf's several-line report as one line: the key's path, then what was wrong."""
    key = getattr(e, "full_key", None)
    msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _keys(node: Any) -> list[str]:
    """Every mapping key in a nested container."""
    if isinstance(node, dict):
        return [str(k) for k in node] + [k for v in node.values() for k in _keys(v)]
    if isinstance(node, list):
        return [k for v in node for k in _keys(v)]
    return []


def read_yaml(path: str | os.PathLike) -> dict:
    """The config file as written, before overrides and the schema; raise ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; check the path (relative paths start from {os.getcwd()}).")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read it as text ({e}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> DictConfig:
    """Read a YAML config, apply overrides, check it against the schema; raise ConfigError."""
    raw = read_yaml(path)
    try:
        return resolve(raw, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def resolve(raw: dict, overrides: list[str] = ()) -> DictConfig:
    sets, deletes = parse_overrides(list(overrides))
    try:
        cfg = OmegaConf.create(raw)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read the config: {_omegaconf_problem(e)}") from None
    for item in sets:
        key, value = _parse_override(item)
        # update, not a merge of a dotlist: a list item can be set by index (compare.seeds[2]=8).
        # A mapping merges into a mapping; anything else replaces what was there, so that a
        # list given for a mapping is reported by the checks below as the wrong type.
        try:
            merge = isinstance(value, dict) and isinstance(OmegaConf.select(cfg, key, default=None), DictConfig)
            OmegaConf.update(cfg, key, value, merge=merge)
        except (OmegaConfBaseException, ValueError, TypeError, IndexError) as e:
            raise ConfigError(
                f"override {item!r}: {_omegaconf_problem(e)}; set a mapping's key (a.b=1), a list item by its index "
                "(a.b[0]=1) or a whole list (a.b=[1, 2])."
            ) from None
    for key in deletes:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            raise ConfigError(f"~{key}: no such key to delete.")
        del node[leaf]
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read the config: {_omegaconf_problem(e)}") from None
    _check_keys(plain, RunConfig, "")
    check_numbers(plain)
    schema = OmegaConf.structured(RunConfig)
    try:
        typed = OmegaConf.merge(schema, plain)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_problem(e)) from None
    except TypeError:  # "Cannot merge incompatible container types", without the key
        where, default, given = _clash(OmegaConf.to_container(schema), plain)
        raise ConfigError(f"{where}: must be a {_kind(default)}, got {given!r}.") from None
    _replace_component_nodes(typed, plain, RunConfig, "")
    if typed.compare.seeds is None:  # typed Any, so that a list or a budget mapping merges in; the default is [0]
        typed.compare.seeds = [0]
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"required value missing: {', '.join(missing)} (set it in the YAML or as key=value).")
    check_values(typed)
    _fill_defaults(typed)
    return typed


# Component nodes: (config key, registry "module:NAME", positional arguments supplied at run time).
COMPONENTS = (
    ("trunk", "mtl.trunks:TRUNKS", 0),
    ("weighting", "mtl.weighting:WEIGHTINGS", 1),
    ("scheduler", "mtl.scheduler:SCHEDULERS", 1),
    ("recipe", "mtl.recipes:RECIPES", 0),
    ("trainer.optimizer", "mtl.optim:OPTIMIZERS", 1),
    ("trainer.lr_schedule", "mtl.optim:LR_SCHEDULES", 1),
)


def _with_defaults(node: dict, registry: str, runtime: int, default_name: str | None = None, keep: tuple[str, ...] = ()) -> dict:
    """``node`` with the defaults of every argument it leaves out; unchanged where the name does
    not resolve (the builders report that with the key's path)."""
    from mtl.registry import effective_kwargs, import_path

    name = node.get("name", default_name)
    try:
        builder = import_path(registry).get(str(name))
    except Exception:  # an unknown name or a user module that fails to import: reported when built
        return node
    kwargs = {k: v for k, v in node.items() if k != "name" and k not in keep}
    filled = effective_kwargs(builder, kwargs, skip=runtime)
    return {**node, **{k: v for k, v in filled.items() if k not in kwargs}}


def _fill_defaults(cfg: DictConfig) -> None:
    """Write every component's effective arguments, defaults included, into the resolved config:
    ``config.yaml``, the W&B run config and the resume check then say what really ran (the
    temperature scheduler's τ and cap, Adam's betas, a task's split fractions)."""
    for key, registry, runtime in COMPONENTS:
        node = OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
        OmegaConf.update(cfg, key, _with_defaults(node, registry, runtime, keep=("checkpoint",)), merge=False)
    for task, node in list(cfg.tasks.items()):
        plain = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        filled = _with_defaults(plain, "mtl.task:TASKS", 0, default_name=str(task), keep=("head",))
        head = filled.get("head")
        if isinstance(head, dict) and "name" in head:  # a head without a name tunes the task's default head
            filled["head"] = _with_defaults(head, "mtl.heads:HEADS", 2)
        cfg.tasks[task] = filled


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


SEEDS = 2**32  # numpy, and so every library seeded from a run's seed, takes seeds in [0, 2^32)


def _path(parts: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_numbers(node: Any, parts: list | None = None) -> None:
    """Checks on every number of the config, components' arguments included: each is finite
    (NaN or inf is never a setting; null says "no limit" where a key allows it), and every
    seed (a key ``seed`` or ``*_seed``, an item of ``seeds``) is an integer in [0, 2^32)."""
    parts = parts or []
    if isinstance(node, dict):
        for key, value in node.items():
            check_numbers(value, [*parts, key])
        return
    if isinstance(node, list):
        for i, value in enumerate(node):
            check_numbers(value, [*parts, i])
        return
    where = _path(parts)
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where}: {node} is not a finite number; give a finite value (or null where the key allows no limit).")
    leaf = parts[-1] if parts else ""
    name = parts[-2] if isinstance(leaf, int) and len(parts) > 1 else leaf
    if isinstance(name, str) and (name in ("seed", "seeds") or name.endswith("_seed")) and _is_number(node):
        _must(float(node).is_integer() and 0 <= node < SEEDS, where, f"a seed must be an integer in [0, 2^32), got {node}.")


def _at_least(value: Any, key: str, low: int, note: str = "") -> None:
    _must(value >= low, key, f"must be >= {low}{note}, got {value}.")


def check_optimizer(node: DictConfig) -> None:
    """Hyper-parameters every torch optimizer names alike, before the optimizer exists (torch
    accepts an infinite LR, and compares a quoted '1e-3' with 0 only to fail in a TypeError)."""
    where = "trainer.optimizer"
    for key, low, strict in (("lr", 0, True), ("weight_decay", 0, False), ("eps", 0, True), ("momentum", 0, False)):
        if key not in node:
            continue
        value = node[key]
        _must(_is_number(value), f"{where}.{key}", f"expected a number, got {value!r} ({type(value).__name__}); write it unquoted, e.g. {where}.{key}=0.001.")
        _must(value > low if strict else value >= low, f"{where}.{key}", f"must be {'>' if strict else '>='} {low}, got {value}; e.g. {where}.{key}=0.001.")
    if "momentum" in node:
        _must(node.momentum < 1, f"{where}.momentum", f"must be in [0, 1), got {node.momentum}.")
    if "betas" in node:
        betas = node.betas
        ok = isinstance(betas, ListConfig) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
        _must(ok, f"{where}.betas", f"must be two numbers in [0, 1), e.g. [0.9, 0.999], got {_plain(betas)!r}.")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node


def check_compare(c: DictConfig) -> None:
    """The compare node's own values and shapes; whether its tasks exist is judged by
    `mtl compare` (and `mtl validate --for compare`), since `mtl train` never reads it."""
    # A typed list lets a nested list or mapping through as an item.
    for key in ("targets", "sources"):
        for i, name in enumerate(c[key] or []):
            _must(isinstance(name, str), f"compare.{key}[{i}]", f"must be a task name, got {_plain(name)!r}.")
    _must(len(c.fractions) >= 1, "compare.fractions", "list at least one labelled fraction, e.g. [1.0].")
    for i, f in enumerate(c.fractions):
        _must(_is_number(f), f"compare.fractions[{i}]", f"must be a number in (0, 1], got {_plain(f)!r}.")
        _must(0 < f <= 1, f"compare.fractions[{i}]", f"{f} is outside (0, 1]; a fraction is the share of the targets' training labels kept.")
    _must(len(set(c.fractions)) == len(c.fractions), "compare.fractions", f"each fraction once, got {list(c.fractions)}.")
    check_seeds(c.seeds)
    check_tune(c.tune)
    _must(len(c.regimes) >= 1, "compare.regimes", "name at least one regime, e.g. {single_task: {}, joint: {}}.")
    for label, node in c.regimes.items():
        where = f"compare.regimes.{label}"
        _must(node is None or isinstance(node, DictConfig), where,
              f"must be a mapping (or {{}}), got {_plain(node)!r}; e.g. {where}: {{}} or {where}: {{recipes: [fine_tune]}}.")
        if node is None:
            continue
        _must(isinstance(node.get("kind", ""), str), f"{where}.kind", "must be a regime kind: single_task, sequential, joint, stages, groups or merge.")
        recipes = node.get("recipes")
        if recipes is not None:
            _must(isinstance(recipes, ListConfig) and len(recipes) >= 1, f"{where}.recipes",
                  f"must be a list of recipes, e.g. [linear_probe, {{name: lp_ft, probe_epochs: 3}}], got {_plain(recipes)!r}.")
            for i, r in enumerate(recipes):
                _must(isinstance(r, str) or (isinstance(r, DictConfig) and isinstance(r.get("name"), str)), f"{where}.recipes[{i}]",
                      f"must be a recipe name or {{name: ..., **arguments}} (see `mtl list recipes`), got {_plain(r)!r}.")
        stages = node.get("stages")
        if stages is not None:
            _must(isinstance(stages, ListConfig) and all(isinstance(x, DictConfig) for x in stages), f"{where}.stages",
                  f"must be a list of stage mappings, e.g. [{{tasks: [a]}}, {{tasks: [b]}}], got {_plain(stages)!r}.")
    for role, node in c.stages.items():
        _must(node is None or isinstance(node, DictConfig), f"compare.stages.{role}",
              f"must be a mapping of config overrides, e.g. {{trainer: {{epochs: 5}}}}, got {_plain(node)!r}.")
    for key in ("workers", "threads"):
        value = c[key]
        _must(value is None or (isinstance(value, int) and value >= 1), f"compare.{key}",
              f"must be a whole number >= 1 (or null for the default), got {_plain(value)!r}.")
    _must(c.executor in ("local", "ray"), "compare.executor", f"must be local (this machine) or ray (a Ray cluster, local by default), got {c.executor!r}.")


BUDGET_KEYS = ("min", "max")
# A budget plans every seed's cells up front, and mtl.stats stops counting seeds needed at 1,000.
BUDGET_MAX = 1000
TUNE_KEYS = ("grid", "extra", "seeds")


def check_seeds(seeds: Any) -> None:
    """``compare.seeds``: a list of distinct seeds, or a budget ``{min, max}`` of whole numbers
    with 2 <= min <= max (every look of the budget's stop rule is a paired test)."""
    if isinstance(seeds, DictConfig):
        for key in seeds:
            _must(key in BUDGET_KEYS, f"compare.seeds.{key}", f"unknown key.{did_you_mean(str(key), BUDGET_KEYS)} A budget is {{min: 3, max: 10}}.")
        for key in BUDGET_KEYS:
            _must(key in seeds, f"compare.seeds.{key}", "missing; a budget gives both, e.g. compare.seeds={min: 3, max: 10}.")
            value = seeds[key]
            _must(_is_number(value) and float(value).is_integer(), f"compare.seeds.{key}", f"must be a whole number of seeds, got {_plain(value)!r}.")
        _must(seeds.min >= 2, "compare.seeds.min", f"must be >= 2, got {seeds.min}: the budget stops on a paired test, which needs 2 seeds "
              "(3 or more to resolve anything but large differences); for one seed and no test write compare.seeds=[0].")
        _must(seeds.max >= seeds.min, "compare.seeds.max", f"must be >= min, got min {seeds.min} and max {seeds.max}.")
        _must(seeds.max <= BUDGET_MAX, "compare.seeds.max", f"must be <= {BUDGET_MAX}, got {seeds.max}.")
        return
    _must(isinstance(seeds, ListConfig), "compare.seeds",
          f"must be a list of seeds or a budget {{min: 3, max: 10}}, got {_plain(seeds)!r}; write compare.seeds=[{_plain(seeds)}] for one item.")
    _must(len(seeds) >= 1, "compare.seeds", "list at least one seed, e.g. [0, 1, 2].")
    for i, seed in enumerate(seeds):
        _must(_is_number(seed) and float(seed).is_integer(), f"compare.seeds[{i}]", f"must be an integer in [0, 2^32), got {_plain(seed)!r}.")
    _must(len(set(seeds)) == len(seeds), "compare.seeds", f"each seed once (a seed names a cell), got {list(seeds)}.")


def _check_grid(node: Any, where: str) -> None:
    _must(isinstance(node, DictConfig), where, f"must be a mapping of config keys to lists of values, e.g. {{trainer.optimizer.lr: [0.001, 0.003]}}, got {_plain(node)!r}.")
    for key, values in node.items():
        _must(isinstance(values, ListConfig) and len(values) >= 1, f"{where}.{key}", f"must be a non-empty list of values, got {_plain(values)!r}; e.g. [0.001, 0.003].")
        plain = [_plain(v) for v in values]
        _must(all(not isinstance(v, (dict, list)) for v in plain), f"{where}.{key}", f"values must be single values (numbers, strings), got {plain!r}.")
        _must(len({repr(v) for v in plain}) == len(plain), f"{where}.{key}", f"each value once, got {plain!r}.")


def check_tune(tune: Any) -> None:
    """``compare.tune``'s shape: grid and extra's keys are checked against the config schema by
    `mtl compare`, which knows each method's stage config."""
    if tune is None:
        return
    for key in tune:
        _must(key in TUNE_KEYS, f"compare.tune.{key}", f"unknown key.{did_you_mean(str(key), TUNE_KEYS)} compare.tune takes {', '.join(TUNE_KEYS)}.")
    _check_grid(tune.get("grid") or DictConfig({}), "compare.tune.grid")
    extra = tune.get("extra") or DictConfig({})
    _must(isinstance(extra, DictConfig), "compare.tune.extra", f"must map a method to its own grid, e.g. {{joint: {{weighting.gamma: [0.001, 0.01]}}}}, got {_plain(extra)!r}.")
    for method, grid in extra.items():
        _check_grid(grid, f"compare.tune.extra.{method}")
    _must(bool(tune.get("grid")) or any(extra.values()), "compare.tune", "give a grid (every method) or an extra grid (one method), e.g. compare.tune.grid={trainer.optimizer.lr: [0.001, 0.003]}.")
    seeds = tune.get("seeds", 1)
    _must(_is_number(seeds) and float(seeds).is_integer() and seeds >= 1, "compare.tune.seeds",
          f"must be a whole number >= 1 of tuning seeds, got {_plain(seeds)!r}.")


def check_values(cfg: DictConfig) -> None:
    """Range and choice checks the types alone cannot express."""
    _must(bool(cfg.output_dir.strip()), "output_dir", "is empty; name the run directory, e.g. output_dir=runs/my_run.")
    for i, module in enumerate(cfg.imports):
        _must(isinstance(module, str) and bool(module.strip()), f"imports[{i}]", f"must name a module to import, e.g. my_tasks, got {_plain(module)!r}.")
    for i, tag in enumerate(cfg.logging.wandb.tags):
        _must(isinstance(tag, str), f"logging.wandb.tags[{i}]", f"must be a string, got {_plain(tag)!r}.")
    _must(cfg.init_from is None or bool(cfg.init_from.strip()), "init_from", "is empty; give a checkpoint path or null.")
    t = cfg.trainer
    _at_least(t.epochs, "trainer.epochs", 1)
    _at_least(t.batch_size, "trainer.batch_size", 1)
    _at_least(t.eval_batch_size, "trainer.eval_batch_size", 1)
    _must(t.grad_clip is None or t.grad_clip > 0, "trainer.grad_clip", f"must be > 0 or null, got {t.grad_clip}.")
    _must(t.steps_per_epoch is None or t.steps_per_epoch >= 1, "trainer.steps_per_epoch", f"must be >= 1 or null, got {t.steps_per_epoch}.")
    _must(t.precision in ("fp32", "bf16"), "trainer.precision", f"must be fp32 or bf16, got {t.precision!r}.")
    _at_least(cfg.engine.every, "engine.every", 1)
    _at_least(t.checkpoint_every, "trainer.checkpoint_every", 0, " (0: at epoch ends only)")
    _at_least(t.keep_checkpoints, "trainer.keep_checkpoints", 1, " (resuming needs one)")
    _must(t.on_nonfinite in ("stop", "skip"), "trainer.on_nonfinite", f"must be stop or skip, got {t.on_nonfinite!r}.")
    _at_least(cfg.engine.jacobian_chunk, "engine.jacobian_chunk", 0, " (0: all tasks at once)")
    _at_least(cfg.engine.affinity_every, "engine.affinity_every", 0, " (0: no affinity)")
    _at_least(t.num_workers, "trainer.num_workers", 0)
    _at_least(t.device_data_limit_mb, "trainer.device_data_limit_mb", 0)
    _at_least(cfg.logging.log_every, "logging.log_every", 1)
    modes = ("online", "offline", "disabled")
    _must(cfg.logging.wandb.mode in modes, "logging.wandb.mode", f"must be one of {', '.join(modes)}, got {cfg.logging.wandb.mode!r}.")
    dev = cfg.device
    _must(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "device", f"must be auto, cpu, cuda or cuda:N, got {dev!r}.")
    _must(len(cfg.tasks) >= 1, "tasks", "define at least one task, e.g. tasks: {mnist: {}}.")
    for name, node in cfg.tasks.items():
        _must(node is None or isinstance(node, DictConfig), f"tasks.{name}", "must be a mapping, e.g. {name: mnist}.")
        head = node.get("head") if node is not None else None
        _must(head is None or isinstance(head, DictConfig), f"tasks.{name}.head", f"must be a mapping, e.g. {{name: mlp, hidden: [64]}}, got {_plain(head)!r}.")
    for key in ("trunk", "weighting", "scheduler", "recipe", "trainer.optimizer", "trainer.lr_schedule"):
        node = OmegaConf.select(cfg, key)
        _must("name" in node, f"{key}.name", "missing: name a registered component (see `mtl list`) or an import path.")
        _must(isinstance(node.name, str) and bool(node.name.strip()), f"{key}.name",
              f"must be a registered name (see `mtl list`) or an import path, got {_plain(node.name)!r}.")
    check_optimizer(t.optimizer)
    check_compare(cfg.compare)
    select = t.select_on
    if select not in ("primary_mean", "loss"):
        task, _, metric = select.partition("/")
        _must(task in cfg.tasks and bool(metric), "trainer.select_on",
              f"must be primary_mean, loss or <task>/<metric> with a configured task, got {select!r}.{did_you_mean(task, cfg.tasks)}")


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    OmegaConf.save(cfg, path, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
