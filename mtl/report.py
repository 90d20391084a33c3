"""Comparison report: per-task tables, Δm% against single-task, data-efficiency,
generalization and parameter plots, and findings read off the numbers.

Input is the long-form results table that ``mtl compare`` writes (one row per value; see
``REQUIRED_COLUMNS``). Every number and every sentence of the findings is computed here from
that table, so a report can be regenerated from ``results.csv`` alone.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

BASELINE = "single_task"
REQUIRED_COLUMNS = (
    "method", "regime", "recipe", "seed", "fraction", "task", "split", "metric", "value",
    "direction", "primary", "trainable_params", "total_params", "wall_time_s", "cell",
)

FORMULA = "Δm% = (100 / K) Σ_k (−1)^{l_k} (M_m,k − M_b,k) / M_b,k"

# (task, metric) -> value, or -> "max" / "min"
Metrics = dict[tuple[str, str], float]
Directions = dict[tuple[str, str], str]


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
    total = 0.0
    for key, value in method.items():
        if directions[key] not in ("max", "min"):
            raise ValueError(f"direction of {key} must be 'max' or 'min', got {directions[key]!r}")
        if baseline[key] == 0:
            raise ValueError(f"baseline of {key} is 0: a relative change is undefined")
        sign = -1.0 if directions[key] == "min" else 1.0
        total += sign * (value - baseline[key]) / abs(baseline[key])
    return 100.0 * total / len(method)


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, fraction): ``n_seeds``, ``test/{task}/{metric}/mean`` and ``/std`` of
    each task's primary metric (NaN where the method does not report the task), and
    ``delta_m_pct`` / ``delta_m_pct_std`` (NaN without a single-task baseline)."""
    df = _prepare(df)
    primary = _primary_metrics(df)
    directions = _directions(df)
    has_baseline = BASELINE in set(df["method"])
    columns = [f"test/{t}/{m}/{stat}" for t, m in primary.items() for stat in ("mean", "std")]
    records = []
    for fraction in sorted(df["fraction"].unique()):
        base = _values(_method_rows(df, BASELINE, fraction), "test") if has_baseline else None
        for method in _methods(df):
            rows = _method_rows(df, method, fraction)
            if rows.empty:
                continue
            values = _values(rows, "test")
            record = {"method": method, "fraction": fraction, "n_seeds": rows["seed"].nunique()}
            for task, metric in primary.items():
                if (task, metric) in values:
                    record[f"test/{task}/{metric}/mean"] = values[(task, metric)].mean()
                    record[f"test/{task}/{metric}/std"] = values[(task, metric)].std()
            record["delta_m_pct"], record["delta_m_pct_std"] = _delta(values, base, directions)
            records.append(record)
    return pd.DataFrame(records).reindex(
        columns=["method", "fraction", "n_seeds", *columns, "delta_m_pct", "delta_m_pct_std"]
    )


def write_report(df: pd.DataFrame, out_dir: str | Path, title: str = "Comparison") -> str:
    """Write ``report.md`` and its PNGs (``data_efficiency_<task>.png`` per target task,
    ``generalization.png``, ``parameters.png``) into ``out_dir``; return the Markdown."""
    df = _prepare(df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(df)
    primary = _primary_metrics(df)
    directions = _directions(df)
    sections = [
        _header(df, title, primary, directions),
        _definition(),
        *(_task_table(table, f, primary, directions) for f in sorted(table["fraction"].unique())),
        _delta_table(table),
        _data_efficiency(df, out, primary, directions),
        _generalization(df, out, primary, directions),
        _parameters(df, out),
        _findings(df, table, primary, directions),
    ]
    text = "\n\n".join(sections) + "\n"
    (out / "report.md").write_text(text)
    return text


# ---- the table and what is read from it ----


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


def _delta(values: pd.DataFrame, base: pd.DataFrame | None, directions: Directions) -> tuple[float, float]:
    """Δm% of the seed-mean values, and the std over seeds of each seed's Δm% against the
    seed-mean baseline; NaN where a key has no baseline or a zero one."""
    keys = [k for k in values.columns if k[1] != "loss"]
    if base is None or not keys:
        return math.nan, math.nan
    base_mean = base.mean()
    if any(k not in base_mean.index or base_mean[k] == 0 for k in keys):
        return math.nan, math.nan
    base_dict = base_mean[keys].to_dict()
    mean = delta_m(values[keys].mean().to_dict(), base_dict, directions)
    per_seed = [delta_m(row.to_dict(), base_dict, directions) for _, row in values[keys].iterrows()]
    return mean, pd.Series(per_seed, dtype=float).std()


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "max" else a < b


def _best(means: pd.Series, direction: str) -> set:
    """Index labels of the best finite mean (all of them on a tie)."""
    means = means.dropna()
    if means.empty:
        return set()
    best = means.max() if direction == "max" else means.min()
    return set(means.index[means == best])


# ---- formatting ----


def _fmt(mean: float, std: float = math.nan, digits: int = 4, signed: bool = False) -> str:
    """``mean ± std``; the std is left out where it does not exist (one seed)."""
    if pd.isna(mean):
        return "n/a"
    text = f"{mean:{'+' if signed else ''}.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {std:.{digits}f}"


def _fmt_delta(mean: float, std: float) -> str:
    return _fmt(mean, std, digits=2, signed=True)


def _arrow(direction: str) -> str:
    return "↑" if direction == "max" else "↓"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _filename(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task)


def _colors(df: pd.DataFrame) -> dict[str, str]:
    """One colour per method, the same in every plot and panel."""
    return {method: f"C{i % 10}" for i, method in enumerate(_methods(df))}


def _fraction_axis(ax, fractions, label: str = "labelled fraction") -> None:
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel(label)
    # Near-equal values otherwise get an unreadable "1e-14+1.41e-2" offset label.
    ax.ticklabel_format(axis="y", useOffset=False)


def _save(fig: Figure, path: Path) -> None:
    # A bare Figure renders PNG with Agg and touches no pyplot state, so a caller's backend and
    # open figures are left alone and nothing needs a display.
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- sections ----


def _header(df: pd.DataFrame, title: str, primary: dict[str, str], directions: Directions) -> str:
    seeds = sorted(df["seed"].unique())
    fractions = ", ".join(f"{f:g}" for f in sorted(df["fraction"].unique()))
    tasks = ", ".join(f"{t} ({m} {_arrow(directions[(t, m)])})" for t, m in primary.items())
    return "\n".join([
        f"# {title}",
        "",
        "Model selection used the validation split only; the test split was evaluated once, "
        "on the selected checkpoint.",
        "",
        f"- Methods: {', '.join(_methods(df))}",
        f"- Seeds: {len(seeds)} ({', '.join(str(s) for s in seeds)})",
        f"- Labelled fractions of the target data: {fractions}",
        f"- Tasks (primary metric, ↑ higher / ↓ lower is better): {tasks}",
    ])


def _definition() -> str:
    return "\n".join([
        "## Δm% (Maninis et al. 2019)",
        "",
        f"`{FORMULA}`",
        "",
        "over the K (task, metric) pairs of the tasks a method reports, every test metric except "
        "the loss; l_k = 1 where lower is better, 0 otherwise; M are test values averaged over "
        "seeds; the baseline b is single-task (|M_b,k| in the denominator, which changes nothing "
        "for positive metrics). **Positive Δm% means better than single-task, negative worse.** "
        "The ± is the std over seeds of each seed's Δm% against the seed-mean baseline. A task "
        "whose single-task baseline exists at one fraction only (a source task, whose data is "
        "not subsampled) is compared with that baseline at every fraction.",
    ])


def _task_table(table: pd.DataFrame, fraction: float, primary: dict[str, str], directions: Directions) -> str:
    rows = table[table["fraction"] == fraction].set_index("method")
    best = {t: _best(rows[f"test/{t}/{m}/mean"], directions[(t, m)]) for t, m in primary.items()}
    best_delta = _best(rows["delta_m_pct"], "max")
    header = ["method", "n seeds"]
    header += [f"{t}: {m} {_arrow(directions[(t, m)])}" for t, m in primary.items()]
    header.append("Δm% ↑")
    body = []
    for method, row in rows.iterrows():
        cells = [method, str(int(row["n_seeds"]))]
        for task, metric in primary.items():
            text = _fmt(row[f"test/{task}/{metric}/mean"], row[f"test/{task}/{metric}/std"])
            cells.append(f"**{text}**" if method in best[task] else text)
        text = _fmt_delta(row["delta_m_pct"], row["delta_m_pct_std"])
        cells.append(f"**{text}**" if method in best_delta else text)
        body.append(cells)
    return "\n".join([
        f"## Test results at labelled fraction {fraction:g}",
        "",
        "Primary test metric, mean ± std over seeds; best per column in bold; n/a: not reported.",
        "",
        _markdown(header, body),
    ])


def _delta_table(table: pd.DataFrame) -> str:
    title = "## Δm% against single-task (%, mean ± std over seeds)"
    if BASELINE not in set(table["method"]):
        return f"{title}\n\nNo `{BASELINE}` rows in the results: Δm% cannot be computed."
    fractions = sorted(table["fraction"].unique())
    cells = table.set_index(["method", "fraction"])
    body = []
    for method in [m for m in pd.unique(table["method"]) if m != BASELINE]:
        row = [method]
        for f in fractions:
            has = (method, f) in cells.index
            row.append(_fmt_delta(*cells.loc[(method, f), ["delta_m_pct", "delta_m_pct_std"]]) if has else "n/a")
        body.append(row)
    return f"{title}\n\n" + _markdown(["method", *(f"fraction {f:g}" for f in fractions)], body)


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
    lines.append("Primary test metric against the labelled fraction (log scale); error bars: std over seeds.")
    colors = _colors(df)
    for task in targets:
        metric = primary[task]
        rows = test[test["task"] == task]
        fig = Figure(figsize=(5.5, 3.6))
        ax = fig.add_subplot()
        for method in _methods(rows):
            stats = rows[rows["method"] == method].groupby("fraction")["value"].agg(["mean", "std"])
            yerr = stats["std"].fillna(0)
            ax.errorbar(stats.index, stats["mean"], yerr, marker="o", capsize=3, color=colors[method], label=method)
        _fraction_axis(ax, sorted(rows["fraction"].unique()), "labelled fraction of the target data (log scale)")
        ax.set_ylabel(f"test {metric} {_arrow(directions[(task, metric)])}")
        ax.set_title(task)
        ax.legend(fontsize="small")
        name = f"data_efficiency_{_filename(task)}.png"
        _save(fig, out / name)
        lines += ["", f"![data efficiency: {task}]({name})"]
    return "\n".join(lines)


def _generalization_stats(df: pd.DataFrame, primary: dict[str, str], directions: Directions) -> pd.DataFrame:
    """Per (method, fraction, task): the train − test gap of the primary metric (signed so that
    positive means train better than test), mean over seeds; the std over seeds of the test value."""
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
                    "brittleness": test[(task, metric)].std(),
                })
    return pd.DataFrame(records)


def _generalization(df: pd.DataFrame, out: Path, primary: dict[str, str], directions: Directions) -> str:
    stats = _generalization_stats(df, primary, directions)
    tasks = list(pd.unique(stats["task"]))
    header = ["method", "fraction"]
    for task in tasks:
        header += [f"{task} gap", f"{task} seed std"]
    body = []
    for (method, fraction), group in stats.groupby(["method", "fraction"], sort=False):
        by_task = group.set_index("task")
        row = [method, f"{fraction:g}"]
        for task in tasks:
            has = task in by_task.index
            row += [_fmt(by_task.loc[task, "gap"], signed=True) if has else "n/a"]
            row += [_fmt(by_task.loc[task, "brittleness"]) if has else "n/a"]
        body.append(row)

    colors = _colors(df)
    fractions = sorted(stats["fraction"].unique())
    fig = Figure(figsize=(3.8 * len(tasks), 5.6))
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for col, task in enumerate(tasks):
        for method, group in stats[stats["task"] == task].groupby("method", sort=False):
            style = {"marker": "o", "color": colors[method], "label": method}
            axes[0, col].plot(group["fraction"], group["gap"], **style)
            axes[1, col].plot(group["fraction"], group["brittleness"], **style)
        axes[0, col].set_title(f"{task} ({primary[task]})")
        axes[0, col].set_ylabel("train − test gap (+: train better)")
        axes[1, col].set_ylabel("test std over seeds")
        axes[0, col].legend(fontsize="x-small")
        for ax in axes[:, col]:
            _fraction_axis(ax, fractions)
            # Zero (no gap, no spread) is the reference; drawing it also keeps the scale readable.
            ax.axhline(0, color="grey", linewidth=0.8)
    _save(fig, out / "generalization.png")
    return "\n".join([
        "## Generalization and brittleness",
        "",
        "At every labelled fraction, per task's primary metric. Gap: train − test, mean over seeds, "
        "signed so that **a positive gap means train is better than test** (for lower-is-better "
        "metrics the difference is negated). Seed std: std over seeds of the test value "
        "(brittleness; lower is steadier). n/a: no train-split value or a single seed.",
        "",
        _markdown(header, body),
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
    _save(fig, out / "parameters.png")
    return "\n".join([
        "## Parameters",
        "",
        "Per seed, summed over a method's runs at its largest fraction (single-task trains one "
        "model per task, so its count is what serving every task takes).",
        "",
        _markdown(["method", "runs", "trainable", "total", "trainable share", "wall time (s)"], body),
        "",
        "![parameters](parameters.png)",
    ])


def _findings(df: pd.DataFrame, table: pd.DataFrame, primary: dict[str, str], directions: Directions) -> str:
    lines = ["## Findings", "", "Generated from the numbers above."]
    has_baseline = BASELINE in set(df["method"])
    if not has_baseline:
        lines += ["", f"- No `{BASELINE}` baseline in the results: nothing is compared against single-task."]
    for fraction in sorted(table["fraction"].unique()):
        rows = table[table["fraction"] == fraction].set_index("method")
        lines += ["", f"### Labelled fraction {fraction:g}", ""]
        for task, metric in primary.items():
            means = rows[f"test/{task}/{metric}/mean"]
            best = _best(means, directions[(task, metric)])
            if best:
                value = means[next(iter(best))]
                lines.append(f"- Best on {task} ({metric}): {', '.join(sorted(best))} ({value:.4f}).")
        if not has_baseline or BASELINE not in rows.index:
            continue
        for method, row in rows.drop(index=BASELINE).iterrows():
            lines.append(_method_finding(method, row, rows.loc[BASELINE], primary, directions))
    return "\n".join(lines)


def _method_finding(method: str, row: pd.Series, base: pd.Series, primary: dict[str, str], directions: Directions) -> str:
    delta, spread = row["delta_m_pct"], row["delta_m_pct_std"]
    if pd.isna(delta):
        return f"- {method}: Δm% not computed (a reported metric lacks a finite single-task baseline or value here)."
    if delta > 0:
        text = f"- {method} beats single-task on average (Δm% = {_fmt_delta(delta, spread)})"
        if not pd.isna(spread) and delta <= spread:
            text += ", but by less than the seed spread"
    else:
        text = f"- {method} does not beat single-task (Δm% = {_fmt_delta(delta, spread)})"
    worse = []
    for task, metric in primary.items():
        m, b = row[f"test/{task}/{metric}/mean"], base[f"test/{task}/{metric}/mean"]
        if not pd.isna(m) and not pd.isna(b) and _better(b, m, directions[(task, metric)]):
            worse.append(f"{task} ({m:.4f} vs {b:.4f})")
    if worse:
        text += f"; worse than single-task on {', '.join(worse)}"
    return text + "."
