"""Sener & Koltun 2018 (Table 3) on this framework: Multi-LeNet on MultiMNIST and MultiFashion,
single-task vs equal weighting vs uncertainty weighting vs GradNorm vs MGDA-UB.

    python -m paper_repro.multi_mnist            # both grids, 3 seeds, then results/
    python -m paper_repro.multi_mnist --smoke    # MultiMNIST only, 2 steps, 1 seed (CI)
    python -m paper_repro.multi_mnist --report-only

Writes results/results.md (tables beside the published numbers, the ordering question
answered from the numbers), results/results.csv and results/accuracy.png.
"""

from __future__ import annotations

import json
import time

import pandas as pd
from matplotlib.figure import Figure

from paper_repro.common import (
    SMOKE, STUDIES, delta_m_primary, fmt, folders, kendall_tau, markdown, parser, provenance, run_grid, seed_stats, write,
)

HERE = STUDIES / "multi_mnist"
METHODS = ["single_task", "equal", "uncertainty", "gradnorm", "mgda_ub"]
NAMES = {"single_task": "single task", "equal": "uniform scaling (equal)", "uncertainty": "Kendall et al. (uncertainty)",
         "gradnorm": "GradNorm", "mgda_ub": "MGDA-UB"}
# Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS, Table 3:
# MultiMNIST test accuracy (%), left / right digit, Multi-LeNet trained on 60k pairs.
PUBLISHED = {
    "single_task": (97.23, 95.90),
    "equal": (96.46, 94.99),
    "uncertainty": (96.47, 95.29),
    "gradnorm": (96.27, 94.84),
    "mgda_ub": (97.26, 95.90),
}
DATASETS = {"multi_mnist": HERE / "multi_mnist.yaml", "multi_fashion": HERE / "multi_fashion.yaml"}


def main(argv=None) -> int:
    args = parser("multi_mnist", __doc__).parse_args(argv)
    runs, results = folders(args, "multi_mnist")
    datasets = ["multi_mnist"] if args.smoke else list(DATASETS)
    overrides = SMOKE if args.smoke else []
    frames, walls = {}, {}
    for name in datasets:
        # MultiFashion's grid is shared with weighting_benchmark, in its own folder under runs/.
        out = runs / name if args.smoke else runs.parent / name if name == "multi_fashion" else runs / name
        start = time.perf_counter()
        frames[name] = run_grid(DATASETS[name], [*overrides, *args.overrides], out, train=not args.report_only)
        walls[name] = time.perf_counter() - start
    timing = runs / "wall_time.json"
    if not args.report_only:
        timing.write_text(json.dumps(walls))
    walls = json.loads(timing.read_text()) if timing.exists() else {}
    report(frames, walls, results, args.smoke)
    print(f"results: {results / 'results.md'}")
    return 0


def ordering(stats: pd.DataFrame) -> list[str]:
    """Methods from best to worst by the mean of left and right test accuracy."""
    mean = stats.groupby("method")["mean"].mean()
    return list(mean.sort_values(ascending=False).index)


def report(frames: dict[str, pd.DataFrame], walls: dict[str, float], results, smoke: bool) -> None:
    command = "python -m paper_repro.multi_mnist" + (" --smoke" if smoke else "")
    records, sections = [], []
    published_order = sorted(PUBLISHED, key=lambda m: -sum(PUBLISHED[m]) / 2)
    for name, df in frames.items():
        stats = seed_stats(df, ["method", "task"])
        deltas = delta_m_primary(df).set_index("method")
        cell = stats.set_index(["method", "task"])
        methods = [m for m in METHODS if m in set(stats["method"])]
        body = []
        for m in methods:
            left, right = cell.loc[(m, "left")], cell.loc[(m, "right")]
            delta = fmt(deltas.loc[m, "delta_m_pct"], deltas.loc[m, "delta_m_pct_std"], scale=1, signed=True) if m in deltas.index else "0 (baseline)"
            row = [NAMES[m], int(left["count"]), fmt(left["mean"], left["std"]), fmt(right["mean"], right["std"]), delta]
            if name == "multi_mnist":
                row += [f"{PUBLISHED[m][0]:.2f}", f"{PUBLISHED[m][1]:.2f}"]
            body.append(row)
            for task, s in (("left", left), ("right", right)):
                records.append({"dataset": name, "method": m, "task": task, "test_accuracy_mean": s["mean"],
                                "test_accuracy_std": s["std"], "n_seeds": int(s["count"]),
                                "delta_m_pct": deltas["delta_m_pct"].get(m, 0.0),
                                "published_accuracy": PUBLISHED[m][task == "right"] / 100 if name == "multi_mnist" else None})
        header = ["method", "seeds", "left acc. (%)", "right acc. (%)", "Δm% vs single task"]
        if name == "multi_mnist":
            header += ["published left", "published right"]
        ours = ordering(stats)
        tau = kendall_tau([m for m in published_order if m in ours], ours) if set(ours) == set(PUBLISHED) else float("nan")
        best = ours[0]
        side_mean = stats.groupby("method")["mean"].mean()
        mtl_span = side_mean.drop(index="single_task", errors="ignore")
        span = 100 * (mtl_span.max() - mtl_span.min()) if len(mtl_span) else float("nan")
        noise = 100 * stats["std"].median()
        resolved = "larger than" if span > noise else "within"
        lines = [
            f"## {'MultiMNIST (MNIST 5k)' if name == 'multi_mnist' else 'MultiFashion (full Fashion-MNIST)'}",
            "",
            "Test accuracy, mean ± std over seeds (the checkpoint selected on validation); Δm% over the two accuracies.",
            "",
            markdown(header, body),
            "",
            f"Ordering here (mean of left and right, best first): {' > '.join(NAMES[m] for m in ours)}.",
            f"Published ordering (MultiMNIST): {' > '.join(NAMES[m] for m in published_order)}.",
            f"Kendall's τ between the two: {tau:+.2f} (1 = same order). Best here: {NAMES[best]}.",
            f"The MTL methods' means (of left and right) span {span:.2f} points, {resolved} the median seed std "
            f"of one method's accuracy ({noise:.2f} points)"
            + ("" if "single_task" not in side_mean or not len(mtl_span) else
               f"; single task is {100 * (side_mean['single_task'] - mtl_span.max()):+.2f} points from the best MTL method") + ".",
        ]
        if name in walls:
            lines += ["", f"Wall time of this grid: {walls[name] / 60:.1f} min."]
        sections.append("\n".join(lines))
    figure(frames, results)
    text = "\n\n".join([
        "# Multi-LeNet on MultiMNIST / MultiFashion: results",
        provenance(command, sum(walls.values()) or None, smoke),
        "Published: Sener & Koltun 2018, Table 3 (MultiMNIST, 60k training pairs, 100 epochs).",
        *sections,
        "![accuracy](accuracy.png)",
    ])
    write(results, "results.md", text)
    pd.DataFrame(records).to_csv(results / "results.csv", index=False)


def figure(frames: dict[str, pd.DataFrame], results) -> None:
    fig = Figure(figsize=(5.2 * len(frames), 3.8))
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    for ax, (name, df) in zip(axes, frames.items()):
        stats = seed_stats(df, ["method", "task"]).set_index(["method", "task"])
        methods = [m for m in METHODS if (m, "left") in stats.index]
        for j, task in enumerate(("left", "right")):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(methods))]
            ax.bar(xs, [100 * stats.loc[(m, task), "mean"] for m in methods], 0.36,
                   yerr=[100 * (stats.loc[(m, task), "std"] if stats.loc[(m, task), "count"] > 1 else 0) for m in methods],
                   capsize=3, color=f"C{j}", label=f"{task} (ours)")
            if name == "multi_mnist":
                ax.scatter(xs, [PUBLISHED[m][j] for m in methods], marker="_", s=300, color="k", zorder=3,
                           label="published (Sener & Koltun)" if j == 0 else None)
        means = [100 * stats.loc[(m, t), "mean"] for m in methods for t in ("left", "right")]
        low = min(means + ([min(min(v) for v in PUBLISHED.values())] if name == "multi_mnist" else []))
        ax.set_ylim(max(0, low - 5), 100)
        ax.set_xticks(range(len(methods)), [m.replace("single_task", "single") for m in methods])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    fig.savefig(results / "accuracy.png", dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
