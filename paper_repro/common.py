"""What every study shares: run a `mtl compare` grid, read its long-form results back,
summarize them (mean ± std over seeds; Δm% with the library's one paired function), and write
Markdown tables and the results folder. Formatting, Δm% and statistics are the library's
(``mtl.report``, ``scipy.stats``), imported where used so that importing this module stays
cheap (``paper_repro.index`` reads it without torch).

A study module (``paper_repro.<study>.__main__``) runs its grids with
:func:`run_grid`, then builds its ``results.md`` / ``results.csv`` / figures from the
grids' ``results.csv`` only, so ``--report-only`` regenerates them without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

STUDIES = Path(__file__).resolve().parent
ROOT = STUDIES.parent

# A few optimizer steps, one seed, no W&B: what CI runs to show a study's command works end to end.
SMOKE = [
    "trainer.epochs=1",
    "trainer.steps_per_epoch=2",
    "compare.seeds=[0]",
    "logging.wandb.mode=disabled",
]


def parser(study: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m paper_repro.{study}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few steps, one seed, data CI has: checks the command, not the claim")
    p.add_argument("--runs", type=Path, default=None, help=f"where the grids run (default runs/paper_repro/{study}, or .../{study}_smoke)")
    p.add_argument("--results", type=Path, default=None,
                   help=f"where results.md/csv and figures go (default paper_repro/{study}/results; with --smoke, RUNS/results)")
    p.add_argument("--report-only", action="store_true", help="rebuild the results from the grids' results.csv; train nothing")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the grid(s), as for `mtl compare` (~key deletes)")
    return p


def parse_with_protocol(p: argparse.ArgumentParser, here: Path, protocols: dict[str, str], argv=None) -> argparse.Namespace:
    """``p.parse_args(argv)`` with a ``--protocol`` option: ``protocols`` maps each name to its
    help, the first is the default and writes results/, any other results_<name>/ (unless
    --results is given, or --smoke puts them beside its runs)."""
    default = next(iter(protocols))
    p.add_argument("--protocol", choices=list(protocols), default=default,
                   help="; ".join(f"{name}: {text}" for name, text in protocols.items()))
    args = p.parse_args(argv)
    if args.protocol != default and args.results is None and not args.smoke:
        args.results = here / f"results_{args.protocol}"
    return args


def folders(args: argparse.Namespace, study: str) -> tuple[Path, Path]:
    runs = args.runs or ROOT / "runs" / "paper_repro" / (f"{study}_smoke" if args.smoke else study)
    results = args.results or (runs / "results" if args.smoke else STUDIES / study / "results")
    results.mkdir(parents=True, exist_ok=True)
    return Path(runs), Path(results)


def load(config: str | Path, overrides: Sequence[str] = (), extra: str | Path | None = None):
    """``mtl.config.load_config``, with the YAML file ``extra`` merged over ``config`` first."""
    import yaml
    from omegaconf import OmegaConf

    from mtl.config import load_config, resolve

    if extra is None:
        return load_config(config, list(overrides))
    merged = OmegaConf.merge(*(OmegaConf.create(yaml.safe_load(Path(p).read_text())) for p in (config, extra)))
    return resolve(OmegaConf.to_container(merged), list(overrides))


def run_grid(config: str | Path, overrides: Sequence[str], output_dir: Path, train: bool = True,
             extra: str | Path | None = None, log: Callable = print) -> pd.DataFrame:
    """Run one ``mtl compare`` grid (finished cells are skipped) and return its long-form results;
    with ``train=False``, only gather the results of the cells finished so far."""
    from mtl.compare import Grid, run_compare

    cfg = load(config, [*overrides, f"output_dir={output_dir}"], extra)
    if not train:
        rows = Grid(cfg, log).rows()
        if not rows:
            raise FileNotFoundError(f"{output_dir} holds no finished cell: run the study without --report-only first.")
        return pd.DataFrame(rows)
    start = time.perf_counter()
    log(f"== {Path(config).name} {' '.join(overrides)} -> {output_dir}")
    run_compare(cfg, log=log)
    log(f"== {Path(config).name}: {time.perf_counter() - start:.0f}s")
    return pd.read_csv(output_dir / "results.csv")


def primary_test(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Rows of each task's primary metric on one split."""
    primary = df["primary"].astype(str).str.lower().isin(["true", "1", "1.0"])
    return df[primary & (df["split"] == split)].copy()


def seed_stats(df: pd.DataFrame, by: Sequence[str], split: str = "test") -> pd.DataFrame:
    """Mean, std and count over seeds of the primary metric, per ``by`` (e.g. method, task)."""
    rows = primary_test(df, split)
    return rows.groupby(list(by), sort=False)["value"].agg(["mean", "std", "count"]).reset_index()


def fmt(mean: float, std: float = math.nan, scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` (scaled: accuracies in percent by default); ``n/a`` for NaN: the report's formatting."""
    from mtl.report import format_mean_std

    mean, std = (math.nan if v is None else v * scale for v in (mean, std))
    return format_mean_std(mean, std, digits, signed)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, as the report writes them (any cell value, shown with ``str``)."""
    from mtl.report import markdown_table

    return markdown_table([str(h) for h in header], [[str(c) for c in row] for row in rows])


def write(results: Path, name: str, text: str) -> Path:
    """``results/name``, ending in a newline, written atomically (``mtl.results.write_text``)."""
    from mtl.results import write_text

    path = results / name
    write_text(text if text.endswith("\n") else text + "\n", path)
    return path


def provenance(command: str, wall_s: float | None, smoke: bool) -> str:
    """The generated-file notice every results.md starts with."""
    when = "smoke size (checks the command only; the numbers mean nothing)" if smoke else "full size"
    wall = f"; training wall time {wall_s / 60:.1f} min" if wall_s else ""
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (f"_Generated by `{command}` from the grids' results.csv ({when}{wall}; "
            f"OMP_NUM_THREADS={threads}). Do not edit by hand._")


def delta_m_primary(df: pd.DataFrame, baseline: str = "single_task") -> pd.DataFrame:
    """Δm% of each method against ``baseline`` on the tasks' primary test metrics (metrics:
    primary), paired by seed with ``mtl.report.delta_m_paired``, the one Δm% of reports and
    studies: ``delta_m_pct`` of the seed means, ``delta_m_pct_std`` the std of the per-seed Δm%
    (each seed against the same seed's baseline), ``delta_m_pct_low``/``_high`` its 95% bootstrap
    CI over seeds, ``n_seeds`` the paired seeds. Every method is compared over the tasks all of
    them report."""
    from mtl.report import delta_m_paired

    rows = primary_test(df)
    directions = {(t, m): d for t, m, d in rows[["task", "metric", "direction"]].drop_duplicates().itertuples(index=False)}
    per_seed = rows.groupby(["method", "seed", "task", "metric"])["value"].mean().unstack(["task", "metric"])
    methods = [m for m in pd.unique(rows["method"]) if m != baseline]
    reported = [set(per_seed.loc[m].dropna(axis=1, how="all").columns) for m in [baseline, *methods]]
    keys = [k for k in per_seed.columns if all(k in r for r in reported)]
    out = []
    for method in methods:
        d = delta_m_paired(per_seed.loc[method], per_seed.loc[baseline], directions, keys)
        out.append({"method": method, "delta_m_pct": d.mean, "delta_m_pct_std": d.std, "delta_m_pct_low": d.low,
                    "delta_m_pct_high": d.high, "n_seeds": len(d.seeds)})
    return pd.DataFrame(out, columns=["method", "delta_m_pct", "delta_m_pct_std", "delta_m_pct_low", "delta_m_pct_high", "n_seeds"])


def per_seed(df: pd.DataFrame) -> pd.DataFrame:
    """Seeds × (task, metric) test values of the primary metrics, per method (index: method, seed):
    what the paired comparisons read."""
    rows = primary_test(df)
    return rows.groupby(["method", "seed", "task", "metric"])["value"].mean().unstack(["task", "metric"])


def directions(df: pd.DataFrame) -> dict[tuple[str, str], str]:
    rows = primary_test(df)
    return {(t, m): d for t, m, d in rows[["task", "metric", "direction"]].drop_duplicates().itertuples(index=False)}


def against(values: pd.DataFrame, dirs: dict, baseline: str) -> dict:
    """Δm% (``mtl.report.DeltaM``, paired by seed: ``mtl.report.delta_m_paired``) of every MTL
    method but ``baseline`` against it; single-task is never compared."""
    from mtl.report import delta_m_paired

    methods = values.index.get_level_values("method").unique()
    keys = list(values.columns)
    return {m: delta_m_paired(values.loc[m], values.loc[baseline], dirs, keys)
            for m in methods if m not in (baseline, "single_task") and baseline in methods}


def rank_ci(values: pd.DataFrame, dirs: dict, methods: list[str]) -> pd.DataFrame:
    """Mean rank of the per-task test values among ``methods`` (as Navon et al. 2022 and Liu et
    al. 2023: rank per task, averaged over tasks), here per seed and then averaged over the
    seeds every method has, with a percentile bootstrap 95% CI over seeds (``mtl.stats``)."""
    import numpy as np

    from mtl import stats

    seeds = sorted(set.intersection(*(set(values.loc[m].dropna().index) for m in methods)))
    per_task = [stats.ranks(np.array([values.loc[(m, seeds), key].to_numpy(float) for m in methods]), dirs[key] == "max")
                for key in values.columns]
    r = np.mean(per_task, axis=0)  # methods × seeds
    if len(seeds) < 2:
        return pd.DataFrame({"mean_rank": r.mean(axis=1), "rank_low": np.nan, "rank_high": np.nan}, index=methods)
    low, high = stats.bootstrap_ci(np.mean, (r,))
    return pd.DataFrame({"mean_rank": r.mean(axis=1), "rank_low": low, "rank_high": high}, index=methods)


def left_right_table(df: pd.DataFrame, reference: str, prefix: str) -> tuple[pd.DataFrame, list]:
    """The table of a left/right grid (MultiMNIST, MultiFashion) and the tests behind its verdicts.
    Per method: seeds, each task's mean and std, the per-seed Δm% against single-task
    (``delta_m_pct``) and against ``reference`` (``<prefix>``), each with its bootstrap CI,
    Holm-corrected paired p over all of them and verdict, and the mean rank with its CI."""
    from mtl import stats

    values, dirs = per_seed(df), directions(df)
    wide = seed_stats(df, ["method", "task"]).pivot(index="method", columns="task", values=["mean", "std", "count"])
    single, other = against(values, dirs, "single_task"), against(values, dirs, reference)
    tests = [d.test for d in single.values()] + [d.test for d in other.values()]
    stats.correct(tests)
    out = pd.DataFrame({
        "method": wide.index,
        "n_seeds": wide[("count", "left")].astype(int).values,
        "left_mean": wide[("mean", "left")].values, "left_std": wide[("std", "left")].values,
        "right_mean": wide[("mean", "right")].values, "right_std": wide[("std", "right")].values,
    })
    for name, deltas in (("delta_m_pct", single), (prefix, other)):
        for column, attr in (("", "mean"), ("_low", "low"), ("_high", "high")):
            out[name + column] = out["method"].map({m: getattr(d, attr) for m, d in deltas.items()})
        out[name + "_p_holm"] = out["method"].map({m: d.test.p_holm for m, d in deltas.items()})
        out[name + "_verdict"] = out["method"].map({m: d.test.verdict(m=len(tests)) for m, d in deltas.items()})
    out["delta_m_pct"] = out["delta_m_pct"].where(out["method"] != "single_task", 0.0)
    ranks = rank_ci(values, dirs, [m for m in wide.index if m != "single_task"])
    return out.join(ranks, on="method"), tests


def left_right_findings(t: pd.DataFrame, m: int, prefix: str, reference: str, noun: str) -> list[str]:
    """Sentences of a ``left_right_table`` from its verdicts only: what resolved against
    single-task and against ``reference`` (column ``prefix``), the largest difference from the
    reference, and what the p-values and ranks are."""
    mtl = t[t["method"] != "single_task"]
    lines = []
    for column, baseline in (("delta_m_pct", "single-task"), (prefix, reference)):
        rows = mtl.dropna(subset=[column])  # the reference has no difference from itself
        better = rows[rows[column + "_verdict"] == "better"]["method"].tolist()
        worse = rows[rows[column + "_verdict"] == "worse"]["method"].tolist()
        lines.append(f"- Against {baseline} (Δm%, paired by seed): resolved better: {', '.join(better) or 'none'}; "
                     f"resolved worse: {', '.join(worse) or 'none'}; not resolved (or, with one seed, not tested): "
                     f"{len(rows) - len(better) - len(worse)} of {len(rows)}.")
    rows = mtl.dropna(subset=[prefix])
    if len(rows):
        top = rows.loc[rows[prefix].abs().idxmax()]
        lines.append(f"- The largest difference from {reference}: {top.method}, {ci(top[prefix], top[prefix + '_low'], top[prefix + '_high'])} "
                     f"points of Δm%: {top[prefix + '_verdict']}.")
    seeds = int(mtl["n_seeds"].min()) if len(mtl) else 0
    lines.append(f"- p-values are Holm-corrected over the {m} tests of this file; mean ranks have percentile bootstrap "
                 f"CIs over seeds ({seeds} seeds: a coarse interval); no ordering of {noun} is claimed beyond the verdicts.")
    return lines


def tuning(root: Path, names: dict[str, str] | None = None) -> str:
    """The values ``compare.tune`` selected for each method (from the grid's tune.json, with
    ``names`` for the methods' printed names), or "" untuned."""
    path = root / "tune.json"
    if not path.exists():
        return ""
    tune = json.loads(path.read_text())
    names = names or {}
    chosen = [f"{names.get(u['method'], u['method'])}{' ' + u['variant'] if u['variant'] else ''}: "
              + ", ".join(f"{k.rsplit('.', 1)[-1]} {v:g}" for k, v in u["selected"].items()) + f" ({u['runs']} runs)"
              for u in tune["units"]]
    grid = "; ".join(f"{k} in {v}" for k, v in tune["grid"].items())
    return (f"Tuned ({grid}; {len(tune['seeds'])} tuning seed(s), selected on validation, never test): "
            + "; ".join(chosen) + ".")


def convergence_line(df: pd.DataFrame, root: Path) -> str:
    """One sentence from ``mtl.report.convergence``: how many (cell, task) pairs of the grid in
    ``root`` were still improving on validation in the last 20% of their epochs, and of which
    methods; "" when no cell kept its training log."""
    from mtl.report import CONVERGENCE_TAIL, convergence

    conv = convergence(df, root)
    judged = conv[conv["still_improving"].notna()]
    if judged.empty:
        return ""
    flagged = judged[judged["still_improving"].astype(bool)]
    by_method = flagged.groupby("method").size()
    where = ", ".join(f"{m} {n}" for m, n in by_method.items()) or "none"
    return (f"Still improving on validation in the last {CONVERGENCE_TAIL:.0%} of the epochs (stopped by the budget, "
            f"not by convergence): {len(flagged)} of {len(judged)} (cell, task) pairs; by method: {where}.")


def by_delta_m(out: pd.DataFrame) -> pd.DataFrame:
    """Single-task first, then the methods from the highest Δm% down."""
    mtl = out["method"] != "single_task"
    return out.sort_values(["delta_m_pct"], ascending=False, key=lambda s: s.where(mtl, float("inf"))).reset_index(drop=True)


def ci(mean: float, low: float, high: float) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:+.2f}" + ("" if pd.isna(low) else f" [{low:+.2f}, {high:+.2f}]")


def kendall_tau(a: Sequence[str], b: Sequence[str]) -> float:
    """Kendall's τ between two orderings of the same items (1: same order, −1: reversed):
    ``scipy.stats.kendalltau`` of each item's position in ``a`` and in ``b``."""
    from scipy import stats

    pos = {item: i for i, item in enumerate(b)}
    return float(stats.kendalltau(range(len(a)), [pos[item] for item in a]).statistic)
