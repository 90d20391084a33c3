"""The four claims of the transfer-learning literature on small image tasks:
(a) less labelled data, (b) better generalization, (c) less brittle, (d) fewer trainable parameters.

    python -m paper_repro.transfer_claims            # every pair of pairs/, the LR sweep, then results/
    python -m paper_repro.transfer_claims --smoke    # MNIST -> digits only, 2 steps, 1 seed (CI)
    python -m paper_repro.transfer_claims --report-only

Each pair of pairs/ merged over base.yaml is one `mtl compare` grid: scratch (single_task),
linear probe, fine-tune and LP-FT from the source trunk, and joint training, at several
labelled fractions of the target, 3 seeds. The learning-rate sweep reruns the first pair at
one fraction with other target learning rates. Writes results/results.md, results/results.csv,
results/data_efficiency.png and results/lr_sweep.png.
"""

from __future__ import annotations

import json
import time

import pandas as pd
from matplotlib.figure import Figure

from paper_repro.common import SMOKE, STUDIES, fmt, folders, markdown, parser, primary_test, provenance, run_grid, write

HERE = STUDIES / "transfer_claims"
BASE = HERE / "base.yaml"
PAIRS = ["fashion_to_digits", "fashion_to_mnist", "fashion_split", "mnist_to_digits"]
SCRATCH = "single_task"
REGIMES = [SCRATCH, "sequential/linear_probe", "sequential/fine_tune", "sequential/lp_ft", "joint"]
NAMES = {SCRATCH: "scratch", "sequential/linear_probe": "linear probe", "sequential/fine_tune": "fine-tune",
         "sequential/lp_ft": "LP-FT", "joint": "joint"}
TARGET = "target"
# (c) the learning-rate sweep: the first pair at one fraction, target stages at these rates
# (the base rate, 0.002, is the pair's own grid).
SWEEP_PAIR, SWEEP_FRACTION, SWEEP_LRS, BASE_LR = "fashion_to_digits", 0.1, [0.0005, 0.008], 0.002
SMOKE_OVERRIDES = [*SMOKE, "compare.fractions=[0.1,1.0]", "compare.stages.source.trainer.epochs=1",
                   "compare.stages.source.trainer.steps_per_epoch=2"]


def sweep_overrides(lr: float) -> list[str]:
    return [f"compare.fractions=[{SWEEP_FRACTION}]", f"compare.stages.target.trainer.optimizer.lr={lr}",
            f"compare.name=transfer_{SWEEP_PAIR}_lr{lr:g}"]


def main(argv=None) -> int:
    args = parser("transfer_claims", __doc__).parse_args(argv)
    runs, results = folders(args, "transfer_claims")
    pairs = ["mnist_to_digits"] if args.smoke else PAIRS
    sweep_pair = "mnist_to_digits" if args.smoke else SWEEP_PAIR
    lrs = SWEEP_LRS[:1] if args.smoke else SWEEP_LRS
    base = [*SMOKE_OVERRIDES, *args.overrides] if args.smoke else list(args.overrides)
    timing = runs / "wall_time.json"
    walls = json.loads(timing.read_text()) if timing.exists() else {}
    frames, sweep = {}, {}
    jobs = [(p, p, []) for p in pairs] + [(f"{sweep_pair}_lr{lr:g}", sweep_pair, sweep_overrides(lr)) for lr in lrs]
    for name, pair, extra in jobs:
        start = time.perf_counter()
        try:
            df = run_grid(BASE, [*base, *extra], runs / name, train=not args.report_only, extra=HERE / "pairs" / f"{pair}.yaml")
        except FileNotFoundError as e:  # --report-only on a grid not run yet
            print(f"skipped {name}: {e}")
            continue
        if not args.report_only:
            walls[name] = time.perf_counter() - start
            timing.write_text(json.dumps(walls))
        (sweep if extra else frames)[name] = df
    sweep = {lr: sweep[f"{sweep_pair}_lr{lr:g}"] for lr in lrs if f"{sweep_pair}_lr{lr:g}" in sweep}
    if sweep_pair in frames:
        sweep[BASE_LR] = frames[sweep_pair]
    report(frames, sweep, walls, results, args.smoke)
    print(f"results: {results / 'results.md'}")
    return 0


def target_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, fraction): the target's primary metric on test (mean, std over seeds), on
    train (mean), the train − test gap, and the trainable parameters of its run."""
    test = primary_test(df, "test")
    test = test[test["task"] == TARGET]
    train = primary_test(df, "train")
    train = train[train["task"] == TARGET]
    g = test.groupby(["method", "fraction"])
    out = g["value"].agg(test_mean="mean", test_std="std", n_seeds="count")
    out["train_mean"] = train.groupby(["method", "fraction"])["value"].mean()
    out["gap"] = out["train_mean"] - out["test_mean"]
    out["trainable_params"] = g["trainable_params"].median()
    return out.reset_index()


def report(frames, sweep, walls, results, smoke) -> None:
    records, sections, claims = [], [], {"a": [], "b": [], "c": [], "d": []}
    for pair, df in frames.items():
        s = target_stats(df)
        s.insert(0, "pair", pair)
        records.append(s)
        fractions = sorted(s["fraction"].unique())
        cell = s.set_index(["method", "fraction"])
        methods = [m for m in REGIMES if m in set(s["method"])]
        body = [[NAMES[m], *(fmt(*cell.loc[(m, f), ["test_mean", "test_std"]]) if (m, f) in cell.index else "n/a" for f in fractions),
                 f"{cell.loc[m, 'trainable_params'].iloc[-1]:,.0f}"] for m in methods]
        sections.append("\n".join([f"### {pair}", "", "Target test accuracy (%), mean ± std over seeds, by labelled fraction of the target; trainable parameters of the target run.", "",
                                   markdown(["regime", *(f"fraction {f:g}" for f in fractions), "trainable params"], body)]))
        low = fractions[0]
        at = s[s["fraction"] == low].set_index("method")
        if SCRATCH in at.index:
            others = at.drop(index=SCRATCH)
            best = others["test_mean"].idxmax()
            margin = at.loc[best, "test_mean"] - at.loc[SCRATCH, "test_mean"]
            noise = max(at.loc[best, "test_std"], at.loc[SCRATCH, "test_std"])
            claims["a"].append(f"{pair} at fraction {low:g}: best {NAMES[best]} {fmt(at.loc[best, 'test_mean'])}% vs scratch "
                               f"{fmt(at.loc[SCRATCH, 'test_mean'])}%: {margin * 100:+.1f} points"
                               + ("" if pd.isna(noise) else " (beyond the seed std)" if margin > noise else " (within the seed std)" if margin > 0 else ""))
            gaps = s.groupby("method")["gap"].mean()
            better = [NAMES[m] for m in methods if m != SCRATCH and gaps[m] < gaps[SCRATCH]]
            claims["b"].append(f"{pair}: mean train−test gap scratch {gaps[SCRATCH] * 100:.1f} points; smaller for "
                               f"{', '.join(better) or 'no transfer regime'} ("
                               + ", ".join(f"{NAMES[m]} {gaps[m] * 100:.1f}" for m in methods if m != SCRATCH) + ")")
            stds = s.groupby("method")["test_std"].mean()
            claims["c"].append(f"{pair}: seed std of test accuracy (mean over fractions) scratch {stds[SCRATCH] * 100:.2f}; "
                               + ", ".join(f"{NAMES[m]} {stds[m] * 100:.2f}" for m in methods if m != SCRATCH))
            params = s.groupby("method")["trainable_params"].max()
            claims["d"].append(f"{pair}: scratch {params[SCRATCH]:,.0f}; "
                               + ", ".join(f"{NAMES[m]} {params[m]:,.0f} ({params[m] / params[SCRATCH]:.2f}×)" for m in methods if m != SCRATCH))
    sweep_text = lr_sweep(sweep, results)
    figure(frames, results)
    all_stats = pd.concat(records) if records else pd.DataFrame()
    all_stats.to_csv(results / "results.csv", index=False)
    command = "python -m paper_repro.transfer_claims" + (" --smoke" if smoke else "")
    text = "\n\n".join([
        "# The transfer-learning claims: results",
        provenance(command, sum(walls.values()) or None, smoke),
        "## What the numbers say, per claim (generated)",
        "**(a) Less labelled data** — target accuracy at the smallest labelled fraction, best transfer regime against scratch:\n\n"
        + "\n".join(f"- {c}" for c in claims["a"]),
        "**(b) Better generalization** — train − test gap of the target's accuracy, mean over fractions (points; smaller is better):\n\n"
        + "\n".join(f"- {c}" for c in claims["b"]),
        "**(c) Less brittle** — spread of the target's test accuracy over seeds (points, std), and over the learning-rate sweep below:\n\n"
        + "\n".join(f"- {c}" for c in claims["c"]),
        "**(d) Fewer trainable parameters** — parameters trained in the target run (joint: trunk and both heads):\n\n"
        + "\n".join(f"- {c}" for c in claims["d"]),
        "## Per pair", *sections,
        "![data efficiency](data_efficiency.png)",
        sweep_text,
    ])
    write(results, "results.md", text)


def lr_sweep(sweep: dict[float, pd.DataFrame], results) -> str:
    if len(sweep) < 2:
        return "## Learning-rate sweep\n\nNot run (fewer than two learning rates finished)."
    rows = []
    for lr, df in sweep.items():
        s = target_stats(df)
        s = s[s["fraction"].round(6) == round(min(s["fraction"], key=lambda f: abs(f - SWEEP_FRACTION)), 6)]
        s.insert(0, "lr", lr)
        rows.append(s)
    s = pd.concat(rows)
    lrs = sorted(s["lr"].unique())
    cell = s.set_index(["method", "lr"])
    methods = [m for m in REGIMES if m in set(s["method"])]
    body = []
    for m in methods:
        means = [cell.loc[(m, lr), "test_mean"] for lr in lrs if (m, lr) in cell.index]
        body.append([NAMES[m], *(fmt(*cell.loc[(m, lr), ["test_mean", "test_std"]]) if (m, lr) in cell.index else "n/a" for lr in lrs),
                     f"{pd.Series(means).std() * 100:.2f}", f"{(max(means) - min(means)) * 100:.2f}"])
    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.add_subplot()
    for i, m in enumerate(methods):
        part = s[s["method"] == m].sort_values("lr")
        ax.errorbar(part["lr"], 100 * part["test_mean"], 100 * part["test_std"].fillna(0), marker="o", capsize=3, color=f"C{i}", label=NAMES[m])
    ax.set_xscale("log")
    ax.set_xlabel("target learning rate (Adam)")
    ax.set_ylabel("target test accuracy (%)")
    ax.set_title(f"{SWEEP_PAIR}, fraction {SWEEP_FRACTION:g}")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(results / "lr_sweep.png", dpi=90)
    s.to_csv(results / "lr_sweep.csv", index=False)
    return "\n\n".join([
        "## Learning-rate sweep (claim c)",
        "Target test accuracy (%), mean ± std over seeds, at each learning rate of the target stage "
        "(the source stage keeps its own); the last columns: std and range of the seed means over the rates (points; smaller = less brittle).",
        markdown(["regime", *(f"lr {lr:g}" for lr in lrs), "std over lr", "range over lr"], body),
        "![learning-rate sweep](lr_sweep.png)",
    ])


def figure(frames, results) -> None:
    if not frames:
        return
    fig = Figure(figsize=(4.2 * len(frames), 3.6))
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    for ax, (pair, df) in zip(axes, frames.items()):
        s = target_stats(df)
        for i, m in enumerate(r for r in REGIMES if r in set(s["method"])):
            part = s[s["method"] == m].sort_values("fraction")
            ax.errorbar(part["fraction"], 100 * part["test_mean"], 100 * part["test_std"].fillna(0), marker="o", capsize=3, color=f"C{i}", label=NAMES[m])
        ax.set_xscale("log")
        ax.set_xlabel("labelled fraction of the target")
        ax.set_ylabel("target test accuracy (%)")
        ax.set_title(pair)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(results / "data_efficiency.png", dpi=80)


if __name__ == "__main__":
    raise SystemExit(main())
