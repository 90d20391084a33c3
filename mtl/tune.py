"""Fair tuning for `mtl compare` (``compare.tune``): every method gets the same search.

Rankings of multi-task methods change when the baseline is tuned as carefully as the
methods (Kurin et al. 2022, "In Defense of the Unitary Scalarization"; Xin et al. 2022, "Do
Current Multi-Task Optimization Methods in Deep Learning Even Help?"), so a comparison tunes
every method with one budget:

- ``grid``: dotted config keys to lists of values, searched for every method (e.g.
  ``trainer.optimizer.lr: [0.001, 0.003]``);
- ``extra``: a method's own hyper-parameters, ``{method: {key: [values]}}``, added to the
  grid of that method only; a method is named as in the report's tables (``joint``,
  ``sequential/lp_ft``) or by its regime's label (all of that regime's recipes);
- ``seeds``: N tuning seeds, ``TUNE_SEED``, ``TUNE_SEED + 1``, ...: never an evaluation
  seed, so the comparison's paired differences come from runs the selection never saw.

The product of a method's grid is searched separately for each method at each labelled
fraction (and each task of single-task), on the last stage of its cells (the stage whose
model is evaluated; a sequential source stage is shared and never tuned). The selected point
has the best validation primary metric (the stage's tasks' primary metrics, signed so that
higher is better, averaged as ``select_on: primary_mean`` does), averaged over the tuning
seeds; the test split is never read. The evaluation cells then run with the selected values,
and ``tune.json`` (read by the report) keeps every point's score and the runs each method got.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import replace
from typing import Any

import numpy as np
from omegaconf import DictConfig

from mtl.config import ConfigError, to_dict
from mtl.registry import did_you_mean

TUNE_SEED = 10_000


def tuning_seeds(cfg: DictConfig) -> list[int]:
    return [TUNE_SEED + i for i in range(int(cfg.compare.tune.get("seeds", 1)))]


def point_name(values: dict[str, Any]) -> str:
    """A grid point as a folder name: ``trainer.optimizer.lr=0.001,weighting.gamma=0.01``."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(f"{k}={v}" for k, v in values.items()))


def leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a resolved config whose value is a single value (or null): what a
    grid can set."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in leaf_keys(value, f"{prefix}{key}.")]
    return [] if isinstance(node, list) else [prefix.rstrip(".")]


def validation_score(results: dict[str, Any]) -> float:
    """Mean over the run's tasks of the primary validation metric, negated where lower is
    better (higher is better); NaN when no task has a finite value."""
    values = []
    for task, info in results["tasks"].items():
        metric = info["primary_metric"]
        value = results["splits"]["val"][task][metric]
        if value is not None and math.isfinite(value):
            values.append(value if info["directions"][metric] == "max" else -value)
    return float(np.mean(values)) if values else math.nan


class Tuning:
    """The tuning cells of a grid (``compare.Grid``), their checks, and the selection."""

    def __init__(self, grid) -> None:
        self.grid = grid
        node = to_dict(grid.cfg)["compare"]["tune"]
        self.common = dict(node.get("grid") or {})
        self.extra = {m: dict(g or {}) for m, g in (node.get("extra") or {}).items()}
        self.seeds = tuning_seeds(grid.cfg)
        clash = sorted(set(self.seeds) & set(grid.seeds))
        if clash:
            raise ConfigError(f"compare.seeds: seed {clash[0]} is also a tuning seed (compare.tune uses {self.seeds[0]} to "
                              f"{self.seeds[-1]}); evaluation seeds must be ones the tuning never saw: use seeds below {TUNE_SEED}.")
        names = {c.label for c in grid.cells} | {c.regime for c in grid.cells}
        for method in self.extra:
            if method not in names:
                raise ConfigError(f"compare.tune.extra.{method}: no method of that name.{did_you_mean(str(method), names)} "
                                  f"Methods: {', '.join(sorted(names))}.")
        # One unit per method, fraction (and single-task task): the cells of the first seed.
        self.units = [c for c in grid.cells if c.seed == grid.seeds[0]]
        self.cells = []
        for unit in self.units:
            if not self.method_grid(unit):  # only other methods declared a grid: nothing to search
                continue
            for values in self.points(unit):
                for seed in self.seeds:
                    cell = replace(unit, seed=seed, tuned=values, point=point_name(values), dirs=[])
                    cell.dirs = grid._dirs(cell)
                    self.cells.append(cell)

    def method_grid(self, cell) -> dict[str, list]:
        """The grid every method searches, then the regime's and the method's extra grids."""
        return {**self.common, **self.extra.get(cell.regime, {}), **self.extra.get(cell.label, {})}

    def points(self, cell) -> list[dict[str, Any]]:
        grid = self.method_grid(cell)
        return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]

    def _where(self, cell, key: str) -> str:
        for method in (cell.label, cell.regime):
            if key in self.extra.get(method, {}):
                return f"compare.tune.extra.{method}.{key}"
        return f"compare.tune.grid.{key}"

    def check(self) -> None:
        """Before any training: every key names a single value of each method's config, and every
        point resolves (types, ranges) in the stage it sets."""
        from mtl.compare import stage_config

        grid = self.grid
        for unit in self.units:
            last = len(unit.stages) - 1
            keys = set(leaf_keys(to_dict(stage_config(grid.cfg, unit, last, unit.dirs[-1], {}, grid.targets))))
            for key in self.method_grid(unit):
                if key not in keys:
                    raise ConfigError(
                        f"{self._where(unit, key)}: not a key of {unit.label}'s config (stage {unit.stages[last].name!r}).{did_you_mean(key, keys)} "
                        "A tune key is a dotted config path to a single value, e.g. trainer.optimizer.lr (see the stage's config.yaml)."
                    )
        for cell in self.cells:
            if cell.seed != self.seeds[0]:
                continue
            try:
                stage_config(grid.cfg, cell, len(cell.stages) - 1, cell.dirs[-1], {}, grid.targets)
            except ConfigError as e:
                raise ConfigError(f"compare.tune ({cell.label}, {cell.point}): {e}") from None

    def select(self) -> list[dict[str, Any]]:
        """Per unit, the point with the best validation score averaged over the tuning seeds
        (the first of the grid on a tie); sets it on the grid's evaluation cells and returns
        the records of ``tune.json``."""
        records = []
        for unit in self.units:
            if not self.method_grid(unit):
                records.append({"method": unit.label, "variant": unit.variant, "fraction": unit.fraction, "selected": {},
                                "validation": None, "runs": 0, "points": []})
                continue
            scored = []
            for values in self.points(unit):
                cells = [c for c in self.cells if c.point == point_name(values) and (c.label, c.variant, c.fraction) == (unit.label, unit.variant, unit.fraction)]
                per_seed = [validation_score(json.loads((c.dirs[-1] / "results.json").read_text())) for c in cells]
                scored.append({"values": values, "validation": float(np.mean(per_seed)), "per_seed": per_seed})
            finite = [s["validation"] for s in scored if math.isfinite(s["validation"])]
            if not finite:
                raise ConfigError(f"compare.tune: no point of {unit.label} at fraction {unit.fraction:g} has a finite validation "
                                  "score (a validation split without labels?); see the runs under tune/.")
            best = next(s for s in scored if s["validation"] == max(finite))
            for cell in self.grid.cells:
                if (cell.label, cell.variant, cell.fraction) == (unit.label, unit.variant, unit.fraction):
                    cell.tuned = dict(best["values"])
            records.append({"method": unit.label, "variant": unit.variant, "fraction": unit.fraction, "selected": best["values"],
                            "validation": best["validation"], "runs": len(scored) * len(self.seeds), "points": scored})
        return records

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"seeds": self.seeds, "grid": self.common, "extra": self.extra,
                "selected_on": "validation: primary metric, mean over the last stage's tasks and the tuning seeds",
                "units": records}
