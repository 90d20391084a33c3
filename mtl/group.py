"""`mtl group`: which tasks should train together, from one joint run (TAG, ``mtl.affinity``).

The config's tasks train jointly, as ``mtl train`` would (its trunk, heads, optimizer, LR
schedule, loss weighting and recipe), for ``--steps`` steps; every ``--every`` steps the
lookahead affinity of each task onto each other is measured on the step's batch. Written to
the run directory (``output_dir``):

  affinity.csv   one row per measured step, task stepped on (from) and task measured (onto)
  groups.json    the mean affinity matrix, the best grouping for each number of groups,
                 its score, and the step times with and without the measurement
  groups.md      the same as tables, with the `mtl compare` overrides that run each grouping
  metrics.jsonl  each measurement's matrix and the training losses (W&B too, when enabled)

No checkpoint is written and nothing is evaluated: the run exists to measure the affinities.
"""

from __future__ import annotations

import csv
import io
import math
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mtl.affinity import MAX_TASKS, Grouping, LookaheadAffinity, NonFiniteAffinity, check_affinity, select_groups
from mtl.builders import build_components, build_lr_schedule, build_optimizer, build_recipe, build_scheduler, input_groups, resolve_device
from mtl.config import ConfigError, read_yaml, save_config, to_dict
from mtl.data import BatchSource, shared_inputs
from mtl.loggers import build_loggers
from mtl.losses import task_losses
from mtl.results import write_json, write_text
from mtl.scheduler import AllTasks, Sources
from mtl.trainer import mark_written_by, seed_everything, written_by
from mtl.weighting import WEIGHTINGS, LossWeighting

MARK = "group"


def check_arguments(every: int, max_groups: int | None, steps: int | None) -> None:
    """The command's own options, before the config is read."""
    if every < 1:
        raise ConfigError(f"--every: must be a whole number of steps >= 1, got {every}; --every 1 measures at every step.")
    if max_groups is not None and max_groups < 1:
        raise ConfigError(f"--groups: must be >= 1 (the most networks a grouping may use), got {max_groups}.")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}.")


class GroupRun:
    """``GroupRun(cfg, every, max_groups, steps)`` builds and checks everything; ``run()`` trains,
    measures, selects and writes."""

    def __init__(self, cfg: DictConfig, every: int = 10, max_groups: int | None = None, steps: int | None = None,
                 command: list[str] | None = None):
        check_arguments(every, max_groups, steps)
        self.cfg, self.every = cfg, every
        # The config path and overrides of this run, which the printed `mtl compare` commands repeat.
        self.command = command
        t = cfg.trainer
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
        if cfg.weighting.name in WEIGHTINGS:  # checked before the data loads; an import path is checked once built
            self._check_weighting(WEIGHTINGS.get(cfg.weighting.name))
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed, cfg.deterministic)
        parts = build_components(cfg)
        self.tasks, self.splits = parts.tasks, parts.splits
        self.names = list(self.tasks)
        self.model, self.weighting = parts.model.to(self.device), parts.weighting.to(self.device)
        self._check_weighting(type(self.weighting))
        self.recipe = build_recipe(cfg)
        self.recipe.setup(self.model)
        self._check_trunk_trains()
        groups = self.recipe.param_groups(self.model)
        weighting_params = list(self.weighting.parameters())
        if weighting_params:
            groups.append({"params": weighting_params, "lr_scale": 1.0, "weight_decay": 0.0, "name": "weighting"})
        self.optimizer = build_optimizer(cfg, groups)
        self.groups = input_groups(self.tasks, self.splits)
        self.sources = {
            name: BatchSource(shared_inputs([self.splits[m].train for m in members]), t.batch_size, self.device, seed=cfg.seed + i,
                              on_device=t.data_on_device, device_limit_mb=t.device_data_limit_mb, num_workers=t.num_workers)
            for i, (name, members) in enumerate(self.groups.items())
        }
        sizes = Sources(samples={n: s.n for n, s in self.sources.items()}, batches={n: s.batches_per_pass for n, s in self.sources.items()},
                        seed=cfg.seed, epochs=t.epochs, fixed_epoch=t.steps_per_epoch)
        self.scheduler = build_scheduler(cfg, sizes)
        if not isinstance(self.scheduler, AllTasks):
            raise ConfigError(f"scheduler: the affinity of task i onto task j needs both tasks' batches at every measured step; "
                              f"{cfg.scheduler.name!r} samples tasks. Use scheduler.name=all.")
        self.steps_per_epoch = self.scheduler.steps_per_epoch
        self.steps = steps if steps is not None else t.epochs * self.steps_per_epoch
        self.lr_schedule = build_lr_schedule(cfg, self.optimizer, self.steps)
        self.affinity = self._lookahead()

    def _check_weighting(self, cls: type) -> None:
        if not issubclass(cls, LossWeighting):
            loss_level = [n for n in WEIGHTINGS.names() if issubclass(WEIGHTINGS.get(n), LossWeighting)]
            raise ConfigError(f"weighting: `mtl group` trains with a loss-level weighting (TAG's joint run sums the losses); "
                              f"{self.cfg.weighting.name!r} is gradient-level. Use weighting.name=equal, or one of {', '.join(loss_level)}.")

    def _lookahead(self) -> LookaheadAffinity:
        """Over the trunk parameters that train now (a recipe may unfreeze more each epoch)."""
        trunk = [p for p in self.model.trunk.parameters() if p.requires_grad]
        return LookaheadAffinity(self.optimizer, trunk, list(self.model.buffers()))

    def _check_trunk_trains(self) -> None:
        """Affinity is the effect of one task's step on the shared trunk: a frozen trunk has none."""
        epochs = self.cfg.trainer.epochs
        for epoch in self.recipe.distinct_epochs(self.model, epochs):
            self.recipe.start_epoch(self.model, epoch)
            if not any(p.requires_grad for p in self.model.trunk.parameters()):
                raise ConfigError(f"recipe: {self.cfg.recipe.name!r} freezes the trunk in epoch {epoch + 1}, where no task's step changes "
                                  "another's loss; `mtl group` needs the trunk to train: use recipe.name=fine_tune.")
        self.recipe.start_epoch(self.model, 0)

    # -- training ---------------------------------------------------------------------

    def run(self, log=print) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A rerun replaces an earlier `mtl group` run's files; its log would otherwise grow by a second run.
        (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        mark_written_by(self.run_dir, MARK)
        save_config(cfg, self.run_dir / "config.yaml")
        wandb = cfg.logging.wandb.copy()
        if wandb.job_type == "train":
            wandb.job_type = MARK
        self.loggers = build_loggers(wandb, self.run_dir, to_dict(cfg), resume=False)
        try:
            rows, matrices, times = self._train(log)
            out = self._finish(rows, matrices, times)
        except BaseException as e:
            self.loggers.close(exit_code=130 if isinstance(e, KeyboardInterrupt) else 1)
            raise
        self.loggers.close()
        return out

    def _train(self, log):
        rows: list[dict[str, Any]] = []
        matrices: list[torch.Tensor] = []
        times: dict[str, list[float]] = {"plain": [], "affinity": []}
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        bf16 = self.cfg.trainer.precision == "bf16"
        log_every = self.cfg.logging.log_every
        sums = torch.zeros(len(self.names), device=self.device)
        count = 0
        epoch = 0
        self.model.train()
        for step in range(self.steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                self.recipe.start_epoch(self.model, min(epoch, self.cfg.trainer.epochs - 1))
                self.affinity = self._lookahead()
            measure = step % self.every == 0
            sync()
            start = time.perf_counter()
            names = self.scheduler.tasks_for_step(step)
            batches = {n: self.sources[n].next() for n in names}
            inputs = {n: b[0] for n, b in batches.items()}
            targets = {task: y for n, b in batches.items() for task, y in zip(self.groups[n], b[1:])}

            def evaluate() -> torch.Tensor:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    found = task_losses(self.tasks, self.model.forward_groups(inputs, self.groups), targets)
                return torch.stack([found[t] for t in self.names])

            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = task_losses(self.tasks, self.model.forward_groups(inputs, self.groups), targets)
                vector = torch.stack([losses[t] for t in self.weighting.tasks])
                total = self.weighting(vector)
                penalty = self.recipe.penalty(self.model)
                if measure:
                    grads = self.affinity.gradients(torch.stack([losses[t] for t in self.names]))
                (total if penalty is None else total + penalty).backward()
            if not bool(torch.isfinite(vector).all()):
                bad = [f"task {t!r} loss {v}" for t, v in zip(self.weighting.tasks, vector.tolist()) if not math.isfinite(v)]
                raise NonFiniteAffinity(f"step {step}: non-finite loss ({', '.join(bad)}); lower trainer.optimizer.lr or set trainer.grad_clip.")
            if measure:
                z, before, after = self.affinity(grads, evaluate)
                check_affinity(z, before, after, self.names, step)
                matrices.append(z.cpu())
                rows += self._rows(step, z, before, after)
                self.loggers.log({f"affinity/{a}/{b}": float(z[i, j]) for i, a in enumerate(self.names) for j, b in enumerate(self.names)}, step)
            if self.cfg.trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
            self.optimizer.step()
            self.lr_schedule.step()
            after_step = None
            if self.weighting.wants_losses_after_step:
                with torch.no_grad():
                    after_step = evaluate()
            self.weighting.update(vector.detach(), after_step)
            sync()
            times["affinity" if measure else "plain"].append(time.perf_counter() - start)
            sums += torch.stack([losses[t].detach().float() for t in self.names])
            count += 1
            if (step + 1) % log_every == 0 or step + 1 == self.steps:
                means = (sums / count).tolist()
                self.loggers.log({f"train/{t}/batch_loss": v for t, v in zip(self.names, means)}, step + 1)
                log(f"step {step + 1}/{self.steps}: " + ", ".join(f"{t} {v:.4f}" for t, v in zip(self.names, means)))
                sums.zero_()
                count = 0
        return rows, matrices, times

    def _rows(self, step: int, z, before, after) -> list[dict[str, Any]]:
        lr = self.optimizer.param_groups[0]["lr"]
        return [
            {"step": step, "lr": lr, "from": a, "onto": b, "affinity": float(z[i, j]), "loss_before": float(before[j]), "loss_after": float(after[i, j])}
            for i, a in enumerate(self.names) for j, b in enumerate(self.names)
        ]

    # -- results ----------------------------------------------------------------------

    def _finish(self, rows, matrices, times) -> dict[str, Any]:
        mean = torch.stack(matrices).mean(dim=0)
        groupings = select_groups(mean, self.names, self.max_groups)
        timing = step_times(times, self.every)
        matrix = {a: {b: float(mean[i, j]) for j, b in enumerate(self.names)} for i, a in enumerate(self.names)}
        result = {
            "tasks": self.names,
            "steps": self.steps,
            "every": self.every,
            "measured_steps": len(matrices),
            "affinity": matrix,
            "groupings": [{"max_groups": g, "groups": s.groups, "score": s.score, "serving": s.serving, "onto": s.onto}
                          for g, s in groupings.items()],
            "step_time": timing,
        }
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
        self._log_wandb(mean, result)
        return {**result, "markdown": markdown, "commands": commands}

    def _log_wandb(self, mean: torch.Tensor, result: dict[str, Any]) -> None:
        summary = {f"affinity_mean/{a}/{b}": v for a, row in result["affinity"].items() for b, v in row.items()}
        for g in result["groupings"]:
            summary[f"grouping/{g['max_groups']}/score"] = g["score"]
            summary[f"grouping/{g['max_groups']}/groups"] = " | ".join(", ".join(m) for m in g["groups"])
        self.loggers.log_summary(summary)
        for logger in self.loggers.loggers:
            run = getattr(logger, "run", None)
            if run is not None:  # the W&B run: the mean matrix as a table (rows: the task stepped on)
                import wandb

                table = wandb.Table(columns=["from", *self.names], data=[[a, *map(float, mean[i].tolist())] for i, a in enumerate(self.names)])
                run.log({"affinity_matrix": table, "global_step": self.steps})


def step_times(times: dict[str, list[float]], every: int) -> dict[str, float]:
    """Median step times (the first step of each kind is left out: it pays for allocations and
    lazy initialisation) and what the measurement costs a run at ``every``."""
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
            f"Median step {t['plain_s'] * 1e3:.1f} ms without the measurement ({t['plain_steps']} steps), {t['affinity_s'] * 1e3:.1f} ms "
            f"with it ({t['affinity_steps']} steps): ×{t['ratio']:.2f} at a measured step, ×{t['run_ratio']:.2f} for the run at --every "
            f"{result['every']}."
        )
    else:
        lines.append(f"Median step {t['affinity_s'] * 1e3:.1f} ms, every step measured: no step without the measurement to compare with "
                     "(--every 2 or more gives both).")
    if commands:
        lines += ["", "## Run a grouping against all-joint and single-task", "",
                  "Each group becomes a joint regime of its own (`groupK`); read each task's row in its serving group's regime.", ""]
        for g, (config, *overrides) in commands.items():
            quoted = " ".join(shlex.quote(o) for o in overrides)
            lines += [f"At most {g} groups:", "", "```", f"mtl compare {shlex.quote(config)} {quoted}", "```", ""]
    return "\n".join(lines).rstrip() + "\n"
