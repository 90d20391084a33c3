"""A run's directory: whether a run may start or resume there, and its checkpoint files.

``RunDir(cfg)`` checks, writing nothing: a directory that holds a run needs ``resume=true``,
a resumed run's config may differ only in ``RESUMABLE_CHANGES``, the directory must be
writable and have room for the checkpoints. ``open(cfg)`` is the first write. Checkpoints
are written on one background thread (``CheckpointWriter``); a failed write names the fix.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mtl import checkpoint
from mtl.config import ConfigError, save_config, to_dict
from mtl.results import write_json
from mtl.state import FORMAT

# How a run is computed, not what it computes: a resume may change these (e.g. a smaller
# engine.jacobian_chunk after running out of memory).
# The feature cache changes how a frozen trunk's features are computed, not what they are.
RESUMABLE_CHANGES = ("resume", "trainer.epochs", "device", "logging", "engine.jacobian_chunk", "engine.staged_gramian",
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


class RunDir:
    """``output_dir``: ``checkpoints/step-<step>.pt`` (the newest ``keep``), ``checkpoints/best.pt``,
    and the files ``open`` and the trainer write (config.yaml, metrics.jsonl, results.json, trunk.pt)."""

    def __init__(self, cfg: DictConfig, writes: bool = True):
        self.path = Path(cfg.output_dir)
        self.checkpoints = self.path / "checkpoints"
        self.best = self.checkpoints / "best.pt"
        self.keep = cfg.trainer.keep_checkpoints
        self.writes = writes  # False on the ranks other than 0 under torchrun
        self.writer = CheckpointWriter()

    def resume_state(self, cfg: DictConfig) -> dict[str, Any] | None:
        """The newest intact checkpoint's state when resuming, None for a fresh run; an error
        when the directory holds a run and ``resume`` is not set, or its config differs."""
        found = checkpoint.step_checkpoints(self.checkpoints)
        if found and not cfg.resume:
            raise ConfigError(
                f"output_dir: {str(self.path)!r} already holds a run ({found[0]}); "
                "pass resume=true to continue it, or choose another output_dir."
            )
        if not (cfg.resume and found):
            return None
        try:
            path, state = checkpoint.latest(self.checkpoints)
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"resume: {e}") from None
        if state.get("format") != FORMAT:
            raise ConfigError(
                f"resume: {path} was written by another version of mtl (training-state format {state.get('format', 1)}, "
                f"this one reads {FORMAT}), so it cannot continue exactly. Start a new output_dir; to keep its weights, "
                f"start from them with init_from={str(path)!r}."
            )
        changed = config_changes(state["config"], to_dict(cfg), allowed=RESUMABLE_CHANGES + UNREAD_BY_TRAINING)
        if changed:
            raise ConfigError(
                f"resume: {path} was written with another config ({', '.join(changed)} differ); "
                "resume with the config in its run directory (only trainer.epochs, device and logging may change), "
                "or start a new output_dir."
            )
        return state

    def check_room(self, state_bytes: int) -> None:
        """Unwritable or too full for the checkpoints: an error now, not hours into training."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK) or (existing != self.path and not existing.is_dir()):
            raise ConfigError(f"output_dir: {str(self.path)!r} cannot be written ({existing} is not a writable directory); choose another output_dir.")
        # A step checkpoint holds the model and about two optimizer moments; keep + 1 of them
        # exist while a new one is written, plus best.pt and trunk.pt.
        needed = (self.keep + 1) * 3 * state_bytes + 2 * state_bytes
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise ConfigError(
                f"output_dir: {str(existing)!r} has {free / 2**20:.0f} MiB free; this run's checkpoints need about "
                f"{needed / 2**20:.0f} MiB. Free space, choose another output_dir, or lower trainer.keep_checkpoints."
            )

    def open(self, cfg: DictConfig) -> None:
        """The first write: the marker and config.yaml. A comparison's directory is refused."""
        if written_by(self.path) == "compare":
            # Checked here, not when built: `mtl validate` of a comparison's config builds a Trainer on its directory.
            raise ConfigError(
                f"output_dir: {str(self.path)!r} holds a comparison (written by mtl compare); this run's files would "
                f"replace and mix with its own. Choose another output_dir, e.g. output_dir={self.path}-train."
            )
        if not self.writes:
            return
        try:
            mark_written_by(self.path, "train")
            save_config(cfg, self.path / "config.yaml")
        except OSError as e:
            raise ConfigError(f"output_dir: cannot write to {str(self.path)!r}: {e}") from None

    def save_step(self, state: dict[str, Any], step: int) -> None:
        """A step checkpoint, written in the background (the previous writes waited for first)."""
        if self.writes:
            self.writer.submit(self._write, state, None, step)

    def save_best(self, state: dict[str, Any], step: int) -> None:
        if self.writes:
            self.writer.submit(self._write, state, self.best, step)

    def _write(self, state: dict[str, Any], path: Path | None, step: int) -> None:
        """On the writer's thread; a failure is raised by the next ``CheckpointWriter.wait``."""
        try:
            if path is None:
                checkpoint.save_step(state, self.checkpoints, step, self.keep)
            else:
                checkpoint.save(state, path)
        except OSError as e:
            raise ConfigError(
                f"output_dir: writing a checkpoint into {str(self.checkpoints)!r} failed at step {step} ({e}); "
                f"{self.kept()}. Free space (or fix the directory's permissions) and rerun with resume=true."
            ) from None

    def kept(self) -> str:
        """Which step checkpoint a stopped run can resume from, in words."""
        previous = checkpoint.step_checkpoints(self.checkpoints)
        return f"the last checkpoint, {previous[0].name}, is intact" if previous else "no checkpoint was written yet"
