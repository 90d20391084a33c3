"""Checkpoint files: written atomically with a checksum, read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values only, so the safe loader can
read it (a pickle from an untrusted file would run code). Beside each file, ``<name>.sha256``
holds its digest: a truncated or bit-flipped checkpoint is reported, never loaded.

The framework's one atomic writer (``write_atomic``: checkpoints, results, reports) and its
one verified reader (``read``: checksum, then the safe loader) live here; trunk weights
(``init_from``, ``trunk.checkpoint``, pretrained files) are read through ``read`` too.

A run keeps its training state as ``checkpoints/step-<step>.pt`` (the newest
``keep`` of them) and the selected model as ``best.pt``; ``latest`` resumes from the newest
one that reads back intact, reporting the ones it had to pass over.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpoint(CheckpointError):
    """A file whose bytes do not match its ``.sha256``."""


STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any], fsync: bool = True) -> None:
    """``write(f)`` into a temporary file beside ``path``, flush, fsync (unless ``fsync=False``),
    rename over ``path``: a reader (or a crash) sees the previous file or the new one, never
    half of one. A failed write removes the temporary file and leaves the previous one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:  # disk full, interrupted: the previous file stays, no half one is left
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _torch_save(state: dict[str, Any], f) -> None:
    try:
        torch.save(state, f)
    except RuntimeError as e:  # torch's zip writer reports a failed write (disk full) this way
        raise OSError(f"the file could not be written completely ({str(e).strip().splitlines()[0]})") from e


class _HashingWriter:
    """A binary file that hashes what is written to it: the checksum without reading the file back."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Temporary file, flush, fsync, rename; then the checksum beside it. A crash leaves the
    previous file (or none), never a half one; a file without its checksum is still read.
    The checksum file is not fsynced (each fsync costs milliseconds to tens of them): after a
    power loss it may be missing (the checkpoint is then read unchecked) or cut short (the
    checkpoint is then reported and an older one used), never a wrong match."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = []

    def write(f):
        hashing = _HashingWriter(f)
        _torch_save(state, hashing)
        digest.append(hashing.sha.hexdigest())

    write_atomic(path, write)
    write_atomic(_checksum_file(path), lambda f: f.write(digest[0].encode()), fsync=False)


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def fingerprint(path: str | os.PathLike) -> str:
    """The file's SHA-256: its ``.sha256`` where one was written beside it, else computed."""
    path = Path(path)
    stored = _checksum_file(path)
    return stored.read_text().strip() if stored.is_file() else _digest(path)


def verify(path: str | os.PathLike) -> None:
    """A CorruptCheckpoint naming ``path`` when its ``.sha256`` exists and does not match its
    bytes (truncated, bit-flipped or replaced); a file without a checksum passes unchecked."""
    path = Path(path)
    checksum = _checksum_file(path)
    if checksum.is_file() and checksum.read_text().strip() != _digest(path):
        raise CorruptCheckpoint(
            f"checkpoint {str(path)!r} is corrupt: its contents do not match {checksum.name} (cut short, changed or "
            "replaced after it was written). Use another checkpoint, or write this one again."
        )


def read_reason(error: Exception) -> str:
    """The line of torch's refusal that names the problem: its weights_only refusal is a page
    of advice, and the unpickler's own line is the reason."""
    text = str(error)
    detail = text.partition("WeightsUnpickler error:")[2] or text
    return (detail.strip().split(". ")[0].splitlines() or [type(error).__name__])[0]


def read(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The one verified reader: the checksum (``verify``), then ``torch.load(weights_only=True)``.
    Every failure is a CheckpointError naming the file; pickled code is never run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found.")
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {read_reason(e)}).") from e


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint (a dict), read by ``read``."""
    state = read(path, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a dict.")
    return state


def step_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The ``step-<n>.pt`` files of a run's checkpoint directory, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_step(state: dict[str, Any], directory: str | os.PathLike, step: int, keep: int) -> Path:
    """Write ``step-<step>.pt``, then delete all but the newest ``keep`` step checkpoints."""
    path = Path(directory) / f"step-{step:09d}.pt"
    save(state, path)
    drop_steps(directory, keep)
    return path


def drop_steps(directory: str | os.PathLike, keep: int = 0) -> int:
    """Delete all but the newest ``keep`` step checkpoints of ``directory`` (and their SHA-256
    files); best.pt stays. The number deleted."""
    old = step_checkpoints(directory)[keep:]
    for path in old:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    return len(old)


def latest(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest step checkpoint that reads back intact, or None when there is none.
    Unreadable ones are reported and left on disk (for inspection); all unreadable is an error."""
    problems = []
    for path in step_checkpoints(directory):
        try:
            state = load(path, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"{'; '.join(problems)} Resuming from the previous checkpoint, {path.name}.", stacklevel=2)
        return path, state
    if problems:
        raise CheckpointError(
            f"{'; '.join(problems)} No intact checkpoint is left in {str(directory)!r}: "
            "start a new output_dir (or delete the checkpoints to retrain there)."
        )
    return None


def rng_state() -> dict[str, Any]:
    """Every global generator a step may draw from: torch (CPU, CUDA), Python's, NumPy's
    (user datasets and augmentations use them); NumPy's key as a tensor for the safe loader."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
