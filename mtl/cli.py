"""The ``mtl`` command: train, compare, validate, rank, group, list."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from mtl.config import ConfigError, load_config, read_yaml
from mtl.listing import KINDS
from mtl.registry import ComponentError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtl", description="Transfer and multi-task learning experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    commands = (
        ("train", "train the tasks of CONFIG jointly"),
        ("compare", "single-task vs sequential transfer vs joint training: the grid of CONFIG's compare node"),
        ("validate", "check CONFIG and its data without training"),
        ("rank", "transferability scores of CONFIG's rank.candidates for each target task, from one forward pass (no training)"),
    )
    for name, help_ in commands:
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
        c.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), ~key deletes a key")
        if name == "validate":
            c.add_argument(
                "--for", dest="judge", choices=("train", "compare", "rank"), default=None,
                help="judge what `mtl train`, `mtl compare` or `mtl rank` would run; default: train, and compare and rank "
                "where the config has their node",
            )
    g = sub.add_parser("group", help="task affinity (TAG) from one joint run of CONFIG's tasks, and the groupings it proposes")
    g.add_argument("config", help="YAML config, e.g. configs/group_quickstart.yaml")
    g.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), ~key deletes a key")
    g.add_argument("--every", type=int, default=10, help="measure the affinity every k steps (default 10; 1: every step)")
    g.add_argument("--groups", type=int, default=None, help="propose groupings of at most 1, ..., G groups (default: one per task)")
    g.add_argument("--steps", type=int, default=None,
                   help="train one epoch of N steps, i.e. trainer.epochs=1 trainer.steps_per_epoch=N (default: the config's epochs)")
    ls = sub.add_parser("list", help="what is registered; with NAME, its docstring and config arguments")
    ls.add_argument("kind", choices=sorted(KINDS))
    ls.add_argument("name", nargs="?", help="one component, e.g. `mtl list weightings pcgrad`")
    return p


def cmd_train(config: str, overrides: Sequence[str]) -> int:
    from mtl import distributed
    from mtl.results import format_table
    from mtl.trainer import Trainer

    cfg = load_config(config, list(overrides))
    results = Trainer(cfg).fit()
    if not distributed.current().is_main:
        return 0  # rank 0 prints for every process under torchrun
    print(format_table(results))
    print(f"\nbest epoch {results['best_epoch']} ({results['selected_on']}); test metrics are of that model.")
    trunk = ", trunk.pt" if (Path(cfg.output_dir) / "trunk.pt").exists() else ""  # architectures of one trunk write it
    print(f"run directory: {cfg.output_dir} (results.json, metrics.jsonl, config.yaml, checkpoints/{trunk})")
    return 0


def cmd_compare(config: str, overrides: Sequence[str]) -> int:
    from mtl import distributed
    from mtl.compare import run_compare

    cfg = load_config(config, list(overrides))
    out = run_compare(cfg)
    if not distributed.current().is_main:
        return 0
    print()
    print(out["table"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\n{out['cells']} cells; model selection on validation only. Report: {out['report']} (plots beside it); long-form results: {out['csv']}")
    return 0


def cmd_rank(config: str, overrides: Sequence[str]) -> int:
    from mtl.rank import load, rank

    cfg, node = load(config, list(overrides))
    out = rank(cfg, node)
    print()
    print(out["markdown"])
    extra = f", {out['validation_csv']} (each score against measured transfer)" if "validation_csv" in out else ""
    print(f"written: {out['md']}, {out['csv']} (one row per target, candidate and score){extra}")
    return 0


def cmd_group(config: str, overrides: Sequence[str], every: int, groups: int | None, steps: int | None) -> int:
    from mtl.group import GroupRun, check_arguments

    check_arguments(every, groups, steps)  # before the config and its data are read
    cfg = load_config(config, list(overrides))
    out = GroupRun(cfg, every, groups, steps, command=[config, *overrides]).run()
    print()
    print(out["markdown"])
    print(f"written: {cfg.output_dir}/affinity.csv (per measured step, from -> onto), groups.md, groups.json; "
          "and as by mtl train: results.json, metrics.jsonl, config.yaml, checkpoints/")
    return 0


def _judged(config: str, overrides: Sequence[str], judge: str | None) -> tuple[str, ...]:
    """What validate checks: the commands named by --for, else both when the config (or an
    override) has a compare node, else what `mtl train` runs."""
    if judge:
        return (judge,)
    raw = read_yaml(config)
    written = "compare" in raw or any(o.split("=")[0].split(".")[0] == "compare" for o in overrides)
    commands = ("train", "compare") if written and "~compare" not in overrides else ("train",)
    return commands + (("rank",) if "rank" in raw and "~rank" not in overrides else ())


def cmd_validate(config: str, overrides: Sequence[str], judge: str | None = None) -> int:
    from mtl.trainer import Trainer

    from mtl import rank

    commands = _judged(config, overrides, judge)
    # The rank node is read by `mtl rank` alone: set aside, as `mtl rank` does, before the run config is checked.
    cfg, node = rank.load(config, list(overrides)) if "rank" in read_yaml(config) else (load_config(config, list(overrides)), None)
    print(f"{config}: judged for {' and '.join(f'`mtl {c}`' for c in commands)}"
          f"{'' if judge else ' (--for train, compare or rank judges one)'}")
    if "train" in commands:
        trainer = Trainer(cfg)  # builds and checks everything, writes nothing
        for name, task in trainer.tasks.items():
            sizes = ", ".join(f"{split} {len(ds)}" for split, ds in trainer.splits[name].items())
            print(f"  task {name}: {type(task).__name__}, {sizes}; head {type(trainer.model.heads[name]).__name__}")
        params = trainer.parameters
        print(f"  architecture {cfg.architecture.name}, trunk {cfg.trunk.name}; recipe {cfg.recipe.name}: {params['trainable']:,} of {params['total']:,} parameters train")
        print(f"  {cfg.trainer.epochs} epochs of {trainer.steps_per_epoch} steps")
    if "compare" in commands:
        from mtl.compare import Grid

        try:
            grid = Grid(cfg)
            grid.preflight()
        except ConfigError as e:
            if judge:
                raise
            raise ConfigError(f"{e} (judged for `mtl compare`, as the config has a compare node; `--for train` judges only what `mtl train` runs)") from None
        print(f"  compare: {len(grid.cells)} cells; every distinct stage builds")
    if "rank" in commands:
        s, targets, candidates = rank.prepare(cfg, node)
        print(f"  rank: {len(candidates)} candidates x {len(targets)} targets ({', '.join(t.name for t in targets)}), "
              f"at most {s.max_samples} samples each; every candidate's trunk takes every target's inputs; scores {', '.join(s.scores)}")
    print(f"{config}: OK")
    return 0


def cmd_list(kind: str, name: str | None = None) -> int:
    from mtl import listing

    if name is not None:
        print(listing.explain(kind, name))
        return 0
    rows = listing.summaries(kind)
    width = max((len(n) for n, _ in rows), default=0)
    for key, doc in rows:
        print(f"{key.ljust(width)}  {doc}")
    print(f"\n`mtl list {kind} NAME`: one {kind.rstrip('s')}'s docstring and config arguments.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides after an option (`validate CONFIG --for train a=1`) are left over by argparse.
    if extra and (args.command == "list" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    # Import paths in a config (my_tasks:MyTask) resolve from the working directory, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return _dispatch(args)
    except (ConfigError, ComponentError) as e:
        if _debug():  # the chained cause is the user's own exception (a task method that raised)
            traceback.print_exception(e)
        print(f"mtl: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"mtl: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        if _debug():
            raise
        if _out_of_memory(e):
            print(f"mtl: error: {args.command} ran out of memory ({str(e).strip().splitlines()[0]}). A size in the config "
                  "is too large for this machine: lower the trunk's or heads' widths, trainer.batch_size or "
                  "trainer.eval_batch_size.", file=sys.stderr)
            return 2
        print(_unexpected(args.command, e), file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "list":
        return cmd_list(args.kind, args.name)
    # Imported here, not at the top: `mtl list` answers without importing torch.
    from mtl import distributed
    from mtl.affinity import NonFiniteAffinity
    from mtl.engine import NonFiniteError

    try:
        if args.command == "train":
            return cmd_train(args.config, args.overrides)
        if args.command == "compare":
            return cmd_compare(args.config, args.overrides)
        if args.command == "rank":
            return cmd_rank(args.config, args.overrides)
        if args.command == "group":
            return cmd_group(args.config, args.overrides, args.every, args.groups, args.steps)
        return cmd_validate(args.config, args.overrides, args.judge)
    except (NonFiniteError, NonFiniteAffinity) as e:
        print(f"mtl: error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


def _debug() -> bool:
    return os.environ.get("MTL_DEBUG", "") not in ("", "0")


def _first_line(e: Exception) -> str:
    """A config error is one line; a library's message wrapped into it (torch appends its C++
    stack) is cut to its first line unless MTL_DEBUG is set."""
    lines = str(e).strip().splitlines()
    if len(lines) <= 1 or _debug():
        return str(e).strip()
    return f"{lines[0]} (cut at the first of {len(lines)} lines; MTL_DEBUG=1 prints them all)"


def _out_of_memory(e: Exception) -> bool:
    """A failed allocation is the config's sizes against this machine, not a bug: torch's CPU
    allocator raises a RuntimeError, CUDA an OutOfMemoryError (matched by name: torch is not
    imported at the top of this module)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def _unexpected(command: str, e: Exception) -> str:
    """One line for an error no check foresaw: what failed and where, instead of a page of
    traceback; the traceback is one environment variable away."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (
        f"mtl: error: {command} failed with an unexpected {type(e).__name__}{where}"
        f"{': ' + message if message else ''}. Run with MTL_DEBUG=1 for the full traceback, and please report it."
    )


if __name__ == "__main__":
    sys.exit(main())
