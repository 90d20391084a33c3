"""Transfer recipes side by side on the quickstart pair (MNIST -> sklearn digits, seed_net):
single-task, sequential transfer with five target recipes (full fine-tune, LP-FT, LoRA, BitFit,
linear probe), joint training and two model merges, judged on both tasks (the MNIST source
too: forgetting), at several labelled fractions of digits, with trainable parameters and
checkpoint sizes.

    python -m paper_repro.transfer_recipes            # the grid, then results/
    python -m paper_repro.transfer_recipes --smoke    # every regime, one fraction, 2 steps, 1 seed (CI)
    python -m paper_repro.transfer_recipes --report-only

The grid is configs/quickstart.yaml with config.yaml merged over it. Writes results/results.md,
results/results.csv (per method, fraction and task: mean, std, the paired differences against
single-task and against joint with their tests, trainable parameters, checkpoint bytes),
results/per_seed.csv (every seed's primary test accuracy per task, what the tests read),
results/delta_m.csv (Δm% per method and fraction) and results/accuracy_vs_params.png (and .pdf).

Verdicts come from mtl.stats only: paired t-tests of per-seed differences (a seed fixes the
labelled subset and the initialisation in every regime), Holm over every test of results.md.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mtl import stats
from paper_repro.common import (
    ROOT, SMOKE, STUDIES, ci, fmt, folders, markdown, parser, primary_test, provenance, run_grid, write,
)

HERE = STUDIES / "transfer_recipes"
BASE = ROOT / "configs" / "quickstart.yaml"
CONFIG = HERE / "config.yaml"
SCRATCH, JOINT = "single_task", "joint"
METHODS = [SCRATCH, "sequential/fine_tune", "sequential/lp_ft", "sequential/lora", "sequential/bitfit",
           "sequential/linear_probe", JOINT, "task_arithmetic", "ties"]
NAMES = {SCRATCH: "single-task", "sequential/fine_tune": "fine-tune", "sequential/lp_ft": "LP-FT", "sequential/lora": "LoRA r=8",
         "sequential/bitfit": "BitFit", "sequential/linear_probe": "linear probe", JOINT: "joint",
         "task_arithmetic": "merge: task arithmetic", "ties": "merge: TIES"}
SMOKE_OVERRIDES = [*SMOKE, "compare.fractions=[0.05]"]


def main(argv=None) -> int:
    args = parser("transfer_recipes", __doc__).parse_args(argv)
    runs, results = folders(args, "transfer_recipes")
    overrides = [*SMOKE_OVERRIDES, *args.overrides] if args.smoke else list(args.overrides)
    timing = runs / "wall_time.json"
    walls = json.loads(timing.read_text()) if timing.exists() else []
    start = time.perf_counter()
    df = run_grid(BASE, overrides, runs, train=not args.report_only, extra=CONFIG)
    if not args.report_only:
        # Summed over invocations: a grid may be run in parts (finished cells are skipped).
        walls.append(time.perf_counter() - start)
        timing.write_text(json.dumps(walls))
    report(df, runs, results, sum(walls) or None, args.smoke)
    print(f"results: {results / 'results.md'}")
    return 0


def checkpoint_file(root: Path, cell: str) -> Path:
    """What a cell stores for its tasks, as the library writes it: ``trained.pt`` where the
    recipe trains part of the model (only those tensors, plus a reference to the base trunk
    they need: mtl.trainer writes it exactly then), a merge cell's ``merged_trunk.pt`` (the one
    trunk both tasks share; each head stays in its fine-tune's best.pt), else the selected
    model, ``checkpoints/best.pt`` (trunk and heads, no optimizer state)."""
    folder = root / cell
    for name in ("trained.pt", "merged_trunk.pt"):
        if (folder / name).exists():
            return folder / name
    return folder / "checkpoints" / "best.pt"


def seeds_table(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Every seed's primary test metric per method, fraction and task, with the value right
    after the task's own training, the retention, the trainable parameters of the cell's last
    stage and its checkpoint's bytes (from the files, when the runs are present)."""
    rows = primary_test(df)
    out = rows[["method", "fraction", "seed", "task", "metric", "direction", "value", "after_training", "retention",
                "trainable_params", "cell"]].copy()
    files = {cell: checkpoint_file(root, cell) for cell in out["cell"].unique()}
    out["checkpoint_file"] = out["cell"].map(lambda c: files[c].name)
    out["checkpoint_bytes"] = out["cell"].map(lambda c: files[c].stat().st_size if files[c].exists() else np.nan)
    return out.reset_index(drop=True)


def at(seeds: pd.DataFrame, method: str, task: str, fraction: float) -> pd.DataFrame:
    """``method``'s rows of ``task`` at ``fraction``, one per seed; a task the grid never
    subsamples (the source: single-task runs it once per seed on all its data) at fraction 1."""
    rows = seeds[(seeds["method"] == method) & (seeds["task"] == task)]
    here = rows[np.isclose(rows["fraction"], fraction)]
    return here if len(here) else rows[np.isclose(rows["fraction"], 1.0)]


def grid_fractions(seeds: pd.DataFrame) -> list[float]:
    """The grid's labelled fractions: those of the joint and transfer cells (single-task runs
    the source at fraction 1 only, whatever the grid's fractions)."""
    return sorted(seeds[seeds["method"] != SCRATCH]["fraction"].unique())


def values(seeds: pd.DataFrame, method: str, task: str, fraction: float) -> pd.Series:
    return at(seeds, method, task, fraction).set_index("seed")["value"]


def comparisons(seeds: pd.DataFrame) -> tuple[pd.DataFrame, list[stats.Difference]]:
    """Per method, fraction and task: the seed mean and std, and the paired per-seed
    difference (points of accuracy; + = the method better) against single-task and against
    joint, each a paired t-test; Holm over all of them (the report's one family), and the
    Δm% tests of :func:`delta_m` join that family too."""
    records, tests = [], []
    tasks = list(dict.fromkeys(seeds["task"]))
    methods = [m for m in METHODS if m in set(seeds["method"])]
    for fraction in grid_fractions(seeds):
        for task in tasks:
            for method in methods:
                rows = at(seeds, method, task, fraction)
                if rows.empty:
                    continue
                mine = rows.set_index("seed")["value"]
                record = {"method": method, "fraction": fraction, "task": task, "n_seeds": len(mine),
                          "mean": mine.mean(), "std": mine.std(), "retention": rows["retention"].mean(),
                          "trainable_params": rows["trainable_params"].median(), "checkpoint_file": rows["checkpoint_file"].iloc[0],
                          "checkpoint_bytes": rows["checkpoint_bytes"].median()}
                higher = rows["direction"].iloc[0] == "max"
                for prefix, baseline in (("vs_single", SCRATCH), ("vs_joint", JOINT)):
                    if method in (SCRATCH, baseline) or baseline not in set(seeds["method"]):
                        continue
                    base = values(seeds, baseline, task, fraction)
                    both = mine.index.intersection(base.index)
                    d = stats.Difference.of(100 * stats.paired_differences(mine[both].to_numpy(), base[both].to_numpy(), higher))
                    tests.append(d)
                    record[prefix] = d
                records.append(record)
    return pd.DataFrame(records), tests


def delta_m(seeds: pd.DataFrame) -> pd.DataFrame:
    """Δm% (mtl.report.delta_m_paired, over both tasks' primary test metrics) of every method
    against single-task and against joint, per fraction, paired by seed."""
    from mtl.report import delta_m_paired

    out = []
    keys = [(t, m) for t, m in seeds[["task", "metric"]].drop_duplicates().itertuples(index=False)]
    dirs = {(t, m): d for t, m, d in seeds[["task", "metric", "direction"]].drop_duplicates().itertuples(index=False)}

    def table(method: str, fraction: float) -> pd.DataFrame:
        return pd.DataFrame({(t, m): values(seeds, method, t, fraction) for t, m in keys})

    for fraction in grid_fractions(seeds):
        for baseline in (SCRATCH, JOINT):
            if baseline not in set(seeds["method"]):
                continue
            base = table(baseline, fraction)
            for method in [m for m in METHODS if m in set(seeds["method"]) and m not in (SCRATCH, baseline)]:
                d = delta_m_paired(table(method, fraction), base, dirs, keys)
                out.append({"method": method, "fraction": fraction, "baseline": baseline, "delta_m_pct": d.mean,
                            "low": d.low, "high": d.high, "n_seeds": len(d.seeds), "test": d.test})
    return pd.DataFrame(out)


def verdict(d: stats.Difference | float, m: int) -> str:
    return "–" if not isinstance(d, stats.Difference) else d.verdict(m=m)


def shown(d: stats.Difference | float, m: int) -> str:
    if not isinstance(d, stats.Difference):
        return "–"
    p = "–" if math.isnan(d.p_holm) else f"{d.p_holm:.3f}"
    return f"{ci(d.mean, d.low, d.high)}; p (Holm) {p}: {d.verdict(m=m)}"


def flatten(table: pd.DataFrame, m: int) -> pd.DataFrame:
    """``table`` with each Difference spread into columns (CSV-friendly)."""
    out = table.copy()
    for prefix in ("vs_single", "vs_joint"):
        if prefix not in out:
            continue
        col = out.pop(prefix)
        for attr in ("mean", "low", "high", "p", "p_holm", "dz"):
            out[f"{prefix}_{attr}"] = col.map(lambda d, a=attr: getattr(d, a) if isinstance(d, stats.Difference) else np.nan)
        out[f"{prefix}_verdict"] = col.map(lambda d: verdict(d, m))
    return out


def findings(table: pd.DataFrame, dm: pd.DataFrame, m: int, tested: int) -> list[str]:
    """Sentences from the verdicts only."""
    lines = []
    for prefix, baseline in (("vs_single", "single-task"), ("vs_joint", "joint")):
        if prefix not in table:
            continue
        rows = table[table[prefix].map(lambda d: isinstance(d, stats.Difference))]
        for word in ("better", "worse"):
            hits = [f"{NAMES[r.method]} on {r.task} at {r.fraction:g}" for r in rows.itertuples() if getattr(r, prefix).verdict(m=m) == word]
            lines.append(f"- Per task, against {baseline}, resolved {word}: {', '.join(hits) or 'none'}.")
        lines.append(f"- Per task, against {baseline}, not resolved: {sum(getattr(r, prefix).verdict(m=m) not in ('better', 'worse') for r in rows.itertuples())} "
                     f"of {len(rows)}.")
    for baseline, name in ((SCRATCH, "single-task"), (JOINT, "joint")):
        rows = dm[dm["baseline"] == baseline]
        for word in ("better", "worse"):
            hits = [f"{NAMES[r.method]} at {r.fraction:g}" for r in rows.itertuples() if r.test.verdict(m=m) == word]
            lines.append(f"- Δm% against {name}, resolved {word}: {', '.join(hits) or 'none'}.")
    lines.append(f"- p-values are Holm-corrected over all {tested} tests of this file (per-task differences and Δm%, against "
                 "single-task and against joint); \"better\"/\"worse\" need p (Holm) < 0.05.")
    return lines


def report(df: pd.DataFrame, root: Path, results: Path, wall: float | None, smoke: bool) -> None:
    seeds = seeds_table(df, root)
    table, tests = comparisons(seeds)
    dm = delta_m(seeds)
    tests += list(dm["test"]) if len(dm) else []
    stats.correct(tests)
    tested = sum(not math.isnan(t.p) for t in tests)
    m = max(1, tested)  # Holm's strictest level, α/m, for the seeds-needed estimates
    flatten(table, m).to_csv(results / "results.csv", index=False)
    seeds.drop(columns=["cell"]).to_csv(results / "per_seed.csv", index=False)
    dm_csv = dm.drop(columns=["test"]).assign(p_holm=[t.p_holm for t in dm["test"]], verdict=[t.verdict(m=m) for t in dm["test"]]) if len(dm) else dm
    dm_csv.to_csv(results / "delta_m.csv", index=False)
    n_seeds = int(seeds.groupby(["method", "fraction", "task"])["seed"].nunique().min())
    sections = []
    for task in dict.fromkeys(table["task"]):
        body = []
        for r in table[table["task"] == task].itertuples():
            body.append([NAMES[r.method], f"{r.fraction:g}", r.n_seeds, fmt(r.mean, r.std),
                         "–" if pd.isna(r.retention) else f"{r.retention:.3f}",
                         shown(getattr(r, "vs_single", np.nan), m), shown(getattr(r, "vs_joint", np.nan), m)])
        sections.append("\n\n".join([
            f"### {task}",
            markdown(["method", "fraction", "seeds", "test accuracy (%)", "retention", "− single-task (points) [95% CI]",
                      "− joint (points) [95% CI]"], body)]))
    dm_body = [[NAMES[r.method], f"{r.fraction:g}", "single-task" if r.baseline == SCRATCH else "joint", r.n_seeds,
                ci(r.delta_m_pct, r.low, r.high), "–" if math.isnan(r.test.p_holm) else f"{r.test.p_holm:.3f}", r.test.verdict(m=m)]
               for r in dm.itertuples()]
    cost = table.groupby("method", sort=False).agg(trainable=("trainable_params", "max"), file=("checkpoint_file", "first"),
                                                    bytes=("checkpoint_bytes", "max"))
    cost_body = [[NAMES[method], f"{r.trainable:,.0f}", r.file, "n/a" if pd.isna(r.bytes) else f"{r.bytes:,.0f}"]
                 for method, r in cost.iterrows()]
    text = "\n\n".join([
        "# Transfer recipes on MNIST → digits: results",
        provenance("python -m paper_repro.transfer_recipes" + (" --smoke" if smoke else ""), wall, smoke),
        f"Primary test metric (accuracy, %) of each task, mean ± std over {n_seeds} seeds, per labelled fraction of digits "
        "(MNIST always keeps all its training data; its single-task baseline is one run per seed, compared at every "
        "fraction). Differences are per seed (method − baseline, the same seed: the same labelled subset and "
        "initialisation), in points of accuracy with a 95% t interval; p from the paired t-test, Holm-corrected over "
        f"all {tested} tests of this file. Retention: the source's final accuracy over its accuracy right after the source "
        "stage (sequential cells only; 1 = nothing forgotten).",
        "## Per task", *sections,
        "## Δm% (metrics: primary, both tasks)",
        "Δm% of the seed means against each baseline with a percentile bootstrap 95% CI over seeds; the verdict is the "
        "paired t-test of the per-seed Δm%, in the same Holm family.",
        markdown(["method", "fraction", "against", "seeds", "Δm% [95% CI]", "p (Holm)", "verdict"], dm_body),
        "## Trainable parameters and checkpoint sizes",
        "Trainable parameters: those the cell's last stage trains in at least one epoch (results.csv; a sequential "
        "cell's target stage, not its source stage; joint and merge: the trunk and both heads). Checkpoint: the file "
        "named, bytes as written (median over seeds; the largest over fractions): trained.pt holds only what a partial recipe "
        "trains and needs the source trunk beside it; best.pt the whole selected model; merged_trunk.pt the merged "
        "trunk (each task's head, 510 parameters, stays in its fine-tune's best.pt).",
        markdown(["method", "trainable parameters", "checkpoint file", "bytes"], cost_body),
        "![accuracy against trainable parameters](accuracy_vs_params.png)",
        "## Findings (generated from the tests)\n\n" + "\n".join(findings(table, dm, m, tested)),
    ])
    write(results, "results.md", text)
    figure(seeds, table, results)


def figure(seeds: pd.DataFrame, table: pd.DataFrame, results: Path) -> None:
    """Test accuracy (mean, 95% t interval over seeds) against trainable parameters, one panel
    per task and fraction (x offset slightly per method; the tables hold the exact counts)."""
    tasks, fractions = list(dict.fromkeys(table["task"])), sorted(table["fraction"].unique())
    fig = Figure(figsize=(3.6 * len(fractions), 3.2 * len(tasks)))
    axes = fig.subplots(len(tasks), len(fractions), squeeze=False)
    methods = [m for m in METHODS if m in set(table["method"])]
    for i, task in enumerate(tasks):
        for j, fraction in enumerate(fractions):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                v = values(seeds, method, task, fraction)
                if v.empty:
                    continue
                mean, low, high = stats.t_interval(100 * v.to_numpy())
                params = table[(table["method"] == method) & (table["task"] == task)]["trainable_params"].max()
                yerr = None if np.isnan(low) else [[mean - low], [high - mean]]
                # A small offset per method, so that the whole-model methods (21,840 to 22,350 parameters) do not hide each other.
                shift = 1.07 ** (k - len(methods) / 2)
                ax.errorbar(params * shift, mean, yerr=yerr, marker="o", capsize=3, color=f"C{k % 10}", label=NAMES[method])
            ax.set_xscale("log")
            ax.set_title(f"{task}, digits fraction {fraction:g}", fontsize="small")
            ax.set_xlabel("trainable parameters (last stage)")
            ax.set_ylabel("test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize="small", loc="lower center", ncol=min(5, len(labels)))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(results / "accuracy_vs_params.png", dpi=150)
    fig.savefig(results / "accuracy_vs_params.pdf")


if __name__ == "__main__":
    raise SystemExit(main())
