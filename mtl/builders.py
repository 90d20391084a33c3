"""Every object of a run is built here, from the resolved config, before any training.

Each builder raises ``ConfigError`` naming the config key at fault, so ``mtl validate``
and ``mtl train`` report bad input the same way and early.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtl import contract, optim
from mtl.architectures import ARCHITECTURES, Architecture
from mtl.config import ConfigError
from mtl.data import BatchSource, shared_inputs
from mtl.distributed import Context
from mtl.features import DEFAULT_MAX_MB, FeatureCache
from mtl.heads import HEADS, Head
from mtl.model import MultiTaskModel
from mtl.recipes import RECIPES, Recipe
from mtl.registry import ComponentError, build
from mtl.scheduler import SCHEDULERS, AllTasks, Sources, TaskScheduler
from mtl.step import Feed, Step, build_step
from mtl.task import TASKS, Splits, Task, TaskArgumentError
from mtl.trunks import Trunk, build_trunk, load_trunk_checkpoint
from mtl.trunks.base import TrunkInputError
from mtl.trunks.loading import read_checkpoint
from mtl.weighting import WEIGHTINGS, GradientWeighting, Weighting

logger = logging.getLogger(__name__)

# Samples per split in the task-contract check, run on the CPU before the model moves to its
# device: enough for shapes, losses and metrics, few enough that a large trunk costs little.
CHECK_BATCH = 16


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def _at(where: str, e: ComponentError) -> ConfigError:
    """A registry's error as a config error that starts with the config key."""
    message = str(e)
    return ConfigError(message if message.startswith(where) else f"{where}: {message}")


def _component(fn, *args: Any, where: str, refused: tuple[type[Exception], ...] = (TypeError, ValueError)):
    """Call a builder; turn a bad argument or value (an exception of a ``refused`` type) into a
    ConfigError naming ``where``."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except ComponentError as e:
        raise _at(where, e) from None
    except refused as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} requested but no CUDA GPU is visible; use device=cpu or device=auto.")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} but only {torch.cuda.device_count()} GPU(s) are visible.")
    return torch.device(name)


def build_tasks(cfg: DictConfig) -> tuple[dict[str, Task], dict[str, dict[str, Any]]]:
    """Tasks keyed by their config name, and each task's head node.

    A task node is ``{name: registered name or import path, head: {...}?, **kwargs}``;
    without ``name`` the config key is the registered name. A ``head`` without a name
    overrides the arguments of the task's default head.
    """
    tasks, heads = {}, {}
    for key, node in cfg.tasks.items():
        node = _plain(node)
        name = node.pop("name", key)
        head = node.pop("head", None) or {}
        task = _build_task(key, name, node)
        task.name = key
        contract.check_definition(key, task)
        heads[key] = head if "name" in head else {**task.head_config(), **head}
        tasks[key] = task
    return tasks, heads


def _build_task(key: str, name: str, node: dict[str, Any]) -> Task:
    """A task from its config node; an exception in its ``__init__`` becomes one line naming
    the config key, or the user's own file:line when their code raised it."""
    where = f"tasks.{key}"
    try:
        return build(TASKS, {"name": name, **node}, where)
    except TaskArgumentError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError:
        raise
    except ComponentError as e:
        raise _at(where, e) from None
    except Exception as e:
        if isinstance(e, (TypeError, ValueError)):  # an argument its __init__ refuses
            at = contract.user_location(e)
            raise ConfigError(f"{where}: {contract.first_line(e)}{f' (at {at})' if at else ''}") from e
        raise contract.raised(contract.describe(key, TASKS.get(name)), "__init__", e) from e


def load_datasets(tasks: dict[str, Task]) -> dict[str, Splits]:
    splits = {}
    for key, task in tasks.items():
        where = contract.describe(key, type(task))
        try:
            splits[key] = task.build_datasets()
        except (FileNotFoundError, ImportError, ValueError, TypeError) as e:
            # The data source's own error (a missing file or package, a bad argument) names its fix, at its end: kept whole.
            at = contract.user_location(e)
            raise ConfigError(f"tasks.{key}: cannot load its data: {contract.first_line(e, limit=None)}{f' (at {at})' if at else ''}") from e
        except ConfigError:
            raise
        except Exception as e:
            raise contract.raised(where, "build_datasets()", e) from e
        if not isinstance(splits[key], Splits):
            raise contract.TaskContractError(
                f"{where}: build_datasets() must return Splits(train, val, test) (mtl.Splits; tensor_splits(x, y, self) builds one), "
                f"got {contract.summarize(splits[key])}."
            )
        for split, ds in splits[key].items():
            size = contract.call(where, f"build_datasets(): len() of the {split} split", len, ds)
            if size == 0:
                raise ConfigError(
                    f"{where}: the {split} split is empty; {type(task).__name__}.build_datasets must give every "
                    "split at least one sample (check its data source, val_fraction and test_fraction)."
                )
            # Heads are sized from the first training input: it must be a tensor in an (input, target) pair.
            item = contract.call(where, f"build_datasets(): the {split} split's item 0", ds.__getitem__, 0)
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], torch.Tensor):
                raise contract.TaskContractError(
                    f"{where}: build_datasets(): the {split} split's items must be (input tensor, target) pairs, got "
                    f"{contract.summarize(item)}; e.g. TensorDataset(x, y), or tensor_splits(x, y, self)."
                )
    return splits


def build_heads(
    trunk: Trunk, tasks: dict[str, Task], head_nodes: dict[str, dict[str, Any]], splits: dict[str, Splits]
) -> dict[str, Head]:
    """One head per task, sized from the trunk's features on that task's inputs."""
    heads = {}
    for key, task in tasks.items():
        shape = tuple(splits[key].train[0][0].shape)
        try:
            features = trunk.feature_shape(shape)
        except TrunkInputError as e:  # the trunk's own message names the fix (text to an image trunk, ...)
            raise ConfigError(f"tasks.{key}: {e}") from None
        except RuntimeError as e:
            hint = getattr(trunk, "input_hint", None)
            expected = f" it expects {hint}" if hint else ""
            raise ConfigError(
                f"tasks.{key}: its inputs have shape {shape}, which trunk {type(trunk).__name__} cannot take;{expected} "
                f"(check trunk.in_channels or the task's image size). Torch said: {str(e).splitlines()[0]}"
            ) from None
        where = f"tasks.{key}.head"
        # torch refuses impossible layer sizes (hidden: [-1]) with a RuntimeError.
        heads[key] = _component(
            build, HEADS, head_nodes[key], where, features, task.num_outputs, where=where, refused=(TypeError, ValueError, RuntimeError)
        )
    return heads


def check_targets(tasks: dict[str, Task], trunk: Trunk, heads: dict[str, Head], splits: dict[str, Splits], batch_size: int) -> None:
    """The task contract on real data (``mtl.contract``): each task's first batch of each split
    through the trunk, its head, loss and metrics, and every in-memory target against the head."""
    features: dict = {}
    for key, task in tasks.items():
        contract.check_batches(key, task, trunk, heads[key], splits[key], batch_size, features)


@dataclass
class Components:
    tasks: dict[str, Task]
    splits: dict[str, Splits]
    model: Architecture
    weighting: Weighting


def import_plugins(cfg: DictConfig) -> None:
    """The user's modules named in ``imports``: their ``@register_*`` calls run before anything is built."""
    for i, module in enumerate(cfg.imports):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"imports[{i}]: cannot import {module!r} ({e}); it is looked up from the working directory and sys.path.") from None


def build_components(cfg: DictConfig) -> Components:
    """Tasks and their data, trunk, heads (sized on the real inputs) and weighting."""
    import_plugins(cfg)
    tasks, head_nodes = build_tasks(cfg)
    check_selection(cfg.trainer.select_on, tasks)
    splits = load_datasets(tasks)
    node = _plain(cfg.trunk)
    cache_mb = feature_cache_setting(node)
    trunk = _component(build_trunk, dict(node), where="trunk")
    heads = build_heads(trunk, tasks, head_nodes, splits)
    check_targets(tasks, trunk, heads, splits, min(cfg.trainer.batch_size, CHECK_BATCH))
    model = build_architecture(cfg, trunk, heads, lambda: _component(build_trunk, dict(node), where="trunk"))
    if cfg.init_from:
        init_from(model, cfg.init_from)
    if cache_mb and model.trunk is not None:
        # Active only while the trunk is frozen (a linear probe, LP-FT's probe epochs): see mtl.features.
        FeatureCache.attach(trunk, cache_mb)
    weighting = _component(build, WEIGHTINGS, _plain(cfg.weighting), "weighting", list(tasks), where="weighting")
    return Components(tasks, splits, model, weighting)


def build_architecture(cfg: DictConfig, trunk: Trunk, heads: dict[str, Head], make_trunk) -> Architecture:
    """The model: ``architecture.name`` (``mtl list architectures``) on the built trunk and heads;
    ``make_trunk`` builds the further trunk copies some architectures are made of."""
    node = _plain(cfg.architecture)
    return _component(build, ARCHITECTURES, node, "architecture", trunk, heads, make_trunk, where="architecture")


def build_eval_model(trunk: Any, task_nodes: dict[str, Any]) -> tuple[MultiTaskModel, dict[str, Task], dict[str, Splits]]:
    """Hard sharing on the trunk config node ``trunk``, with fresh heads for ``task_nodes``
    ({task: its config node}), and those tasks' data: the model that saved weights are loaded
    into to evaluate them again (``mtl.forgetting``, ``mtl.merging``)."""
    tasks, head_nodes = build_tasks(OmegaConf.create({"tasks": task_nodes}))
    splits = load_datasets(tasks)
    node = _plain(trunk)
    feature_cache_setting(node)  # the framework's own keys, not the trunk's arguments
    built = _component(build_trunk, node, where="trunk")
    return MultiTaskModel(built, build_heads(built, tasks, head_nodes, splits)), tasks, splits


def feature_cache_setting(node: dict[str, Any]) -> float | None:
    """Pops the framework's own trunk keys from a trunk node before the trunk is built:
    ``feature_cache`` (default true) and ``feature_cache_mb`` (default 1024), the memory
    the frozen trunk's features may take. The cache's budget in MB, or None when it is off."""
    enabled = node.pop("feature_cache", True)
    max_mb = node.pop("feature_cache_mb", DEFAULT_MAX_MB)
    if not isinstance(enabled, bool):
        raise ConfigError(
            f"trunk.feature_cache: must be true or false, got {enabled!r}; false runs a frozen trunk at every step "
            "instead of reusing its features."
        )
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb > 0:
        raise ConfigError(f"trunk.feature_cache_mb: must be a number of megabytes > 0, got {max_mb!r}.")
    return float(max_mb) if enabled else None


def init_from(model: Architecture, path: str) -> None:
    """Start from an earlier stage's checkpoint: its trunk, and the heads of tasks that
    continue. A head whose task is new, or whose shape no longer fits, starts fresh (said)."""
    # read_checkpoint condenses torch's page-long refusal of a corrupt or pickled file to its reason.
    if model.trunk is None:
        raise ConfigError(
            f"init_from: architecture {type(model).__name__} has no single trunk to load {path!r} into; "
            "start it from pretrained weights with trunk.checkpoint (every trunk copy loads them), or use architecture.name=hard."
        )
    state = _component(read_checkpoint, path, "init_from", where="init_from")
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"init_from: {path!r} is not a checkpoint of this framework (no 'model' entry); use trunk.checkpoint for a trunk alone.")
    _component(load_trunk_checkpoint, model.trunk, path, "init_from", where="init_from")
    weights = state["model"]
    for task, head in model.heads.items():
        prefix = f"heads.{task}."
        saved = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        own = head.state_dict()
        if not saved:
            logger.info("init_from: no head for task %r in %s; it starts fresh.", task, path)
        elif saved.keys() == own.keys() and all(saved[k].shape == own[k].shape for k in own):
            head.load_state_dict(saved)
        else:
            warnings.warn(f"init_from: the head of task {task!r} in {path} does not fit this head's shape; it starts fresh.")


def build_recipe(cfg: DictConfig) -> Recipe:
    return _component(build, RECIPES, _plain(cfg.recipe), "recipe", where="recipe")


def build_optimizer(cfg: DictConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer over parameter groups; a group's ``lr_scale`` multiplies the configured LR."""
    optimizer = _component(optim.build_optimizer, _plain(cfg.trainer.optimizer), groups, where="trainer.optimizer")
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)
    return optimizer


def build_lr_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    node = _plain(cfg.trainer.lr_schedule)
    return _component(optim.build_lr_schedule, node, optimizer, total_steps, where="trainer.lr_schedule")


def build_scheduler(cfg: DictConfig, sources: Sources) -> TaskScheduler:
    return _component(build, SCHEDULERS, _plain(cfg.scheduler), "scheduler", sources, where="scheduler")


def input_groups(tasks: dict[str, Task], splits: dict[str, Splits]) -> dict[str, list[str]]:
    """Training sources: ``{name: tasks}``, tasks with one ``input_key`` together (named
    ``a+b``), every other task alone. Shared inputs are checked, not trusted."""
    by_key: dict[Any, list[str]] = {}
    for name, task in tasks.items():
        key = task.input_key()
        by_key.setdefault(name if key is None else ("shared", key), []).append(name)
    groups = {}
    for members in by_key.values():
        first = members[0]
        for other in members[1:]:
            for split, ds in splits[first].items():
                theirs = getattr(splits[other], split)
                same = len(ds) == len(theirs)  # type: ignore[arg-type]
                if same and hasattr(ds, "tensors") and hasattr(theirs, "tensors"):
                    same = torch.equal(ds.tensors[0], theirs.tensors[0])
                if not same:
                    raise ConfigError(
                        f"tasks.{other}: declares the same input_key as tasks.{first} but its {split} inputs differ; "
                        "shared-input tasks must build identical inputs (same data, size, split_seed and train_fraction)."
                    )
        groups["+".join(members)] = members
    return groups


def check_selection(select_on: str, tasks: dict[str, Task]) -> None:
    if select_on in ("primary_mean", "loss"):
        return
    task, _, metric = select_on.partition("/")
    valid = [*tasks[task].metrics(), "loss"]
    if metric not in valid:
        raise ConfigError(f"trainer.select_on: task {task!r} has no metric {metric!r}; it has {', '.join(valid)}.")


def seed_everything(seed: int, deterministic: bool) -> None:
    """torch's, Python's and NumPy's global generators (user datasets and transforms draw from them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs (CUDA docs, "Reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


@dataclass
class Run:
    """Every object of one training stage, built and checked."""

    tasks: dict[str, Task]
    splits: dict[str, Splits]
    model: Architecture
    weighting: Weighting
    recipe: Recipe
    parameters: dict[str, int]  # total, and trainable in at least one epoch of the stage
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    groups: dict[str, list[str]]  # input source -> the tasks it feeds
    sources: dict[str, BatchSource]
    scheduler: TaskScheduler
    feed: Feed
    step: Step


def build_run(cfg: DictConfig, dist: Context, device: torch.device) -> Run:
    """The stage's tasks, data, model, recipe, optimizer, schedules, batch sources and training
    step, from the resolved config; the seed is set first (the model's initialisation draws from it)."""
    t = cfg.trainer
    seed_everything(cfg.seed, cfg.deterministic)
    parts = build_components(cfg)
    model, weighting = parts.model.to(device), parts.weighting.to(device)
    if t.channels_last:
        to_channels_last(model)
    recipe = build_recipe(cfg)
    if model.trunk is None and recipe.needs_one_trunk:
        raise ConfigError(
            f"recipe.name: {cfg.recipe.name!r} freezes or adapts one trunk, and architecture {cfg.architecture.name!r} "
            "is built of several trunk copies; use recipe.name=fine_tune, or architecture.name=hard for this recipe."
        )
    recipe.setup(model)
    parameters = count_parameters(cfg, recipe, model)
    groups = recipe.param_groups(model)
    if list(weighting.parameters()):
        # Learned loss scales (uncertainty, IMTL-L) must not be decayed towards 0.
        groups.append({"params": list(weighting.parameters()), "lr_scale": 1.0, "weight_decay": 0.0, "name": "weighting"})
    optimizer = build_optimizer(cfg, groups)
    inputs = input_groups(parts.tasks, parts.splits)
    sources = {
        name: BatchSource(
            shared_inputs([parts.splits[m].train for m in members]), t.batch_size, device, seed=cfg.seed + i,
            on_device=t.data_on_device, device_limit_mb=t.device_data_limit_mb, num_workers=t.num_workers,
        )
        for i, (name, members) in enumerate(inputs.items())
    }
    check_shards(cfg, sources, dist)
    sizes = Sources(
        samples={n: s.n for n, s in sources.items()}, batches={n: s.batches_per_pass for n, s in sources.items()},
        seed=cfg.seed, epochs=t.epochs, fixed_epoch=t.steps_per_epoch,
    )
    scheduler = build_scheduler(cfg, sizes)
    check_weighting(cfg, weighting, scheduler, inputs, model)
    check_affinity_every(cfg, weighting, dist, scheduler, recipe, model)
    lr_schedule = build_lr_schedule(cfg, optimizer, t.epochs * scheduler.steps_per_epoch)
    engine = {"every": cfg.engine.every, "chunk": cfg.engine.jacobian_chunk, "staged": cfg.engine.staged_gramian,
              "record_every": cfg.logging.log_every}
    step = build_step(model, parts.tasks, inputs, weighting, optimizer, lr_schedule, recipe, dist, device,
                      bf16=t.precision == "bf16", grad_clip=t.grad_clip or 0.0, engine=engine, affinity_every=cfg.engine.affinity_every)
    feed = Feed(sources, inputs, dist, channels_last=t.channels_last)
    return Run(parts.tasks, parts.splits, model, weighting, recipe, parameters, optimizer, lr_schedule, inputs, sources, scheduler, feed, step)


@torch.no_grad()
def to_channels_last(model: nn.Module) -> None:
    """Every 4-D parameter and buffer in channels_last layout. ``Module.to(memory_format=...)``
    refuses a model that also holds 5-D tensors (experts stacked ``[E, C_out, C_in, k, k]``)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


def check_weighting(cfg: DictConfig, weighting: Weighting, scheduler: TaskScheduler, groups: dict[str, list[str]], model: Architecture) -> None:
    """A weighting that needs every task at every step, one shared representation, or a last
    shared layer gets it."""
    if weighting.requires_all_tasks and not isinstance(scheduler, AllTasks):
        raise ConfigError(
            f"weighting: {cfg.weighting.name!r} needs every task's loss at every step; use scheduler.name=all "
            "(or weighting.name=equal with a sampling scheduler)."
        )
    if isinstance(weighting, GradientWeighting) and weighting.mode == "representation" and len(groups) > 1:
        advice = ("Use weighting.mode=parameters." if "parameters" in type(weighting).modes
                  else f"{cfg.weighting.name!r} works on a shared representation only; use weighting.name=mgda, its parameter-gradient form.")
        raise ConfigError(
            f"weighting.mode: representation needs one shared representation, i.e. every task fed by one input batch "
            f"(tasks with one input_key, e.g. MultiMNIST left/right); here the tasks have separate inputs "
            f"({', '.join(groups)}). " + advice
        )
    mode = weighting.mode if isinstance(weighting, GradientWeighting) else None
    if mode == "representation" and not model.shares_representation:
        raise ConfigError(
            f"weighting.mode: representation needs one representation every task reads, and architecture "
            f"{cfg.architecture.name!r} has none (each task reads its own mixture); "
            + ("use weighting.mode=parameters." if "parameters" in type(weighting).modes else "use weighting.name=mgda, its parameter-gradient form.")
        )
    if mode == "last_shared":
        try:
            model.last_shared_parameters()
        except NotImplementedError as e:
            raise ConfigError(f"weighting.mode: {e} Use weighting.mode=parameters.") from None


def check_affinity_every(cfg: DictConfig, weighting: Weighting, dist: Context, scheduler: TaskScheduler, recipe: Recipe,
                         model: Architecture) -> None:
    """TAG's lookahead runs in the step of a loss-level weighting, in one process, with every
    task's batch at each step and shared parameters that train."""
    if not cfg.engine.affinity_every:
        return
    where = "engine.affinity_every: TAG's lookahead affinity"
    if isinstance(weighting, GradientWeighting):
        raise ConfigError(f"{where} is measured in the step of a loss-level weighting; weighting {cfg.weighting.name!r} is "
                          "gradient-level: use weighting.name=equal (or another loss-level one).")
    if dist.active:
        raise ConfigError(f"{where} is measured in one process; torchrun runs several: measure it without torchrun.")
    if not isinstance(scheduler, AllTasks):
        raise ConfigError(f"{where} of task i onto task j needs both tasks' batches at every measured step; scheduler "
                          f"{cfg.scheduler.name!r} samples tasks: use scheduler.name=all.")
    for epoch in recipe.distinct_epochs(model, cfg.trainer.epochs):
        recipe.start_epoch(model, epoch)  # the trainer sets each epoch's own again when it starts it
        if not any(p.requires_grad for p in model.shared_parameters()):
            raise ConfigError(f"{where} is the effect of one task's step on the shared parameters, and recipe {cfg.recipe.name!r} "
                              f"freezes them in epoch {epoch + 1}: use recipe.name=fine_tune.")


def check_shards(cfg: DictConfig, sources: dict[str, BatchSource], dist: Context) -> None:
    """Under torchrun each rank trains on an equal slice of every global batch."""
    if not dist.active:
        return
    for name, source in sources.items():
        if source.batch_size % dist.world:
            raise ConfigError(
                f"trainer.batch_size: a batch of {source.batch_size} ({name}) does not split evenly over {dist.world} "
                f"processes; use a batch_size divisible by {dist.world}"
                + (f" (the training set has only {source.n} samples)." if source.n < cfg.trainer.batch_size else ".")
            )


def count_parameters(cfg: DictConfig, recipe: Recipe, model: Architecture) -> dict[str, int]:
    """Total parameters, and those the recipe trains in at least one epoch of the stage."""
    trainable: dict[int, int] = {}
    for epoch in recipe.distinct_epochs(model, cfg.trainer.epochs):
        recipe.start_epoch(model, epoch)
        trainable.update((id(p), p.numel()) for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise ConfigError(f"recipe: {cfg.recipe.name!r} leaves no parameter to train in this stage; choose another recipe.")
    return {"total": sum(p.numel() for p in model.parameters()), "trainable": sum(trainable.values())}
