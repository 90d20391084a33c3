"""`mtl compare`: single-task baselines, sequential transfer and joint training, side by side.

The grid is regimes × seeds × labelled fractions of the target tasks. Each cell is a list
of stages run by the ordinary ``Trainer``; a stage's config is the comparison's config
with the stage's tasks, recipe and overrides. Built-in regimes:

  single_task  one run per task (the baseline); a target task at every fraction, any
               other task once per seed on all its data (its data never varies).
  sequential   source stage (the sources jointly, once per seed, shared by every cell
               that needs it), then a target stage per recipe that starts from the
               source stage's trunk (``trunk.checkpoint``) with new target heads.
  joint        every task in one stage (targets at the cell's fraction).
  stages       any list of stages written in YAML; each starts from the previous stage's
               selected checkpoint (``init_from``: trunk and the heads of tasks that continue).
  groups       a grouping of the tasks, one independent joint stage per group.
  merge        model merging (``mtl.merging``): one fine-tune per task from a common trunk
               (the trunk as configured, built with the cell's seed, saved as the cell's
               ``common_trunk.pt``), then one trunk merged from them (``method``: task_arithmetic,
               ties, dare) with λ chosen on validation among ``coefficients``; each task is
               evaluated with the merged trunk and its own fine-tuned head (``merge.json``).

Forgetting: in a sequential or stages regime, every task trained before the last stage keeps
its head, and after each later stage it is evaluated on that stage's trunk (``mtl.forgetting``:
the accuracy matrix of Lopez-Paz & Ranzato 2017, stored per cell in ``forgetting.json``).
results.csv then has every task of the cell, not the last stage's only, with each value's
``after_training`` value, ``backward_transfer`` and ``retention``; the report gives ACC, BWT and
FWT. ``compare.regimes.<label>.forgetting`` lists the tasks to follow (default: every task
trained before the last stage; ``[]``: none, e.g. when evaluating a large source is costly).

Seeds: ``compare.seeds`` lists them, or is a budget ``{min, max}``: seeds 0, 1, 2, ... are
added one at a time, from min, until every comparison with single-task resolves under the
group-sequential rule of ``mtl.stats.SeedBudget`` or max is reached; a method (at a
fraction) whose comparisons have all resolved gets no more seeds. Tuning: ``compare.tune``
(``mtl.tune``) first picks each method's values on validation, on tuning seeds of its own.

Cells run one after another, or several at once (``compare.workers``: worker processes;
``compare.executor=ray``: Ray tasks), a seed's shared source stage before its cells
(``mtl.executor``); with ``deterministic=true`` the results do not depend on which ran them
(otherwise a cell's thread count can change float reductions, and so the last digits).

A finished cell (its last stage wrote results.json) is skipped when the grid is rerun, and a
finished grid may gain regimes (only their cells train; it may not lose or change one); an
interrupted stage resumes from its last checkpoint; ``compare.keep_step_checkpoints=false``
deletes a stage's step checkpoints once it has finished (best.pt and trunk.pt stay). A budgeted grid rerun replays its
decisions from the finished cells' results, so it resumes where it stopped. Model selection is on validation in
every stage; the test split is only evaluated on the selected checkpoint.

The output directory is the comparison's: its config.yaml and written_by.json say which
grid wrote it, and another grid, another config or `mtl train` is refused there before
anything runs, so results are never silently replaced. Every W&B run of the comparison
(each stage of each cell, and the report run) keeps its files in ``<output_dir>/wandb``:
``wandb sync <output_dir>/wandb`` uploads them all.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl import distributed
from mtl.config import COMPONENTS, ConfigError, resolve, save_config, to_dict
from mtl.registry import did_you_mean
from mtl.stats import SeedBudget

BUILTIN_KINDS = ("single_task", "sequential", "joint", "stages", "groups", "merge")
MERGE_ARGUMENTS = ("method", "coefficients", "top_k", "drop", "seed")  # kind merge: the method and its arguments
COMMON_TRUNK = "common_trunk.pt"  # a merge cell's θ_0, written before its fine-tunes
# How the cells run (mtl.executor), not what they compute (exactly so with deterministic=true): a grid may resume with other values.
EXECUTION = ("compare.workers", "compare.threads", "compare.executor", "compare.ray_address", "compare.keep_step_checkpoints")
STAGE_KEYS = ("tasks", "name", "recipe", "trainer", "weighting", "scheduler", "trunk", "architecture")


@dataclass
class Stage:
    name: str
    tasks: list[str]
    overrides: dict[str, Any]  # merged over the comparison's config
    where: str  # config path of the overrides, for error messages


@dataclass
class Cell:
    regime: str
    recipe: str
    seed: int
    fraction: float
    stages: list[Stage]
    label: str  # the method's name in tables: the regime, or regime/recipe for sequential
    variant: str = ""  # what tells cells of one regime apart: the task (single_task), the recipe (sequential), the architecture (joint)
    shared_source: bool = False  # the first stage is the per-seed shared source stage
    dirs: list[Path] = field(default_factory=list)
    tuned: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value, set on the last stage
    point: str = ""  # a tuning cell's grid point (its folder under tune/); "" for the comparison's own cells
    forgetting: list[str] = field(default_factory=list)  # earlier tasks evaluated after every later stage
    # kind groups: each stage is one independent group; task -> the stage (group) whose model reports it
    serve: dict[str, int] | None = None
    # kind merge: {"method": node, "coefficients": [λ]}; the last stage is the merge step, the others its fine-tunes
    merge: dict[str, Any] | None = None


def _merge(*nodes: dict[str, Any]) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.create(n) for n in nodes]))  # type: ignore[return-value]


def seed_plan(cfg: DictConfig) -> tuple[list[int], SeedBudget | None]:
    """The seeds a grid may run and its budget: ``compare.seeds`` as listed (no budget), or,
    for a budget ``{min, max}``, seeds 0, 1, ..., max − 1 in that order."""
    seeds = cfg.compare.seeds
    if isinstance(seeds, DictConfig):
        budget = SeedBudget(int(seeds.min), int(seeds.max))
        return list(range(budget.max)), budget
    return [int(s) for s in seeds], None


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"trainer.optimizer.lr": 0.1}`` as ``{"trainer": {"optimizer": {"lr": 0.1}}}``."""
    node = OmegaConf.create({})
    for key, value in dotted.items():
        OmegaConf.update(node, key, value, merge=True)
    return OmegaConf.to_container(node)  # type: ignore[return-value]


def _apply_stage(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with a stage's overrides merged in, except that a component the stage names anew
    (``recipe: {name: linear_probe}`` over ``lp_ft``) replaces the node: arguments of another
    component (``probe_epochs``, or the defaults the resolved config holds) do not carry over."""
    base = _merge(base)
    for key, _, _ in COMPONENTS:
        parent, _, leaf = key.rpartition(".")
        over = overrides.get(parent, {}) if parent else overrides
        node = over.get(leaf) if isinstance(over, dict) else None
        target = base.get(parent, {}) if parent else base
        if isinstance(node, dict) and "name" in node and isinstance(target.get(leaf), dict) and target[leaf].get("name") != node["name"]:
            target[leaf] = {}
    return _merge(base, overrides)


def _check_tasks(names: list[str], cfg: DictConfig, where: str) -> None:
    for name in names:
        if name not in cfg.tasks:
            raise ConfigError(f"{where}: task {name!r} is not defined under tasks.{did_you_mean(name, cfg.tasks)} Defined: {', '.join(cfg.tasks)}.")


def roles(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(targets, sources), checked against the defined tasks."""
    c = cfg.compare
    targets = list(c.targets)
    _check_tasks(targets, cfg, "compare.targets")
    sources = list(c.sources) if c.sources is not None else [t for t in cfg.tasks if t not in targets]
    _check_tasks(sources, cfg, "compare.sources")
    both = [t for t in sources if t in targets]
    if both:
        raise ConfigError(f"compare.sources: {', '.join(both)} is also a target; a source stage is shared by every fraction, so its data cannot vary.")
    for i, f in enumerate(c.fractions):
        if not 0 < f <= 1:
            raise ConfigError(f"compare.fractions[{i}]: {f} is outside (0, 1]; a fraction is the share of the targets' training labels kept.")
    if not targets and list(c.fractions) != [1.0]:
        raise ConfigError("compare.fractions: fractions subsample the targets; name them in compare.targets.")
    if not c.seeds:
        raise ConfigError("compare.seeds: list at least one seed.")
    if not c.regimes:
        raise ConfigError("compare.regimes: name at least one regime, e.g. {single_task: {}, joint: {}}.")
    return targets, sources


def plan(cfg: DictConfig, seeds: list[int] | None = None) -> list[Cell]:
    """Every cell of the grid, in run order (baselines first), for ``seeds`` (default: every
    seed the grid may run, see :func:`seed_plan`)."""
    targets, sources = roles(cfg)
    seeds = seed_plan(cfg)[0] if seeds is None else seeds
    c = cfg.compare
    stage_cfg = to_dict(cfg)["compare"]["stages"]
    unknown = set(stage_cfg) - {"source", "target"}
    if unknown:
        raise ConfigError(f"compare.stages.{sorted(unknown)[0]}: unknown stage role; use source or target.")
    source_over, target_over = stage_cfg.get("source", {}), stage_cfg.get("target", {})
    cells: list[Cell] = []
    for label, node in to_dict(cfg)["compare"]["regimes"].items():
        node = dict(node or {})
        where = f"compare.regimes.{label}"
        kind = node.pop("kind", label)
        if kind not in BUILTIN_KINDS:
            raise ConfigError(f"{where}.kind: unknown regime kind {kind!r}.{did_you_mean(kind, BUILTIN_KINDS)} Kinds: {', '.join(BUILTIN_KINDS)}.")
        recipes = node.pop("recipes", None)
        architectures = node.pop("architectures", None)
        custom = node.pop("stages", None)
        follow = node.pop("forgetting", None)
        groups, serve = node.pop("groups", None), node.pop("serve", None)
        merging = {k: node.pop(k) for k in MERGE_ARGUMENTS if k in node}
        if node:
            raise ConfigError(f"{where}.{next(iter(node))}: unknown key; a regime takes kind, recipes (sequential), architectures (joint), stages (kinds stages, merge), "
                              "groups and serve (kind groups), forgetting (sequential, stages) or method, coefficients, top_k, drop "
                              "and seed (kind merge).")
        if merging and kind != "merge":
            raise ConfigError(f"{where}.{next(iter(merging))}: only a regime of kind merge takes method, coefficients and the method's "
                              "arguments (top_k, drop, seed).")
        if (groups is not None or serve is not None) and kind != "groups":
            raise ConfigError(f"{where}.{'groups' if groups is not None else 'serve'}: only a regime of kind groups takes groups and serve.")
        if architectures is not None and kind != "joint":
            raise ConfigError(f"{where}.architectures: only a joint regime takes architectures (one cell per architecture, "
                              "see `mtl list architectures`); a stages regime sets architecture in a stage.")
        if recipes is not None and kind != "sequential":
            raise ConfigError(f"{where}.recipes: only a sequential regime takes recipes (the target stage's recipe).")
        if follow is not None and kind == "merge":
            raise ConfigError(f"{where}.forgetting: a merge's fine-tunes train side by side, not one after another, so no later stage "
                              "evaluates an earlier task; forgetting is measured in sequential and stages regimes.")
        if follow is not None and kind in ("single_task", "joint"):
            raise ConfigError(f"{where}.forgetting: a {kind} regime trains its tasks in one stage, so no later stage can evaluate them; "
                              "forgetting is measured in sequential and stages regimes.")
        for seed in seeds:
            if kind == "single_task":
                # A task that is not a target keeps all its data: one baseline per seed.
                cells += [_single(label, t, seed, 1.0, target_over) for t in cfg.tasks if t not in targets]
            for fraction in c.fractions:
                if kind == "groups":
                    new = [_grouped(label, seed, float(fraction), groups, serve, target_over, where, cfg)]
                elif kind == "merge":
                    new = [_merged(label, seed, float(fraction), custom, merging, target_over, where, cfg)]
                elif kind == "joint" and architectures is not None:
                    new = _architectures(label, seed, float(fraction), architectures, target_over, where, cfg)
                else:
                    new = _cells(kind, label, seed, float(fraction), targets, sources, recipes, custom, source_over, target_over, where, cfg)
                for cell in new:
                    cell.forgetting = _follow(follow, cell.stages, f"{where}.forgetting", cfg) if kind in ("sequential", "stages") else []
                cells += new
    return cells


def _follow(listed: Any, stages: list[Stage], where: str, cfg: DictConfig) -> list[str]:
    """The earlier tasks a sequential cell evaluates after every later stage: ``listed``
    (``compare.regimes.<label>.forgetting``), checked, or by default every task trained before
    the last stage (``mtl.forgetting.followable``)."""
    from mtl.forgetting import followable

    can = followable([s.tasks for s in stages])
    if listed is None:
        return can
    if not isinstance(listed, list) or not all(isinstance(t, str) for t in listed):
        raise ConfigError(f"{where}: must be a list of task names (default: every task trained before the last stage; [] for none), got {listed!r}.")
    if listed and len(stages) < 2:
        raise ConfigError(f"{where}: the regime has {len(stages)} stage; backward transfer compares a task after its own stage with "
                          "after a later one, so it needs 2 or more stages (add a stage, or remove forgetting).")
    _check_tasks(listed, cfg, where)
    for i, task in enumerate(listed):
        if task not in can:
            trained = [s.name for s in stages if task in s.tasks]
            why = (f"is trained in the last stage ({stages[-1].name}), so no later stage evaluates it after its training" if trained
                   else "is trained by no stage of this regime")
            raise ConfigError(f"{where}[{i}]: task {task!r} {why}; backward transfer needs a task trained before the last stage"
                              + (f": {', '.join(can)}." if can else ", and this regime has none."))
    return list(dict.fromkeys(listed))


def _grouped(label: str, seed: int, fraction: float, groups: Any, serve: Any, overrides: dict[str, Any], where: str,
             cfg: DictConfig) -> Cell:
    """A grouping of the tasks (TAG, Fifty et al. 2021; ``mtl group`` prints one): each group
    trains jointly, on its own trunk from scratch, one stage per group; every task is reported
    by the group that serves it, ``serve[task]`` (default: the first group that has it), so
    the cell reports every task once, as joint and single-task do."""
    if not isinstance(groups, list) or not groups or not all(isinstance(g, list) and g for g in groups):
        raise ConfigError(f"{where}.groups: a list of task groups, each a non-empty list, e.g. [[a, b], [c]]; got {groups!r}.")
    for k, members in enumerate(groups):
        _check_tasks([str(t) for t in members], cfg, f"{where}.groups[{k}]")
    missing = [t for t in cfg.tasks if not any(t in g for g in groups)]
    if missing:
        raise ConfigError(f"{where}.groups: task {missing[0]!r} is in no group; every task of the comparison must be trained by one "
                          "(put it in a group of its own to train it alone).")
    chosen = {t: next(k for k, g in enumerate(groups) if t in g) for t in cfg.tasks}
    if serve is not None:
        if not isinstance(serve, dict):
            raise ConfigError(f"{where}.serve: a mapping task -> index of the group that reports it, e.g. {{a: 0}}; got {serve!r}.")
        for t, k in serve.items():
            _check_tasks([str(t)], cfg, f"{where}.serve")
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(groups) or t not in groups[k]:
                raise ConfigError(f"{where}.serve.{t}: {k!r} is not the index of a group that has {t!r} "
                                  f"(groups with it: {[i for i, g in enumerate(groups) if t in g]}).")
            chosen[str(t)] = k
    stages = [Stage(f"group{k}", [str(t) for t in members], overrides, f"{where}.groups[{k}]") for k, members in enumerate(groups)]
    return Cell(label, "fine_tune", seed, fraction, stages, label=label, serve=chosen)


def _architectures(label: str, seed: int, fraction: float, listed: Any, overrides: dict[str, Any], where: str, cfg: DictConfig) -> list[Cell]:
    """A joint regime over architectures (``architectures: [hard, {name: mmoe, experts: 4}]``):
    one cell per architecture, all tasks in one stage, labelled ``<label>/<architecture>`` as a
    sequential regime's recipes are."""
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"{where}.architectures: a list of architectures, e.g. [hard, mmoe, {{name: mtan}}] (`mtl list architectures`); got {listed!r}.")
    from mtl.architectures import ARCHITECTURES

    out = []
    for i, entry in enumerate(listed):
        node = entry if isinstance(entry, dict) else {"name": entry}
        name = node.get("name")
        if not isinstance(name, str) or name not in ARCHITECTURES:
            raise ConfigError(f"{where}.architectures[{i}]: {name!r} is not a registered architecture."
                              f"{did_you_mean(str(name), ARCHITECTURES.names())} See `mtl list architectures`.")
        variant = name if sum(1 for e in listed if (e if isinstance(e, str) else e.get("name")) == name) == 1 else f"{name}{i}"
        stage = Stage("train", list(cfg.tasks), _merge(overrides, {"architecture": node}), f"{where}.architectures[{i}]")
        out.append(Cell(label, variant, seed, fraction, [stage], label=f"{label}/{variant}", variant=variant))
    return out


def _single(label: str, task: str, seed: int, fraction: float, overrides: dict[str, Any]) -> Cell:
    stage = Stage("train", [task], overrides, "compare.stages.target")
    return Cell(label, "fine_tune", seed, fraction, [stage], label=label, variant=task)


def _cells(kind, label, seed, fraction, targets, sources, recipes, custom, source_over, target_over, where, cfg) -> list[Cell]:
    if kind == "single_task":
        return [_single(label, t, seed, fraction, target_over) for t in targets]
    if kind == "joint":
        return [Cell(label, "fine_tune", seed, fraction, [Stage("train", list(cfg.tasks), target_over, "compare.stages.target")], label=label)]
    if kind == "sequential":
        if not targets or not sources:
            raise ConfigError(f"{where}: sequential transfer needs compare.targets and at least one source task.")
        _check_tasks(sources, cfg, "compare.sources")
        out = []
        for i, recipe in enumerate(recipes or ["fine_tune"]):
            node = recipe if isinstance(recipe, dict) else {"name": recipe}
            if "name" not in node:
                raise ConfigError(f"{where}.recipes[{i}]: a recipe needs a name (see `mtl list recipes`).")
            stages = [
                Stage("source", sources, _merge({"recipe": {"name": "fine_tune"}}, source_over), "compare.stages.source"),
                Stage("target", targets, _merge(target_over, {"recipe": node}), f"{where}.recipes[{i}]"),
            ]
            name = node["name"]
            out.append(Cell(label, name, seed, fraction, stages, label=f"{label}/{name}", variant=name, shared_source=True))
        return out
    if not custom:
        raise ConfigError(f"{where}.stages: a regime of kind stages lists its stages, e.g. [{{tasks: [a]}}, {{tasks: [b], recipe: {{name: linear_probe}}}}].")
    stages = _custom_stages(custom, where, cfg)
    recipe = stages[-1].overrides.get("recipe", {}).get("name", "fine_tune")
    return [Cell(label, recipe, seed, fraction, stages, label=label)]


def _custom_stages(custom: list, where: str, cfg: DictConfig, name=lambda i, tasks: f"stage{i}") -> list[Stage]:
    """The stages a regime lists (``compare.regimes.<label>.stages``), checked; ``name(i, tasks)``
    names a stage that does not name itself."""
    stages = []
    for i, node in enumerate(custom):
        swhere = f"{where}.stages[{i}]"
        node = dict(node)
        bad = set(node) - set(STAGE_KEYS)
        if bad:
            raise ConfigError(f"{swhere}.{sorted(bad)[0]}: unknown stage key.{did_you_mean(sorted(bad)[0], STAGE_KEYS)} Stage keys: {', '.join(STAGE_KEYS)}.")
        if not node.get("tasks"):
            raise ConfigError(f"{swhere}.tasks: list the tasks this stage trains.")
        _check_tasks(list(node["tasks"]), cfg, f"{swhere}.tasks")
        tasks = list(node.pop("tasks"))
        stages.append(Stage(str(node.pop("name", name(i, tasks))), tasks, node, swhere))
    return stages


def _merged(label: str, seed: int, fraction: float, custom: Any, merging: dict[str, Any], overrides: dict[str, Any], where: str,
            cfg: DictConfig) -> Cell:
    """Model merging (``mtl.merging``): one stage per task fine-tunes it alone from the common
    trunk (by default every task of the comparison, with ``compare.stages.target``; or the
    regime's own ``stages``, one task each), then the merge step, the cell's last stage, merges
    their trunks by ``method`` (default task_arithmetic; its arguments beside it or in a
    ``{name, ...}`` node) with λ chosen on validation among ``coefficients`` (default: the
    method's grid)."""
    from mtl.merging import build_method, check_coefficients

    merging = dict(merging)
    node = merging.pop("method", "task_arithmetic")
    node = {"name": node} if isinstance(node, str) else dict(node or {})
    coefficients = merging.pop("coefficients", None)
    node.update(merging)  # top_k, drop, seed written beside the method
    method = build_method(node, f"{where}.method")
    if "seed" in inspect.signature(type(method)).parameters and "seed" not in node:
        node["seed"] = seed  # a method that draws (DARE's masks) draws anew for each seed of the grid
    grid = check_coefficients(list(method.coefficients) if coefficients is None else coefficients, f"{where}.coefficients")
    if custom:
        stages = _custom_stages(custom, where, cfg, name=lambda i, tasks: str(tasks[0]))
    else:
        stages = [Stage(str(t), [str(t)], overrides, "compare.stages.target") for t in cfg.tasks]
    for stage in stages:
        if len(stage.tasks) != 1:
            raise ConfigError(f"{stage.where}.tasks: a merge fine-tunes each task alone from the common trunk; list one task per "
                              f"stage, got {stage.tasks}.")
    tasks = [s.tasks[0] for s in stages]
    twice = [t for t in tasks if tasks.count(t) > 1]
    if twice:
        raise ConfigError(f"{where}.stages: task {twice[0]!r} is fine-tuned twice; each task's head comes from its one fine-tune.")
    if len(tasks) < 2:
        raise ConfigError(f"{where}: merging combines the fine-tunes of 2 or more tasks, and this regime has {len(tasks)} "
                          f"({', '.join(tasks) or 'none'}); define more tasks, or list 2 or more stages.")
    stages.append(Stage("merge", tasks, overrides, where))
    return Cell(label, "fine_tune", seed, fraction, stages, label=label, merge={"method": node, "coefficients": grid})


def _cell_dir(root: Path, cell: Cell) -> Path:
    where = root / "tune" / cell.point if cell.point else root / "cells"
    return where / cell.regime / cell.variant / f"f{cell.fraction:g}" / f"seed{cell.seed}"


def comparison_name(cfg: DictConfig) -> str:
    """The W&B group of every run of the comparison."""
    return cfg.compare.name or Path(cfg.output_dir).name


def cell_identity(cell: Cell, index: int, targets: list[str]) -> dict[str, Any]:
    """What one stage's run is in the grid: its W&B run config's ``cell``. (The run config's
    ``compare`` holds the comparison's values as the user set them.)"""
    stage = cell.stages[index]
    shared = cell.shared_source and index == 0  # one source stage per seed serves every recipe and fraction
    tuning = {"tuning": dict(cell.tuned)} if cell.point and not shared else {}
    return {
        "regime": cell.regime,
        "method": None if shared else cell.label,
        "recipe": None if shared else cell.recipe,
        "stage": stage.name,
        "tasks": list(stage.tasks),
        "seed": cell.seed,
        "fraction": None if shared else cell.fraction,
        "targets": [t for t in stage.tasks if t in targets],  # the tasks trained on that fraction of their labels
        **tuning,
    }


def stage_config(cfg: DictConfig, cell: Cell, index: int, run_dir: Path, init: dict[str, Any], targets: list[str]) -> DictConfig:
    """The ordinary run config of one stage of a cell."""
    stage = cell.stages[index]
    base = to_dict(cfg)
    tasks = {}
    for name in stage.tasks:
        node = dict(base["tasks"][name] or {})
        if name in targets:
            node.update(train_fraction=cell.fraction, subset_seed=cell.seed)
        tasks[name] = node
    group = comparison_name(cfg)
    if cell.shared_source and index == 0:
        tags, name = ["source", f"seed={cell.seed}"], f"{cell.regime}/source/s{cell.seed}"
    else:
        tags = [cell.recipe, f"fraction={cell.fraction:g}", f"seed={cell.seed}", stage.name] + (["tune"] if cell.point else [])
        parts = ("tune" if cell.point else "", cell.label, cell.variant if cell.regime == "single_task" else stage.name, cell.point, f"f{cell.fraction:g}", f"s{cell.seed}")
        name = "/".join(p for p in parts if p)
    wandb = {"group": group, "job_type": cell.regime, "tags": tags, "name": name}
    run = {"output_dir": str(run_dir), "seed": cell.seed, "resume": True, "tasks": tasks, "logging": {"progress_bar": False, "wandb": wandb}}
    # Tuned values set the last stage, the one whose model the comparison evaluates (a merge cell's: every fine-tune).
    tuned = nested(cell.tuned) if cell.tuned and (index == len(cell.stages) - 1 or cell.merge is not None) else {}
    raw = _merge(_apply_stage(base, _merge(stage.overrides, tuned)), init, run)
    raw["tasks"] = tasks  # a merge would keep the tasks this stage does not train
    if "tasks" in tuned:  # ... and would drop a tuned task key
        raw = _merge(raw, {"tasks": tuned["tasks"]})
    try:
        return resolve(raw)
    except ConfigError as e:
        raise ConfigError(f"{stage.where} (stage {stage.name!r} of {cell.label}): {e}") from None


def _trunk_mismatch(cell: Cell, index: int, before: dict, after: dict) -> str:
    """Stage ``index`` loads the trunk that the stage before it trains: their shapes must agree."""
    key = next(k for k in [*before, *after] if before.get(k) != after.get(k))
    source, target = cell.stages[index - 1], cell.stages[index]
    # A sequential cell's target overrides come from compare.stages.target (its `where` is the recipe).
    places = ("compare.stages.source", "compare.stages.target") if cell.shared_source else (source.where, target.where)
    return (
        f"{target.where}: stage {target.name!r} of {cell.label} starts from the trunk of stage {source.name!r}, but their "
        f"trunk configs differ ({key}: {before.get(key, 'absent')} there, {after.get(key, 'absent')} here). Give both "
        f"the same trunk: set trunk keys at the top level only, or alike in {places[0]} and {places[1]}."
    )


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trunk": {"name": "x"}}`` as ``{"trunk.name": "x"}``; lists and scalars are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _check_task_vector(trainer, cell: Cell, stage: Stage) -> None:
    """A merge's fine-tune must be able to change every weight of the trunk and add none: a
    frozen trunk has no task vector, and adapters (LoRA, IA3, ...) are not merged here."""
    model, recipe = trainer.model, trainer.recipe
    trunk = list(model.trunk.state_dict())
    changes = set(recipe.state_keys(model))
    if set(recipe.base_shapes) != set(trunk) or any(f"trunk.{k}" not in changes for k in trunk):
        raise ConfigError(
            f"{stage.where} (stage {stage.name!r} of {cell.label}): recipe {trainer.cfg.recipe.name!r} does not fine-tune the whole trunk, "
            "so the run has no task vector to merge (a frozen trunk has none; LoRA, IA3 and the other adapter recipes are not "
            "merged here). Use a recipe that trains every trunk weight: fine_tune, lp_ft, l2_sp, layerwise_lr_decay or gradual_unfreezing."
        )


def describe(cell: Cell) -> str:
    """A cell in one line of the grid's log: ``tune <point> sequential/fine_tune f=0.05 seed=1``."""
    variant = f"[{cell.variant}]" if cell.regime == "single_task" else ""
    point = f"tune {cell.point} " if cell.point else ""
    return f"{point}{cell.label}{variant} f={cell.fraction:g} seed={cell.seed}"


def train_cell(cfg: DictConfig, cell: Cell, stages: list[int], targets: list[str], root: Path, log=print) -> int:
    """Train ``stages`` (indices) of ``cell`` in order, each not finished yet; the number trained.
    What an executor's worker runs: everything it needs is in its arguments. A stage stopped
    midway (Ctrl-C, a killed worker) resumes from its last checkpoint."""
    from mtl import checkpoint
    from mtl.trainer import Trainer

    trained = 0
    if cell.merge is not None and not (cell.dirs[-1] / COMMON_TRUNK).exists():
        _write_common_trunk(cfg, cell, targets)
    for i in stages:
        if (cell.dirs[i] / "results.json").exists():
            continue
        if cell.merge is not None and i == len(cell.stages) - 1:
            _merge_step(cell, log)
            continue
        found = checkpoint.step_checkpoints(cell.dirs[i] / "checkpoints")
        if found:
            log(f"  {cell.dirs[i].relative_to(root)}: resuming from {found[0].name}")
        stage = stage_config(cfg, cell, i, cell.dirs[i], start_of(cell, i), targets)
        Trainer(stage, cell=cell_identity(cell, i, targets), wandb_dir=root).fit()
        trained += 1
        # Only a finished stage (results.json written) loses them: a stopped one resumes from them.
        if not cfg.compare.keep_step_checkpoints and distributed.current().is_main and (cell.dirs[i] / "results.json").exists():
            checkpoint.drop_steps(cell.dirs[i] / "checkpoints")
    if cell.forgetting and trained and (cell.dirs[-1] / "results.json").exists():
        # Here, in the job: left to the grid's report, every cell's matrix was evaluated one after
        # another in the command's process after the workers had finished.
        forgetting_matrix(cell, root, log)
    return trained


def forgetting_matrix(cell: Cell, root: Path, log=print) -> dict[str, Any]:
    """The finished sequential ``cell``'s accuracy matrix (``mtl.forgetting.matrix``), kept in its
    folder: computed once, then read back while its checkpoints are unchanged."""
    from mtl.forgetting import FILE, ChainStage, matrix

    stages = [ChainStage(s.name, list(s.tasks), d) for s, d in zip(cell.stages, cell.dirs)]
    return matrix(_cell_dir(root, cell) / FILE, stages, cell.forgetting, log)


def start_of(cell: Cell, index: int) -> dict[str, Any]:
    """Where stage ``index`` of ``cell`` starts from: the files of the stage before it."""
    if cell.merge is not None:  # every fine-tune starts from the cell's common trunk
        return {"trunk": {"checkpoint": str(cell.dirs[-1] / COMMON_TRUNK)}}
    if index == 0 or cell.serve is not None:  # the groups of a grouping train independently
        return {}
    previous = cell.dirs[index - 1]
    if cell.shared_source:
        return {"trunk": {"checkpoint": str(previous / "trunk.pt")}}
    return {"init_from": str(previous / "checkpoints" / "best.pt")}


def _write_common_trunk(cfg: DictConfig, cell: Cell, targets: list[str]) -> None:
    """θ_0 of a merge cell: the trunk as its first fine-tune's config builds it (pretrained
    weights, trunk.checkpoint or init_from loaded; else initialised from the cell's seed), saved
    once, so that every fine-tune starts from these very weights."""
    from mtl import checkpoint
    from mtl.builders import feature_cache_setting, import_plugins, seed_everything
    from mtl.trunks import build_trunk, load_trunk_checkpoint

    ctx = distributed.current()
    if ctx.is_main:
        stage = stage_config(cfg, cell, 0, cell.dirs[0], {}, targets)
        import_plugins(stage)
        seed_everything(stage.seed, False)
        node = OmegaConf.to_container(stage.trunk, resolve=True)
        feature_cache_setting(node)  # the framework's own keys, not the trunk's arguments
        trunk = build_trunk(node)
        if stage.init_from:
            load_trunk_checkpoint(trunk, stage.init_from, "init_from")
        checkpoint.save({"trunk": trunk.state_dict(), "trunk_config": node}, cell.dirs[-1] / COMMON_TRUNK)
    ctx.barrier()


def _merge_step(cell: Cell, log) -> None:
    """The merge step of a merge cell (``mtl.merging.evaluate_merged``): merged_trunk.pt (a
    trunk file ``trunk.checkpoint`` loads), merge.json, then the cell's results.json (last:
    a cell with results.json is finished)."""
    from mtl import checkpoint
    from mtl.merging import evaluate_merged
    from mtl.results import write_json

    runs = {s.tasks[0]: d for s, d in zip(cell.stages[:-1], cell.dirs[:-1])}
    base = cell.dirs[-1] / COMMON_TRUNK
    out = evaluate_merged(cell.merge["method"], cell.merge["coefficients"], base, runs)
    if distributed.current().is_main:
        config = checkpoint.load(base)["trunk_config"]
        checkpoint.save({"trunk": out["trunk"], "trunk_config": config}, cell.dirs[-1] / "merged_trunk.pt")
        write_json(out["merge"], cell.dirs[-1] / "merge.json")
        write_json(out["results"], cell.dirs[-1] / "results.json")
    m = out["merge"]
    log(f"  merged {len(runs)} fine-tunes by {cell.merge['method']['name']} in {m['merge_s']:.3f}s; λ = {m['chosen']:g} on validation")


class Grid:
    """Runs the planned cells; ``rows()`` gathers the long-form results."""

    def __init__(self, cfg: DictConfig, log=print):
        from mtl.tune import Tuning

        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.targets, self.sources = roles(cfg)
        self.seeds, self.budget = seed_plan(cfg)
        self.cells = plan(cfg, self.seeds)
        self.log = log
        for cell in self.cells:
            cell.dirs = self._dirs(cell)
        if self.budget:
            from mtl.report import BASELINE  # the report (plots) is imported only where a budget needs its baseline's name

            if not any(c.label == BASELINE for c in self.cells):
                raise ConfigError(f"compare.seeds: a budget adds seeds until every comparison with {BASELINE} resolves, and this grid "
                                  f"has none; add the baseline (compare.regimes.{BASELINE}={{}}) or list the seeds, e.g. compare.seeds=[0,1,2].")
        self.tuning = Tuning(self) if cfg.compare.tune else None
        self.executor = None  # built at the first run, kept across runs (a budget's waves, tuning then evaluation)

    def _dirs(self, cell: Cell) -> list[Path]:
        base = _cell_dir(self.root, cell)
        if cell.shared_source:  # a tuning seed's source stage stays under tune/, out of the comparison's sources/
            return [self.root / ("tune/sources" if cell.point else "sources") / f"seed{cell.seed}", base]
        if len(cell.stages) == 1:
            return [base]
        if cell.merge is not None:  # the merge step writes the cell's results beside its fine-tunes' folders
            return [*(base / s.name for s in cell.stages[:-1]), base]
        return [base / s.name for s in cell.stages]

    def preflight(self) -> None:
        """Check what the executor needs, that output_dir holds nothing of another command or grid,
        then build (not train) one stage config per distinct stage, so bad input fails first."""
        from mtl import executor
        from mtl.trainer import RESUMABLE_CHANGES, Trainer, written_by

        executor.check(self.cfg)  # workers the machine has, Ray and its address: in seconds
        command = written_by(self.root)
        if command == "train":
            raise ConfigError(
                f"output_dir: {str(self.root)!r} holds a training run (written by mtl train); the comparison would mix its "
                f"files with that run's. Choose another output_dir, e.g. output_dir={self.root}-compare."
            )
        # Unlike one run, a grid may not change its epochs midway: finished cells are never
        # retrained, so the cells of one table would have trained for different lengths.
        allowed = tuple(k for k in RESUMABLE_CHANGES if k != "trainer.epochs") + EXECUTION
        if command == "compare":  # the grid itself: a smaller or other grid would replace the report of this one
            self._check_same_config(self.root, self.cfg, allowed + ("compare.regimes",))
            self._check_regimes_kept()
        tuning = self.tuning.cells if self.tuning else []
        if self.tuning:
            self.tuning.check()
        # With tuning, the evaluation cells' configs hold the values selected later: checked then.
        self.check_existing(tuning if self.tuning else self.cells)
        trunks: dict[tuple, dict[str, tuple[int, ...]]] = {}  # a distinct stage -> its trunk's shapes
        merges: set[tuple[str, str]] = set()  # merge regimes (and tuning points) whose common trunk is checked
        for cell in [*self.cells, *(c for c in tuning if c.seed == self.tuning.seeds[0])]:
            # A tuned value (trunk.features, say) can change the last stage's trunk: each point is its own stage.
            # (A merge cell's tuned values set every fine-tune.)
            keys = [(cell.regime, cell.recipe, i, tuple(stage.tasks), cell.point if i == len(cell.stages) - 1 or cell.merge else "")
                    for i, stage in enumerate(cell.stages)]
            if cell.merge is not None and (cell.label, cell.point) not in merges:
                merges.add((cell.label, cell.point))
                self._check_common_trunk(cell)
            for i, stage in enumerate(cell.stages):
                if cell.merge is not None and i == len(cell.stages) - 1:
                    continue  # the merge step trains nothing; its inputs are checked above and when it runs
                if keys[i] not in trunks:
                    # A later stage starts from its previous stage's files; before those exist, check it without.
                    init = start_of(cell, i)
                    start = init.get("init_from") or init.get("trunk", {}).get("checkpoint")
                    cfg = stage_config(self.cfg, cell, i, cell.dirs[i], init if start and Path(start).exists() else {}, self.targets)
                    try:
                        trainer = Trainer(cfg)
                    except ConfigError as e:
                        raise ConfigError(f"{stage.where} (stage {stage.name!r} of {cell.label}): {e}") from None
                    # The trunk as built, before a recipe's adapters (LoRA renames its layers): what a next stage loads.
                    trunks[keys[i]] = trainer.recipe.base_shapes
                    if cell.merge is not None:
                        _check_task_vector(trainer, cell, stage)
                if i and cell.serve is None and cell.merge is None and trunks[keys[i]] != trunks[keys[i - 1]]:
                    raise ConfigError(_trunk_mismatch(cell, i, trunks[keys[i - 1]], trunks[keys[i]]))

    def _check_common_trunk(self, cell: Cell) -> None:
        """Every fine-tune of a merge cell must start from one trunk: the same trunk config and
        init_from (as configured: the common trunk file the grid adds is built from them)."""
        first, start = None, {}
        for i, stage in enumerate(cell.stages[:-1]):
            c = to_dict(stage_config(self.cfg, cell, i, cell.dirs[i], {}, self.targets))
            shared = (c.get("architecture") or {}).get("name", "hard")
            if shared != "hard":
                raise ConfigError(
                    f"{stage.where} (stage {stage.name!r} of {cell.label}): architecture {shared!r}; a merge combines the fine-tunes "
                    "of one shared trunk, i.e. hard parameter sharing: set architecture.name=hard for the merge's fine-tunes."
                )
            here = _leaves({"trunk": c["trunk"], "init_from": c["init_from"]})
            if first is None:
                first, start = stage, here
                continue
            differ = [k for k in [*start, *(k for k in here if k not in start)] if start.get(k) != here.get(k)]
            if differ:
                shown = "; ".join(f"{k}: {start.get(k, 'absent')} there, {here.get(k, 'absent')} here" for k in differ[:3])
                raise ConfigError(
                    f"{stage.where} (stage {stage.name!r} of {cell.label}): a merge combines fine-tunes of one common trunk, but this "
                    f"stage's trunk differs from stage {first.name!r}'s ({shown}). Set trunk and init_from at the top level only, "
                    "or alike in every stage of the regime."
                )

    def check_existing(self, cells: list[Cell]) -> None:
        """Stages of ``cells`` already run in output_dir must have run with the config they would run with now."""
        from mtl.trainer import RESUMABLE_CHANGES, UNREAD_BY_TRAINING

        allowed = tuple(k for k in RESUMABLE_CHANGES if k != "trainer.epochs")
        for cell in cells:
            for i in range(len(cell.stages)):
                if (cell.dirs[i] / "config.yaml").exists():
                    cfg = stage_config(self.cfg, cell, i, cell.dirs[i], start_of(cell, i), self.targets)
                    self._check_same_config(cell.dirs[i], cfg, allowed + UNREAD_BY_TRAINING)

    def _check_regimes_kept(self) -> None:
        """A finished grid may gain regimes (their cells train; the others are skipped and the report
        covers them all), but not lose or change one: its cells and report would be replaced. Seeds
        and fractions do not grow in place: seeds added after reading a report are optional stopping,
        which the p-values do not allow for (a seed budget, ``compare.seeds: {min, max}``, does)."""
        saved = OmegaConf.to_container(OmegaConf.load(self.root / "config.yaml"))["compare"]["regimes"]
        now = to_dict(self.cfg)["compare"]["regimes"]
        lost = [label for label in saved if label not in now]
        changed = [label for label in saved if label in now and now[label] != saved[label]]
        if lost or changed:
            what = "; ".join([*(f"{label} is missing" for label in lost), *(f"{label} differs" for label in changed)])
            raise ConfigError(
                f"compare.regimes: output_dir {self.root} holds a grid run with other regimes ({what}); a grid may gain "
                f"regimes but not lose or change one. Keep its regimes as its config.yaml has them, or use a new output_dir "
                f"(e.g. output_dir={self.root}-2) so results are not replaced or mixed."
            )

    def _check_same_config(self, directory: Path, cfg: DictConfig, allowed: tuple[str, ...]) -> None:
        from mtl.trainer import config_changes

        saved = OmegaConf.to_container(OmegaConf.load(directory / "config.yaml"))
        changed = config_changes(saved, to_dict(cfg), allowed=allowed)
        if changed:
            raise ConfigError(
                f"output_dir: {directory} was run with another config ({', '.join(changed[:5])} differ); rerun with the "
                f"config it was run with (its config.yaml) to resume it, or use a new output_dir (e.g. output_dir={self.root}-2) "
                "so results are not replaced or mixed."
            )

    def claim(self) -> None:
        """Mark output_dir as this comparison's, before any cell trains (``preflight`` first)."""
        from mtl.trainer import mark_written_by

        self.root.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.root / "config.yaml")
        mark_written_by(self.root, "compare")  # after config.yaml: a marked directory always has its config

    def run(self, cells: list[Cell] | None = None) -> int:
        """Train the cells (default: every planned cell) not finished yet, by the grid's executor
        (``mtl.executor``); the number of stages trained."""
        from mtl.executor import build_executor, jobs, run_jobs

        cells = self.cells if cells is None else cells
        if self.executor is None:
            self.executor = build_executor(self.cfg, self.root)
        todo = jobs(cells, self.root)
        for cell in cells:
            if (cell.dirs[-1] / "results.json").exists():
                self.log(f"{describe(cell)}: finished earlier, skipped")
        return run_jobs(todo, self.executor, self.log, progress=bool(self.cfg.logging.progress_bar))

    def close(self) -> None:
        """Stop the executor's workers (a later ``run`` starts them again)."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None

    def run_budget(self) -> tuple[list[Cell], int]:
        """Seeds as a budget: the first ``min`` seeds, then one seed at a time for the methods
        (at a fraction) with a comparison not resolved yet, with the baselines they need, until
        none is left or ``max`` seeds ran. Returns the cells run and the stages trained. Each
        decision is read back from the finished cells' results, so a rerun makes the same ones."""
        import pandas as pd

        from mtl.report import BASELINE, budget_stops

        budget = self.budget
        chosen = [c for c in self.cells if c.seed in self.seeds[: budget.min]]
        trained = self.run(chosen)
        for n in range(budget.min, budget.max):
            stops = budget_stops(pd.DataFrame(self.rows(chosen)), budget)
            open_ = self.open_comparisons(stops)
            if not open_:
                self.log(f"seed budget: every comparison resolved at {n} seeds or fewer; no more seeds.")
                return chosen, trained
            fractions = {f for _, f in open_}
            self.log(f"seed budget: {len(open_)} method/fraction pair(s) with a comparison not resolved at {n} seeds; adding seed {self.seeds[n]}.")

            def needed(cell: Cell) -> bool:
                if cell.label != BASELINE:
                    return (cell.label, cell.fraction) in open_
                # A task's baseline at one fraction only (a source task, never subsampled) serves every fraction.
                return cell.fraction in fractions or cell.variant not in self.targets

            more = [c for c in self.cells if c.seed == self.seeds[n] and needed(c)]
            trained += self.run(more)
            chosen += more
        self.log(f"seed budget: max ({budget.max} seeds) reached.")
        return chosen, trained

    def open_comparisons(self, stops: dict) -> set[tuple[str, float]]:
        """(method, fraction) pairs with a comparison the budget has not resolved (``stops``: from
        ``mtl.report.budget_stops``). A sequential method's comparisons on its earlier tasks are
        reported but buy no seeds: a linear probe's source scores what single-task scores at
        every seed (the same run), a tie no number of seeds resolves."""
        followed = {c.label: set(c.forgetting) for c in self.cells}
        return {(method, fraction) for (fraction, method, on), stop in stops.items()
                if not stop.resolved and on.partition(": ")[0] not in followed.get(method, ())}

    def rows(self, cells: list[Cell] | None = None) -> list[dict[str, Any]]:
        """The long-form results of the finished ``cells`` (default: every planned cell): one row
        per task, split and metric of the cell's final model. A sequential cell also has the
        earlier tasks it follows (val and test splits, from its forgetting matrix, computed by the
        cell's job, or here when missing). Every row says which stages trained its task (``trained_first``,
        ``trained_last``, of ``stages``), its value right after that training
        (``after_training``), and, for a task trained before the last stage, its
        ``backward_transfer`` (final − after training, signed: negative is forgetting) and
        ``retention`` (``mtl.forgetting``)."""
        from mtl.forgetting import backward_transfer, retention

        rows = []
        for cell in self.cells if cells is None else cells:
            last = len(cell.stages) - 1
            done = {i: d / "results.json" for i, d in enumerate(cell.dirs) if (d / "results.json").exists()}
            # Who reports a task: the last stage, or in a grouping each task's serving group (all must be done).
            if last not in done or (cell.serve is not None and len(done) < len(cell.dirs)):
                continue
            loaded = {i: json.loads(path.read_text()) for i, path in done.items()}
            serve = cell.serve if cell.serve is not None else dict.fromkeys(loaded[last]["tasks"], last)
            wall = sum(r["wall_time_s"] for r in loaded.values())
            final = {}  # task -> (its info, {split: final metrics}, {split: metrics right after its last training})
            for t, k in serve.items():
                values = {s: loaded[k]["splits"][s][t] for s in loaded[k]["splits"]}
                final[t] = (loaded[k]["tasks"][t], values, values)  # trained in its reporting stage: final = after training
            params = loaded[last]["parameters"]
            if cell.serve is not None:  # the grouping's parameters are all groups'
                params = {key: sum(r["parameters"][key] for r in loaded.values()) for key in ("trainable", "total")}
            if cell.forgetting:
                m = forgetting_matrix(cell, self.root, self.log)
                after = m["after"]
                for t in cell.forgetting:
                    info = m["tasks"][t]
                    own = info["stages"][-1]
                    final[t] = (info, {s: after[last][s][t] for s in after[last]}, {s: after[own][s][t] for s in after[own]})
            for task, (info, splits, after) in final.items():
                trained = [cell.serve[task]] if cell.serve is not None else [i for i, s in enumerate(cell.stages) if task in s.tasks]
                for split, per_task in splits.items():
                    for metric, value in per_task.items():
                        value = float("nan") if value is None else value
                        before = after[split].get(metric)
                        before = float("nan") if before is None else before
                        direction = info["directions"][metric]
                        earlier = trained[-1] < last and cell.serve is None
                        rows.append(
                            {
                                "method": cell.label,
                                "regime": cell.regime,
                                "recipe": cell.recipe,
                                "seed": cell.seed,
                                "fraction": cell.fraction,
                                "task": task,
                                "split": split,
                                "metric": metric,
                                "value": value,
                                "direction": direction,
                                "primary": metric == info["primary_metric"],
                                "trainable_params": params["trainable"],
                                "total_params": params["total"],
                                "wall_time_s": wall,
                                "cell": str(cell.dirs[-1].relative_to(self.root)),
                                "stages": len(cell.stages),
                                "trained_first": trained[0],
                                "trained_last": trained[-1],
                                "after_training": before,
                                "backward_transfer": backward_transfer([value], [before], direction == "max") if earlier else float("nan"),
                                "retention": retention(value, before, direction == "max") if earlier else float("nan"),
                            }
                        )
        return rows


def run_compare(cfg: DictConfig, log=print) -> dict[str, Any]:
    """Plan, check, run (skipping finished cells) and report. Returns the paths written."""
    import pandas as pd

    from mtl.report import comparison_table, write_report
    from mtl.results import write_json, write_text

    # Joined now (not first in a Trainer) so that every rank knows from the start whether it writes.
    ctx = distributed.setup(cfg.device)
    grid = Grid(cfg, log if ctx.is_main else (lambda *_: None))
    grid.preflight()
    if grid.budget is None and len(grid.seeds) < 2:
        log("compare.seeds: one seed, so the report gives differences without a CI or test and no verdict; "
            "list 2 or more seeds (3 or more to resolve anything but large differences).")
    ctx.barrier()  # every rank has read output_dir's config before rank 0 writes its own
    if ctx.is_main:
        grid.claim()
    root, trained = grid.root, 0
    try:
        if grid.tuning:
            trained += grid.run(grid.tuning.cells)
            records = grid.tuning.select()
            if ctx.is_main:
                write_json(grid.tuning.summary(records), root / "tune.json")
            grid.check_existing(grid.cells)
        if grid.budget:
            cells, more = grid.run_budget()
            trained += more
        else:
            cells = grid.cells
            trained += grid.run()
    finally:
        grid.close()
    df = pd.DataFrame(grid.rows(cells))
    table = comparison_table(df)
    if not ctx.is_main:  # under torchrun every rank trains the cells; rank 0 writes the comparison
        return {"csv": root / "results.csv", "report": root / "report.md", "table": table, "cells": len(cells)}
    write_text(df.to_csv(index=False), root / "results.csv")
    write_report(df, root, title=f"Comparison: {comparison_name(cfg)}", budget=grid.budget)
    mode = os.environ.get("WANDB_MODE") or cfg.logging.wandb.mode
    # A rerun that trained nothing has nothing new for the report run (when there is one already).
    if mode != "disabled" and (trained or not (root / "wandb_run_id").exists()):
        _log_wandb(cfg, root, table)
    if mode == "offline":
        log(f"W&B: the comparison's offline runs are in {root / 'wandb'}; upload them all with: wandb sync {root / 'wandb'}")
    return {"csv": root / "results.csv", "report": root / "report.md", "table": table, "cells": len(cells)}


def _log_wandb(cfg: DictConfig, root: Path, table) -> None:
    """The comparison's report run, in its group: the table as a W&B Table, the plots as images.
    Its id is kept in output_dir, so a rerun updates the same run instead of adding one."""
    from mtl.loggers import WandbLogger

    name = comparison_name(cfg)
    config = to_dict(cfg)
    config["logging"]["wandb"].update(group=name, job_type="report", name=f"{name}/report")
    try:
        import wandb

        logger = WandbLogger(OmegaConf.create(config["logging"]["wandb"]), root, config, resume=True)
        logger.run.log({"comparison": wandb.Table(dataframe=table.reset_index() if table.index.name else table)})
        logger.run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(root.glob("*.png"))})
        logger.close()
    except Exception as e:  # the local report is complete without W&B
        warnings.warn(f"W&B report run not logged ({type(e).__name__}: {e}); see {root / 'report.md'}.")
