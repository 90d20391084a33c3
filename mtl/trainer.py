"""The trainer for one stage: joint training of a shared trunk and task heads.

``Trainer(cfg)`` builds and checks everything (``mtl.builders.build_run``) and writes
nothing; ``fit`` runs the epochs: each step draws a batch (``Feed``) and hands it to the
stage's ``Step`` (forward, weighting, backward, optimizer step); each epoch ends with a
validation of every task, the best checkpoint by validation (never test) and a step
checkpoint; the end evaluates the best model on train/val/test.
"""

from __future__ import annotations

import contextlib
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm  # tqdm.auto warns in notebooks without ipywidgets

from mtl import checkpoint, distributed
from mtl.builders import build_run, resolve_device, seed_everything
from mtl.config import ConfigError, to_dict
from mtl.engine import NonFiniteError
from mtl.loggers import Loggers, build_loggers
from mtl.results import directions, evaluate, flatten, selection_score, write_json
from mtl.rundir import RESUMABLE_CHANGES, UNREAD_BY_TRAINING, CheckpointWriter, RunDir, config_changes, mark_written_by, written_by
from mtl.signals import deferred_signals
from mtl.state import Schedule, Sources, TrainState
from mtl.step import GradientClip

# Imported from here by mtl.compare and older code: the run directory's and the step's names.
__all__ = ["Trainer", "RESUMABLE_CHANGES", "UNREAD_BY_TRAINING", "CheckpointWriter", "GradientClip", "config_changes",
           "mark_written_by", "written_by", "seed_everything"]


class Trainer:
    """``Trainer(cfg)`` builds and checks everything and writes nothing; ``fit()`` trains.

    ``mtl compare`` also passes ``cell``, the identity of the comparison cell this stage
    belongs to (the W&B run config's ``cell``), and ``wandb_dir``, the one folder that holds
    the W&B files of every run of the comparison (default: the run directory). ``command``:
    the command the run directory is marked as written by (``mtl group`` trains through here)."""

    def __init__(self, cfg: DictConfig, cell: dict[str, Any] | None = None, wandb_dir: Path | None = None, command: str = "train"):
        self.cfg, self.cell, self.wandb_dir, self.command = cfg, cell, wandb_dir, command
        t = cfg.trainer
        # Settings read at every step, as plain values: an OmegaConf lookup costs tens of microseconds.
        self._log_every, self._checkpoint_every, self._skip_nonfinite = cfg.logging.log_every, t.checkpoint_every, t.on_nonfinite == "skip"
        self._epochs, self._eval_batch, self._workers, self._select_on = t.epochs, t.eval_batch_size, t.num_workers, t.select_on
        self.dist = distributed.setup(cfg.device)
        self.device = resolve_device(cfg.device)
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.dir = RunDir(cfg, writes=self.dist.is_main)
        self._resume_state = self.dir.resume_state(cfg)
        run = build_run(cfg, self.dist, self.device)
        self.tasks, self.splits, self.model, self.weighting, self.recipe = run.tasks, run.splits, run.model, run.weighting, run.recipe
        self.groups, self.sources, self.scheduler, self.optimizer = run.groups, run.sources, run.scheduler, run.optimizer
        self.feed, self.update, self.parameters = run.feed, run.step, run.parameters
        self.steps_per_epoch = self.scheduler.steps_per_epoch
        self.state = TrainState({"model": self.model, "optimizer": self.optimizer, "lr_schedule": Schedule(run.lr_schedule),
                                 "weighting": self.weighting, "update": self.update, "scheduler": self.scheduler, "sources": Sources(self.sources)})
        tensors = [*self.model.state_dict().values(), *self.weighting.state_dict().values()]
        self.dir.check_room(sum(v.numel() * v.element_size() for v in tensors if isinstance(v, torch.Tensor)))
        self._stop_signal: int | None = None

    @property
    def step(self) -> int:
        return self.state.step

    def fit(self, report: Callable[[dict[str, Any], Loggers], None] | None = None) -> dict[str, Any]:
        """Train the stage and return its results (also written to results.json).

        Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and raises
        ``KeyboardInterrupt``; a second one stops at once. ``resume=true`` continues exactly.
        ``report(results, loggers)``: called on rank 0 once the results are written, before the
        loggers close, for a command's own outputs in the same W&B run (``mtl group``'s groupings)."""
        self._open_run()
        try:
            with deferred_signals(self._on_signal):
                while self.state.epoch < self._epochs:
                    self._train_epoch()
            self.dir.writer.wait()  # best.pt, read back by _finish
        except BaseException as e:
            self._close_stopped(e)
            raise
        finally:
            self.dir.writer.close()
        return self._finish(report)

    def _open_run(self) -> None:
        """The first write to the run directory: nothing is written while the setup is checked."""
        self.dir.open(self.cfg)
        if self.command != "train" and self.dist.is_main:
            mark_written_by(self.dir.path, self.command)  # RunDir.open marks every run as `mtl train`'s
        if self._resume_state is not None:
            self.state.load_state_dict(self._resume_state)
        if not self.dist.is_main:  # only rank 0 writes files and talks to W&B
            self.loggers = Loggers([])
            return
        wandb_config = {**to_dict(self.cfg), "cell": self.cell} if self.cell else to_dict(self.cfg)
        self.loggers = build_loggers(
            self.cfg.logging.wandb, self.dir.path, wandb_config, resume=self.cfg.resume,
            resume_step=self.step,  # a fresh start (0) also drops the lines of a run killed before its first checkpoint
            wandb_dir=self.wandb_dir,
        )

    def _train_epoch(self) -> None:
        start, epoch = time.perf_counter(), self.state.epoch
        self.model.train()
        self.recipe.start_epoch(self.model, epoch)
        done = self.step - epoch * self.steps_per_epoch  # > 0 when resumed mid-epoch
        bar = tqdm(
            range(done, self.steps_per_epoch), initial=done, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self._epochs}",
            disable=not self.cfg.logging.progress_bar or not self.dist.is_main, dynamic_ncols=True,
            mininterval=1.0,  # a redraw costs about 0.2 ms; tqdm's default 0.1 s redraws ~5 times an epoch of the quickstart
        )
        tick, samples = time.perf_counter(), 0
        for _ in bar:
            samples += self._train_step()
            if self.step % self._log_every == 0:
                self._log_train(bar, samples / (time.perf_counter() - tick))
                tick, samples = time.perf_counter(), 0
            last_of_epoch = self.step == (epoch + 1) * self.steps_per_epoch
            if not last_of_epoch and self._checkpoint_every and self.step % self._checkpoint_every == 0:
                self.dir.writer.wait()
                self._save_checkpoint(start)
                start = time.perf_counter()
            self._stop_if_signalled(start)
        bar.close()
        self.update.on_epoch_end()
        # Buffers (BatchNorm statistics) saw each rank's own shard: evaluate and save their mean.
        self.dist.mean_([b for b in self.model.buffers() if b.is_floating_point()])
        val = self._evaluate("val")
        score = selection_score(val, self._select_on, self.tasks)
        self.loggers.log({**flatten("val", val), "epoch": epoch + 1}, self.step)
        self.state.epoch = epoch + 1
        self.dir.writer.wait()  # the previous checkpoints: long written by now, unless the disk failed
        # A NaN score (no labelled validation sample) never beats another: the first epoch's model is kept then.
        if score > self.state.best["score"] or self.state.best["epoch"] == 0:
            self.state.best = {"score": score, "epoch": self.state.epoch}
            self.dir.save_best({"model": self.model.state_dict(), "epoch": self.state.epoch, "score": score}, self.step)
        self._save_checkpoint(start)
        self._stop_if_signalled(time.perf_counter())

    def _train_step(self) -> int:
        """One batch through the stage's step; the number of samples drawn."""
        inputs, targets, samples = self.feed.next(self.scheduler.tasks_for_step(self.step))
        try:
            self.update.step(inputs, targets)
        except NonFiniteError as e:
            self._skip_or_stop(str(e))
        self.state.step += 1
        return samples

    def _skip_or_stop(self, problem: str) -> None:
        where = f"step {self.step} (epoch {self.state.epoch + 1})"
        if self._skip_nonfinite:
            self.state.skipped += 1
            if self.dist.is_main:
                tqdm.write(f"mtl: {where}: {problem}; step skipped ({self.state.skipped} so far).")
            return
        self.dir.writer.wait()
        raise NonFiniteError(
            f"{where}: {problem}. The update was not applied and {self.dir.kept()}. Lower the learning rate or set "
            "trainer.grad_clip; or set trainer.on_nonfinite=skip to skip such steps (they are counted)."
        )

    def _log_train(self, bar: tqdm, rate: float) -> None:
        # The only host sync of the training loop, once every log_every steps.
        means = self.update.running.means(0)
        # batch_loss: mean over the interval's mini-batches in train mode; evaluation of the
        # train split at the end is logged as train/<task>/loss like the other splits.
        metrics = {f"train/{n}/batch_loss": v for n, v in means.items()}
        metrics.update({"train/batch_loss": sum(means.values()), "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": rate})
        if self.state.skipped:
            metrics["skipped_steps"] = self.state.skipped
        metrics.update(self.update.diagnostics())
        self.loggers.log(metrics, self.step)
        bar.set_postfix({"step": self.step, **{n: f"{v:.3f}" for n, v in means.items()}, "samples/s": f"{rate:.0f}"}, refresh=False)

    def _evaluate(self, split: str) -> dict[str, dict[str, float]]:
        datasets = {n: getattr(s, split) for n, s in self.splits.items()}
        return evaluate(self.model, self.tasks, datasets, self._eval_batch, self.device, num_workers=self._workers, groups=self.groups)

    def _save_checkpoint(self, since: float) -> None:
        self.state.wall_time += time.perf_counter() - since
        self.dir.save_step(self.state.state_dict(self.cfg), self.step)

    def _on_signal(self, signum: int) -> None:
        self._stop_signal = signum

    def _stop_if_signalled(self, since: float) -> None:
        # Every rank stops at the same step (torchrun signals each, not necessarily at once).
        if not self.dist.any(self._stop_signal is not None):
            return
        self._save_checkpoint(since)
        self.dir.writer.wait()
        name = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "a stop signal on another rank"
        raise KeyboardInterrupt(
            f"{name} at step {self.step}: checkpoint written to {self.dir.checkpoints}; "
            "rerun the same command with resume=true to continue exactly where it stopped."
        )

    def _close_stopped(self, error: BaseException) -> None:
        """The logs of a run that did not finish say so: a ``stopped`` line in metrics.jsonl,
        and the W&B run ends with the exit code of the command (130 for Ctrl-C), not as finished."""
        interrupted = isinstance(error, KeyboardInterrupt)
        try:
            self.dir.writer.wait()  # a checkpoint being written is finished, not cut
        except ConfigError as e:  # a failed write behind another error: said, not lost
            warnings.warn(str(e), stacklevel=2)
        # A full disk is one reason a run stops: its error, not a second one from the log, is reported.
        with contextlib.suppress(OSError):
            self.loggers.log({"stopped": "interrupted" if interrupted else type(error).__name__, "reason": str(error) or type(error).__name__}, self.step)
        self.loggers.close(exit_code=130 if interrupted else 1)

    def _finish(self, report: Callable[[dict[str, Any], Loggers], None] | None = None) -> dict[str, Any]:
        self.dist.barrier()  # rank 0 has written best.pt
        best = checkpoint.load(self.dir.best, map_location=self.device)
        self.model.load_state_dict(best["model"])
        splits = {split: self._evaluate(split) for split in ("train", "val", "test")}
        dirs = directions(self.tasks)
        results = {
            "tasks": {n: {"primary_metric": task.primary_metric, "directions": dirs[n]} for n, task in self.tasks.items()},
            "splits": splits,
            "best_epoch": best["epoch"],
            "selected_on": f"validation: {self._select_on}",
            "epochs": self.state.epoch,
            "steps": self.step,
            "skipped_steps": self.state.skipped,
            "parameters": self.parameters,
            "wall_time_s": round(self.state.wall_time, 2),
            "device": str(self.device),
            "processes": self.dist.world,
            **self.update.summary(),
        }
        if self.dist.is_main:
            write_json(results, self.dir.path / "results.json")
            config = to_dict(self.cfg)
            if self.model.trunk is not None:  # the trunk a later stage starts from (architectures of one trunk)
                checkpoint.save({"trunk": self.model.trunk.state_dict(), "trunk_config": config["trunk"]}, self.dir.path / "trunk.pt")
            if len(self.recipe.state_keys(self.model)) < len(best["model"]):  # a recipe that trains part of the model
                trained = {**self.recipe.trainable_state(self.model), "trunk_config": config["trunk"], "recipe_config": config["recipe"]}
                checkpoint.save(trained, self.dir.path / "trained.pt")
        final = {k: v for split, m in splits.items() for k, v in flatten(split, m).items()}
        self.loggers.log(final, self.step)
        self.loggers.log_summary({**final, "best_epoch": best["epoch"], "parameters/total": results["parameters"]["total"]})
        if report is not None and self.dist.is_main:
            report(results, self.loggers)
        self.loggers.close()
        self.dist.barrier()  # the next stage of a comparison reads these files on every rank
        return results
