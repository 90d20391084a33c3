"""`mtl group`: which tasks should train together, from one joint run (TAG, ``mtl.affinity``).

The config's tasks train jointly on the trainer (``mtl.trainer.Trainer``), as ``mtl train``
would (its trunk, heads, optimizer, LR schedule, loss weighting and recipe), with
``engine.affinity_every=--every``: every ``--every``-th step the training step measures the
lookahead affinity of each task onto each other on the step's batch (``mtl.step.Affinity``;
Fifty et al. 2021, "Efficiently Identifying Task Groupings for Multi-Task Learning"), leaving
the trained weights as they would be without it. ``--steps N`` trains one epoch of N steps
(``trainer.epochs=1 trainer.steps_per_epoch=N``: the LR schedule spans the N steps, a recipe
stays in its first epoch). As ``mtl train`` does, each epoch is validated and checkpointed and
the best model is evaluated at the end (results.json, whose ``affinity`` is the mean below,
metrics.jsonl with each log interval's mean matrix, checkpoints/; ``resume=true`` continues a
stopped run, and a finished one needs it or another output_dir). Written besides to the run
directory (``output_dir``, marked as written by ``mtl group``):

  affinity.csv   one row per measured step, task stepped on (from) and task measured (onto)
  groups.json    the mean affinity matrix, the best grouping for each number of groups,
                 its score, and the median training-step times with and without the measurement
  groups.md      the same as tables, with the `mtl compare` overrides that run each grouping
"""

from __future__ import annotations

import csv
import io
import shlex
import statistics
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mtl.affinity import MAX_TASKS, Grouping, NonFiniteAffinity, select_groups
from mtl.config import ConfigError, read_yaml
from mtl.loggers import Loggers
from mtl.results import write_json, write_text
from mtl.trainer import Trainer, written_by

MARK = "group"


def check_arguments(every: int, max_groups: int | None, steps: int | None) -> None:
    """The command's own options, before the config is read."""
    if every < 1:
        raise ConfigError(f"--every: must be a whole number of steps >= 1, got {every}; --every 1 measures at every step.")
    if max_groups is not None and max_groups < 1:
        raise ConfigError(f"--groups: must be >= 1 (the most networks a grouping may use), got {max_groups}.")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}.")


def group_config(cfg: DictConfig, every: int, steps: int | None) -> DictConfig:
    """The config the trainer runs (and config.yaml records): the affinity every ``every``
    steps, ``steps`` as one epoch of that many, and W&B's default job type ``group``."""
    run = cfg.copy()
    run.engine.affinity_every = every
    if steps is not None:
        run.trainer.epochs, run.trainer.steps_per_epoch = 1, steps
    if run.logging.wandb.job_type == "train":
        run.logging.wandb.job_type = MARK
    return run


class GroupRun:
    """``GroupRun(cfg, every, max_groups, steps)`` builds the trainer and checks everything,
    writing nothing; ``run()`` trains, selects the groupings and writes."""

    def __init__(self, cfg: DictConfig, every: int = 10, max_groups: int | None = None, steps: int | None = None,
                 command: list[str] | None = None):
        check_arguments(every, max_groups, steps)
        self.every = every
        # The config path and overrides of this run, which the printed `mtl compare` commands repeat.
        self.command = command
        if len(cfg.tasks) < 2:
            raise ConfigError(f"tasks: `mtl group` measures how tasks affect each other and needs two or more; the config has "
                              f"{len(cfg.tasks)} ({', '.join(cfg.tasks)}). Add tasks under tasks.")
        if len(cfg.tasks) > MAX_TASKS:
            raise ConfigError(f"tasks: {len(cfg.tasks)} tasks; the exact grouping search takes 3^T steps and stops at {MAX_TASKS}. "
                              "Group a subset: remove tasks with ~tasks.NAME.")
        self.max_groups = len(cfg.tasks) if max_groups is None else max_groups
        if self.max_groups > len(cfg.tasks):
            raise ConfigError(f"--groups: {self.max_groups} groups for {len(cfg.tasks)} tasks; a grouping has at most one group per task, "
                              f"use --groups {len(cfg.tasks)} or fewer.")
        self.run_dir = Path(cfg.output_dir)
        other = written_by(self.run_dir)
        if other not in (None, MARK):
            raise ConfigError(f"output_dir: {str(self.run_dir)!r} holds the files of `mtl {other}`; choose another output_dir, "
                              f"e.g. output_dir={self.run_dir}-group.")
        self.cfg = group_config(cfg, every, steps)
        # The trainer refuses what TAG cannot measure (builders.check_affinity_every): a gradient-level
        # weighting, torchrun, a scheduler that samples tasks, a recipe that freezes the trunk.
        self.trainer = Trainer(self.cfg, command=MARK)
        self.names = list(self.trainer.weighting.tasks)
        self.affinity = self.trainer.update.affinity
        self.affinity.record()

    def run(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        self.trainer.fit(report=lambda results, loggers: found.update(self._finish(results, loggers)))
        return found

    # -- results ----------------------------------------------------------------------

    def _finish(self, results: dict[str, Any], loggers: Loggers) -> dict[str, Any]:
        if "affinity" not in results:  # trainer.on_nonfinite=skip skipped every step that would have measured
            raise NonFiniteAffinity(f"no step was measured: each measuring step (--every {self.every}) had a non-finite loss and was skipped "
                                    "(trainer.on_nonfinite=skip); lower trainer.optimizer.lr or set trainer.grad_clip.")
        matrix = results["affinity"]
        mean = torch.tensor([[matrix[a][b] for b in self.names] for a in self.names])
        groupings = select_groups(mean, self.names, self.max_groups)
        result = {
            "tasks": self.names,
            "steps": results["steps"],
            "every": self.every,
            "measured_steps": results["affinity_steps"],
            "affinity": matrix,
            "groupings": [{"max_groups": g, "groups": s.groups, "score": s.score, "serving": s.serving, "onto": s.onto}
                          for g, s in groupings.items()],
            "step_time": step_times(self.affinity.times, self.every),
        }
        rows = self.affinity.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text(buffer.getvalue(), self.run_dir / "affinity.csv")
        write_json(result, self.run_dir / "groups.json")
        config, *overrides = self.command or ["CONFIG"]
        kept = [o for o in overrides if not o.startswith("output_dir=")]
        written = None
        if self.command:
            written = (read_yaml(config).get("compare") or {}).get("regimes") or {}
        commands = {g: [config, *kept, *compare_overrides(self.cfg, s, written), f"output_dir={self.run_dir}-compare"]
                    for g, s in groupings.items() if len(s.groups) > 1}
        markdown = report(result, commands)
        write_text(markdown, self.run_dir / "groups.md")
        self._log_wandb(loggers, mean, result)
        return {**result, "markdown": markdown, "commands": commands}

    def _log_wandb(self, loggers: Loggers, mean: torch.Tensor, result: dict[str, Any]) -> None:
        summary = {f"affinity_mean/{a}/{b}": v for a, row in result["affinity"].items() for b, v in row.items()}
        for g in result["groupings"]:
            summary[f"grouping/{g['max_groups']}/score"] = g["score"]
            summary[f"grouping/{g['max_groups']}/groups"] = " | ".join(", ".join(m) for m in g["groups"])
        loggers.log_summary(summary)
        for logger in loggers.loggers:
            run = getattr(logger, "run", None)
            if run is not None:  # the W&B run: the mean matrix as a table (rows: the task stepped on)
                import wandb

                table = wandb.Table(columns=["from", *self.names], data=[[a, *map(float, mean[i].tolist())] for i, a in enumerate(self.names)])
                run.log({"affinity_matrix": table, "global_step": result["steps"]})


def step_times(times: dict[str, list[float]], every: int) -> dict[str, float]:
    """Median training-step times as ``mtl.step.Affinity`` timed them (the first step of each
    kind is left out: it pays for allocations and lazy initialisation) and what the measurement
    costs the training steps of a run at ``every``."""
    plain = statistics.median(times["plain"][1:] or times["plain"]) if times["plain"] else float("nan")
    measured = statistics.median(times["affinity"][1:] or times["affinity"])
    ratio = measured / plain
    return {"plain_s": plain, "affinity_s": measured, "ratio": ratio, "run_ratio": 1 + (ratio - 1) / every,
            "plain_steps": len(times["plain"]), "affinity_steps": len(times["affinity"])}


def compare_overrides(cfg: DictConfig, grouping: Grouping, written: dict[str, Any] | None = None) -> list[str]:
    """``mtl compare`` overrides that run the grouping as one method (regime ``tag``, kind
    groups: each group trained on its own, each task reported by the group that serves it)
    beside single-task and all-joint. ``written``: the regimes the config file names
    (``compare.regimes``), which the overrides remove or keep; without a compare.regimes node
    the file gets the overrides' regimes alone (a named regime replaces the defaults). None: the
    regimes of ``cfg``."""
    regimes = dict(cfg.compare.regimes) if written is None else written
    out = [f"~compare.regimes.{label}" for label, node in regimes.items()
           if label not in ("single_task", "joint") or (node and node.get("kind", label) != label)]
    out += [f"compare.regimes.{label}={{}}" for label in ("single_task", "joint") if label not in regimes or f"~compare.regimes.{label}" in out]
    groups = ", ".join(f"[{', '.join(members)}]" for members in grouping.groups)
    serve = ", ".join(f"{t}: {k}" for t, k in grouping.serving.items())
    out.append(f"compare.regimes.tag={{kind: groups, groups: [{groups}], serve: {{{serve}}}}}")
    return out


def report(result: dict[str, Any], commands: dict[int, list[str]]) -> str:
    names = result["tasks"]
    matrix = result["affinity"]
    lines = [
        "# Task affinity (TAG, Fifty et al. 2021)",
        "",
        f"Lookahead affinity Z(i→j) = 1 − L_j(θ after a step on task i alone) / L_j(θ), on the step's batch: > 0, task i's "
        f"step lowers task j's loss. Mean over {result['measured_steps']} measured steps (every {result['every']} of "
        f"{result['steps']}). Rows: the task stepped on (i); columns: the task measured (j).",
        "",
        "| from \\ onto | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        *[f"| {a} | " + " | ".join(f"{matrix[a][b]:+.4f}" for b in names) + " |" for a in names],
        "",
        "## Groupings",
        "",
        "Each task is served by the group containing it with the highest mean affinity onto it from the group's other "
        "members; the score sums that over tasks. A task may be in more than one group.",
        "",
        "| at most | groups | score | serving group of each task |",
        "|---|---|---|---|",
    ]
    for g in result["groupings"]:
        groups = " · ".join("{" + ", ".join(m) + "}" for m in g["groups"])
        serving = ", ".join(f"{t}: {g['serving'][t] + 1} ({g['onto'][t]:+.4f})" for t in names)
        lines.append(f"| {g['max_groups']} | {groups} | {g['score']:+.4f} | {serving} |")
    t = result["step_time"]
    lines += ["", "## Cost", ""]
    if t["plain_steps"]:
        lines.append(
            f"Median training step {t['plain_s'] * 1e3:.1f} ms without the measurement ({t['plain_steps']} steps), {t['affinity_s'] * 1e3:.1f} ms "
            f"with it ({t['affinity_steps']} steps): ×{t['ratio']:.2f} at a measured step, ×{t['run_ratio']:.2f} for the run's training "
            f"steps at --every {result['every']} (drawing the batches, validation and checkpoints are not timed)."
        )
    else:
        lines.append(f"Median training step {t['affinity_s'] * 1e3:.1f} ms, every step measured: no step without the measurement to "
                     "compare with (--every 2 or more gives both).")
    if commands:
        lines += ["", "## Run a grouping against all-joint and single-task", "",
                  "Each group becomes a joint regime of its own (`groupK`); read each task's row in its serving group's regime.", ""]
        for g, (config, *overrides) in commands.items():
            quoted = " ".join(shlex.quote(o) for o in overrides)
            lines += [f"At most {g} groups:", "", "```", f"mtl compare {shlex.quote(config)} {quoted}", "```", ""]
    return "\n".join(lines).rstrip() + "\n"
