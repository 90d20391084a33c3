"""Comparison report: per-task tables, Δm% against single-task, verdicts from paired
statistics, convergence flags, forgetting in sequential regimes (ACC, BWT, FWT), and
data-efficiency, generalization, paired-difference, parameter and accuracy-against-trainable-
parameters plots.

Input is the long-form results table that ``mtl compare`` writes (one row per value; see
``REQUIRED_COLUMNS``). Every number and every sentence is computed here from that table
(and, for convergence, from the cells' ``metrics.jsonl`` when they are under ``out_dir``),
so a report can be regenerated from ``results.csv`` alone.

Every comparison is against the single-task baseline and *paired by seed*: in a grid every
method runs the same seeds, and a seed fixes the target's labelled subset and the RNGs that
initialise the model and order the batches (see ``mtl.stats``). Verdicts come only from
``mtl.stats``: per-seed differences, paired t-test, Holm over every comparison of the report;
for a grid whose seeds were a budget, its group-sequential stop rule (``stats.SeedBudget``),
replayed on the table by :func:`budget_stops`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from mtl import stats
from mtl.results import write_text

BASELINE = "single_task"
REQUIRED_COLUMNS = (
    "method", "regime", "recipe", "seed", "fraction", "task", "split", "metric", "value",
    "direction", "primary", "trainable_params", "total_params", "wall_time_s", "cell",
)
METRICS = ("all", "primary")  # which metrics of a task enter Δm%

FORMULA = "Δm% = (100 / K) Σ_k (−1)^{l_k} (M_m,k − M_b,k) / M_b,k"
CONVERGENCE_TAIL = 0.2  # a cell whose validation still improved in this last share of its epochs is flagged

# (task, metric) -> value, or -> "max" / "min"
Metrics = dict[tuple[str, str], float]
Directions = dict[tuple[str, str], str]


# ---- Δm%: the one function ----


def _signs(keys, directions: Directions) -> np.ndarray:
    for key in keys:
        if directions[key] not in ("max", "min"):
            raise ValueError(f"direction of {key} must be 'max' or 'min', got {directions[key]!r}")
    return np.array([-1.0 if directions[k] == "min" else 1.0 for k in keys])


def _relative_change(method: np.ndarray, baseline: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """The Δm% formula on arrays whose first axis is the K keys (further axes: a batch)."""
    signs = signs.reshape((-1,) + (1,) * (method.ndim - 1))
    return 100.0 * np.mean(signs * (method - baseline) / np.abs(baseline), axis=0)


def delta_m(method: Metrics, baseline: Metrics, directions: Directions) -> float:
    """Mean relative change against the baseline, in percent (Maninis et al. 2019, the form of
    Navon et al. 2022 and Liu et al. 2023): ``Δm% = (100/K) Σ_k (−1)^{l_k} (M_m,k − M_b,k) / M_b,k``
    over the K (task, metric) keys of ``method``; l_k = 1 where lower is better. Positive means
    better than the baseline. The denominator is |M_b,k|, equal to the published formula for the
    usual positive metrics and keeping "positive is better" for metrics that can be negative (R²)."""
    if not method:
        raise ValueError("delta_m needs at least one (task, metric) value")
    missing = sorted(set(method) - set(baseline))
    if missing:
        raise ValueError(f"no baseline value for {missing}")
    keys = list(method)
    signs = _signs(keys, directions)
    zero = [k for k in keys if baseline[k] == 0]
    if zero:
        raise ValueError(f"baseline of {zero[0]} is 0: a relative change is undefined")
    m, b = np.array([method[k] for k in keys], float), np.array([baseline[k] for k in keys], float)
    return float(_relative_change(m, b, signs))


def delta_m_keys(columns, primary: dict[str, str], metrics: str) -> list[tuple[str, str]]:
    """The (task, metric) keys Δm% averages: ``primary``, each task's primary metric; ``all``,
    every metric but the loss (the published Δm% of NYUv2 and CityScapes averages every metric)."""
    if metrics not in METRICS:
        raise ValueError(f"metrics must be one of {METRICS}, got {metrics!r}")
    if metrics == "primary":
        return [k for k in columns if primary.get(k[0]) == k[1]]
    return [k for k in columns if k[1] != "loss"]


@dataclass
class DeltaM:
    """Δm% of one method against the baseline over ``keys``, paired by seed: ``mean`` is Δm%
    of the seed means; ``per_seed`` each seed's Δm% against the same seed's baseline (what
    ``test`` tests); ``low``/``high`` a percentile bootstrap CI of ``mean`` over seeds."""

    keys: list[tuple[str, str]]
    seeds: list
    mean: float
    per_seed: np.ndarray
    low: float
    high: float
    test: stats.Difference

    @property
    def std(self) -> float:
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else math.nan


def delta_m_paired(method: pd.DataFrame, baseline: pd.DataFrame, directions: Directions,
                   keys: list[tuple[str, str]]) -> DeltaM:
    """Δm% (:func:`delta_m`) of ``method`` against ``baseline``, both seeds × (task, metric)
    tables, on the seeds both have where every key is finite. This is the one Δm% of reports,
    ``paper_repro`` and the notebooks; the caller chooses ``keys`` (the task set and metrics)."""
    missing = [k for k in keys if k not in baseline.columns or k not in method.columns]
    if not keys or missing:
        raise ValueError(f"no baseline value for {missing}" if missing else "delta_m needs at least one (task, metric) value")
    both = method.index.intersection(baseline.index)
    m, b = method.loc[both, keys], baseline.loc[both, keys]
    finite = m.notna().all(axis=1) & b.notna().all(axis=1)
    seeds = list(both[finite.to_numpy()])
    if not seeds:
        raise ValueError(f"no seed has finite values of {keys} for both the method and the baseline")
    m, b = m.loc[seeds].to_numpy(float).T, b.loc[seeds].to_numpy(float).T  # keys × seeds
    signs = _signs(keys, directions)
    if (b.mean(axis=1) == 0).any() or (b == 0).any():
        raise ValueError(f"a baseline value of {keys} is 0: a relative change is undefined")
    mean = delta_m(dict(zip(keys, m.mean(axis=1))), dict(zip(keys, b.mean(axis=1))), directions)
    per_seed = _relative_change(m, b, signs)
    low, high = stats.bootstrap_ci(
        lambda mm, bb, axis: _relative_change(mm.mean(axis=axis), bb.mean(axis=axis), signs), (m, b)
    )
    return DeltaM(list(keys), seeds, mean, per_seed, float(low), float(high), stats.Difference.of(per_seed))


# ---- the paired analysis every table, verdict and plot reads ----


@dataclass
class Comparison:
    """One method against the baseline at one fraction: on a task's primary metric (the
    difference in the metric's units, positive = better) or on per-seed Δm% (in %)."""

    fraction: float
    method: str
    on: str  # "tgt: mae" or "Δm%"
    test: stats.Difference


@dataclass
class FractionAnalysis:
    fraction: float
    values: dict[str, pd.DataFrame]  # method -> seeds × (task, metric) test values
    common: list[str]  # the tasks every method reports here (targets-only where a method reports only its targets)
    tasks: list[str]  # every task: the all-tasks Δm%, for the methods that report all of them
    delta: dict[str, DeltaM | None] = field(default_factory=dict)  # over `common`
    delta_all: dict[str, DeltaM | None] = field(default_factory=dict)  # over `tasks`, when it differs
    comparisons: list[Comparison] = field(default_factory=list)


def analyse(df: pd.DataFrame, metrics: str = "all") -> list[FractionAnalysis]:
    """Per labelled fraction: each method's test values, Δm% over the common task set (and
    over all tasks where a method reports them all), and the paired comparisons of every
    method with the baseline, Holm-corrected together over the whole table."""
    df = _prepare(df)
    primary = _primary_metrics(df)
    directions = _directions(df)
    has_baseline = BASELINE in set(df["method"])
    out = []
    for fraction in sorted(df["fraction"].unique()):
        values = {m: _values(_method_rows(df, m, fraction), "test") for m in _methods(df)}
        values = {m: v for m, v in values.items() if not v.empty}
        reported = {m: {t for t, k in v.columns if k == primary[t]} for m, v in values.items()}
        common = [t for t in primary if all(t in r for r in reported.values())]
        a = FractionAnalysis(fraction, values, common, [t for t in primary if any(t in r for r in reported.values())])
        out.append(a)
        if not has_baseline or BASELINE not in values:
            continue
        base = values[BASELINE]
        for method, v in values.items():
            a.delta[method] = _delta_or_none(v, base, directions, delta_m_keys(v.columns, primary, metrics), common)
            if a.common != a.tasks and reported[method] >= set(a.tasks):
                a.delta_all[method] = _delta_or_none(v, base, directions, delta_m_keys(v.columns, primary, metrics), a.tasks)
            if method == BASELINE:
                continue
            for task in primary:
                key = (task, primary[task])
                if key in v.columns and key in base.columns:
                    both = v.index.intersection(base.index)
                    pair = pd.concat([v.loc[both, key], base.loc[both, key]], axis=1).dropna()
                    if len(pair):
                        d = stats.paired_differences(pair.iloc[:, 0], pair.iloc[:, 1], directions[key] == "max")
                        a.comparisons.append(Comparison(fraction, method, f"{task}: {key[1]}", stats.Difference.of(d)))
            if a.delta[method] is not None:
                a.comparisons.append(Comparison(fraction, method, "Δm%", a.delta[method].test))
    stats.correct([c.test for a in out for c in a.comparisons])
    return out


def _delta_or_none(values, base, directions, keys, tasks) -> DeltaM | None:
    keys = [k for k in keys if k[0] in tasks]
    try:
        return delta_m_paired(values, base, directions, keys)
    except ValueError:  # a key without a finite, non-zero baseline here: shown as n/a
        return None


@dataclass
class Stop:
    """Where the seed budget's stop rule (``stats.SeedBudget``) left one comparison."""

    verdict: int  # +1 better, −1 worse, 0 not resolved
    resolved: bool
    n: int  # seeds at its last look: the look that resolved it, or the last look made
    level: float  # α_k of that look


def budget_stops(df: pd.DataFrame, budget: stats.SeedBudget, metrics: str = "all") -> dict[tuple[float, str, str], Stop]:
    """Replay a budgeted grid's looks on its results: at each look of n seeds (the budget's
    seeds 0 to n − 1), the paired tests of :func:`analyse`; ``budget.decide`` then gives every
    comparison its verdict and the look that resolved it. Keys: (fraction, method, on). Used
    by ``mtl compare`` to choose the next seed and by the report, so both read the same rule.
    A look where a comparison's differences are equal at every seed is no test of it."""
    df = _prepare(df)
    made = [n for n in budget.looks if n <= df["seed"].nunique()]  # the budget's seeds are 0, 1, 2, ...
    if not made:
        return {}
    per_look = [{(c.fraction, c.method, c.on): c.test for a in analyse(df[df["seed"] < n], metrics) for c in a.comparisons} for n in made]
    keys = list(dict.fromkeys(k for look in per_look for k in look))
    means, p = np.full((len(keys), len(budget.looks)), np.nan), np.full((len(keys), len(budget.looks)), np.nan)
    n_at = np.zeros((len(keys), len(budget.looks)), int)
    for j, look in enumerate(per_look):
        for i, key in enumerate(keys):
            if key in look:
                # Differences equal at every seed (two seeds of a coarse accuracy often are) have no
                # spread to test against: no test at that look, where a fixed-n report says p = 0.
                test = look[key]
                means[i, j], p[i, j], n_at[i, j] = test.mean, test.p if np.isfinite(test.dz) else np.nan, test.n
    verdict, at = budget.decide(means, p)
    levels = budget.levels()
    out = {}
    for i, key in enumerate(keys):
        k = at[i] if at[i] >= 0 else len(made) - 1
        out[key] = Stop(int(verdict[i]), bool(at[i] >= 0), int(n_at[i, k]), float(levels[k]))
    return out


def family_size(analyses: list[FractionAnalysis]) -> int:
    return sum(1 for a in analyses for c in a.comparisons if c.test.n > 1)


def comparison_table(df: pd.DataFrame, metrics: str = "all") -> pd.DataFrame:
    """One row per (method, fraction): ``n_seeds``, ``test/{task}/{metric}/mean`` and ``/std`` of
    each task's primary metric (NaN where the method does not report the task), and Δm% over
    the tasks every method reports at that fraction (``metrics``: all or primary):
    ``delta_m_pct`` (of the seed means), ``delta_m_pct_std`` (std of the per-seed Δm%, each
    against the same seed's baseline) and ``delta_m_pct_low``/``_high`` (bootstrap 95% CI);
    NaN without a single-task baseline."""
    return _table(analyse(df, metrics), _primary_metrics(_prepare(df)))


def _table(analyses: list[FractionAnalysis], primary: dict[str, str]) -> pd.DataFrame:
    columns = [f"test/{t}/{m}/{stat}" for t, m in primary.items() for stat in ("mean", "std")]
    deltas = ["delta_m_pct", "delta_m_pct_std", "delta_m_pct_low", "delta_m_pct_high"]
    records = []
    for a in analyses:
        for method, values in a.values.items():
            record = {"method": method, "fraction": a.fraction, "n_seeds": len(values)}
            for task, metric in primary.items():
                if (task, metric) in values:
                    record[f"test/{task}/{metric}/mean"] = values[(task, metric)].mean()
                    record[f"test/{task}/{metric}/std"] = values[(task, metric)].std()
            d = a.delta.get(method)
            if d is not None:
                record.update(zip(deltas, (d.mean, d.std, d.low, d.high)))
            records.append(record)
    return pd.DataFrame(records).reindex(columns=["method", "fraction", "n_seeds", *columns, *deltas])


def write_report(df: pd.DataFrame, out_dir: str | Path, title: str = "Comparison", metrics: str = "all",
                 budget: stats.SeedBudget | None = None) -> str:
    """Write ``report.md`` and its plots (each as PNG at 150 dpi and PDF:
    ``data_efficiency_<task>``, ``paired_differences``, ``generalization``, ``parameters``,
    ``accuracy_vs_parameters``) into ``out_dir``; return the Markdown. A table with the
    forgetting columns (a grid with sequential regimes) also gets ACC, BWT and FWT. Convergence is read from the cells' ``metrics.jsonl``
    when ``out_dir`` is the grid's output_dir, tuning from its ``tune.json``. With ``budget``
    (a grid whose seeds were a budget) the verdicts are the budget's stop rule's."""
    df = _prepare(df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analyses = analyse(df, metrics)
    primary = _primary_metrics(df)
    table = _table(analyses, primary)
    directions = _directions(df)
    sections = [
        _header(df, title, primary, directions, budget),
        _tuning(df, out),
        _definition(metrics),
        *(_task_table(table, f, primary, directions) for f in sorted(table["fraction"].unique())),
        _delta_tables(analyses, metrics),
        _verdicts(analyses) if budget is None else _budget_verdicts(analyses, budget, budget_stops(df, budget, metrics), df),
        _ranks(analyses, metrics),
        _paired_plot(analyses, out, metrics),
        _convergence(df, out),
        _data_efficiency(df, out, primary, directions),
        _generalization(df, out, primary, directions),
        _forgetting_section(df),
        _parameters(df, out),
        _accuracy_vs_parameters(df, out, primary, directions),
    ]
    text = "\n\n".join(s for s in sections if s) + "\n"
    write_text(text, out / "report.md")  # atomic: a reader never sees half a report
    return text


# ---- reading the table ----


def _prepare(df: pd.DataFrame) -> pd.DataFrame:
    if len(df) == 0:
        raise ValueError("the results table is empty")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"the results table lacks columns: {missing}")
    if not (df["split"] == "test").any():
        raise ValueError("the results table has no test-split rows: nothing to compare")
    df = df.copy()
    # Fractions read back from CSV must compare equal across methods.
    df["fraction"] = df["fraction"].astype(float).round(6)
    df["value"] = df["value"].astype(float)
    # A CSV written by another tool may hold "True"/"true"/1 rather than booleans.
    df["primary"] = df["primary"].astype(str).str.lower().isin(["true", "1", "1.0"])
    return df


def _primary_metrics(df: pd.DataFrame) -> dict[str, str]:
    primary = df[df["primary"]].groupby("task", sort=False)["metric"].first().to_dict()
    missing = [t for t in pd.unique(df["task"]) if t not in primary]
    if missing:
        raise ValueError(f"no primary metric marked for tasks: {missing}")
    return {t: primary[t] for t in pd.unique(df["task"])}


def _directions(df: pd.DataFrame) -> Directions:
    return df.groupby(["task", "metric"])["direction"].first().to_dict()


def _methods(df: pd.DataFrame) -> list[str]:
    methods = list(pd.unique(df["method"]))
    return [BASELINE] + [m for m in methods if m != BASELINE] if BASELINE in methods else methods


def _method_rows(df: pd.DataFrame, method: str, fraction: float) -> pd.DataFrame:
    """A method's rows at a labelled fraction. For the baseline, a task it has at a single other
    fraction (a source task, never subsampled) stands in at every fraction; a task it has at
    several fractions but not this one has no baseline here."""
    rows = df[df["method"] == method]
    at = rows[rows["fraction"] == fraction]
    if method != BASELINE:
        return at
    others = rows[~rows["task"].isin(set(at["task"]))]
    single = others.groupby("task")["fraction"].transform("nunique") == 1
    return pd.concat([at, others[single]])


def _values(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """Seeds × (task, metric) values of one split."""
    rows = rows[rows["split"] == split]
    return rows.groupby(["seed", "task", "metric"])["value"].mean().unstack(["task", "metric"])


def _best(means: pd.Series, direction: str) -> set:
    """Index labels of the best finite mean (all of them on a tie)."""
    means = means.dropna()
    if means.empty:
        return set()
    best = means.max() if direction == "max" else means.min()
    return set(means.index[means == best])


# ---- convergence ----


def still_improving(history, higher_is_better: bool = True, tail: float = CONVERGENCE_TAIL) -> bool | None:
    """Whether the best value of the validations in the last ``tail`` share of the epochs
    (at least the last one) beats the best of the epochs before them: a run that still
    improved there was stopped by its budget, not by convergence. None with fewer than two
    validations (nothing to compare)."""
    h = [v if higher_is_better else -v for v in history]
    before = math.floor((1 - tail) * len(h))
    if len(h) < 2 or before < 1:
        return None
    return max(h[before:]) > max(h[:before])


def validation_history(path: Path) -> dict[str, list[float]]:
    """``{"val/task/metric": [value per epoch]}`` from a run's ``metrics.jsonl`` (the last
    record of an epoch wins, so a resumed run's repeated epochs count once)."""
    by_epoch: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "epoch" in record:
            by_epoch[record["epoch"]] = record
    history: dict[str, list[float]] = {}
    for epoch in sorted(by_epoch):
        for key, value in by_epoch[epoch].items():
            if key.startswith("val/") and value is not None:
                history.setdefault(key, []).append(float(value))
    return history


def convergence(df: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """Per cell and task: epochs validated and whether the primary validation metric was still
    improving in the last 20% of them (None: not judged). Read from ``root/<cell>/metrics.jsonl``;
    cells without that file are left out."""
    df = _prepare(df)
    primary, directions = _primary_metrics(df), _directions(df)
    records = []
    cells = df[df["split"] == "test"].drop_duplicates(["cell", "task"])
    if "trained_last" in cells.columns:  # an earlier task of a sequential cell trained in another run (its source stage)
        cells = cells[cells["trained_last"] >= cells["stages"] - 1]
    for row in cells.itertuples(index=False):
        path = Path(root) / row.cell / "metrics.jsonl"
        if not path.exists():
            continue
        metric = primary[row.task]
        history = validation_history(path).get(f"val/{row.task}/{metric}", [])
        records.append({"method": row.method, "fraction": row.fraction, "seed": row.seed, "task": row.task,
                        "cell": row.cell, "epochs": len(history),
                        "still_improving": still_improving(history, directions[(row.task, metric)] == "max")})
    return pd.DataFrame(records, columns=["method", "fraction", "seed", "task", "cell", "epochs", "still_improving"])


# ---- formatting ----


def format_mean_std(mean: float, std: float = math.nan, digits: int = 4, signed: bool = False) -> str:
    """``mean ± std``; the std is left out where it does not exist (one seed)."""
    if pd.isna(mean):
        return "n/a"
    text = f"{mean:{'+' if signed else ''}.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {std:.{digits}f}"


def _fmt_ci(mean: float, low: float, high: float, digits: int = 4) -> str:
    """``+mean [low, high]``; the interval is left out where it does not exist (one seed)."""
    if pd.isna(mean):
        return "n/a"
    text = f"{mean:+.{digits}f}"
    return text if pd.isna(low) else f"{text} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _fmt_p(p: float) -> str:
    return "–" if pd.isna(p) else "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _arrow(direction: str) -> str:
    return "↑" if direction == "max" else "↓"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _filename(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task)


def _colors(df: pd.DataFrame) -> dict[str, str]:
    """One colour per method, the same in every plot and panel."""
    return {method: f"C{i % 10}" for i, method in enumerate(_methods(df))}


def _dodge(i: int, count: int, width: float = 0.06) -> float:
    """Offset of the i-th of ``count`` series, centred on 0, so their error bars do not overlap."""
    return (i - (count - 1) / 2) * width


def _fraction_axis(ax, fractions, label: str = "labelled fraction") -> None:
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel(label)
    # Near-equal values otherwise get an unreadable "1e-14+1.41e-2" offset label.
    ax.ticklabel_format(axis="y", useOffset=False)


def _save(fig: Figure, out: Path, stem: str) -> None:
    # A bare Figure renders with Agg and touches no pyplot state, so a caller's backend and
    # open figures are left alone and nothing needs a display. The PDF is for papers; the PNG
    # for the Markdown and W&B.
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=150)
    fig.savefig(out / f"{stem}.pdf")


def _ci_halfwidth(values: pd.Series) -> float:
    """Half-width of the 95% t interval of the mean (0 with one seed: no bar)."""
    mean, low, _ = stats.t_interval(values.dropna().to_numpy())
    return 0.0 if np.isnan(low) else float(mean - low)


# ---- sections ----


def _header(df: pd.DataFrame, title: str, primary: dict[str, str], directions: Directions,
            budget: stats.SeedBudget | None = None) -> str:
    seeds = sorted(df["seed"].unique())
    fractions = ", ".join(f"{f:g}" for f in sorted(df["fraction"].unique()))
    tasks = ", ".join(f"{t} ({m} {_arrow(directions[(t, m)])})" for t, m in primary.items())
    lines = [
        f"# {title}",
        "",
        "Model selection used the validation split only; the test split was evaluated once, "
        "on the selected checkpoint.",
        "",
        f"- Methods: {', '.join(_methods(df))}",
        f"- Seeds: {len(seeds)} ({', '.join(str(s) for s in seeds)})"
        + (f"; a budget of {budget.min} to {budget.max}, added one at a time until each comparison resolved (see Verdicts)" if budget else ""),
        f"- Labelled fractions of the target data: {fractions}",
        f"- Tasks (primary metric, ↑ higher / ↓ lower is better): {tasks}",
        "",
        "Every comparison is with single-task and paired by seed: a seed fixes the targets' "
        "labelled subset (the same in every regime; the val/test split is the same for all seeds) "
        "and seeds the initialisation (the same trunk initialisation in every regime; a sequential "
        "target stage starts from the trunk its seed's source stage trained) and the batch order, "
        "so per-seed differences cancel what a seed's subset does to both.",
    ]
    if len(seeds) < 2:
        lines += ["", "**One seed: no test is possible.** Differences are shown without a confidence "
                      "interval and no verdict is given; run at least 2 seeds (3 or more to resolve anything "
                      "but very large differences)."]
    return "\n".join(lines)


def _definition(metrics: str) -> str:
    which = ("each task's primary test metric" if metrics == "primary"
             else "every test metric of the task except the loss")
    return "\n".join([
        "## Δm% (Maninis et al. 2019)",
        "",
        f"`{FORMULA}`",
        "",
        f"over the K (task, metric) pairs of a task set, **metrics: {metrics}** ({which}); l_k = 1 "
        "where lower is better, 0 otherwise; the baseline b is single-task (|M_b,k| in the "
        "denominator, which changes nothing for positive metrics). **Positive Δm% means better "
        "than single-task, negative worse.** Δm% is of the seed means; its 95% CI is a "
        "percentile bootstrap over seeds (too narrow with few seeds: 3 seeds have 10 distinct "
        "resamples). Methods are compared over the same task set only: the tasks every method "
        "reports (every task when sequential cells report their earlier tasks, as `mtl compare` does unless a "
        "regime sets forgetting: []; targets-only otherwise), and, where that is not "
        "every task, all tasks for the methods that report them all. A task whose single-task "
        "baseline exists at one fraction only (a source task, whose data is not subsampled) is "
        "compared with that baseline at every fraction.",
    ])


def _task_table(table: pd.DataFrame, fraction: float, primary: dict[str, str], directions: Directions) -> str:
    rows = table[table["fraction"] == fraction].set_index("method")
    best = {t: _best(rows[f"test/{t}/{m}/mean"], directions[(t, m)]) for t, m in primary.items()}
    header = ["method", "n seeds"]
    header += [f"{t}: {m} {_arrow(directions[(t, m)])}" for t, m in primary.items()]
    body = []
    for method, row in rows.iterrows():
        cells = [method, str(int(row["n_seeds"]))]
        for task, metric in primary.items():
            text = format_mean_std(row[f"test/{task}/{metric}/mean"], row[f"test/{task}/{metric}/std"])
            cells.append(f"**{text}**" if method in best[task] else text)
        body.append(cells)
    return "\n".join([
        f"## Test results at labelled fraction {fraction:g}",
        "",
        "Primary test metric, mean ± std over seeds; the best mean per column in bold (a "
        "description, not a verdict: see Verdicts); n/a: not reported.",
        "",
        markdown_table(header, body),
    ])


def _delta_tables(analyses: list[FractionAnalysis], metrics: str) -> str:
    title = "## Δm% against single-task"
    if not any(a.delta for a in analyses):
        return f"{title}\n\nNo `{BASELINE}` rows in the results: Δm% cannot be computed."
    parts = [title, "",
             f"% of the seed means, [95% bootstrap CI over seeds], (n seeds). **metrics: {metrics}.** "
             "n/a: a value lacks a finite, non-zero single-task baseline here."]
    for name, attr in (("tasks every method reports", "delta"), ("all tasks, methods that report every task", "delta_all")):
        sets = {tuple(a.common if attr == "delta" else a.tasks) for a in analyses if getattr(a, attr)}
        for tasks in sorted(sets):
            cols = [a for a in analyses if getattr(a, attr) and tuple(a.common if attr == "delta" else a.tasks) == tasks]
            methods = list(dict.fromkeys(m for a in cols for m in getattr(a, attr) if m != BASELINE))
            body = []
            for method in methods:
                row = [method]
                for a in cols:
                    d = getattr(a, attr).get(method)
                    row.append("n/a" if d is None else f"{_fmt_ci(d.mean, d.low, d.high, 2)} ({len(d.seeds)})")
                body.append(row)
            parts += ["", f"### Over {name}: {', '.join(tasks)} (metrics: {metrics})", "",
                      markdown_table(["method", *(f"fraction {a.fraction:g}" for a in cols)], body)]
    return "\n".join(parts)


def _verdicts(analyses: list[FractionAnalysis]) -> str:
    lines = ["## Verdicts", ""]
    if not any(a.delta for a in analyses):
        return "\n".join(lines + [f"No `{BASELINE}` baseline in the results: nothing is compared against single-task."])
    m = family_size(analyses)
    lines += [
        "Each method against single-task, paired by seed. Difference: method − single-task, signed so "
        "that **positive is better** (lower-is-better metrics negated), mean over seeds with its 95% t "
        "interval; for Δm% the mean of the per-seed Δm% (each seed against the same seed's baseline). "
        "Paired t-test, two-sided (not Wilcoxon: with fewer than 6 seeds it cannot reach p < 0.05); "
        f"p (Holm): Holm-corrected over all {m} tested comparisons of this report; d_z: Cohen's effect "
        "size of paired data. A verdict is better/worse only where p (Holm) < 0.05; otherwise the seeds "
        "needed are for 80% power at the observed d_z and level 0.05/"
        f"{max(m, 1)} (Holm's strictest step).",
    ]
    header = ["method", "on", "n", "difference [95% CI]", "d_z", "p", "p (Holm)", "verdict"]
    for a in analyses:
        if not a.comparisons:
            continue
        body = [[c.method, c.on, str(c.test.n), _fmt_ci(c.test.mean, c.test.low, c.test.high, 2 if c.on == "Δm%" else 4),
                 "–" if np.isnan(c.test.dz) else f"{c.test.dz:+.2f}", _fmt_p(c.test.p), _fmt_p(c.test.p_holm),
                 c.test.verdict(m=max(m, 1))] for c in a.comparisons]
        lines += ["", f"### Labelled fraction {a.fraction:g}", "", markdown_table(header, body)]
    return "\n".join(lines)


def _budget_verdicts(analyses: list[FractionAnalysis], budget: stats.SeedBudget, stops: dict, df: pd.DataFrame) -> str:
    lines = ["## Verdicts", ""]
    if not any(a.delta for a in analyses):
        return "\n".join(lines + [f"No `{BASELINE}` baseline in the results: nothing is compared against single-task."])
    m = family_size(analyses)
    levels = ", ".join(f"{n}: {a:.4f}" for n, a in zip(budget.looks, budget.levels()))
    lines += [
        f"Seeds were a budget: {budget.min} seeds, then one more at a time (seeds 0, 1, 2, ...) for the methods with a "
        f"comparison not resolved yet, up to {budget.max}. The stop rule is group-sequential, so that looking after every "
        "seed does not inflate false verdicts: the look at n seeds tests at level α_n, the increments of Lan & DeMets' "
        "O'Brien–Fleming-type spending function, which sum to 0.05 (seeds: level; "
        f"{levels}); at each look, Holm at α_n over the comparisons still open. A comparison that passes is resolved "
        "(better/worse) and its method gets no more seeds once all of its comparisons are. The false-verdict rate stays "
        "≤ 0.05 (`mtl.stats.SeedBudget`; checked by simulation in `tests/test_stats.py`). Difference: method − "
        "single-task, **positive is better**, mean over the comparison's seeds with its 95% t interval (fixed-n, "
        "descriptive: not adjusted for the looks); p: its paired t-test on those seeds; stopped: why it got its seeds. "
        "A sequential method's comparisons on its earlier tasks (see Forgetting) are shown but add no seeds.",
    ]
    header = ["method", "on", "n", "difference [95% CI]", "d_z", "p", "stopped", "verdict"]
    made = df["seed"].nunique()
    for a in analyses:
        if not a.comparisons:
            continue
        body = []
        for c in a.comparisons:
            stop = stops.get((c.fraction, c.method, c.on))
            if stop is not None and stop.resolved:
                stopped, verdict = f"resolved at {stop.n} seeds (level {stop.level:.4f})", "better" if stop.verdict > 0 else "worse"
            else:
                c.test.p_holm = math.nan  # the fixed-n Holm p does not apply; the rule did not resolve it
                stopped = f"max reached ({budget.max} seeds)" if made >= budget.max else f"not resolved; budget unfinished ({made} of {budget.max} seeds)"
                verdict = c.test.verdict(m=max(m, 1))
            body.append([c.method, c.on, str(c.test.n), _fmt_ci(c.test.mean, c.test.low, c.test.high, 2 if c.on == "Δm%" else 4),
                         "–" if np.isnan(c.test.dz) else f"{c.test.dz:+.2f}", _fmt_p(c.test.p), stopped, verdict])
        lines += ["", f"### Labelled fraction {a.fraction:g}", "", markdown_table(header, body)]
    runs = df.drop_duplicates(["method", "fraction", "seed"]).groupby(["method", "fraction"], sort=False)["seed"].nunique()
    lines += ["", "Seeds each method ran, per labelled fraction:", "",
              markdown_table(["method", "fraction", "seeds"], [[mt, f"{f:g}", str(k)] for (mt, f), k in runs.items()])]
    return "\n".join(lines)


def _tuning(df: pd.DataFrame, out: Path) -> str:
    path = out / "tune.json"
    if not path.exists():
        return ""
    info = json.loads(path.read_text())
    grid = "; ".join(f"{k}: {v}" for k, v in info["grid"].items()) or "none"
    extra = "; ".join(f"{m}: " + ", ".join(f"{k}: {v}" for k, v in g.items()) for m, g in info["extra"].items()) or "none"
    body = []
    for u in info["units"]:
        score = "n/a" if u["validation"] is None else f"{u['validation']:.4f}"
        body.append([u["method"], u["variant"] if u["method"] == BASELINE else "", f"{u['fraction']:g}",
                     ", ".join(f"{k}={v}" for k, v in u["selected"].items()), score, str(len(u["points"])), str(u["runs"])])
    tuned = pd.DataFrame(info["units"]).groupby("method", sort=False)["runs"].sum()
    evaluated = df.drop_duplicates(["method", "cell"]).groupby("method", sort=False)["cell"].nunique()
    runs = [[m, str(tuned.get(m, 0)), str(evaluated.get(m, 0))] for m in dict.fromkeys([*tuned.index, *evaluated.index])]
    return "\n".join([
        "## Tuning",
        "",
        f"Every method searched the same grid ({grid}), plus its own declared extra grid ({extra}), on the last "
        f"stage of its cells, separately at each labelled fraction; tuning seeds {', '.join(map(str, info['seeds']))}, "
        f"never evaluation seeds. Selected on {info['selected_on']} (higher is better; lower-is-better metrics negated); "
        "the test split was not read. The evaluation cells below ran with the selected values.",
        "",
        markdown_table(["method", "task", "fraction", "selected", "validation score", "points", "tuning runs"], body),
        "",
        "Runs per method (cells: a sequential cell's shared source stage is not counted):",
        "",
        markdown_table(["method", "tuning runs", "evaluation runs"], runs),
    ])


def _ranks(analyses: list[FractionAnalysis], metrics: str) -> str:
    lines = ["## Mean rank", "",
             f"Per seed, the methods (single-task included, at 0) ranked by their per-seed Δm% over the tasks "
             f"every method reports (metrics: {metrics}; 1 = best, ties share the mean rank); mean over the "
             "seeds every method has, [95% percentile bootstrap CI over seeds]."]
    body, fractions = {}, []
    for a in analyses:
        ranked = {m: d for m, d in a.delta.items() if d is not None}
        if len(ranked) < 2:
            continue
        seeds = sorted(set.intersection(*(set(d.seeds) for d in ranked.values())))
        if not seeds:
            continue
        scores = np.array([[d.per_seed[d.seeds.index(s)] for s in seeds] for d in ranked.values()])
        mean, low, high = stats.mean_ranks(scores)
        fractions.append(a.fraction)
        for i, method in enumerate(ranked):
            text = f"{mean[i]:.2f}" if np.isnan(low[i]) else f"{mean[i]:.2f} [{low[i]:.2f}, {high[i]:.2f}]"
            body.setdefault(method, {})[a.fraction] = f"{text} ({len(seeds)})"
    if not body:
        return ""
    rows = [[m, *(body[m].get(f, "n/a") for f in fractions)] for m in body]
    return "\n".join(lines + ["", markdown_table(["method", *(f"fraction {f:g}" for f in fractions)], rows)])


def _paired_plot(analyses: list[FractionAnalysis], out: Path, metrics: str) -> str:
    """Method − single-task per comparison target, with its 95% CI and a zero line."""
    panels = list(dict.fromkeys(c.on for a in analyses for c in a.comparisons))
    panels.sort(key=lambda on: on == "Δm%")  # the summary last, after the tasks it summarizes
    if not panels:
        return ""
    methods = list(dict.fromkeys(c.method for a in analyses for c in a.comparisons))
    fractions = [a for a in analyses if a.comparisons]
    fig = Figure(figsize=(4.2 * len(panels), 1.4 + 0.45 * len(methods) * max(1, len(fractions)) ** 0.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, on in zip(axes, panels):
        for j, a in enumerate(fractions):
            found = [(methods.index(c.method), c) for c in a.comparisons if c.on == on]
            if not found:
                continue
            y = [i + _dodge(j, len(fractions), 0.8 / max(len(fractions), 1)) for i, _ in found]
            if on == "Δm%":  # the Δm% of the seed means and its bootstrap CI, as in the Δm% table
                d = [a.delta[c.method] for _, c in found]
                x, lo, hi = [v.mean for v in d], [v.low for v in d], [v.high for v in d]
            else:
                x, lo, hi = [c.test.mean for _, c in found], [c.test.low for _, c in found], [c.test.high for _, c in found]
            err = [[0 if np.isnan(v) else m - v for m, v in zip(x, lo)], [0 if np.isnan(v) else v - m for m, v in zip(x, hi)]]
            ax.errorbar(x, y, xerr=err, fmt="o", capsize=3, color=f"C{j % 10}", label=f"fraction {a.fraction:g}")
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(range(len(methods)), methods)
        ax.invert_yaxis()
        ax.set_title(on if on != "Δm%" else f"Δm% (metrics: {metrics})")
        ax.set_xlabel("method − single-task (+: better)" + (", %" if on == "Δm%" else ""))
        ax.legend(fontsize="x-small")
    _save(fig, out, "paired_differences")
    return "\n".join([
        "## Paired differences",
        "",
        "Method − single-task per seed, mean and 95% CI (t interval; Δm%: bootstrap), signed so that right "
        "of the zero line is better. Also as [PDF](paired_differences.pdf).",
        "",
        "![paired differences](paired_differences.png)",
    ])


def _convergence(df: pd.DataFrame, out: Path) -> str:
    lines = ["## Convergence", ""]
    conv = convergence(df, out)
    if conv.empty:
        return "\n".join(lines + ["Not checked: the cells' metrics.jsonl are not in the report's folder (the report was built "
                                  "from a results table away from its grid)."])
    judged = conv[conv["still_improving"].notna()]
    flagged = judged[judged["still_improving"].astype(bool)]
    lines.append(
        f"A cell is flagged when its primary validation metric was still improving in the last "
        f"{CONVERGENCE_TAIL:.0%} of its epochs (the best value there beats the best before): its budget, not "
        f"convergence, ended it. {len(flagged)} of {len(judged)} judged (cell, task) pairs flagged"
        + (f"; {len(conv) - len(judged)} not judged (fewer than 2 validations)." if len(judged) < len(conv) else ".")
    )
    if not flagged.empty:
        body = []
        for (method, fraction, task), group in judged.groupby(["method", "fraction", "task"], sort=False):
            seeds = group.loc[group["still_improving"].astype(bool), "seed"]
            if len(seeds):
                body.append([method, f"{fraction:g}", task, f"{len(seeds)} of {len(group)}", ", ".join(str(s) for s in sorted(seeds)),
                             f"{group['epochs'].min()}" if group["epochs"].nunique() == 1 else f"{group['epochs'].min()}–{group['epochs'].max()}"])
        lines += ["", "**Still improving** (each cell's folder: the `cell` column of results.csv):", "",
                  markdown_table(["method", "fraction", "task", "cells flagged", "seeds", "epochs"], body)]
    return "\n".join(lines)


def _data_efficiency(df: pd.DataFrame, out: Path, primary: dict[str, str], directions: Directions) -> str:
    test = df[(df["split"] == "test") & (df["metric"] == df["task"].map(primary))]
    # Joint runs report the source tasks at every fraction too, so the targets (the tasks whose
    # labels were subsampled) are read off the single-task runs when there are any.
    runs = test[test["method"] == BASELINE] if BASELINE in set(test["method"]) else test
    n_fractions = runs.groupby("task")["fraction"].nunique()
    targets = [t for t in primary if n_fractions.get(t, 0) > 1]
    lines = ["## Data efficiency", ""]
    if not targets:
        return "\n".join(lines + ["Every task was run at a single labelled fraction: no curve to draw."])
    lines.append("Primary test metric against the labelled fraction (log scale); error bars: 95% t interval "
                 "of the seed mean, methods offset sideways so the bars do not overlap.")
    colors = _colors(df)
    for task in targets:
        metric = primary[task]
        rows = test[test["task"] == task]
        fig = Figure(figsize=(5.5, 3.6))
        ax = fig.add_subplot()
        methods = _methods(rows)
        for i, method in enumerate(methods):
            by = rows[rows["method"] == method].groupby("fraction")["value"]
            mean, half = by.mean(), by.agg(_ci_halfwidth)
            x = mean.index.to_numpy() * 10 ** _dodge(i, len(methods), 0.03)  # log axis: dodge by a factor
            ax.errorbar(x, mean, half, marker="o", capsize=3, color=colors[method], label=method)
        _fraction_axis(ax, sorted(rows["fraction"].unique()), "labelled fraction of the target data (log scale)")
        ax.set_ylabel(f"test {metric} {_arrow(directions[(task, metric)])}")
        ax.set_title(task)
        ax.legend(fontsize="small")
        name = f"data_efficiency_{_filename(task)}"
        _save(fig, out, name)
        lines += ["", f"![data efficiency: {task}]({name}.png)"]
    return "\n".join(lines)


def _generalization_stats(df: pd.DataFrame, primary: dict[str, str], directions: Directions) -> pd.DataFrame:
    """Per (method, fraction, task): the train − test gap of the primary metric (signed so that
    positive means train better than test), mean over seeds and the half-width of its 95% t
    interval; the std over seeds of the test value."""
    records = []
    for method in _methods(df):
        for fraction in sorted(df["fraction"].unique()):
            rows = _method_rows(df, method, fraction)
            train, test = _values(rows, "train"), _values(rows, "test")
            for task, metric in primary.items():
                if (task, metric) not in test:
                    continue
                sign = 1.0 if directions[(task, metric)] == "max" else -1.0
                gap = sign * (train[(task, metric)] - test[(task, metric)]) if (task, metric) in train else None
                records.append({
                    "method": method, "fraction": fraction, "task": task,
                    "gap": math.nan if gap is None else gap.mean(),
                    "gap_ci": math.nan if gap is None else _ci_halfwidth(gap),
                    "brittleness": test[(task, metric)].std(),
                })
    return pd.DataFrame(records)


def _generalization(df: pd.DataFrame, out: Path, primary: dict[str, str], directions: Directions) -> str:
    gen = _generalization_stats(df, primary, directions)
    tasks = list(pd.unique(gen["task"]))
    header = ["method", "fraction"]
    for task in tasks:
        header += [f"{task} gap", f"{task} seed std"]
    body = []
    for (method, fraction), group in gen.groupby(["method", "fraction"], sort=False):
        by_task = group.set_index("task")
        row = [method, f"{fraction:g}"]
        for task in tasks:
            has = task in by_task.index
            row += [format_mean_std(by_task.loc[task, "gap"], signed=True) if has else "n/a"]
            row += [format_mean_std(by_task.loc[task, "brittleness"]) if has else "n/a"]
        body.append(row)

    colors = _colors(df)
    fractions = sorted(gen["fraction"].unique())
    fig = Figure(figsize=(3.8 * len(tasks), 5.6))
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for col, task in enumerate(tasks):
        by_method = list(gen[gen["task"] == task].groupby("method", sort=False))
        for i, (method, group) in enumerate(by_method):
            style = {"marker": "o", "color": colors[method], "label": method}
            x = group["fraction"] * 10 ** _dodge(i, len(by_method), 0.03)  # log axis: dodge by a factor
            axes[0, col].errorbar(x, group["gap"], group["gap_ci"].fillna(0), capsize=3, **style)
            axes[1, col].plot(group["fraction"], group["brittleness"], **style)
        axes[0, col].set_title(f"{task} ({primary[task]})")
        axes[0, col].set_ylabel("train − test gap (+: train better)")
        axes[1, col].set_ylabel("test std over seeds")
        for ax in axes[:, col]:
            ax.legend(fontsize="x-small")
            _fraction_axis(ax, fractions)
            # Zero (no gap, no spread) is the reference; drawing it also keeps the scale readable.
            ax.axhline(0, color="grey", linewidth=0.8)
    _save(fig, out, "generalization")
    return "\n".join([
        "## Generalization and brittleness",
        "",
        "At every labelled fraction, per task's primary metric. Gap: train − test, mean over seeds "
        "(plot: with its 95% t interval), "
        "signed so that **a positive gap means train is better than test** (for lower-is-better "
        "metrics the difference is negated). Seed std: std over seeds of the test value "
        "(brittleness; lower is steadier; descriptive: with few seeds a std is itself very uncertain). "
        "n/a: no train-split value or a single seed.",
        "",
        markdown_table(header, body),
        "",
        "![generalization](generalization.png)",
    ])


def _parameters(df: pd.DataFrame, out: Path) -> str:
    records = []
    for method in _methods(df):
        fraction = df.loc[df["method"] == method, "fraction"].max()
        cells = _method_rows(df, method, fraction).drop_duplicates(["seed", "cell"])
        per_seed = cells.groupby("seed")[["trainable_params", "total_params", "wall_time_s"]].sum().mean()
        records.append((method, cells.groupby("seed")["cell"].nunique().max(), per_seed))
    body = [
        [m, str(runs), f"{p['trainable_params']:,.0f}", f"{p['total_params']:,.0f}",
         f"{100 * p['trainable_params'] / p['total_params']:.1f}%", f"{p['wall_time_s']:.1f}"]
        for m, runs, p in records
    ]
    fig = Figure(figsize=(6, 1.2 + 0.5 * len(records)))
    ax = fig.add_subplot()
    y = range(len(records))
    ax.barh([i + 0.2 for i in y], [p["total_params"] for _, _, p in records], 0.4, label="total")
    ax.barh([i - 0.2 for i in y], [p["trainable_params"] for _, _, p in records], 0.4, label="trainable")
    ax.set_yticks(list(y), [m for m, _, _ in records])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.legend(fontsize="small", loc="lower right")
    _save(fig, out, "parameters")
    return "\n".join([
        "## Parameters",
        "",
        "Per seed, summed over a method's runs at its largest fraction (single-task trains one "
        "model per task, so its count is what serving every task takes).",
        "",
        markdown_table(["method", "runs", "trainable", "total", "trainable share", "wall time (s)"], body),
        "",
        "![parameters](parameters.png)",
    ])


# ---- forgetting (sequential regimes) and accuracy against trainable parameters ----

FORGETTING_COLUMNS = ("stages", "trained_first", "trained_last", "after_training", "backward_transfer")


@dataclass
class Forgetting:
    """One multi-stage method at one fraction, over the tasks of its cells (test split, primary
    metrics): ``acc``, each seed's ACC; ``bwt``, ``fwt`` and ``vs_joint`` (ACC minus the joint
    regime's ACC of the same seed), each a ``stats.Difference`` of per-seed values tested
    against 0; None where it does not apply (no earlier task, no baseline, no joint regime)."""

    method: str
    fraction: float
    acc: np.ndarray
    bwt: stats.Difference | None
    fwt: stats.Difference | None
    vs_joint: stats.Difference | None


def forgetting_stats(df: pd.DataFrame, joint: str = "joint") -> list[Forgetting]:
    """ACC, BWT and FWT of every method whose cells have 2 or more stages, per labelled fraction,
    from the long-form table alone (its forgetting columns, written by ``mtl compare``):

      ACC = mean over the cell's tasks of the final value (R_{T,i});
      BWT = mean over the tasks trained before the last stage of ``backward_transfer``
            (R_{T,i} − R_{i,i}, signed: negative is forgetting);
      FWT = mean over the tasks not trained in the first stage of ``after_training`` (R_{i,i})
            minus the single-task value of the same task and seed (signed by direction).

    Averages over tasks are taken only when every task's primary metric is the same metric
    with the same direction (they must share a scale); otherwise that method has none. The
    tests (BWT ≠ 0, FWT ≠ 0, ACC − joint ≠ 0: paired t-tests over seeds) are Holm-corrected
    together, as one family of their own."""
    df = _prepare(df)
    if any(c not in df.columns for c in FORGETTING_COLUMNS):
        return []
    primary, directions = _primary_metrics(df), _directions(df)
    test = df[(df["split"] == "test") & df["primary"]]
    out = []
    for fraction in sorted(test["fraction"].unique()):
        base = _values(_method_rows(df, BASELINE, fraction), "test") if BASELINE in set(df["method"]) else pd.DataFrame()
        joint_acc = _acc_per_seed(test[(test["method"] == joint) & (test["fraction"] == fraction)], primary, directions)
        for method in _methods(test):
            rows = test[(test["method"] == method) & (test["fraction"] == fraction)]
            if rows.empty or rows["stages"].max() < 2:
                continue
            acc = _acc_per_seed(rows, primary, directions)
            if acc is None:
                out.append(Forgetting(method, fraction, np.array([]), None, None, None))
                continue
            sign = 1.0 if directions[(rows["task"].iloc[0], rows["metric"].iloc[0])] == "max" else -1.0
            earlier = rows[rows["trained_last"] < rows["stages"] - 1]
            bwt = earlier.groupby("seed")["backward_transfer"].mean().dropna()
            later = rows[rows["trained_first"] > 0]
            gains = []
            for row in later.itertuples(index=False):
                key = (row.task, primary[row.task])
                if key in base.columns and row.seed in base.index and pd.notna(base.loc[row.seed, key]):
                    gains.append((row.seed, sign * (row.after_training - base.loc[row.seed, key])))
            fwt = pd.DataFrame(gains, columns=["seed", "gain"]).groupby("seed")["gain"].mean() if gains else pd.Series(dtype=float)
            both = acc.index.intersection(joint_acc.index) if joint_acc is not None else []
            out.append(Forgetting(
                method, fraction, acc.to_numpy(),
                stats.Difference.of(bwt.to_numpy()) if len(bwt) else None,
                stats.Difference.of(fwt.to_numpy()) if len(fwt) else None,
                stats.Difference.of(sign * (acc[both] - joint_acc[both]).to_numpy()) if len(both) else None,
            ))
    stats.correct([d for f in out for d in (f.bwt, f.fwt, f.vs_joint) if d is not None])
    return out


def _acc_per_seed(rows: pd.DataFrame, primary: dict[str, str], directions: Directions) -> pd.Series | None:
    """Per seed, the mean final value over the tasks (ACC); None without rows or when the tasks'
    primary metrics differ (an average over different scales means nothing)."""
    if rows.empty or len({(m, directions[(t, m)]) for t, m in primary.items() if t in set(rows["task"])}) > 1:
        return None
    per_seed = rows.groupby(["seed", "task"])["value"].mean().unstack("task")
    return per_seed.dropna().mean(axis=1)


def _forgetting_section(df: pd.DataFrame) -> str:
    results = forgetting_stats(df)
    if not results:
        return ""
    d = _prepare(df)
    primary, directions = _primary_metrics(d), _directions(d)
    m = sum(1 for f in results for t in (f.bwt, f.fwt, f.vs_joint) if t is not None and t.n > 1)

    def cell(diff: stats.Difference | None) -> list[str]:
        if diff is None:
            return ["n/a", "–", "–"]
        return [_fmt_ci(diff.mean, diff.low, diff.high), _fmt_p(diff.p_holm if diff.n > 1 else math.nan), diff.verdict(m=max(m, 1))]

    body = []
    for f in results:
        acc = format_mean_std(f.acc.mean(), f.acc.std(ddof=1) if len(f.acc) > 1 else math.nan) if len(f.acc) else "n/a (mixed metrics)"
        body.append([f.method, f"{f.fraction:g}", str(len(f.acc)), acc, *cell(f.bwt), *cell(f.fwt), *cell(f.vs_joint)])
    d = d[(d["split"] == "test") & d["primary"] & (d["stages"] >= 2) & (d["trained_last"] < d["stages"] - 1)]
    tasks = []
    for (method, fraction, task), g in d.groupby(["method", "fraction", "task"], sort=False):
        if g["backward_transfer"].isna().all():  # its metric could not be computed (no labelled sample)
            continue
        diff = stats.Difference.of(g["backward_transfer"].dropna().to_numpy())
        tasks.append([method, f"{fraction:g}", task, f"{primary[task]} {_arrow(directions[(task, primary[task])])}", str(diff.n),
                      format_mean_std(g["after_training"].mean()), format_mean_std(g["value"].mean()),
                      _fmt_ci(diff.mean, diff.low, diff.high), format_mean_std(g["retention"].mean()) if "retention" in g else "n/a"])
    return "\n".join([
        "## Forgetting in sequential transfer",
        "",
        "Every task trained before a cell's last stage keeps its head, and after each later stage it is evaluated on that "
        "stage's trunk (the matrix R of Lopez-Paz & Ranzato 2017, GEM: R[k][i] is task i's test metric after stage k). "
        "Over a cell's tasks, on their primary test metric: **ACC** = (1/T) Σ_i R[T][i], the final mean; "
        "**BWT** = 1/(T−1) Σ_{i<T} (R[T][i] − R[i][i]), the change of the earlier tasks since their own training "
        "(**negative is forgetting**); **FWT** = 1/(T−1) Σ_{i≥2} (R[i][i] − b_i), each later task just after its training "
        "against single-task b_i of the same seed (GEM's b_i is a random model's score, which with a new head per task is "
        "chance; a model trained alone is Continual World's reference, Wołczyk et al. 2021). Metrics are signed so that "
        "positive is better. Mean over seeds [95% t interval]; p (Holm): paired t-test against 0, Holm-corrected over the "
        f"{m} tests of this section; verdict: better / worse where p (Holm) < 0.05 (a *worse* BWT is forgetting the "
        "seeds resolve); ACC − joint: per seed against the joint regime. An average over tasks is given only when the "
        "tasks share their primary metric.",
        "",
        markdown_table(["method", "fraction", "n", "ACC", "BWT [95% CI]", "p (Holm)", "verdict", "FWT [95% CI]", "p (Holm)",
                        "verdict", "ACC − joint [95% CI]", "p (Holm)", "verdict"], body),
        "",
        "Per earlier task: its value right after its own training, after the last stage, their difference (backward "
        "transfer, positive is better) and the retention (final / after training; after / final for lower-is-better "
        "metrics; 1 = nothing lost):",
        "",
        markdown_table(["method", "fraction", "task", "metric", "n", "after training", "final", "backward transfer [95% CI]",
                        "retention"], tasks),
    ])


def _parameter_tasks(df: pd.DataFrame, primary: dict[str, str]) -> list[str]:
    """The targets (tasks whose single-task runs span several labelled fractions), else every task."""
    test = df[df["split"] == "test"]
    runs = test[test["method"] == BASELINE] if BASELINE in set(test["method"]) else test
    counts = runs.groupby("task")["fraction"].nunique()
    targets = [t for t in primary if counts.get(t, 0) > 1]
    return targets or list(primary)


def _accuracy_vs_parameters(df: pd.DataFrame, out: Path, primary: dict[str, str], directions: Directions) -> str:
    tasks = _parameter_tasks(df, primary)
    if "trained_last" in df.columns:  # an earlier task of a sequential cell was trained by another run than the counted one
        df = df[df["trained_last"] >= df["stages"] - 1]
    # A non-target's baseline runs at fraction 1 only and stands in at every fraction: no panel of its own.
    methods = df[df["method"] != BASELINE]
    fractions = sorted((methods if not methods.empty else df)["fraction"].unique())
    colors = _colors(df)
    body = []
    fig = Figure(figsize=(4.2 * len(fractions), 3.4 * len(tasks)))
    axes = fig.subplots(len(tasks), len(fractions), squeeze=False)
    for r, task in enumerate(tasks):
        metric = primary[task]
        for c, fraction in enumerate(fractions):
            ax = axes[r, c]
            methods, xs = _methods(df), []
            for i, method in enumerate(methods):
                rows = _method_rows(df, method, fraction)
                rows = rows[(rows["split"] == "test") & (rows["task"] == task) & (rows["metric"] == metric)]
                if rows.empty:
                    continue
                by_seed = rows.groupby("seed")[["value", "trainable_params"]].mean()
                mean, half, params = by_seed["value"].mean(), _ci_halfwidth(by_seed["value"]), by_seed["trainable_params"].mean()
                # Methods that train as many parameters (fine-tune, joint) are dodged by a factor on the log axis.
                xs.append(params * 10 ** _dodge(i, len(methods), 0.02))
                ax.errorbar(xs[-1:], [mean], [half], fmt="o", capsize=3, color=colors[method], label=method)
                interval = f" [{mean - half:.4f}, {mean + half:.4f}]" if len(by_seed) > 1 else ""
                body.append([task, f"{fraction:g}", method, f"{params:,.0f}", str(len(by_seed)), f"{mean:.4f}{interval}"])
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow range otherwise labels every minor tick, overlapping
            if xs:  # at least a decade wide, with a margin: a label then sits on a major tick
                ax.set_xlim(min(xs) / 3, max(max(xs), 10 * min(xs)) * 3)
            ax.set_xlabel("trainable parameters (log scale)")
            ax.set_ylabel(f"test {metric} {_arrow(directions[(task, metric)])}")
            ax.set_title(f"{task}, fraction {fraction:g}")
            ax.ticklabel_format(axis="y", useOffset=False)
            if ax.has_data():
                ax.legend(fontsize="x-small")
    _save(fig, out, "accuracy_vs_parameters")
    return "\n".join([
        "## Accuracy against trainable parameters",
        "",
        "Each method's primary test metric (mean over seeds, 95% t interval) against the parameters its run trains "
        "(the last stage's: a sequential recipe's count is what fine-tuning the target costs), per task and labelled "
        "fraction; the targets only where the single-task runs show which they are (several fractions), and a task only "
        "where the counted run trained it (a sequential cell's earlier tasks are in Forgetting). Also as "
        "[PDF](accuracy_vs_parameters.pdf).",
        "",
        markdown_table(["task", "fraction", "method", "trainable", "n", "test value [95% CI]"], body),
        "",
        "![accuracy against trainable parameters](accuracy_vs_parameters.png)",
    ])
