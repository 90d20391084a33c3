"""Run ``mtl`` in a subprocess and stop it at a chosen training step, as a crash would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import QUICKSTART, ROOT


def env(**extra: str) -> dict[str, str]:
    # One thread: float sums are then reduced in one order in every process, so runs compare bitwise.
    out = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out.pop("WANDB_MODE", None)
    out.update(extra)
    return out


def command(kind: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "mtl", kind, QUICKSTART, *overrides]


def run(kind: str, overrides: list[str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(kind, overrides), env=env(**extra), capture_output=True, text=True, timeout=600, cwd=ROOT)


def last_step(metrics: Path) -> int:
    """The highest step logged so far (a line being written may be cut short)."""
    best = -1
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                best = max(best, json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                pass
    return best


def run_until(kind: str, overrides: list[str], watch, sig: int = signal.SIGKILL, **extra: str) -> subprocess.CompletedProcess:
    """Start ``mtl kind``; send ``sig`` as soon as ``watch()`` is true (polled every 5 ms)."""
    proc = subprocess.Popen(command(kind, overrides), env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if watch():
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def comparable_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which differ between any two runs."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "samples_per_s"} for line in lines]
