"""Every registered weighting method on MultiFashion (Multi-LeNet, 3 seeds): per-task test
accuracy, Δm% against single-task, mean rank and the training-step time over equal weighting.

    python -m paper_repro.weighting_benchmark            # MultiFashion grid, then results/
    python -m paper_repro.weighting_benchmark --smoke    # every method, MultiMNIST, 2 steps (CI)
    python -m paper_repro.weighting_benchmark --report-only

The grid is paper_repro/multi_mnist/multi_fashion.yaml with methods.yaml merged over it, in
the same output folder, so the five methods paper_repro.multi_mnist runs are trained once.
Writes results/results.md, results/results.csv and results/delta_vs_time.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from paper_repro.common import SMOKE, STUDIES, delta_m_primary, fmt, folders, markdown, parser, provenance, run_grid, seed_stats, write
from paper_repro.weighting_benchmark.published import SOURCE, tables_markdown

HERE = STUDIES / "weighting_benchmark"
BASE = STUDIES / "multi_mnist" / "multi_fashion.yaml"
METHODS = HERE / "methods.yaml"
# Registered weightings that are another method under a new name, run once under that name:
# IMTL-L's objective Σ exp(s)L − s is uncertainty weighting's with s = −s' (IMTLLoss docstring).
SAME_AS = {"imtl_l": "uncertainty"}
# CI has no Fashion-MNIST: the smoke run puts the same methods on MultiMNIST (5k MNIST, bundled).
SMOKE_DATA = ["tasks.left.name=multi_mnist_left", "tasks.right.name=multi_mnist_right"]


def main(argv=None) -> int:
    args = parser("weighting_benchmark", __doc__).parse_args(argv)
    runs, results = folders(args, "weighting_benchmark")
    # The full grid shares its folder with paper_repro.multi_mnist's MultiFashion grid.
    out = runs if args.smoke else runs.parent / "multi_fashion"
    # log_every=1: the smoke's two steps must log a training rate for the step-time column.
    overrides = [*SMOKE, *SMOKE_DATA, "logging.log_every=1"] if args.smoke else []
    start = time.perf_counter()
    df = run_grid(BASE, [*overrides, *args.overrides], out, train=not args.report_only, extra=METHODS)
    # Wall time summed over invocations (a grid may be run in parts, e.g. some regimes removed with ~).
    timing = out / "weighting_benchmark_wall_time.json"
    walls = json.loads(timing.read_text()) if timing.exists() else []
    if not args.report_only:
        walls.append(time.perf_counter() - start)
        timing.write_text(json.dumps(walls))
    wall = sum(walls) or None
    report(df, out, results, wall, args.smoke)
    print(f"results: {results / 'results.md'}")
    return 0


def step_ratio(df: pd.DataFrame, root: Path) -> pd.Series:
    """Per method: median training samples/s of equal weighting over the method's, the median
    taken over the logged intervals of all its seeds (evaluation excluded)."""
    rates = {}
    for method, cells in df.groupby("method")["cell"]:
        values = []
        for cell in set(cells):
            path = root / cell / "metrics.jsonl"
            if path.exists():
                values += [r["samples_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "samples_per_s" in r]
        rates[method] = pd.Series(values, dtype=float).median()
    rates = pd.Series(rates)
    return rates.get("equal", float("nan")) / rates


def kind(method: str) -> str:
    from mtl.weighting import WEIGHTINGS, GradientWeighting

    if method == "single_task":
        return "-"
    return "gradient" if issubclass(WEIGHTINGS.get(method), GradientWeighting) else "loss"


def table(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    stats = seed_stats(df, ["method", "task"])
    wide = stats.pivot(index="method", columns="task", values=["mean", "std", "count"])
    deltas = delta_m_primary(df).set_index("method")
    ratio = step_ratio(df[df["method"] != "single_task"], root)
    out = pd.DataFrame({
        "method": wide.index,
        "kind": [kind(m) for m in wide.index],
        "n_seeds": wide[("count", "left")].astype(int).values,
        "left_mean": wide[("mean", "left")].values, "left_std": wide[("std", "left")].values,
        "right_mean": wide[("mean", "right")].values, "right_std": wide[("std", "right")].values,
    })
    out["delta_m_pct"] = out["method"].map(deltas["delta_m_pct"]).fillna(0.0)
    out["delta_m_pct_std"] = out["method"].map(deltas["delta_m_pct_std"])
    # Mean rank (as Navon et al. 2022 and Liu et al. 2023): rank of each MTL method per task, averaged.
    mtl = out["method"] != "single_task"
    ranks = out.loc[mtl, ["left_mean", "right_mean"]].rank(ascending=False, method="average")
    out.loc[mtl, "mean_rank"] = ranks.mean(axis=1)
    out["step_time_ratio"] = out["method"].map(ratio)
    return out.sort_values(["delta_m_pct"], ascending=False, key=lambda s: s.where(mtl, float("inf"))).reset_index(drop=True)


def report(df: pd.DataFrame, root: Path, results: Path, wall: float | None, smoke: bool) -> None:
    t = table(df, root)
    t.to_csv(results / "results.csv", index=False)
    body = [[r.method, r.kind, r.n_seeds, fmt(r.left_mean, r.left_std), fmt(r.right_mean, r.right_std),
             "0 (baseline)" if r.method == "single_task" else fmt(r.delta_m_pct, r.delta_m_pct_std, scale=1, signed=True),
             "-" if pd.isna(r.mean_rank) else f"{r.mean_rank:.1f}",
             "-" if pd.isna(r.step_time_ratio) else f"{r.step_time_ratio:.2f}"] for r in t.itertuples()]
    mtl = t[t["method"] != "single_task"]
    best = mtl.iloc[0]
    beat = mtl[mtl["delta_m_pct"] > 0]["method"].tolist()
    equal = t.set_index("method").loc["equal"] if "equal" in set(t["method"]) else None
    above_equal = mtl[mtl["delta_m_pct"] > equal["delta_m_pct"]]["method"].tolist() if equal is not None else []
    spread = mtl["delta_m_pct_std"].median()
    findings = [
        f"- Best Δm%: {best.method} ({fmt(best.delta_m_pct, best.delta_m_pct_std, scale=1, signed=True)}).",
        f"- Methods above single-task (Δm% > 0): {', '.join(beat) if beat else 'none'}.",
        f"- Methods above equal weighting: {len(above_equal)} of {len(mtl) - 1}"
        + (f" ({', '.join(above_equal)})" if above_equal else "") + ".",
        f"- Median seed std of Δm%: {spread:.2f} points, against a range of "
        f"{mtl['delta_m_pct'].max() - mtl['delta_m_pct'].min():.2f} points between best and worst method.",
    ]
    text = "\n\n".join([
        "# Every weighting method on MultiFashion: results",
        provenance("python -m paper_repro.weighting_benchmark" + (" --smoke" if smoke else ""), wall, smoke),
        "Test accuracy (%) of the left and right item, mean ± std over seeds; Δm% against single-task "
        "on the two accuracies (mean ± std over seeds); mean rank of the per-task accuracy among the "
        "MTL methods (1 = best); step time: median training samples/s of equal weighting over the "
        "method's (1.00 = as fast as equal weighting; evaluation excluded; a shared 2-core CPU, so "
        "±10–20% is noise). Sorted by Δm%.",
        markdown(["method", "kind", "seeds", "left acc. (%)", "right acc. (%)", "Δm% ↑", "mean rank ↓", "step time / equal"], body),
        "## Findings (generated from the table)\n\n" + "\n".join(findings),
        "![Δm% against step time](delta_vs_time.png)",
        "## Published Δm% (for reference; lower is better there)\n\n" + tables_markdown()
        + f"\n\nSource: {SOURCE} (see published.py). These values are printed as published: a drop, "
        "lower is better; the Δm% of our table is the same formula with the opposite sign (higher is better). They train other trunks on other "
        "data for far longer, so only the ordering of methods can be compared with ours, not the values.",
    ])
    write(results, "results.md", text)
    figure(mtl, results)


def figure(t: pd.DataFrame, results: Path) -> None:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for r in t.itertuples():
        color = "C1" if r.kind == "gradient" else "C0"
        ax.errorbar(r.step_time_ratio, r.delta_m_pct, yerr=0 if pd.isna(r.delta_m_pct_std) else r.delta_m_pct_std,
                    marker="o", color=color, capsize=2)
        ax.annotate(r.method, (r.step_time_ratio, r.delta_m_pct), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("training step time / equal weighting")
    ax.set_ylabel("Δm% vs single-task (↑)")
    ax.set_title("MultiFashion: blue loss-level, orange gradient-level")
    fig.tight_layout()
    fig.savefig(results / "delta_vs_time.png", dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
