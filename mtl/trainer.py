"""The trainer for one stage: joint training of a shared trunk and task heads.

Everything is built and checked before the first step (``Trainer.__init__``); ``fit``
runs the epochs, validates each task after each epoch, keeps the best checkpoint by
validation (never test), and evaluates the best model on train/val/test at the end.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mtl import checkpoint
from mtl.builders import (
    build_components,
    build_lr_schedule,
    build_optimizer,
    build_recipe,
    build_scheduler,
    input_groups,
    resolve_device,
)
from mtl.config import ConfigError, save_config, to_dict
from mtl.data import BatchSource, shared_inputs
from mtl.loggers import build_loggers
from mtl.losses import task_losses
from mtl.engine import GradientEngine
from mtl.scheduler import AllTasks, Sources
from mtl.weighting import GradientWeighting, LossWeighting
from mtl.results import directions, evaluate, flatten, selection_score, write_json


RESUMABLE_CHANGES = ("resume", "trainer.epochs", "device", "logging")


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two resolved configs, except those a resume may change."""
    changed = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{path}.")
        elif a != b:
            changed.append(path)
    return changed


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs (CUDA docs, "Reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


class Trainer:
    """``Trainer(cfg)`` builds and checks everything and writes nothing; ``fit()`` trains."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        t = cfg.trainer
        self.device = resolve_device(cfg.device)
        self.run_dir = Path(cfg.output_dir)
        self.last_path = self.run_dir / "checkpoints" / "last.pt"
        self.best_path = self.run_dir / "checkpoints" / "best.pt"
        if self.last_path.exists() and not cfg.resume:
            raise ConfigError(
                f"output_dir: {str(self.run_dir)!r} already holds a run ({self.last_path}); "
                "pass resume=true to continue it, or choose another output_dir."
            )
        self._resume_state = None
        if cfg.resume and self.last_path.exists():
            self._resume_state = checkpoint.load(self.last_path)
            changed = config_changes(self._resume_state["config"], to_dict(cfg))
            if changed:
                raise ConfigError(
                    f"resume: {self.last_path} was written with another config ({', '.join(changed)} differ); "
                    "resume with the config in its run directory (only trainer.epochs, device and logging may change), "
                    "or start a new output_dir."
                )
        seed_everything(cfg.seed, cfg.deterministic)

        parts = build_components(cfg)
        self.tasks, self.splits = parts.tasks, parts.splits
        self.model, self.weighting = parts.model.to(self.device), parts.weighting.to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.recipe = build_recipe(cfg)
        self.recipe.setup(self.model)
        self.parameters = self._count_parameters()
        groups = self.recipe.param_groups(self.model)
        weighting_params = list(self.weighting.parameters())
        if weighting_params:
            # Learned loss scales (uncertainty, IMTL-L) must not be decayed towards 0.
            groups.append({"params": weighting_params, "lr_scale": 1.0, "weight_decay": 0.0, "name": "weighting"})
        self.optimizer = build_optimizer(cfg, groups)

        self.groups = input_groups(self.tasks, self.splits)
        self.sources = {
            name: BatchSource(
                shared_inputs([self.splits[m].train for m in members]), t.batch_size, self.device, seed=cfg.seed + i,
                on_device=t.data_on_device, device_limit_mb=t.device_data_limit_mb, num_workers=t.num_workers,
            )
            for i, (name, members) in enumerate(self.groups.items())
        }
        sizes = Sources(
            samples={n: s.n for n, s in self.sources.items()},
            batches={n: s.batches_per_pass for n, s in self.sources.items()},
            seed=cfg.seed, epochs=t.epochs, fixed_epoch=t.steps_per_epoch,
        )
        self.scheduler = build_scheduler(cfg, sizes)
        self.steps_per_epoch = self.scheduler.steps_per_epoch
        self.engine = self._check_weighting()
        self.lr_schedule = build_lr_schedule(cfg, self.optimizer, t.epochs * self.steps_per_epoch)

        self.epoch = 0
        self.step = 0
        self.best = {"score": -float("inf"), "epoch": 0}
        self.wall_time = 0.0
        self._loss_sums = {n: torch.zeros((), device=self.device) for n in self.tasks}
        self._loss_counts = dict.fromkeys(self.tasks, 0)
        self._epoch_sums = {n: torch.zeros((), device=self.device) for n in self.tasks}
        self._epoch_counts = dict.fromkeys(self.tasks, 0)

    def _check_weighting(self) -> GradientEngine | None:
        w = self.weighting
        if w.requires_all_tasks and not isinstance(self.scheduler, AllTasks):
            raise ConfigError(
                f"weighting: {self.cfg.weighting.name!r} needs every task's loss at every step; use scheduler.name=all "
                "(or weighting.name=equal with a sampling scheduler)."
            )
        if not isinstance(w, GradientWeighting):
            return None
        if w.mode == "representation" and len(self.groups) > 1:
            raise ConfigError(
                f"weighting.mode: representation needs one shared representation, i.e. every task fed by one input batch "
                f"(tasks with one input_key, e.g. MultiMNIST left/right); here the tasks have separate inputs "
                f"({', '.join(self.groups)}). Use weighting.mode=parameters."
            )
        return GradientEngine(self.model, w, every=self.cfg.trainer.weighting_every, chunk=self.cfg.trainer.jacobian_chunk)

    def _count_parameters(self) -> dict[str, int]:
        """Total parameters, and those the recipe trains in at least one epoch of the stage."""
        trainable: dict[int, int] = {}
        for epoch in range(self.cfg.trainer.epochs):
            self.recipe.start_epoch(self.model, epoch)
            trainable.update((id(p), p.numel()) for p in self.model.parameters() if p.requires_grad)
        if not trainable:
            raise ConfigError(f"recipe: {self.cfg.recipe.name!r} leaves no parameter to train in this stage; choose another recipe.")
        return {"total": sum(p.numel() for p in self.model.parameters()), "trainable": sum(trainable.values())}

    # -- training -------------------------------------------------------------------

    def _open_run(self) -> None:
        """The first write to the run directory: nothing is written while the setup is checked."""
        cfg = self.cfg
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        except OSError as e:
            raise ConfigError(f"output_dir: cannot write to {str(self.run_dir)!r}: {e}") from None
        if self._resume_state is not None:
            self._load(self._resume_state)
        self.loggers = build_loggers(
            cfg.logging.wandb, self.run_dir, to_dict(cfg), resume=cfg.resume,
            resume_step=self.step if self._resume_state is not None else None,
        )

    def fit(self) -> dict[str, Any]:
        """Train the stage and return its results (also written to results.json)."""
        t = self.cfg.trainer
        self._open_run()
        start = time.perf_counter()
        for epoch in range(self.epoch, t.epochs):
            self.model.train()
            self.recipe.start_epoch(self.model, epoch)
            bar = tqdm(
                range(self.steps_per_epoch),
                desc=f"epoch {epoch + 1}/{t.epochs}",
                disable=not self.cfg.logging.progress_bar,
                dynamic_ncols=True,
            )
            tick, samples = time.perf_counter(), 0
            for _ in bar:
                samples += self._train_step()
                if self.step % self.cfg.logging.log_every == 0:
                    rate = samples / (time.perf_counter() - tick)
                    self._log_train(bar, rate)
                    tick, samples = time.perf_counter(), 0
            bar.close()
            self._end_epoch_losses()
            val = evaluate(self.model, self.tasks, {n: s.val for n, s in self.splits.items()}, t.eval_batch_size, self.device)
            score = selection_score(val, t.select_on, self.tasks)
            self.loggers.log({**flatten("val", val), "epoch": epoch + 1}, self.step)
            self.epoch = epoch + 1
            # A NaN score (no labelled validation sample) never beats another, so the first
            # epoch's model is kept as the selection then.
            if score > self.best["score"] or not self.best_path.exists():
                self.best = {"score": score, "epoch": self.epoch}
                checkpoint.save({"model": self.model.state_dict(), "epoch": self.epoch, "score": score}, self.best_path)
            self.wall_time += time.perf_counter() - start
            start = time.perf_counter()
            checkpoint.save(self._state(), self.last_path)
        return self._finish()

    def _losses(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return task_losses(self.tasks, self.model.forward_groups(inputs, self.groups), targets)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.trainer.channels_last and x.dim() == 4 else x

    def _loss_vector(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every task in weighting order; a task absent from this step (only with weightings
        that allow it, see Weighting.requires_all_tasks) contributes 0."""
        zero = next(iter(losses.values())).new_zeros(())
        return torch.stack([losses.get(t, zero) for t in self.weighting.tasks])

    def _backward(self, names, inputs, targets) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Forward, weighting and backward of one step; the task losses (and their vector)."""
        penalty = functools.partial(self.recipe.penalty, self.model)
        if self.engine is not None:
            members = {n: self.groups[n] for n in names}
            loss_fn = functools.partial(task_losses, self.tasks)
            return self.engine.backward(inputs, members, targets, loss_fn, self.step, penalty), None
        losses = self._losses(inputs, targets)
        vector = self._loss_vector(losses)
        total = self.weighting(vector)
        extra = penalty()
        (total if extra is None else total + extra).backward()
        return losses, vector

    def _train_step(self) -> int:
        names = self.scheduler.tasks_for_step(self.step)
        batches = {n: self.sources[n].next() for n in names}
        inputs = {n: self._layout(b[0]) for n, b in batches.items()}
        targets = {task: y for n, b in batches.items() for task, y in zip(self.groups[n], b[1:])}
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.trainer.precision == "bf16"):
            losses, vector = self._backward(names, inputs, targets)
        if self.cfg.trainer.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        if self.engine is None:
            after = None
            if self.weighting.wants_losses_after_step:
                with torch.no_grad():
                    after = self._loss_vector(self._losses(inputs, targets))
            self.weighting.update(vector.detach(), after)
        self.step += 1
        for n, loss in losses.items():
            self._loss_sums[n] += loss.detach()
            self._loss_counts[n] += 1
            self._epoch_sums[n] += loss.detach()
            self._epoch_counts[n] += 1
        return sum(len(b[0]) for b in batches.values())

    def _end_epoch_losses(self) -> None:
        """Each task's mean training loss of the epoch, for weightings with a loss history (DWA)."""
        if isinstance(self.weighting, LossWeighting):
            means = torch.stack([self._epoch_sums[t] / max(self._epoch_counts[t], 1) for t in self.weighting.tasks])
            self.weighting.on_epoch_end(means)
        for n in self._epoch_sums:
            self._epoch_sums[n].zero_()
            self._epoch_counts[n] = 0

    def _diagnostics(self) -> dict[str, float]:
        """Task weights, and for gradient methods per-task gradient norms and pairwise cosines."""
        out: dict[str, float] = {}
        tasks = self.weighting.tasks
        found = self.engine.diagnostics if self.engine is not None else {}
        weights = found.get("weights") if self.engine is not None else self.weighting.weights()
        if weights is not None:
            out.update({f"weights/{t}": float(v) for t, v in zip(tasks, weights.tolist())})
        if "norms" in found:
            out.update({f"grad_norm/{t}": v for t, v in zip(tasks, found["norms"].tolist())})
            cos = found["cosines"].tolist()
            out.update({f"grad_cos/{a}/{b}": cos[i][j] for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j})
        return out

    def _log_train(self, bar: tqdm, rate: float) -> None:
        # The only host sync of the training loop, once every log_every steps.
        means = {n: (self._loss_sums[n] / c).item() for n, c in self._loss_counts.items() if c}
        # batch_loss: mean over the interval's mini-batches in train mode; evaluation of the
        # train split at the end is logged as train/<task>/loss like the other splits.
        metrics = {f"train/{n}/batch_loss": v for n, v in means.items()}
        metrics.update({"train/batch_loss": sum(means.values()), "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": rate})
        metrics.update(self._diagnostics())
        self.loggers.log(metrics, self.step)
        bar.set_postfix({"step": self.step, **{n: f"{v:.3f}" for n, v in means.items()}, "samples/s": f"{rate:.0f}"}, refresh=False)
        for n in self._loss_sums:
            self._loss_sums[n].zero_()
            self._loss_counts[n] = 0

    # -- end of run -----------------------------------------------------------------

    def _finish(self) -> dict[str, Any]:
        t = self.cfg.trainer
        best = checkpoint.load(self.best_path, map_location=self.device)
        self.model.load_state_dict(best["model"])
        splits = {
            split: evaluate(self.model, self.tasks, {n: getattr(s, split) for n, s in self.splits.items()}, t.eval_batch_size, self.device)
            for split in ("train", "val", "test")
        }
        dirs = directions(self.tasks)
        results = {
            "tasks": {n: {"primary_metric": task.primary_metric, "directions": dirs[n]} for n, task in self.tasks.items()},
            "splits": splits,
            "best_epoch": best["epoch"],
            "selected_on": f"validation: {t.select_on}",
            "epochs": self.epoch,
            "steps": self.step,
            "parameters": self.parameters,
            "wall_time_s": round(self.wall_time, 2),
            "device": str(self.device),
        }
        write_json(results, self.run_dir / "results.json")
        checkpoint.save({"trunk": self.model.trunk.state_dict(), "trunk_config": to_dict(self.cfg)["trunk"]}, self.run_dir / "trunk.pt")
        final = {k: v for split, m in splits.items() for k, v in flatten(split, m).items()}
        self.loggers.log(final, self.step)
        self.loggers.log_summary({**final, "best_epoch": best["epoch"], "parameters/total": results["parameters"]["total"]})
        self.loggers.close()
        return results

    # -- checkpoints ----------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "weighting": self.weighting.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sources": {n: s.state_dict() for n, s in self.sources.items()},
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "wall_time": self.wall_time,
            "rng": checkpoint.rng_state(),
            "config": to_dict(self.cfg),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # Only the step count: the schedule itself comes from the current config, so a run
        # resumed with more epochs stretches its schedule instead of replaying the old one.
        self.lr_schedule.load_state_dict({**state["lr_schedule"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        self.weighting.load_state_dict(state["weighting"])
        self.scheduler.load_state_dict(state["scheduler"])
        for n, s in self.sources.items():
            s.load_state_dict(state["sources"][n])
        self.epoch, self.step, self.best, self.wall_time = state["epoch"], state["step"], state["best"], state["wall_time"]
        checkpoint.set_rng_state(state["rng"])
