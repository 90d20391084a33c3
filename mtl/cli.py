"""The ``mtl`` command: train, validate, list."""

from __future__ import annotations

import argparse
import os
import sys

import yaml
from typing import Sequence

from mtl.config import ConfigError, load_config
from mtl.listing import KINDS
from mtl.registry import ComponentError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtl", description="Transfer and multi-task learning experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    commands = (
        ("train", "train the tasks of CONFIG jointly"),
        ("compare", "single-task vs sequential transfer vs joint training: the grid of CONFIG's compare node"),
        ("validate", "check CONFIG and its data without training"),
    )
    for name, help_ in commands:
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
        c.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), ~key deletes a key")
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
    print(f"run directory: {cfg.output_dir} (results.json, metrics.jsonl, config.yaml, checkpoints/, trunk.pt)")
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


def cmd_validate(config: str, overrides: Sequence[str]) -> int:
    from mtl.trainer import Trainer

    cfg = load_config(config, list(overrides))
    trainer = Trainer(cfg)  # builds and checks everything, writes nothing
    print(f"{config}: OK")
    for name, task in trainer.tasks.items():
        sizes = ", ".join(f"{split} {len(ds)}" for split, ds in trainer.splits[name].items())
        print(f"  task {name}: {type(task).__name__}, {sizes}; head {type(trainer.model.heads[name]).__name__}")
    params = trainer.parameters
    print(f"  trunk {type(trainer.model.trunk).__name__}; recipe {cfg.recipe.name}: {params['trainable']:,} of {params['total']:,} parameters train")
    print(f"  {cfg.trainer.epochs} epochs of {trainer.steps_per_epoch} steps")
    if "compare" in (yaml.safe_load(open(config)) or {}):
        from mtl.compare import Grid

        grid = Grid(cfg)
        grid.preflight()
        print(f"  compare: {len(grid.cells)} cells; every distinct stage builds")
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
    args = _parser().parse_args(argv)
    # Import paths in a config (my_tasks:MyTask) resolve from the working directory, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args.command == "list":
        try:
            return cmd_list(args.kind, args.name)
        except (ConfigError, ComponentError) as e:
            print(f"mtl: error: {e}", file=sys.stderr)
            return 2
    # Imported here, not at the top: `mtl list` answers without importing torch.
    from mtl import distributed
    from mtl.engine import NonFiniteError

    try:
        if args.command == "train":
            return cmd_train(args.config, args.overrides)
        if args.command == "compare":
            return cmd_compare(args.config, args.overrides)
        return cmd_validate(args.config, args.overrides)
    except ConfigError as e:
        print(f"mtl: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"mtl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"mtl: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
