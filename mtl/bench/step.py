"""Time one training step of every weighting: ResNet-18 trunk, T linear heads, one input batch.

Every weighting's row times the trainer's own step (``mtl.step``, as ``Trainer`` builds it):
``zero_grad``, forward, the T per-task losses, the weighting's backward, the finiteness
check, the optimizer step (SGD with momentum), the weighting's update after it and the
running losses. The trunk is ResNet-18
with the CIFAR stem (``small_input=True``) on synthetic ``3 x size x size`` inputs; every
task has a 10-class linear head on the same input batch (so ``representation`` mode is
valid). Rows, all in one run:

- ``single``, mode ``-``: one task, plain backward: the reference of the ``x single`` column;
- ``naive``, mode ``loop``: T heads as separate modules and a Python loop of per-task
  ``torch.autograd.grad`` calls w.r.t. the trunk parameters, stacked and summed (the
  per-task-gradient baseline of common MTL code): the reference of the ``x naive`` column;
- every loss-level weighting, mode ``loss``: ``LossStep``, one backward of
  ``weighting(losses)`` (FAMO also pays the no-grad forward after the step that its update needs);
- every gradient-level weighting through ``EngineStep`` in its default mode, and again
  in ``representation`` mode where the method allows it (a separate row). Methods that need
  only the Gramian get it stage by stage without J (the engine's default); with
  ``--gramian jacobian`` they form J instead, and ``--gramian both`` times each path in its
  own row (mode ``parameters`` and ``parameters/J``).

A few untimed single-task steps warm the process up first. Each row then builds the model
from the same initial weights, runs ``--warmup`` steps, then
``--repeats`` timed steps (``time.perf_counter``, with ``torch.cuda.synchronize`` on CUDA);
ms/step is their median. ``x single`` is ms/step over the single-task step of this run,
``x naive`` (gradient-level rows) over the naive loop at the same T. On CUDA, ``peak MiB``
is ``torch.cuda.max_memory_allocated`` over the row (reset before it). A row that raises
(a solver failing, out of memory) prints its error and the run goes on.

Defaults depend on the device:

- CPU (a full run took 2 min 40 s on 2 idle cores; one ResNet-18 step costs 0.15-9 s there)::

    python -m mtl.bench.step --device cpu
    # = --batch 8 --size 32 --tasks 2 10 --warmup 0 --repeats 3 --dtype fp32
    # (the process warm-up covers one-off costs on CPU; the median drops a slow first step)

- CUDA (the issue's T in {2, 10, 40}), fp32 and then bf16 autocast with channels_last::

    python -m mtl.bench.step --device cuda --out bench_fp32.json
    python -m mtl.bench.step --device cuda --dtype bf16 --channels-last --out bench_bf16.json
    # = --batch 256 --size 32 --tasks 2 10 40 --warmup 3 --repeats 10

CPU timings are only as good as the machine is idle: with two OpenMP threads on two cores,
another busy process slows steps several-fold at random (the header and footer print the
load average). On a shared machine, ``--threads 1`` is slower but far steadier.

A subset: ``--methods equal pcgrad upgrad naive`` (registered weighting names and
``naive``; the single-task reference always runs). ``--out FILE.json`` writes the rows and
the run's settings.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from mtl.distributed import Context
from mtl.heads import LinearHead
from mtl.losses import task_losses
from mtl.model import MultiTaskModel
from mtl.recipes import RECIPES
from mtl.step import build_step
from mtl.task import ClassificationTask
from mtl.trunks import TRUNKS
from mtl.weighting import WEIGHTINGS, GradientWeighting, GramianWeighting

NAIVE = "naive"
SINGLE = "single"
JACOBIAN = "/J"  # suffix of a row's mode: the Gramian-only method formed J (staged=False)
NUM_CLASSES = 10
LOG_EVERY = 20
DEFAULTS = {
    "cpu": {"batch": 8, "tasks": [2, 10], "warmup": 0, "repeats": 3},
    "cuda": {"batch": 256, "tasks": [2, 10, 40], "warmup": 3, "repeats": 10},
}


@dataclass
class Row:
    method: str
    mode: str  # "-" (single), "loop" (naive), "loss", or the engine's mode
    tasks: int
    ms: float | None = None  # median ms/step
    ratio_single: float | None = None
    ratio_naive: float | None = None
    peak_mib: float | None = None
    error: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mtl.bench.step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--tasks", type=int, nargs="+", default=None, help="values of T (CPU: 2 10; CUDA: 2 10 40)")
    p.add_argument("--batch", type=int, default=None, help="batch size (CPU: 8; CUDA: 256)")
    p.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per row (CPU: 3; CUDA: 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (CPU: 0; CUDA: 3)")
    p.add_argument("--methods", nargs="+", default=None, help=f"weighting names and/or {NAIVE!r} (default: all)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: torch.autocast(bfloat16)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    p.add_argument("--chunk", type=int, default=0, help="tasks per batched backward of the gradient engine (default 0: all)")
    p.add_argument(
        "--gramian", choices=("staged", "jacobian", "both"), default="staged",
        help="Gramian-only methods in a parameter mode: G stage by stage (default), from J, or a row of each",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--out", default=None, help="write the rows and settings to this JSON file")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here.")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "size", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1.")
    if args.warmup < 0:
        p.error("--warmup must be >= 0.")
    if args.chunk < 0:
        p.error("--chunk must be >= 0 (0: all tasks at once).")
    if min(args.tasks) < 1:
        p.error("--tasks must be >= 1.")
    available = [*WEIGHTINGS.names(), NAIVE]
    if args.methods is None:
        args.methods = available
    unknown = [m for m in args.methods if m not in available]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(available)}.")
    args.methods = list(dict.fromkeys(args.methods))
    return args


class Bench:
    """Models, data and the step of each row, for one device/dtype/layout."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.tasks = {t: ClassificationTask(NUM_CLASSES) for t in self.task_names(max(args.tasks))}
        self.loss_fn = functools.partial(task_losses, self.tasks)  # the trainer's: one op for T tasks
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
        self.x = x.to(self.device).contiguous(memory_format=self.memory_format)
        self.targets = torch.randint(0, NUM_CLASSES, (max(max(args.tasks), 1), args.batch), generator=gen).to(self.device)
        self._templates: dict[int, MultiTaskModel] = {}

    def autocast(self):
        if self.args.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def task_names(T: int) -> list[str]:
        return [f"task{i}" for i in range(T)]

    def model(self, T: int) -> MultiTaskModel:
        """A fresh copy of T's model (the same initial weights for every row at T)."""
        if T not in self._templates:
            torch.manual_seed(0)
            trunk = TRUNKS.get("resnet18")(small_input=True)
            shape = trunk.feature_shape((3, self.args.size, self.args.size))
            self._templates[T] = MultiTaskModel(trunk, {t: LinearHead(shape, NUM_CLASSES) for t in self.task_names(T)})
        model = copy.deepcopy(self._templates[T]).to(self.device, memory_format=self.memory_format)
        return model.train()

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def batch(self, T: int):
        tasks = self.task_names(T)
        return {"x": self.x}, {"x": tasks}, {t: self.targets[i] for i, t in enumerate(tasks)}

    # One closure per row: the whole training step.

    def single_step(self) -> Callable[[], None]:
        model = self.model(1)
        opt = self.optimizer(model.parameters())
        inputs, members, targets = self.batch(1)
        (task,) = members["x"]

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                loss = self.loss_fn(model.forward_groups(inputs, members), targets)[task]
            loss.backward()
            opt.step()

        return step

    def trainer_step(self, name: str, mode: str, T: int) -> Callable[[], None]:
        """The trainer's own step (``mtl.step.build_step``): the one ``Trainer`` calls, for a
        loss-level (``mode`` "loss") or gradient-level weighting."""
        model = self.model(T)
        inputs, members, targets = self.batch(T)
        cls = WEIGHTINGS.get(name)
        gradient = isinstance(cls, type) and issubclass(cls, GradientWeighting)
        weighting = (cls(members["x"], mode=mode.removesuffix(JACOBIAN)) if gradient else cls(members["x"])).to(self.device)
        opt = self.optimizer([*model.parameters(), *weighting.parameters()])
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        # Diagnostics as the trainer computes them: on logged steps only (default log_every 20).
        engine = {"chunk": self.args.chunk, "staged": not mode.endswith(JACOBIAN), "record_every": LOG_EVERY}
        step = build_step(model, self.tasks, members, weighting, opt, schedule, RECIPES.get("fine_tune")(), Context(), self.device,
                          bf16=self.args.dtype == "bf16", engine=engine)
        return lambda: step.step(inputs, targets)

    def naive_step(self, T: int) -> Callable[[], None]:
        """T separate head modules; one ``autograd.grad`` per task w.r.t. the trunk, then summed."""
        template = self.model(T)
        trunk = template.trunk
        heads = nn.ModuleList(template.heads[t] for t in self.task_names(T))  # never fused
        opt = self.optimizer([*trunk.parameters(), *heads.parameters()])
        shared = [p for p in trunk.parameters() if p.requires_grad]
        head_params = list(heads.parameters())
        _, _, targets = self.batch(T)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                features = trunk(self.x)
                losses = [self.tasks[t].masked_loss(head(features), targets[t]) for t, head in zip(self.task_names(T), heads)]
            rows = []
            for loss in losses:
                grads = torch.autograd.grad(loss, shared, retain_graph=True)
                rows.append(torch.cat([g.flatten() for g in grads]))
            combined = torch.stack(rows).sum(dim=0)
            torch.autograd.backward(sum(losses), inputs=head_params)
            offset = 0
            for p in shared:
                p.grad = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            opt.step()

        return step

    def time(self, build: Callable[[], Callable[[], None]]) -> tuple[float, float | None]:
        """(median ms/step, peak MiB on CUDA) of the step that ``build`` returns."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        step = build()
        for _ in range(self.args.warmup):
            step()
        times = []
        for _ in range(self.args.repeats):
            self.sync()
            start = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None
        return statistics.median(times) * 1000.0, peak

    def warm_up(self) -> None:
        """Untimed single-task steps first, so that the process's one-off costs (thread pools,
        allocator growth, kernel selection) do not land on the reference row."""
        step = self.single_step()
        for _ in range(max(self.args.warmup, 1) + 1):
            step()
        self.sync()
        del step
        self.cleanup()

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def plan(methods: list[str], tasks: list[int], gramian: str = "staged") -> list[tuple[str, str, int]]:
    """(method, mode, T) of every row after the single-task one, the naive loop first at each T."""
    paths = {"staged": [""], "jacobian": [JACOBIAN], "both": ["", JACOBIAN]}[gramian]
    rows = []
    for T in tasks:
        if NAIVE in methods:
            rows.append((NAIVE, "loop", T))
        for name in methods:
            if name == NAIVE:
                continue
            cls = WEIGHTINGS.get(name)
            if isinstance(cls, type) and issubclass(cls, GradientWeighting):
                modes = [cls.modes[0]] + (["representation"] if "representation" in cls.modes[1:] else [])
                for mode in modes:
                    staged = issubclass(cls, GramianWeighting) and mode != "representation"
                    rows += [(name, mode + path, T) for path in (paths if staged else [""])]
            else:
                rows.append((name, "loss", T))
    return rows


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


COLUMNS = f"{'method':<12} {'mode':<14} {'T':>3} {'ms/step':>10} {'x single':>9} {'x naive':>8} {'peak MiB':>9}"


def _fmt(value: float | None, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def format_row(row: Row) -> str:
    line = (
        f"{row.method:<12} {row.mode:<14} {row.tasks:>3} {_fmt(row.ms, '.1f', 10)} "
        f"{_fmt(row.ratio_single, '.2f', 9)} {_fmt(row.ratio_naive, '.2f', 8)} {_fmt(row.peak_mib, '.0f', 9)}"
    )
    return f"{line}  ERROR {row.error}" if row.error else line


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table as rows finish; return the rows as dicts."""
    args = parse_args(argv)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _run(args: argparse.Namespace) -> list[dict]:
    bench = Bench(args)
    device_name = torch.cuda.get_device_name(bench.device) if args.device == "cuda" else _cpu_name()
    print(
        f"mtl.bench.step: ResNet-18 (small_input) + T linear heads, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.dtype}{', channels_last' if args.channels_last else ''}, {args.device} ({device_name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warmup",
        flush=True,
    )
    load_before = _load()
    if args.device == "cpu" and load_before is not None:
        # Other processes on the cores slow CPU steps several-fold: read the table with this.
        print(f"1-min load average before the run: {load_before:.2f} on {os.cpu_count()} CPUs")
    print(COLUMNS)
    print("-" * len(COLUMNS), flush=True)
    try:
        bench.warm_up()
    except Exception as e:  # the single row below reports it
        print(f"warm-up failed: {_error(e)}", flush=True)
    rows: list[Row] = []
    single: float | None = None
    naive: dict[int, float] = {}
    for method, mode, T in [(SINGLE, "-", 1), *plan(args.methods, args.tasks, args.gramian)]:
        row = Row(method, mode, T)
        try:
            if method == SINGLE:
                build = bench.single_step
            elif method == NAIVE:
                build = lambda T=T: bench.naive_step(T)  # noqa: E731
            else:
                build = lambda m=method, mo=mode, T=T: bench.trainer_step(m, mo, T)  # noqa: E731
            row.ms, row.peak_mib = bench.time(build)
            if not math.isfinite(row.ms):
                raise RuntimeError(f"non-finite time {row.ms}")
        except Exception as e:  # a failing method is reported in its row; the run goes on
            row.ms, row.error = None, _error(e)
            if bench.device.type == "cuda":
                row.peak_mib = torch.cuda.max_memory_allocated(bench.device) / 2**20
        finally:
            bench.cleanup()
        if row.ms is not None:
            if method == SINGLE:
                single = row.ms
            elif method == NAIVE:
                naive[T] = row.ms
            row.ratio_single = row.ms / single if single else None
            if mode not in ("-", "loss", "loop") and T in naive:
                row.ratio_naive = row.ms / naive[T]
        rows.append(row)
        print(format_row(row), flush=True)
    load_after = _load()
    if args.device == "cpu" and load_after is not None:
        print(f"1-min load average after the run: {load_after:.2f}")
    result = [asdict(r) for r in rows]
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        meta = {"device_name": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(), "load_before": load_before, "load_after": load_after}
        with open(args.out, "w") as f:
            json.dump({"settings": {**settings, **meta}, "rows": result}, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
