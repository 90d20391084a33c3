"""Metric loggers behind one small protocol: local files always, W&B when enabled.

Metric names are ``{split}/{task}/{metric}`` (e.g. ``val/mnist/accuracy``); every event
carries the global optimizer step.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

from mtl.checkpoint import write_atomic
from mtl.config import WandbConfig


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_summary(self, summary: dict[str, Any]) -> None: ...

    def close(self, exit_code: int = 0) -> None: ...


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/inf; None marks a metric that could not be computed.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _step_of(line: str) -> float:
    """A line's step; a line cut short by a kill (only ever the last) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class DiskLogger:
    """Appends one JSON line per event to ``metrics.jsonl``: ``{"step": ..., name: value}``."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Events after the checkpoint will be logged again by the resumed run.
            kept = [line for line in self.path.read_text().splitlines(keepends=True) if _step_of(line) <= resume_step]
            write_atomic(self.path, lambda f: f.write("".join(kept).encode()))
        self._file = open(self.path, "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        self._file.close()


class WandbLogger:
    """Weights & Biases run: ``global_step`` is the step metric; config uploaded; final
    metrics in the run summary. The run id is kept in the run directory so a resumed
    run continues the same W&B run. W&B's own files go under ``wandb_dir/wandb`` (default:
    the run directory), where `wandb sync` finds them."""

    def __init__(
        self, cfg: WandbConfig, run_dir: str | os.PathLike, config: dict[str, Any], resume: bool = False,
        wandb_dir: str | os.PathLike | None = None,
    ):
        import wandb

        mode = os.environ.get("WANDB_MODE") or cfg.mode
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            name=cfg.name,
            config=config,
            dir=str(wandb_dir or run_dir),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        id_file.write_text(self.run.id)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "global_step": step})

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)

    def close(self, exit_code: int = 0) -> None:
        # Non-zero: W&B marks the run failed instead of finished.
        self.run.finish(exit_code=exit_code)


class Loggers:
    """Fans events out to every logger. The disk log is the record: a remote logger that fails
    (network gone, run deleted, quota) is dropped with one warning and training goes on."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def _each(self, call: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, call)(*args)
            except Exception as e:
                if isinstance(logger, DiskLogger):
                    raise
                self.loggers.remove(logger)
                warnings.warn(f"{type(logger).__name__} failed ({type(e).__name__}: {e}) and is off for the rest of the run; the local logs are complete.")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._each("log", metrics, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._each("log_summary", summary)

    def close(self, exit_code: int = 0) -> None:
        self._each("close", exit_code)


def build_loggers(
    cfg: WandbConfig, run_dir: str | os.PathLike, config: dict[str, Any], resume: bool, resume_step: int | None = None,
    wandb_dir: str | os.PathLike | None = None,
) -> Loggers:
    loggers: list[MetricLogger] = [DiskLogger(run_dir, resume_step)]
    mode = os.environ.get("WANDB_MODE") or cfg.mode
    if mode != "disabled":
        try:
            loggers.append(WandbLogger(cfg, run_dir, config, resume, wandb_dir))
        except Exception as e:  # W&B down, bad key or project: the local logs still hold everything
            warnings.warn(f"W&B logging is off for this run ({type(e).__name__}: {e}); local logs in {run_dir} are complete.")
    return Loggers(loggers)
