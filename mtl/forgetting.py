"""Forgetting in sequential transfer: every earlier task evaluated after every later stage.

A sequential cell (``sequential``, or a ``stages`` chain) trains its stages one after the
other on one trunk; each task keeps its own head. After stage k, a task t trained at an
earlier stage j is evaluated with **stage k's trunk and t's head as stage j left it** (its
selected checkpoint): the source heads are kept, frozen, and only the shared trunk moved.
That gives the accuracy matrix R of Lopez-Paz & Ranzato (2017, "Gradient Episodic Memory
for Continual Learning", GEM, §5): R[k][t] is task t's metric after stage k, for every task
trained at or before stage k (a task trained at stage k is read from that stage's own
``results.json``; the others are evaluated here with ``mtl.results.evaluate`` on the val and
test splits). The matrix of a cell is stored in its folder (``forgetting.json``) with the
checksum of every stage's selected checkpoint, so a rerun reuses it and recomputes it only
when a stage was retrained.

A stage may train several tasks (a source stage trains the sources jointly) and a chain may
train a task more than once, so the summaries are taken per task: ``final`` is its value after
the last stage (R[S][t]), ``after`` its value after the last stage that trained it (R[k(t)][t]).
With one task per stage these are GEM's R_{T,i} and R_{i,i}. Metrics are signed by their
direction (``mtl.results.directions``), so a positive transfer is always an improvement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mtl import checkpoint, distributed

SPLITS = ("val", "test")
FILE = "forgetting.json"


# ---- the summaries ----


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def average_accuracy(final) -> float:
    """ACC (Lopez-Paz & Ranzato 2017, GEM, §5): ``ACC = (1/T) Σ_i R_{T,i}``, the mean over the T
    tasks of their metric after the last stage. Meaningful when the tasks' metrics share a scale."""
    final = np.asarray(final, float)
    if final.size == 0:
        raise ValueError("ACC needs at least one task")
    return float(final.mean())


def backward_transfer(final, after, higher_is_better: bool = True) -> float:
    """BWT (Lopez-Paz & Ranzato 2017, GEM, §5): ``BWT = 1/(T−1) Σ_{i<T} (R_{T,i} − R_{i,i})``,
    the mean change of each earlier task between just after its own training (``after``,
    R_{i,i}) and the end of the chain (``final``, R_{T,i}); pass the T − 1 earlier tasks only.
    Negative is forgetting. Signed by the metric's direction, so that for a lower-is-better
    metric a rise in error is negative too."""
    final, after = np.asarray(final, float), np.asarray(after, float)
    if final.size == 0 or final.shape != after.shape:
        raise ValueError(f"BWT needs the same, non-zero number of final and after-training values, got {final.shape} and {after.shape}")
    return float(_sign(higher_is_better) * (final - after).mean())


def forward_transfer(after, baseline, higher_is_better: bool = True) -> float:
    """FWT: ``FWT = 1/(T−1) Σ_{i≥2} (R_{i,i} − b_i)``, over the tasks not trained in the first
    stage: each one's metric just after its own training in the chain (R_{i,i}) against
    ``baseline`` b_i, the same task trained alone from the same seed on the same labelled
    fraction (the grid's single-task cell). Positive: the earlier stages helped.

    GEM (§5) defines FWT as 1/(T−1) Σ_{i≥2} (R_{i−1,i} − b̄_i): task i *before* its training
    against a randomly initialised model. With a head per task, task i's head does not exist
    before its stage, so R_{i−1,i} would be an untrained head's chance-level score and the
    difference noise. The reference used here, a model trained on the task alone, is the one
    of the forward-transfer metric of Continual World (Wołczyk et al. 2021, §3.1), taken on
    the final metric rather than the area under the training curve; for a two-stage sequential
    cell it is exactly the target's difference with single-task that the report tests."""
    after, baseline = np.asarray(after, float), np.asarray(baseline, float)
    if after.size == 0 or after.shape != baseline.shape:
        raise ValueError(f"FWT needs the same, non-zero number of values and baselines, got {after.shape} and {baseline.shape}")
    return float(_sign(higher_is_better) * (after - baseline).mean())


def retention(final: float, after: float, higher_is_better: bool = True) -> float:
    """Share of a task's metric kept to the end of the chain: ``R_{T,i} / R_{i,i}`` where higher
    is better, ``R_{i,i} / R_{T,i}`` where lower is better, so 1 is nothing lost and below 1 is
    forgetting either way. NaN unless both values are positive (a ratio of a metric that can
    be 0 or negative, R², says nothing)."""
    if not (after > 0 and final > 0):
        return math.nan
    return final / after if higher_is_better else after / final


def gem_summary(R, baseline, higher_is_better: bool = True) -> tuple[float, float, float]:
    """(ACC, BWT, FWT) of a T×T matrix with task i trained at stage i (GEM's setting):
    final = the last row, after = the diagonal; BWT over i < T, FWT over i ≥ 2 with
    ``baseline`` (length T; its first entry is not read)."""
    R = np.asarray(R, float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 2:
        raise ValueError(f"a GEM matrix is T×T with T >= 2, got shape {R.shape}")
    diag = np.diag(R)
    return (
        average_accuracy(R[-1]),
        backward_transfer(R[-1, :-1], diag[:-1], higher_is_better),
        forward_transfer(diag[1:], np.asarray(baseline, float)[1:], higher_is_better),
    )


# ---- the matrix of one cell ----


@dataclass
class ChainStage:
    name: str
    tasks: list[str]
    dir: Path  # the stage's run directory: config.yaml, results.json, checkpoints/best.pt


def trained_in(stages: list[ChainStage], task: str) -> list[int]:
    """Indices of the stages that train ``task``."""
    return [i for i, s in enumerate(stages) if task in s.tasks]


def followable(stages: list[list[str]]) -> list[str]:
    """The tasks a later stage can evaluate: trained, and not in the last stage, in the order
    the chain first trains them (the default of ``compare.regimes.<label>.forgetting``)."""
    last = set(stages[-1]) if stages else set()
    return list(dict.fromkeys(t for tasks in stages[:-1] for t in tasks if t not in last))


def _fingerprint(run_dir: Path) -> str:
    """The selected checkpoint's checksum: a stage retrained since the matrix was stored has another one."""
    return checkpoint.fingerprint(run_dir / "checkpoints" / "best.pt")


def _stored(path: Path, stages: list[ChainStage], follow: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:  # a file cut short by hand: recomputed, as if missing
        return None
    same = data.get("follow") == follow and [
        (s["name"], s["tasks"], s["checkpoint_sha256"]) for s in data.get("stages", [])
    ] == [(s.name, s.tasks, _fingerprint(s.dir)) for s in stages]
    return data if same else None


def matrix(path: Path, stages: list[ChainStage], follow: list[str], log: Callable[[str], Any] = print) -> dict[str, Any]:
    """The cell's accuracy matrix, read from ``path`` when it was stored for these very stages
    (same checkpoints, same followed tasks), else computed and stored there. Under torchrun
    every rank calls this: the ranks agree on recomputing, evaluate their shares, rank 0 writes."""
    from mtl.results import write_json

    ctx = distributed.current()
    data = _stored(path, stages, follow)
    if not ctx.any(data is None):
        return data  # type: ignore[return-value]
    data = compute(stages, follow)
    if ctx.is_main:
        write_json(data, path)
        log(f"forgetting: {', '.join(follow)} evaluated after every later stage; matrix in {path}")
    return data


def compute(stages: list[ChainStage], follow: list[str]) -> dict[str, Any]:
    """``{"stages", "follow", "tasks", "after"}``: ``after[k][split][task][metric]`` is R[k][task]
    for every task of stage k and every followed task trained before k; ``tasks[t]`` gives t's
    primary metric, directions and the stages that train it."""
    results = [json.loads((s.dir / "results.json").read_text()) for s in stages]
    tasks: dict[str, Any] = {}
    after: list[dict[str, Any]] = []
    for k, stage in enumerate(stages):
        for t in stage.tasks:
            tasks[t] = {**results[k]["tasks"][t], "stages": trained_in(stages, t)}
        row = {split: {t: results[k]["splits"][split][t] for t in stage.tasks} for split in SPLITS}
        # Each earlier task with the head its last training stage selected: one model per such stage.
        by_head: dict[int, list[str]] = {}
        for t in follow:
            done = [j for j in trained_in(stages, t) if j < k]
            if done and t not in stage.tasks:
                by_head.setdefault(done[-1], []).append(t)
        for j, names in by_head.items():
            for split, values in evaluate_earlier(stages[k], stages[j], names).items():
                row[split].update(values)
        after.append(row)
    return {
        "stages": [{"name": s.name, "tasks": s.tasks, "checkpoint_sha256": _fingerprint(s.dir)} for s in stages],
        "follow": follow,
        "tasks": tasks,
        "after": after,
    }


def evaluate_earlier(current: ChainStage, earlier: ChainStage, names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {task: {metric: value}}}`` of tasks ``names`` of stage ``earlier``, each with its
    head from that stage's selected checkpoint on the trunk of ``current``'s selected checkpoint.
    The model is built as the trainer builds ``current``'s (its trunk node and recipe, so a
    recipe that adds modules to the trunk is matched), the tasks and heads as ``earlier`` did."""
    import torch

    from mtl.builders import build_eval_model, build_recipe, import_plugins, resolve_device
    from mtl.config import load_config
    from mtl.results import evaluate

    now, then = load_config(current.dir / "config.yaml"), load_config(earlier.dir / "config.yaml")
    import_plugins(now)
    import_plugins(then)
    model, tasks, splits = build_eval_model(now.trunk, {t: then.tasks[t] for t in names})
    build_recipe(now).setup(model)
    device = resolve_device(now.device)
    trunk_state = _weights(current.dir, "trunk.", device)
    heads_state = _weights(earlier.dir, "heads.", device)
    model.trunk.load_state_dict(trunk_state)
    for t in names:
        model.heads[t].load_state_dict({k[len(t) + 1 :]: v for k, v in heads_state.items() if k.startswith(f"{t}.")})
    model.to(device)
    with torch.no_grad():
        return {
            split: evaluate(model, tasks, {t: getattr(splits[t], split) for t in names}, now.trainer.eval_batch_size, device,
                            num_workers=now.trainer.num_workers)
            for split in SPLITS
        }


def _weights(run_dir: Path, prefix: str, device) -> dict[str, Any]:
    state = checkpoint.load(run_dir / "checkpoints" / "best.pt", map_location=device)["model"]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
