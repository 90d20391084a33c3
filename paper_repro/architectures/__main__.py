"""Every registered architecture on MultiFashion (Multi-LeNet trunk, equal weighting, 3 seeds):
per-task test accuracy, Δm% against single-task and against hard sharing (paired by seed, Holm
over the file), mean rank, parameters and training time.

    python -m paper_repro.architectures            # MultiFashion grid, then results/
    python -m paper_repro.architectures --smoke    # every architecture, MultiMNIST, 2 steps (CI)
    python -m paper_repro.architectures --report-only

The grid is paper_repro/multi_mnist/multi_fashion.yaml with architectures.yaml merged over it
and the base's weighting regimes deleted, in a folder of its own (`mtl compare` refuses another
grid's regimes in a finished grid's folder, so its single-task cells are trained again, with
the settings paper_repro.multi_mnist uses). Writes
results/results.md, results/results.csv, results/per_seed.csv (every seed's test accuracy, what
the paired tests read) and results/delta_m.png (and .pdf).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mtl import stats
from paper_repro.common import (
    SMOKE, STUDIES, by_delta_m, ci, fmt, folders, left_right_findings, left_right_table, markdown, parser, primary_test,
    provenance, run_grid, write,
)

HERE = STUDIES / "architectures"
BASE = STUDIES / "multi_mnist" / "multi_fashion.yaml"
ARCHITECTURES = HERE / "architectures.yaml"
HARD = "joint/hard"
# CI has no Fashion-MNIST: the smoke run puts the same architectures on MultiMNIST (5k MNIST, bundled).
SMOKE_DATA = ["tasks.left.name=multi_mnist_left", "tasks.right.name=multi_mnist_right"]


def dropped() -> list[str]:
    """Overrides deleting the base config's regimes that architectures.yaml does not list (the
    weighting methods: this study varies the architecture only)."""
    import yaml

    ours = yaml.safe_load(ARCHITECTURES.read_text())["compare"]["regimes"]
    return [f"~compare.regimes.{k}" for k in yaml.safe_load(BASE.read_text())["compare"]["regimes"] if k not in ours]


def main(argv=None) -> int:
    args = parser("architectures", __doc__).parse_args(argv)
    runs, results = folders(args, "architectures")
    overrides = [*SMOKE, *SMOKE_DATA] if args.smoke else []
    start = time.perf_counter()
    df = run_grid(BASE, [*dropped(), *overrides, *args.overrides], runs, train=not args.report_only, extra=ARCHITECTURES)
    # Wall time summed over invocations (a grid may be run in parts, e.g. some architectures at a time).
    timing = runs / "architectures_wall_time.json"
    walls = json.loads(timing.read_text()) if timing.exists() else []
    if not args.report_only:
        walls.append(time.perf_counter() - start)
        timing.write_text(json.dumps(walls))
    report(df, results, sum(walls) or None, args.smoke)
    print(f"results: {results / 'results.md'}")
    return 0


def sizes(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: parameters and training wall time of one seed's models (single-task: both
    tasks' models together), the mean over seeds; ``wall_time_s`` is the training loop with its
    per-epoch validation (``results.json``), not the final evaluation."""
    cells = df.drop_duplicates(["method", "seed", "cell"])
    per_seed_ = cells.groupby(["method", "seed"])[["trainable_params", "total_params", "wall_time_s"]].sum()
    return per_seed_.groupby("method").mean()


def table(df: pd.DataFrame) -> tuple[pd.DataFrame, list[stats.Difference]]:
    """The results table and the tests behind its verdicts: every architecture's per-seed Δm%
    against single-task and against hard sharing (paired t-tests), Holm over all of them."""
    out, tests = left_right_table(df, HARD, "vs_hard_pct")
    size = sizes(df)
    out = out.join(size, on="method")
    if HARD in size.index:
        out["params_ratio"] = out["total_params"] / size.loc[HARD, "total_params"]
        out["wall_time_ratio"] = out["wall_time_s"] / size.loc[HARD, "wall_time_s"]
    return by_delta_m(out), tests


def verdict(r, prefix: str) -> str:
    mean = getattr(r, prefix)
    if pd.isna(mean):
        return "-"
    p = getattr(r, prefix + "_p_holm")
    return (f"{ci(mean, getattr(r, prefix + '_low'), getattr(r, prefix + '_high'))}, p (Holm) "
            f"{'–' if pd.isna(p) else f'{p:.3f}'}: {getattr(r, prefix + '_verdict')}")


def report(df: pd.DataFrame, results: Path, wall: float | None, smoke: bool) -> None:
    t, tests = table(df)
    data = "MultiMNIST (the smoke run's data)" if smoke else "MultiFashion"
    t.to_csv(results / "results.csv", index=False)
    rows = primary_test(df)[["method", "seed", "task", "metric", "value"]].sort_values(["method", "task", "seed"])
    rows.to_csv(results / "per_seed.csv", index=False)
    body = [[r.method, r.n_seeds, fmt(r.left_mean, r.left_std), fmt(r.right_mean, r.right_std),
             "0 (baseline)" if r.method == "single_task" else verdict(r, "delta_m_pct"),
             "0 (baseline)" if r.method == HARD else verdict(r, "vs_hard_pct"),
             "-" if pd.isna(r.mean_rank) else f"{r.mean_rank:.1f}" + ("" if pd.isna(r.rank_low) else f" [{r.rank_low:.1f}, {r.rank_high:.1f}]"),
             f"{r.total_params:,.0f} ({r.params_ratio:.2f})", f"{r.wall_time_s:.1f} ({r.wall_time_ratio:.2f})"] for r in t.itertuples()]
    text = "\n\n".join([
        f"# Every architecture on {data}: results",
        provenance("python -m paper_repro.architectures" + (" --smoke" if smoke else ""), wall, smoke),
        "Test accuracy (%) of the left and right item, mean ± std over seeds. Δm% (metrics: primary; higher is "
        "better) against single-task and against hard sharing (`joint/hard`), each seed against the same seed's "
        "baseline: Δm% of the seed means with a percentile bootstrap 95% CI; the verdict is a paired t-test of the "
        "per-seed Δm%, Holm-corrected over every test of this file. Mean rank of the per-task accuracy among the "
        "architectures (1 = best) with a bootstrap 95% CI over seeds. Parameters: all of one seed's models (single "
        "task: both tasks' models), in brackets the ratio to hard sharing. Time: seconds of the training loop with "
        "its per-epoch validation (final evaluation excluded), mean over seeds, in brackets the ratio to hard "
        "sharing (a shared 2-core CPU: ±10–20% is noise). Equal weighting and each architecture's defaults. Sorted "
        "by Δm% against single-task. Every run is 240 steps (1.1 passes) with one untuned Adam setting: a ranking "
        "of early training, not of converged runs.",
        markdown(["method", "seeds", "left acc. (%)", "right acc. (%)", "Δm% vs single-task [95% CI], verdict",
                  "Δm% vs hard [95% CI], verdict", "mean rank [95% CI] ↓", "parameters (/ hard)", "time s (/ hard)"], body),
        "## Findings (generated from the tests)\n\n" + "\n".join(left_right_findings(t, len(tests), "vs_hard_pct", "hard sharing", "architectures")),
        "![Δm% with 95% CIs](delta_m.png)",
    ])
    write(results, "results.md", text)
    figure(t[t["method"] != "single_task"], results, data)


def figure(t: pd.DataFrame, results: Path, data: str) -> None:
    """Δm% against single-task and against hard sharing, one row per architecture, 95% CI bars."""
    fig = Figure(figsize=(8.0, 0.45 * len(t) + 1.6))
    axes = fig.subplots(1, 2, sharey=True)
    names = [m.removeprefix("joint/") for m in t["method"]]
    for ax, prefix, title in ((axes[0], "delta_m_pct", "Δm% vs single-task (↑)"), (axes[1], "vs_hard_pct", "Δm% vs hard sharing (↑)")):
        for y, r in enumerate(t.itertuples()):
            mean, low, high = getattr(r, prefix), getattr(r, prefix + "_low"), getattr(r, prefix + "_high")
            if pd.isna(mean):
                continue
            xerr = [[mean - low], [high - mean]] if pd.notna(low) else None
            ax.errorbar(mean, y, xerr=xerr, marker="o", color="C0", capsize=3)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_xlabel(title)
    axes[0].set_yticks(range(len(t)), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"{data}, Multi-LeNet, equal weighting: Δm% with 95% bootstrap CI over seeds")
    fig.tight_layout()
    fig.savefig(results / "delta_m.png", dpi=150)
    fig.savefig(results / "delta_m.pdf")


if __name__ == "__main__":
    raise SystemExit(main())
