"""Every registered weighting method on MultiFashion (Multi-LeNet, 3 seeds): per-task test
accuracy, Δm% against single-task, mean rank and the training-step time over equal weighting.

    python -m paper_repro.weighting_benchmark            # MultiFashion grid, then results/
    python -m paper_repro.weighting_benchmark --smoke    # every method, MultiMNIST, 2 steps (CI)
    python -m paper_repro.weighting_benchmark --report-only
    python -m paper_repro.weighting_benchmark --protocol converged   # 7 methods, tuned LR, 15 passes (results_converged/)

The grid is paper_repro/multi_mnist/multi_fashion.yaml with methods.yaml merged over it, in a
folder of its own: `mtl compare` refuses to add regimes to a finished grid's folder (the grid's
report would change under the other study), so the five methods paper_repro.multi_mnist also
runs on MultiFashion are trained by both studies, with the same config.
Writes results/results.md, results/results.csv, results/per_seed.csv (every seed's test accuracy,
what the paired tests read) and results/delta_vs_time.png (and .pdf).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mtl import stats
from paper_repro.common import (
    SMOKE, STUDIES, by_delta_m, ci, convergence_line, fmt, folders, left_right_findings, left_right_table, markdown, parser,
    parse_with_protocol, primary_test, provenance, run_grid, tuning, write,
)
from paper_repro.weighting_benchmark.published import SOURCE, tables_markdown

HERE = STUDIES / "weighting_benchmark"
BASE = STUDIES / "multi_mnist" / "multi_fashion.yaml"
METHODS = HERE / "methods.yaml"
# --protocol converged: converged.yaml merged over BASE in a folder of its own; of BASE's methods
# GradNorm is left out (six methods of the Nash-MTL/FAMO tables and equal weighting fit the budget).
CONVERGED = HERE / "converged.yaml"
CONVERGED_DROP = ["~compare.regimes.gradnorm"]
# Registered weightings that are another method under a new name, run once under that name:
# IMTL-L's objective Σ exp(s)L − s is uncertainty weighting's with s = −s' (IMTLLoss docstring).
SAME_AS = {"imtl_l": "uncertainty"}
# CI has no Fashion-MNIST: the smoke run puts the same methods on MultiMNIST (5k MNIST, bundled).
SMOKE_DATA = ["tasks.left.name=multi_mnist_left", "tasks.right.name=multi_mnist_right"]


def main(argv=None) -> int:
    args = parse_with_protocol(parser("weighting_benchmark", __doc__), HERE, {
        "short": "every method, 240 steps of Adam 1e-3 (results/)",
        "converged": "equal and six methods, each one's LR tuned on validation, 15 passes over the data (results_converged/)",
    }, argv)
    converged = args.protocol == "converged"
    runs, results = folders(args, "weighting_benchmark")
    out = runs.parent / "weighting_benchmark_converged" if converged and not args.smoke else runs
    # log_every=1: the smoke's two steps must log a training rate for the step-time column.
    overrides = [*SMOKE, *SMOKE_DATA, "logging.log_every=1"] if args.smoke else []
    if converged:
        overrides = [*CONVERGED_DROP, *overrides]
    start = time.perf_counter()
    df = run_grid(BASE, [*overrides, *args.overrides], out, train=not args.report_only, extra=CONVERGED if converged else METHODS)
    # Wall time summed over invocations (a grid may be run in parts, e.g. some regimes removed with ~).
    timing = out / "weighting_benchmark_wall_time.json"
    walls = json.loads(timing.read_text()) if timing.exists() else []
    if not args.report_only:
        walls.append(time.perf_counter() - start)
        timing.write_text(json.dumps(walls))
    wall = sum(walls) or None
    report(df, out, results, wall, args.smoke, "--protocol converged" if converged else "")
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


def table(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[stats.Difference]]:
    """The results table and the tests behind its verdicts: every MTL method's per-seed Δm%
    against single-task and against equal weighting (paired t-tests), Holm over all of them."""
    out, tests = left_right_table(df, "equal", "vs_equal_pct")
    out.insert(1, "kind", [kind(m) for m in out["method"]])
    out["step_time_ratio"] = out["method"].map(step_ratio(df[df["method"] != "single_task"], root))
    return by_delta_m(out), tests


# Each protocol's title and what its runs are, for the report.
TITLE = {"": "Every weighting method on MultiFashion",
         "--protocol converged": "Equal weighting and six methods on MultiFashion, tuned, 15 passes"}
BUDGET = {
    "": "Every run is 240 steps (1.1 passes) with one untuned Adam setting: a ranking of early training, not of converged runs.",
    "--protocol converged": "Every run is 15 passes over the 54,000 training pairs (3,165 steps of batch 256, Adam, cosine to "
                            "zero), each method's LR (single-task's too) tuned on validation; the lines under the table say "
                            "which LR each method got and which cells were still improving when their budget ended.",
}


def report(df: pd.DataFrame, root: Path, results: Path, wall: float | None, smoke: bool, flags: str = "") -> None:
    t, tests = table(df, root)
    t.to_csv(results / "results.csv", index=False)
    rows = primary_test(df)[["method", "seed", "task", "metric", "value"]].sort_values(["method", "task", "seed"])
    rows.to_csv(results / "per_seed.csv", index=False)
    body = [[r.method, r.kind, r.n_seeds, fmt(r.left_mean, r.left_std), fmt(r.right_mean, r.right_std),
             "0 (baseline)" if r.method == "single_task" else ci(r.delta_m_pct, r.delta_m_pct_low, r.delta_m_pct_high),
             "-" if pd.isna(r.vs_equal_pct) else f"{ci(r.vs_equal_pct, r.vs_equal_pct_low, r.vs_equal_pct_high)}, "
             f"p (Holm) {'–' if pd.isna(r.vs_equal_pct_p_holm) else f'{r.vs_equal_pct_p_holm:.3f}'}: {r.vs_equal_pct_verdict}",
             "-" if pd.isna(r.mean_rank) else f"{r.mean_rank:.1f}" + ("" if pd.isna(r.rank_low) else f" [{r.rank_low:.1f}, {r.rank_high:.1f}]"),
             "-" if pd.isna(r.step_time_ratio) else f"{r.step_time_ratio:.2f}"] for r in t.itertuples()]
    text = "\n\n".join([
        f"# {TITLE[flags]}: results",
        provenance(" ".join(filter(None, ["python -m paper_repro.weighting_benchmark", "--smoke" if smoke else "", flags])), wall, smoke),
        "Test accuracy (%) of the left and right item, mean ± std over seeds. Δm% (metrics: primary; higher is "
        "better) against single-task and against equal weighting, each seed against the same seed's baseline: "
        "Δm% of the seed means with a percentile bootstrap 95% CI; the verdict against equal weighting is a paired "
        "t-test of the per-seed Δm%, Holm-corrected over every test of this file. Mean rank of the per-task "
        "accuracy among the MTL methods (1 = best) with a bootstrap 95% CI over seeds. Step time: median "
        "training samples/s of equal weighting over the method's (1.00 = as fast as equal weighting; evaluation "
        "excluded; a shared 2-core CPU, so ±10–20% is noise). Sorted by Δm% against single-task. " + BUDGET[flags],
        markdown(["method", "kind", "seeds", "left acc. (%)", "right acc. (%)", "Δm% vs single-task [95% CI]",
                  "Δm% vs equal [95% CI], verdict", "mean rank [95% CI] ↓", "step time / equal"], body),
        *filter(None, [tuning(root), convergence_line(df, root)]),
        "## Findings (generated from the tests)\n\n" + "\n".join(left_right_findings(t, len(tests), "vs_equal_pct", "equal weighting", "methods")),
        "![Δm% against step time](delta_vs_time.png)",
        "## Published Δm% (for reference; lower is better there)\n\n" + tables_markdown()
        + f"\n\nSource: {SOURCE} (see published.py). These values are printed as published: a drop, "
        "lower is better; the Δm% of our table is the same formula with the opposite sign (higher is better). They train other trunks on other "
        "data for far longer, so only the ordering of methods can be compared with ours, not the values.",
    ])
    write(results, "results.md", text)
    figure(t[t["method"] != "single_task"], results)


def figure(t: pd.DataFrame, results: Path) -> None:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for r in t.itertuples():
        color = "C1" if r.kind == "gradient" else "C0"
        yerr = [[r.delta_m_pct - r.delta_m_pct_low], [r.delta_m_pct_high - r.delta_m_pct]] if pd.notna(r.delta_m_pct_low) else None
        ax.errorbar(r.step_time_ratio, r.delta_m_pct, yerr=yerr, marker="o", color=color, capsize=2)
        ax.annotate(r.method, (r.step_time_ratio, r.delta_m_pct), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("training step time / equal weighting")
    ax.set_ylabel("Δm% vs single-task (↑)")
    ax.set_title("MultiFashion: Δm% with 95% CI against step time")
    ax.legend(handles=[Line2D([], [], color="C0", marker="o", linestyle="", label="loss-level"),
                       Line2D([], [], color="C1", marker="o", linestyle="", label="gradient-level")], loc="best")
    fig.tight_layout()
    fig.savefig(results / "delta_vs_time.png", dpi=150)
    fig.savefig(results / "delta_vs_time.pdf")


if __name__ == "__main__":
    raise SystemExit(main())
