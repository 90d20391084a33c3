"""`mtl train` against a plain PyTorch loop of the same model, data and steps: the framework's overhead.

    python -m mtl.bench.overhead                     # configs/quickstart.yaml, 5 repeats
    python -m mtl.bench.overhead --repeats 9 --threads 1

Both sides train the quickstart's model (the trunk and heads the Trainer built, the plain
loop on a copy of their initial weights) on the same tensors, with the same batch size per
task, Adam learning rate, warmup + cosine schedule and number of steps, evaluate the
validation split after each epoch, keep the best epoch's weights by mean validation
accuracy, and at the end evaluate that model on train/val/test:

- ``mtl``: ``Trainer(cfg).fit()``, logging and checkpointing at the config's settings
  (metrics.jsonl, the progress bar, W&B in the config's mode, a step checkpoint and
  best.pt on disk each epoch, written on the trainer's background thread and waited for
  before ``fit`` returns, results.json, trunk.pt), every check it makes included
  (the finiteness check of every step, the masked losses, torchmetrics' accuracy and F1);
- ``plain``: the loop of ``plain_loop`` below, what one writes by hand: shuffled batches by
  indexing a permutation, one forward of both tasks' inputs, the summed cross-entropies,
  ``backward``, ``step``, a ``loss.item()`` every ``log_every`` steps, argmax accuracy,
  the best weights copied in memory.

One-time start-up is timed apart, not in the ratio: building the Trainer (config checks,
data, model) and, inside ``fit``, opening the run (run directory, config.yaml, the W&B
run's start) and closing the loggers (W&B's finish). Imports happen before anything is
timed. The two sides alternate, ``--repeats`` times each after one untimed round;
``ratio`` is the median wall time of ``mtl`` over that of ``plain``, measured in one run,
``paired ratio`` the median over rounds of each round's own ratio (both sides ran back to
back, so a slow drift of the machine's load cancels), and ``cpu ratio`` the same of this process's CPU time, which another process's load
hardly changes but which misses time spent waiting (an fsync of a checkpoint, say).
Wall times are only as good as the machine is idle; on a shared machine, ``--threads 1``
is steadier.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mtl.config import load_config
from mtl.trainer import Trainer

QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")


def _clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): the CPU time hardly depends on other processes' load."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


class TimedTrainer(Trainer):
    """The Trainer, with the one-time parts of ``fit`` timed (wall, CPU): opening the run
    (W&B's start among them) and closing its loggers (W&B's finish)."""

    def _open_run(self) -> None:
        start = _clock()
        super()._open_run()
        self.one_time = list(_since(start))
        close = self.loggers.close

        def timed_close(*args: Any) -> None:
            start = _clock()
            close(*args)
            self.one_time = [a + b for a, b in zip(self.one_time, _since(start))]

        self.loggers.close = timed_close  # type: ignore[method-assign]


def _cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))

    return factor


@torch.no_grad()
def _accuracy(model: torch.nn.Module, task: str, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        out = model.heads[task](model.trunk(x[i : i + batch].to(device)))
        correct += int((out.argmax(1) == y[i : i + batch].to(device)).sum())
    return correct / len(x)


def plain_loop(model: torch.nn.Module, data: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], settings: dict[str, Any]) -> dict[str, Any]:
    """Train ``model`` (``.trunk``, ``.heads[task]``) on ``data[split][task] = (x, y)`` as a plain script would."""
    device, batch_size, epochs, steps = settings["device"], settings["batch_size"], settings["epochs"], settings["steps_per_epoch"]
    tasks = list(data["train"])
    train = {t: tuple(v.to(device) for v in data["train"][t]) for t in tasks}
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(settings["warmup_steps"], epochs * steps))
    generator = torch.Generator().manual_seed(settings["seed"])
    batches = {t: iter(()) for t in tasks}

    def next_batch(task: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = train[task]
        idx = next(batches[task], None)
        if idx is None:  # a new pass over the task's data, freshly shuffled; the last partial batch dropped
            size = min(batch_size, len(x))
            batches[task] = iter(torch.randperm(len(x), generator=generator).to(device)[: len(x) // size * size].split(size))
            idx = next(batches[task])
        return x[idx], y[idx]

    logged, best, best_state = [], -math.inf, None
    for epoch in range(epochs):
        model.train()
        for step in range(epoch * steps, (epoch + 1) * steps):
            xs, ys = zip(*(next_batch(t) for t in tasks))
            features = model.trunk(torch.cat(xs)).split([len(x) for x in xs])
            loss = sum(F.cross_entropy(model.heads[t](f), y) for t, f, y in zip(tasks, features, ys))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if (step + 1) % settings["log_every"] == 0:
                logged.append(loss.item())
        model.eval()
        score = statistics.mean(_accuracy(model, t, *data["val"][t], settings["eval_batch_size"], device) for t in tasks)
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    accuracy = {s: {t: _accuracy(model, t, *data[s][t], settings["eval_batch_size"], device) for t in tasks} for s in data}
    return {"accuracy": accuracy, "logged_losses": logged}


def _non_default(node, registry: str, free: set[str]) -> list[str]:
    """Arguments of a resolved component node (which holds every default) other than ``free``
    that differ from the component's defaults: the plain loop uses the defaults."""
    from mtl.config import to_dict
    from mtl.registry import effective_kwargs, import_path

    given = to_dict(node)
    defaults = effective_kwargs(import_path(registry).get(given.pop("name")), {}, skip=1)
    return [key for key, value in given.items() if key not in free and defaults.get(key) != value]


def _check_plain_equivalent(cfg) -> None:
    """The plain loop is written for the quickstart's kind of job; refuse a config it does not match."""
    t = cfg.trainer
    expected = {
        "weighting": (cfg.weighting.name, "equal"), "scheduler": (cfg.scheduler.name, "all"),
        "recipe": (cfg.recipe.name, "fine_tune"), "trainer.optimizer": (t.optimizer.name, "adam"),
        "trainer.lr_schedule": (t.lr_schedule.name, "cosine"), "trainer.precision": (t.precision, "fp32"),
    }
    wrong = [f"{key}={got} (needs {want})" for key, (got, want) in expected.items() if got != want]
    changed = _non_default(t.optimizer, "mtl.optim:OPTIMIZERS", {"lr"}) + _non_default(t.lr_schedule, "mtl.optim:LR_SCHEDULES", {"warmup_steps"})
    if changed or t.steps_per_epoch is None or t.grad_clip:
        wrong.append("only optimizer.lr, lr_schedule.warmup_steps and a fixed trainer.steps_per_epoch, no grad_clip")
    if wrong:
        raise SystemExit(f"mtl.bench.overhead: the plain loop does not match this config: {'; '.join(wrong)}")


def _run_mtl(cfg_path: str, overrides: list[str], out: str) -> dict[str, float]:
    start = _clock()
    trainer = TimedTrainer(load_config(cfg_path, [*overrides, f"output_dir={out}"]))
    setup = _since(start)
    start = _clock()
    trainer.fit()
    wall, cpu = _since(start)
    return {"setup_s": setup[0], "run_s": wall - trainer.one_time[0], "cpu_s": cpu - trainer.one_time[1], "open_close_s": trainer.one_time[0]}


def _plain_inputs(cfg_path: str, overrides: list[str], out: str) -> tuple[torch.nn.Module, dict, dict[str, Any]]:
    """The Trainer's model (initial weights) and tensors: both sides start from the same state."""
    cfg = load_config(cfg_path, [*overrides, f"output_dir={out}"])
    _check_plain_equivalent(cfg)
    trainer = Trainer(cfg)
    data = {s: {t: tuple(getattr(sp, s).tensors) for t, sp in trainer.splits.items()} for s in ("train", "val", "test")}
    t = cfg.trainer
    settings = {
        "device": trainer.device, "batch_size": t.batch_size, "epochs": t.epochs, "steps_per_epoch": t.steps_per_epoch,
        "lr": t.optimizer.lr, "warmup_steps": t.lr_schedule.get("warmup_steps", 0), "seed": cfg.seed,
        "log_every": cfg.logging.log_every, "eval_batch_size": t.eval_batch_size,
    }
    return copy.deepcopy(trainer.model), data, settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m mtl.bench.overhead", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=QUICKSTART)
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side (after one untimed warm-up of each)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.epochs=2 logging.wandb.mode=disabled")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1 (the first round of each side is an untimed warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    mtl_runs, plain_runs = [], []
    with tempfile.TemporaryDirectory(prefix="mtl-overhead-") as tmp:
        for i in range(args.repeats + 1):
            # Alternate which side goes first, so a drift in the machine's load hits both alike.
            order = ("mtl", "plain") if i % 2 == 0 else ("plain", "mtl")
            for side in order:
                out = os.path.join(tmp, f"{side}-{i}")
                if side == "mtl":
                    result = _run_mtl(args.config, args.overrides, out)
                else:
                    start = _clock()
                    model, data, settings = _plain_inputs(args.config, args.overrides, out)
                    setup = _since(start)
                    start = _clock()
                    plain_loop(model, data, settings)
                    wall, cpu = _since(start)
                    result = {"setup_s": setup[0], "run_s": wall, "cpu_s": cpu}
                if i:  # the first round warms caches and allocators up
                    (mtl_runs if side == "mtl" else plain_runs).append(result)

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "steps": settings["epochs"] * settings["steps_per_epoch"],
        "mtl_s": median(mtl_runs, "run_s"),
        "plain_s": median(plain_runs, "run_s"),
        "mtl_cpu_s": median(mtl_runs, "cpu_s"),
        "plain_cpu_s": median(plain_runs, "cpu_s"),
        "mtl_runs_s": [r["run_s"] for r in mtl_runs],
        "plain_runs_s": [r["run_s"] for r in plain_runs],
        "mtl_setup_s": median(mtl_runs, "setup_s"),
        "mtl_open_close_s": median(mtl_runs, "open_close_s"),
        "plain_setup_s": median(plain_runs, "setup_s"),
    }
    summary["ratio"] = summary["mtl_s"] / summary["plain_s"]
    # Each round ran both sides back to back: its own ratio cancels a drift of the machine's load between rounds.
    summary["paired_ratio"] = statistics.median(m["run_s"] / p["run_s"] for m, p in zip(mtl_runs, plain_runs))
    summary["cpu_ratio"] = summary["mtl_cpu_s"] / summary["plain_cpu_s"]
    steps, mtl_s, plain_s = summary["steps"], summary["mtl_s"], summary["plain_s"]
    print(f"{Path(args.config).name} {' '.join(args.overrides)}: {steps} steps, {args.repeats} repeats, {summary['threads']} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"  mtl train loop  {mtl_s:8.3f} s  ({1e3 * mtl_s / steps:.1f} ms/step; runs {', '.join(f'{v:.2f}' for v in summary['mtl_runs_s'])})")
    print(f"  plain loop      {plain_s:8.3f} s  ({1e3 * plain_s / steps:.1f} ms/step; runs {', '.join(f'{v:.2f}' for v in summary['plain_runs_s'])})")
    print(f"  ratio           {summary['ratio']:8.3f}  (median mtl / median plain, wall clock)")
    print(f"  paired ratio    {summary['paired_ratio']:8.3f}  (median over rounds of mtl / plain within the round)")
    print(f"  cpu ratio       {summary['cpu_ratio']:8.3f}  (the same of this process's CPU time: {summary['mtl_cpu_s']:.3f} / {summary['plain_cpu_s']:.3f} s; "
          "steadier on a busy machine, blind to time spent waiting, e.g. on fsync)")
    print(f"  one-time, not in the ratio: Trainer() {summary['mtl_setup_s']:.2f} s, run open + loggers close (W&B start/finish) "
          f"{summary['mtl_open_close_s']:.2f} s; plain setup (a Trainer built for its data and model) {summary['plain_setup_s']:.2f} s")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
