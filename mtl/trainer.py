"""The trainer for one stage: joint training of a shared trunk and task heads.

Everything is built and checked before the first step (``Trainer.__init__``); ``fit``
runs the epochs, validates each task after each epoch, keeps the best checkpoint by
validation (never test), and evaluates the best model on train/val/test at the end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm  # tqdm.auto warns in notebooks without ipywidgets

from mtl import checkpoint, distributed
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
from mtl.loggers import Loggers, build_loggers
from mtl.losses import task_losses
from mtl.engine import GradientEngine, NonFiniteError
from mtl.scheduler import AllTasks, Sources
from mtl.weighting import GradientWeighting, LossWeighting
from mtl.results import directions, evaluate, flatten, selection_score, write_json


# How a run is computed, not what it computes: a resume may change these (e.g. a smaller
# jacobian_chunk after running out of memory).
# The feature cache changes how a frozen trunk's features are computed, not what they are.
RESUMABLE_CHANGES = ("resume", "trainer.epochs", "device", "logging", "trainer.jacobian_chunk", "trainer.staged_gramian",
                     "trunk.feature_cache", "trunk.feature_cache_mb")
# Read by `mtl compare` only: a training run (a comparison's cell too) is judged without them.
UNREAD_BY_TRAINING = ("compare",)
# Which command wrote a directory ({"command": "train" | "compare"}), so that one command
# never writes its files over the other's; its config is the config.yaml beside it.
MARKER = "written_by.json"


def written_by(directory: Path) -> str | None:
    """The command whose files ``directory`` holds, or None when no mtl command wrote there."""
    path = directory / MARKER
    return json.loads(path.read_text())["command"] if path.is_file() else None


def mark_written_by(directory: Path, command: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_json({"command": command}, directory / MARKER)


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "", allowed: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """Keys whose values differ between two resolved configs, except ``allowed`` ones (those a resume may change)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in allowed:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{path}.", allowed)
        elif a != b:
            changed.append(path)
    return changed


def seed_everything(seed: int, deterministic: bool) -> None:
    """torch's, Python's and NumPy's global generators (user datasets and transforms draw from them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs (CUDA docs, "Reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


@contextlib.contextmanager
def deferred_signals(on_signal):
    """SIGINT and SIGTERM call ``on_signal(signum)`` instead of interrupting, so the trainer can
    stop between steps (a step is never cut in half). A second signal is not deferred: the
    user can always stop at once. Handlers can only be set from the main thread; elsewhere
    signals keep their usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handle(signum, frame):
        on_signal(signum)
        signal.signal(signum, previous[signum])

    for sig in (signal.SIGINT, signal.SIGTERM):
        # None: a handler set outside Python, which cannot be put back; the default then.
        previous[sig] = signal.signal(sig, handle) or signal.SIG_DFL
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def snapshot(value: Any) -> Any:
    """A copy of a state's tensors, on the CPU, in the same nesting (an OrderedDict's
    ``_metadata`` kept, as ``load_state_dict`` reads it): what a background write may read
    while training changes the live tensors in place."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copy = type(value)((k, snapshot(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            copy._metadata = value._metadata
        return copy
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class CheckpointWriter:
    """Writes checkpoints on one background thread, in the order submitted: serializing and
    fsyncing a checkpoint (tens of milliseconds an epoch) overlaps the next steps.

    ``submit(write, state, *args)`` runs ``write(snapshot(state), *args)`` there; ``wait()``
    returns once every submitted write is done, or raises the first one's error then. The trainer
    waits before it submits again (so at most one epoch's writes are in flight) and before
    anything that reads, names or must outlive the files: the end of ``fit``, a stop."""

    def __init__(self) -> None:
        # Its one thread starts at the first submit: a Trainer that never trains starts none.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtl-checkpoint")
        self._pending: list[Future] = []

    def submit(self, write, state: dict[str, Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(write, snapshot(state), *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        # Every write ends before the first failure (in submission order) is raised: none is left running.
        failure = next((e for e in [f.exception() for f in pending] if e is not None), None)
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Ends the thread once the writes submitted are done (``mtl compare`` builds a Trainer per cell)."""
        self._pool.shutdown(wait=True)


class GradientClip:
    """The gradients' last pass before the optimizer step: caps, clipping and the finiteness check.

    One norm per gradient tensor (one foreach kernel) serves all three, in this order:

    - ``cap`` > 0: the trunk's gradient is scaled to norm ≤ ``cap`` (Nash-MTL's update-norm
      cap: its official code calls ``clip_grad_norm_`` on the shared parameters);
    - ``clip`` > 0 (``trainer.grad_clip``): the whole model's gradient, the capped trunk's
      included, is scaled to norm ≤ ``clip``;
    - a NaN or inf in a loss or any gradient (the model's, or a weighting's own parameters')
      makes the step non-finite: the caller skips it or stops.

    A scale is min(1, max / (norm + 1e-6)), torch's ``clip_grad_norm_``. Under torchrun the
    gradients are the ranks' mean already, so every rank computes the same norms and no other
    all-reduce is needed. One host read per step: a NaN update must never reach the weights."""

    def __init__(self, trunk: list[nn.Parameter], heads: list[nn.Parameter], own: list[nn.Parameter], cap: float = 0.0, clip: float = 0.0):
        self.trunk, self.heads, self.own = trunk, heads, own
        self.cap, self.clip = cap, clip

    def __call__(self, losses: dict[str, torch.Tensor]) -> str | None:
        """Caps and clips the gradients in place; what is not finite, else None (then nothing was scaled)."""
        trunk = [p for p in self.trunk if p.grad is not None]
        model = trunk + [p for p in self.heads if p.grad is not None]
        grads = [p.grad for p in model] + [p.grad for p in self.own if p.grad is not None]
        values = torch.stack([loss.detach().float() for loss in losses.values()])
        # torch's own get_total_norm uses this kernel; torch.foreach.norm is its public name from 2.15 on.
        norms = torch.stack(torch._foreach_norm(grads)).float() if grads else values.new_zeros(0)
        if not bool(torch.isfinite(torch.cat([values, norms])).all()):
            bad = [f"task {n!r} loss {v}" for n, v in zip(losses, values.tolist()) if not math.isfinite(v)]
            if bad:
                return "non-finite loss: " + ", ".join(bad)
            return f"non-finite gradient (model gradient norm {float(torch.linalg.vector_norm(norms[: len(model)]))}) with finite losses"
        if self.cap and trunk:
            trunk_norm = torch.linalg.vector_norm(norms[: len(trunk)])
            torch.nn.utils.clip_grads_with_norm_(trunk, self.cap, trunk_norm)
            # The capped trunk's tensor norms, for the model's norm below without another pass.
            norms = torch.cat([norms[: len(trunk)] * (self.cap / (trunk_norm + 1e-6)).clamp(max=1.0), norms[len(trunk) :]])
        if self.clip and model:
            torch.nn.utils.clip_grads_with_norm_(model, self.clip, torch.linalg.vector_norm(norms[: len(model)]))
        return None


class Trainer:
    """``Trainer(cfg)`` builds and checks everything and writes nothing; ``fit()`` trains.

    ``mtl compare`` also passes ``cell``, the identity of the comparison cell this stage
    belongs to (the W&B run config's ``cell``), and ``wandb_dir``, the one folder that holds
    the W&B files of every run of the comparison (default: the run directory)."""

    def __init__(self, cfg: DictConfig, cell: dict[str, Any] | None = None, wandb_dir: Path | None = None):
        self.cfg = cfg
        self.cell = cell
        self.wandb_dir = wandb_dir
        t = cfg.trainer
        # Settings read at every step, as plain values: an OmegaConf lookup costs tens of microseconds.
        self._bf16, self._channels_last = t.precision == "bf16", t.channels_last
        self._log_every, self._checkpoint_every, self._keep = cfg.logging.log_every, t.checkpoint_every, t.keep_checkpoints
        self._writer = CheckpointWriter()
        self.dist = distributed.setup(cfg.device)
        self.device = resolve_device(cfg.device)
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.run_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.best_path = self.checkpoint_dir / "best.pt"
        found = checkpoint.step_checkpoints(self.checkpoint_dir)
        if found and not cfg.resume:
            raise ConfigError(
                f"output_dir: {str(self.run_dir)!r} already holds a run ({found[0]}); "
                "pass resume=true to continue it, or choose another output_dir."
            )
        self._resume_state = None
        if cfg.resume and found:
            try:
                path, self._resume_state = checkpoint.latest(self.checkpoint_dir)
            except checkpoint.CheckpointError as e:
                raise ConfigError(f"resume: {e}") from None
            changed = config_changes(self._resume_state["config"], to_dict(cfg), allowed=RESUMABLE_CHANGES + UNREAD_BY_TRAINING)
            if changed:
                raise ConfigError(
                    f"resume: {path} was written with another config ({', '.join(changed)} differ); "
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
        self._check_shards()
        self.scheduler = build_scheduler(cfg, sizes)
        self.steps_per_epoch = self.scheduler.steps_per_epoch
        self.engine = self._check_weighting()
        trunk = list(self.model.trunk.parameters())
        in_trunk = {id(p) for p in trunk}
        self._clip = GradientClip(
            trunk, [p for p in self.model.parameters() if id(p) not in in_trunk], weighting_params,
            # Nash-MTL's update-norm cap, the one weighting with one (0: none).
            cap=getattr(self.weighting, "max_norm", 0.0), clip=t.grad_clip or 0.0,
        )
        self.lr_schedule = build_lr_schedule(cfg, self.optimizer, t.epochs * self.steps_per_epoch)

        self._check_output_dir()

        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps (skipped non-finite steps included)
        self.skipped = 0
        self.best = {"score": -float("inf"), "epoch": 0}
        self.wall_time = 0.0
        self._stop_signal: int | None = None
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
                f"({', '.join(self.groups)}). "
                + ("Use weighting.mode=parameters." if "parameters" in type(w).modes
                   else f"{self.cfg.weighting.name!r} works on a shared representation only; use weighting.name=mgda, its parameter-gradient form.")
            )
        return GradientEngine(
            self.model, w, every=self.cfg.trainer.weighting_every, chunk=self.cfg.trainer.jacobian_chunk, ctx=self.dist,
            record_every=self.cfg.logging.log_every, staged=self.cfg.trainer.staged_gramian,
        )

    def _check_shards(self) -> None:
        """Under torchrun each rank trains on an equal slice of every global batch."""
        if not self.dist.active:
            return
        for name, source in self.sources.items():
            if source.batch_size % self.dist.world:
                raise ConfigError(
                    f"trainer.batch_size: a batch of {source.batch_size} ({name}) does not split evenly over {self.dist.world} "
                    f"processes; use a batch_size divisible by {self.dist.world}"
                    + (f" (the training set has only {source.n} samples)." if source.n < self.cfg.trainer.batch_size else ".")
                )

    def _check_output_dir(self) -> None:
        """Unwritable or too full for the checkpoints: an error now, not hours into training."""
        existing = self.run_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK) or (existing != self.run_dir and not existing.is_dir()):
            raise ConfigError(f"output_dir: {str(self.run_dir)!r} cannot be written ({existing} is not a writable directory); choose another output_dir.")
        tensors = [*self.model.state_dict().values(), *self.weighting.state_dict().values()]
        model_bytes = sum(v.numel() * v.element_size() for v in tensors if isinstance(v, torch.Tensor))
        # A step checkpoint holds the model and about two optimizer moments; keep + 1 of them
        # exist while a new one is written, plus best.pt and trunk.pt.
        needed = (self.cfg.trainer.keep_checkpoints + 1) * 3 * model_bytes + 2 * model_bytes
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise ConfigError(
                f"output_dir: {str(existing)!r} has {free / 2**20:.0f} MiB free; this run's checkpoints need about "
                f"{needed / 2**20:.0f} MiB. Free space, choose another output_dir, or lower trainer.keep_checkpoints."
            )

    def _count_parameters(self) -> dict[str, int]:
        """Total parameters, and those the recipe trains in at least one epoch of the stage."""
        trainable: dict[int, int] = {}
        for epoch in self.recipe.distinct_epochs(self.model, self.cfg.trainer.epochs):
            self.recipe.start_epoch(self.model, epoch)
            trainable.update((id(p), p.numel()) for p in self.model.parameters() if p.requires_grad)
        if not trainable:
            raise ConfigError(f"recipe: {self.cfg.recipe.name!r} leaves no parameter to train in this stage; choose another recipe.")
        return {"total": sum(p.numel() for p in self.model.parameters()), "trainable": sum(trainable.values())}

    # -- training -------------------------------------------------------------------

    def _open_run(self) -> None:
        """The first write to the run directory: nothing is written while the setup is checked."""
        cfg = self.cfg
        if written_by(self.run_dir) == "compare":
            # Checked here, not when built: `mtl validate` of a comparison's config builds a Trainer on its directory.
            raise ConfigError(
                f"output_dir: {str(self.run_dir)!r} holds a comparison (written by mtl compare); this run's files would "
                f"replace and mix with its own. Choose another output_dir, e.g. output_dir={self.run_dir}-train."
            )
        if self._resume_state is not None:
            self._load(self._resume_state)
        if not self.dist.is_main:  # only rank 0 writes files and talks to W&B
            self.loggers = Loggers([])
            return
        try:
            mark_written_by(self.run_dir, "train")
            save_config(cfg, self.run_dir / "config.yaml")
        except OSError as e:
            raise ConfigError(f"output_dir: cannot write to {str(self.run_dir)!r}: {e}") from None
        wandb_config = {**to_dict(cfg), "cell": self.cell} if self.cell else to_dict(cfg)
        self.loggers = build_loggers(
            cfg.logging.wandb, self.run_dir, wandb_config, resume=cfg.resume,
            resume_step=self.step,  # a fresh start (0) also drops the lines of a run killed before its first checkpoint
            wandb_dir=self.wandb_dir,
        )

    def fit(self) -> dict[str, Any]:
        """Train the stage and return its results (also written to results.json).

        Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and raises
        ``KeyboardInterrupt``; a second one stops at once. ``resume=true`` continues exactly."""
        self._open_run()
        try:
            with deferred_signals(self._on_signal):
                while self.epoch < self.cfg.trainer.epochs:
                    self._train_epoch()
            self._writer.wait()  # best.pt, read back by _finish
        except BaseException as e:
            self._close_stopped(e)
            raise
        finally:
            self._writer.close()
        return self._finish()

    def _close_stopped(self, error: BaseException) -> None:
        """The logs of a run that did not finish say so: a ``stopped`` line in metrics.jsonl,
        and the W&B run ends with the exit code of the command (130 for Ctrl-C), not as finished."""
        interrupted = isinstance(error, KeyboardInterrupt)
        reason = str(error) or type(error).__name__
        try:
            self._writer.wait()  # a checkpoint being written is finished, not cut
        except ConfigError as e:  # a failed write behind another error: said, not lost
            warnings.warn(str(e), stacklevel=2)
        # A full disk is one reason a run stops: its error, not a second one from the log, is reported.
        with contextlib.suppress(OSError):
            self.loggers.log({"stopped": "interrupted" if interrupted else type(error).__name__, "reason": reason}, self.step)
        self.loggers.close(exit_code=130 if interrupted else 1)

    def _train_epoch(self) -> None:
        t = self.cfg.trainer
        start = time.perf_counter()
        epoch = self.epoch
        self.model.train()
        self.recipe.start_epoch(self.model, epoch)
        done = self.step - epoch * self.steps_per_epoch  # > 0 when resumed mid-epoch
        bar = tqdm(
            range(done, self.steps_per_epoch),
            initial=done,
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not self.cfg.logging.progress_bar or not self.dist.is_main,
            dynamic_ncols=True,
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
                self._writer.wait()
                self._save_checkpoint(start)
                start = time.perf_counter()
            self._stop_if_signalled(start)
        bar.close()
        self._end_epoch_losses()
        # Buffers (BatchNorm statistics) saw each rank's own shard: evaluate and save their mean.
        self.dist.mean_([b for b in self.model.buffers() if b.is_floating_point()])
        val = evaluate(self.model, self.tasks, {n: s.val for n, s in self.splits.items()}, t.eval_batch_size, self.device,
                       num_workers=t.num_workers, groups=self.groups)
        score = selection_score(val, t.select_on, self.tasks)
        self.loggers.log({**flatten("val", val), "epoch": epoch + 1}, self.step)
        self.epoch = epoch + 1
        # A NaN score (no labelled validation sample) never beats another, so the first
        # epoch's model is kept as the selection then.
        self._writer.wait()  # the previous checkpoints: long written by now, unless the disk failed
        if score > self.best["score"] or self.best["epoch"] == 0:
            self.best = {"score": score, "epoch": self.epoch}
            self._write(self.best_path, {"model": self.model.state_dict(), "epoch": self.epoch, "score": score})
        self._save_checkpoint(start)
        self._stop_if_signalled(time.perf_counter())

    def _save_checkpoint(self, since: float) -> None:
        self.wall_time += time.perf_counter() - since
        self._write(self.checkpoint_dir, self._state(), step=True)

    def _write(self, path: Path, state: dict[str, Any], step: bool = False) -> None:
        if self.dist.is_main:
            self._writer.submit(self._write_now, state, path, step, self.step)

    def _write_now(self, state: dict[str, Any], path: Path, step: bool, at_step: int) -> None:
        """On the writer's thread; a failure is raised by the next ``CheckpointWriter.wait``."""
        try:
            if step:
                checkpoint.save_step(state, path, at_step, self._keep)
            else:
                checkpoint.save(state, path)
        except OSError as e:
            previous = checkpoint.step_checkpoints(self.checkpoint_dir)
            kept = f"the previous checkpoint {previous[0].name} is intact" if previous else "no earlier checkpoint exists"
            raise ConfigError(
                f"output_dir: writing a checkpoint into {str(self.checkpoint_dir)!r} failed at step {at_step} ({e}); "
                f"{kept}. Free space (or fix the directory's permissions) and rerun with resume=true."
            ) from None

    # -- stop signals -----------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._stop_signal = signum

    def _stop_if_signalled(self, since: float) -> None:
        # Every rank stops at the same step (torchrun signals each, not necessarily at once).
        if not self.dist.any(self._stop_signal is not None):
            return
        self._save_checkpoint(since)
        self._writer.wait()
        name = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "a stop signal on another rank"
        raise KeyboardInterrupt(
            f"{name} at step {self.step}: checkpoint written to {self.checkpoint_dir}; "
            "rerun the same command with resume=true to continue exactly where it stopped."
        )

    def _losses(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._global(task_losses(self.tasks, self.model.forward_groups(inputs, self.groups), targets), targets)

    def _global(self, losses: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under torchrun, the global batch's losses (``Context.global_losses``), each rank
        weighted by its number of labelled samples of the task."""
        if not self.dist.active:
            return losses
        return self.dist.global_losses(losses, {t: self.tasks[t].valid_mask(targets[t]).sum() for t in losses})

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last and x.dim() == 4 else x

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
            def loss_fn(outputs, targets):
                return self._global(task_losses(self.tasks, outputs, targets), targets)

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
        inputs = {n: self._layout(self.dist.shard(b[0])) for n, b in batches.items()}
        targets = {task: self.dist.shard(y) for n, b in batches.items() for task, y in zip(self.groups[n], b[1:])}
        self.optimizer.zero_grad(set_to_none=True)
        problem = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            try:
                losses, vector = self._backward(names, inputs, targets)
            except NonFiniteError as e:  # the engine's check, before a method sees the gradients
                losses, vector, problem = None, None, str(e)
        if problem is None and self.dist.active:
            self.dist.mean_([p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None])
        problem = problem or self._clip(losses)
        if problem is not None:
            self._skip_or_stop(problem)
        else:
            self.optimizer.step()
        self.lr_schedule.step()
        if problem is None:
            if self.engine is None:
                after = None
                if self.weighting.wants_losses_after_step:
                    with torch.no_grad():
                        after = self._loss_vector(self._losses(inputs, targets))
                self.weighting.update(vector.detach(), after)
            for n, loss in losses.items():
                self._loss_sums[n] += loss.detach()
                self._loss_counts[n] += 1
                self._epoch_sums[n] += loss.detach()
                self._epoch_counts[n] += 1
        self.step += 1
        return sum(len(b[0]) for b in batches.values())

    def _skip_or_stop(self, problem: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = f"step {self.step} (epoch {self.epoch + 1})"
        if self.cfg.trainer.on_nonfinite == "skip":
            self.skipped += 1
            if self.dist.is_main:
                tqdm.write(f"mtl: {where}: {problem}; step skipped ({self.skipped} so far).")
            return
        self._writer.wait()
        previous = checkpoint.step_checkpoints(self.checkpoint_dir)
        kept = f"the last checkpoint, {previous[0]}, is intact" if previous else "no checkpoint was written yet"
        raise NonFiniteError(
            f"{where}: {problem}. The update was not applied and {kept}. Lower the learning rate or set "
            "trainer.grad_clip; or set trainer.on_nonfinite=skip to skip such steps (they are counted)."
        )

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
        if self.skipped:
            metrics["skipped_steps"] = self.skipped
        metrics.update(self._diagnostics())
        self.loggers.log(metrics, self.step)
        bar.set_postfix({"step": self.step, **{n: f"{v:.3f}" for n, v in means.items()}, "samples/s": f"{rate:.0f}"}, refresh=False)
        for n in self._loss_sums:
            self._loss_sums[n].zero_()
            self._loss_counts[n] = 0

    # -- end of run -----------------------------------------------------------------

    def _finish(self) -> dict[str, Any]:
        t = self.cfg.trainer
        self.dist.barrier()  # rank 0 has written best.pt
        best = checkpoint.load(self.best_path, map_location=self.device)
        self.model.load_state_dict(best["model"])
        splits = {
            split: evaluate(self.model, self.tasks, {n: getattr(s, split) for n, s in self.splits.items()}, t.eval_batch_size, self.device,
                            num_workers=t.num_workers, groups=self.groups)
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
            "skipped_steps": self.skipped,
            "parameters": self.parameters,
            "wall_time_s": round(self.wall_time, 2),
            "device": str(self.device),
            "processes": self.dist.world,
        }
        if self.dist.is_main:
            write_json(results, self.run_dir / "results.json")
            checkpoint.save({"trunk": self.model.trunk.state_dict(), "trunk_config": to_dict(self.cfg)["trunk"]}, self.run_dir / "trunk.pt")
        final = {k: v for split, m in splits.items() for k, v in flatten(split, m).items()}
        self.loggers.log(final, self.step)
        self.loggers.log_summary({**final, "best_epoch": best["epoch"], "parameters/total": results["parameters"]["total"]})
        self.loggers.close()
        self.dist.barrier()  # the next stage of a comparison reads these files on every rank
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
            "skipped": self.skipped,
            "best": self.best,
            "wall_time": self.wall_time,
            # The running loss means of a checkpoint taken mid-epoch: the log and DWA's
            # epoch history then continue as if never interrupted.
            "loss_sums": {n: (self._loss_sums[n], self._loss_counts[n]) for n in self.tasks},
            "epoch_sums": {n: (self._epoch_sums[n], self._epoch_counts[n]) for n in self.tasks},
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
        self.skipped = state["skipped"]
        for n in self.tasks:
            self._loss_sums[n], self._loss_counts[n] = state["loss_sums"][n][0].to(self.device), state["loss_sums"][n][1]
            self._epoch_sums[n], self._epoch_counts[n] = state["epoch_sums"][n][0].to(self.device), state["epoch_sums"][n][1]
        checkpoint.set_rng_state(state["rng"])
