"""Time the trainer's step of every registered architecture, and measure its peak memory and
parameters, against hard sharing on the same trunk, at each number of tasks T:

    python -m mtl.bench.architectures --trunk seed_net
    # = --tasks 2 10 40 --batch 64 --repeats 5 --weighting equal --threads 0 (torch's default)

Every task has a 10-class linear head on one shared input batch. A row times the step that
``Trainer`` runs (``mtl.step.build_step``: zero_grad, forward, the T losses, the weighting's
backward, the optimizer step), SGD with momentum. After one untimed step, ms is the median of
``--repeats`` timed steps (``time.perf_counter``, synchronised on CUDA); untimed steps of hard
sharing warm the process up first. ``peak MiB`` is the
memory the step allocates beyond what the model already holds: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps minus the memory before them; on the
CPU the running peak of the step's allocations as ``torch.profiler`` records them
(``profile_memory``), from one more step. ``architecture.batched`` rows (``--loop``) add the
trunk copies forced to one vmap call per stage and to a Python loop, where an architecture offers both.
A row that raises prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time

import torch

from mtl.architectures import ARCHITECTURES
from mtl.distributed import Context
from mtl.heads import LinearHead
from mtl.recipes import RECIPES
from mtl.step import build_step
from mtl.task import ClassificationTask
from mtl.trunks import build_trunk
from mtl.weighting import WEIGHTINGS

INPUTS = {"seed_net": (1, 28, 28), "multi_lenet": (1, 28, 28), "resnet18": (3, 32, 32)}
CLASSES = 10


def rows(loop: bool) -> list[tuple[str, dict]]:
    """(architecture, arguments) of every row, hard sharing first, each at its defaults; with
    ``loop``, the architectures that take ``batched`` twice instead: forced to vmap, and to the
    loop (their default picks one of the two by device)."""
    names = ["hard", *[n for n in ARCHITECTURES.names() if n != "hard"]]
    out = []
    for name in names:
        if loop and "batched" in inspect.signature(ARCHITECTURES.get(name)).parameters:
            out += [(f"{name} vmap", {"batched": True}), (f"{name} loop", {"batched": False})]
        else:
            out.append((name, {}))
    return out


def build_row(name: str, arguments: dict, args: argparse.Namespace, tasks: int, device: torch.device):
    """The model and the trainer's step of one row, from the same seed for every row at T."""
    torch.manual_seed(0)
    node = {"name": args.trunk}
    first = build_trunk(node)
    shape = first.feature_shape(INPUTS[args.trunk])
    names = [f"t{i}" for i in range(tasks)]
    heads = {t: LinearHead(shape, CLASSES) for t in names}
    model = ARCHITECTURES.get(name.split()[0])(first, heads, lambda: build_trunk(node), **arguments).to(device).train()
    weighting = WEIGHTINGS.get(args.weighting)(names).to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *weighting.parameters()], lr=1e-3, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = build_step(model, {t: ClassificationTask(CLASSES) for t in names}, {"x": names}, weighting, optimizer, schedule,
                      RECIPES.get("fine_tune")(), Context(), device)
    return model, step


def timed(step, inputs, targets, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median ms, peak MiB beyond the memory held before the step)."""
    cuda = device.type == "cuda"
    step.step(inputs, targets)
    if cuda:
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step.step(inputs, targets)
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    peak = (torch.cuda.max_memory_allocated(device) - held) / 2**20 if cuda else cpu_peak(lambda: step.step(inputs, targets))
    return statistics.median(times), peak


def cpu_peak(fn) -> float:
    """MiB: the highest running sum of the allocations and frees ``fn`` makes, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def warm_up(args: argparse.Namespace, device: torch.device) -> None:
    """Untimed steps of hard sharing first, so that the process's one-off costs (thread pools,
    allocator growth) do not land on the reference row."""
    _, step = build_row("hard", {}, args, 2, device)
    inputs = {"x": torch.randn(args.batch, *INPUTS[args.trunk], device=device)}
    targets = {t: torch.zeros(args.batch, dtype=torch.long, device=device) for t in ("t0", "t1")}
    for _ in range(3):
        step.step(inputs, targets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trunk", default="seed_net", choices=sorted(INPUTS))
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weighting", default="equal", help="any registered weighting (its default mode)")
    parser.add_argument("--architectures", nargs="+", default=None, help="a subset of the registered ones (hard is always timed)")
    parser.add_argument("--loop", action="store_true", help="also time the loop over trunk copies where an architecture offers it")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chosen = rows(args.loop)
    if args.architectures:
        unknown = sorted(set(args.architectures) - set(ARCHITECTURES.names()))
        if unknown:
            parser.error(f"unknown architecture(s) {', '.join(unknown)}; registered: {', '.join(ARCHITECTURES.names())}.")
        chosen = [r for r in chosen if r[0] == "hard" or r[0].split()[0] in args.architectures]
    print(f"{args.trunk}, batch {args.batch}, weighting {args.weighting}, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'T':>3}  {'architecture':<18} {'params':>11} {'x hard':>7} {'ms':>9} {'x hard':>7} {'peak MiB':>9} {'x hard':>7}")
    warm_up(args, device)
    for tasks in args.tasks:
        gen = torch.Generator().manual_seed(0)
        inputs = {"x": torch.randn(args.batch, *INPUTS[args.trunk], generator=gen).to(device)}
        targets = {f"t{i}": torch.randint(0, CLASSES, (args.batch,), generator=gen).to(device) for i in range(tasks)}
        base = None
        for name, arguments in chosen:
            try:
                model, step = build_row(name, arguments, args, tasks, device)
                params = sum(p.numel() for p in model.parameters())
                ms, peak = timed(step, inputs, targets, args.repeats, device)
            except Exception as e:  # a row that cannot run (out of memory, a trunk it refuses) is reported, not fatal
                print(f"{tasks:>3}  {name:<18} failed: {type(e).__name__}: {e}")
                continue
            if base is None and name != "hard":
                print(f"{tasks:>3}  the hard-sharing row failed: no ratios at this T")
                base = (math.nan,) * 3
            base = base or (params, ms, peak)
            print(f"{tasks:>3}  {name:<18} {params:>11,} {params / base[0]:>7.2f} {ms:>9.1f} {ms / base[1]:>7.2f} "
                  f"{peak:>9.1f} {peak / base[2] if base[2] else math.nan:>7.2f}")
            del model, step


if __name__ == "__main__":
    main()
