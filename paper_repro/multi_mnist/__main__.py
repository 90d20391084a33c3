"""Sener & Koltun 2018 (Table 3) on this framework: Multi-LeNet on MultiMNIST and MultiFashion,
single-task vs equal weighting vs uncertainty weighting vs GradNorm vs MGDA-UB.

    python -m paper_repro.multi_mnist            # both grids, 3 seeds, then results/
    python -m paper_repro.multi_mnist --smoke    # MultiMNIST only, 2 steps, 1 seed (CI)
    python -m paper_repro.multi_mnist --report-only
    python -m paper_repro.multi_mnist --protocol original   # MultiMNIST, Sener & Koltun's protocol (original.yaml)

Writes results/results.md (tables beside the published numbers, verdicts from paired tests),
results/results.csv, results/per_seed.csv (every seed's test accuracy) and
results/accuracy.png (and .pdf); with --protocol original, the same files in results_original/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mtl import stats as mstats
from paper_repro.common import (
    SMOKE, STUDIES, against, ci, directions, fmt, folders, kendall_tau, markdown, parse_with_protocol, parser, per_seed, primary_test,
    provenance, run_grid, seed_stats, tuning, write,
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
# --protocol original: MultiMNIST only, original.yaml merged over multi_mnist.yaml.
ORIGINAL = HERE / "original.yaml"


def main(argv=None) -> int:
    args = parse_with_protocol(parser("multi_mnist", __doc__), HERE, {
        "short": "50 epochs of Adam (results/)",
        "original": "Sener & Koltun's SGD protocol with a tuned LR, MultiMNIST only (results_original/)",
    }, argv)
    original = args.protocol == "original"
    runs, results = folders(args, "multi_mnist")
    datasets = ["multi_mnist"] if args.smoke or original else list(DATASETS)
    overrides = SMOKE if args.smoke else []
    frames, walls, roots = {}, {}, {}
    for name in datasets:
        # MultiFashion's grid keeps its folder of earlier runs, runs/paper_repro/multi_fashion.
        out = runs / name if args.smoke else runs.parent / name if name == "multi_fashion" else runs / name
        if original:
            out = out.with_name(f"{name}_original")
        roots[name] = out
        start = time.perf_counter()
        frames[name] = run_grid(DATASETS[name], [*overrides, *args.overrides], out, train=not args.report_only,
                                extra=ORIGINAL if original else None)
        walls[name] = time.perf_counter() - start
    timing = runs / ("wall_time_original.json" if original else "wall_time.json")
    if not args.report_only:
        timing.write_text(json.dumps(walls))
    walls = json.loads(timing.read_text()) if timing.exists() else {}
    report(frames, walls, results, args.smoke, "--protocol original" if original else "", roots)
    print(f"results: {results / 'results.md'}")
    return 0


def ordering(stats: pd.DataFrame) -> list[str]:
    """Methods from best to worst by the mean of left and right test accuracy."""
    mean = stats.groupby("method")["mean"].mean()
    return list(mean.sort_values(ascending=False).index)


def verdicts(frames: dict[str, pd.DataFrame]) -> dict[str, dict[str, dict]]:
    """Per dataset, each MTL method's Δm% (``mtl.report.DeltaM``) against single task and
    against equal weighting, paired by seed; Holm over every test of the file."""
    out = {name: {"single_task": against(per_seed(df), directions(df), "single_task"),
                  "equal": against(per_seed(df), directions(df), "equal")} for name, df in frames.items()}
    mstats.correct([d.test for by in out.values() for deltas in by.values() for d in deltas.values()])
    return out


def report(frames: dict[str, pd.DataFrame], walls: dict[str, float], results, smoke: bool, flags: str = "",
           roots: dict[str, Path] | None = None) -> None:
    command = " ".join(filter(None, ["python -m paper_repro.multi_mnist", "--smoke" if smoke else "", flags]))
    records, sections = [], []
    published_order = sorted(PUBLISHED, key=lambda m: -sum(PUBLISHED[m]) / 2)
    tests = verdicts(frames)
    m_tests = sum(len(d) for by in tests.values() for d in by.values())
    for name, df in frames.items():
        stats = seed_stats(df, ["method", "task"])
        single, equal = tests[name]["single_task"], tests[name]["equal"]
        cell = stats.set_index(["method", "task"])
        methods = [m for m in METHODS if m in set(stats["method"])]
        body = []
        for m in methods:
            left, right = cell.loc[(m, "left")], cell.loc[(m, "right")]
            d, e = single.get(m), equal.get(m)
            row = [NAMES[m], int(left["count"]), fmt(left["mean"], left["std"]), fmt(right["mean"], right["std"]),
                   "0 (baseline)" if d is None else f"{ci(d.mean, d.low, d.high)}: {d.test.verdict(m=m_tests)}",
                   "-" if e is None else f"{ci(e.mean, e.low, e.high)}: {e.test.verdict(m=m_tests)}"]
            if name == "multi_mnist":
                row += [f"{PUBLISHED[m][0]:.2f}", f"{PUBLISHED[m][1]:.2f}"]
            body.append(row)
            for task, s in (("left", left), ("right", right)):
                records.append({"dataset": name, "method": m, "task": task, "test_accuracy_mean": s["mean"],
                                "test_accuracy_std": s["std"], "n_seeds": int(s["count"]),
                                "delta_m_pct": 0.0 if d is None else d.mean,
                                "delta_m_pct_low": None if d is None else d.low, "delta_m_pct_high": None if d is None else d.high,
                                "vs_single_task_p_holm": None if d is None else d.test.p_holm,
                                "vs_single_task_verdict": None if d is None else d.test.verdict(m=m_tests),
                                "vs_equal_pct": None if e is None else e.mean,
                                "vs_equal_p_holm": None if e is None else e.test.p_holm,
                                "vs_equal_verdict": None if e is None else e.test.verdict(m=m_tests),
                                "published_accuracy": PUBLISHED[m][task == "right"] / 100 if name == "multi_mnist" else None})
        header = ["method", "seeds", "left acc. (%)", "right acc. (%)", "Δm% vs single task [95% CI]: verdict",
                  "Δm% vs equal [95% CI]: verdict"]
        if name == "multi_mnist":
            header += ["published left", "published right"]
        ours = ordering(stats)
        tau = kendall_tau([m for m in published_order if m in ours], ours) if set(ours) == set(PUBLISHED) else float("nan")
        resolved = [f"{NAMES[m]} {d.test.verdict(m=m_tests)} than {baseline}" for baseline, deltas in
                    (("single task", single), ("equal weighting", equal)) for m, d in deltas.items()
                    if d.test.verdict(m=m_tests) in ("better", "worse")]
        lines = [
            f"## {'MultiMNIST (MNIST 5k)' if name == 'multi_mnist' else 'MultiFashion (full Fashion-MNIST)'}",
            "",
            "Test accuracy, mean ± std over seeds (the checkpoint selected on validation). Δm% over the two accuracies "
            "(metrics: primary), each seed against the same seed's baseline, with a percentile bootstrap 95% CI; "
            f"verdicts from paired t-tests of the per-seed Δm%, Holm-corrected over the {m_tests} tests of this file.",
            "",
            markdown(header, body),
            "",
            f"Ordering of the seed means here (mean of left and right, best first): {' > '.join(NAMES[m] for m in ours)}.",
            f"Published ordering (MultiMNIST): {' > '.join(NAMES[m] for m in published_order)}.",
            f"Kendall's τ between the two: {tau:+.2f} (1 = same order), an ordering of means: of its pairs, only those "
            f"with a verdict above are resolved. Resolved: {'; '.join(resolved) if resolved else 'none'}.",
        ]
        tuned = tuning(roots[name], NAMES) if roots else ""
        if tuned:
            lines += ["", tuned]
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
    seeds = pd.concat([primary_test(df).assign(dataset=name) for name, df in frames.items()])
    seeds[["dataset", "method", "seed", "task", "metric", "value"]].sort_values(["dataset", "method", "task", "seed"]).to_csv(
        results / "per_seed.csv", index=False)


def halfwidth(std: float, n: int) -> float:
    """Half-width of the t-based 95% CI of a mean over ``n`` seeds (0 for one seed: no interval)."""
    from scipy import stats as sps

    return float(sps.t.ppf(0.975, n - 1) * std / n**0.5) if n > 1 else 0.0


def figure(frames: dict[str, pd.DataFrame], results) -> None:
    fig = Figure(figsize=(5.2 * len(frames), 3.8))
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    for ax, (name, df) in zip(axes, frames.items()):
        stats = seed_stats(df, ["method", "task"]).set_index(["method", "task"])
        methods = [m for m in METHODS if (m, "left") in stats.index]
        for j, task in enumerate(("left", "right")):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(methods))]
            ax.bar(xs, [100 * stats.loc[(m, task), "mean"] for m in methods], 0.36,
                   yerr=[100 * halfwidth(stats.loc[(m, task), "std"], int(stats.loc[(m, task), "count"])) for m in methods],
                   capsize=3, color=f"C{j}", label=f"{task} (ours)")
            if name == "multi_mnist":
                ax.scatter(xs, [PUBLISHED[m][j] for m in methods], marker="_", s=300, color="k", zorder=3,
                           label="published (Sener & Koltun)" if j == 0 else None)
        means = [100 * stats.loc[(m, t), "mean"] for m in methods for t in ("left", "right")]
        low = min(means + ([min(min(v) for v in PUBLISHED.values())] if name == "multi_mnist" else []))
        ax.set_ylim(max(0, low - 5), 100)
        ax.set_xticks(range(len(methods)), [m.replace("single_task", "single") for m in methods])
        ax.set_ylabel("test accuracy (%), 95% CI over seeds")
        ax.set_title(name)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    fig.savefig(results / "accuracy.png", dpi=150)
    fig.savefig(results / "accuracy.pdf")


if __name__ == "__main__":
    raise SystemExit(main())
