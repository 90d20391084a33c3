"""The four claims of the transfer-learning literature on small image tasks:
(a) less labelled data, (b) better generalization, (c) less brittle, (d) fewer trainable parameters.

    python -m paper_repro.transfer_claims            # every pair of pairs/, the LR sweep, then results/
    python -m paper_repro.transfer_claims --smoke    # MNIST -> digits only, 2 steps, 1 seed (CI)
    python -m paper_repro.transfer_claims --report-only
    python -m paper_repro.transfer_claims --verdicts   # results/verdicts.md from results/*.csv only

Each pair of pairs/ merged over base.yaml is one `mtl compare` grid: scratch (single_task),
linear probe, fine-tune and LP-FT from the source trunk, and joint training, at several
labelled fractions of the target, 3 seeds. The learning-rate sweep reruns the first pair at
one fraction with other target learning rates. Writes results/results.md, results/results.csv
(per pair, method and fraction: mean and std over seeds), results/per_seed.csv (every seed's
target accuracy on train and test, what the paired tests need), results/verdicts.md,
results/data_efficiency.png and results/lr_sweep.png.

Verdicts (results/verdicts.md) come from mtl.stats only, Holm-corrected over all of them:
paired t-tests of per-seed differences when results/per_seed.csv exists, else Welch's test
from the means and stds of results.csv (runs of this study before per_seed.csv was kept).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from scipy import stats as scipy_stats

from mtl import stats
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
    p = parser("transfer_claims", __doc__)
    p.add_argument("--verdicts", action="store_true", help="write results/verdicts.md from the results files alone; no grid is read")
    p.add_argument("--pairs", nargs="+", choices=PAIRS, default=PAIRS, help="the pairs to run (default: all)")
    p.add_argument("--no-sweep", action="store_true", help="skip the learning-rate sweep")
    args = p.parse_args(argv)
    runs, results = folders(args, "transfer_claims")
    if args.verdicts:
        per_seed = results / "per_seed.csv"
        text = verdicts(pd.read_csv(results / "results.csv"), pd.read_csv(per_seed) if per_seed.exists() else None)
        write(results, "verdicts.md", text)
        print(text)
        return 0
    pairs = ["mnist_to_digits"] if args.smoke else args.pairs
    sweep_pair = "mnist_to_digits" if args.smoke else SWEEP_PAIR
    lrs = [] if args.no_sweep else SWEEP_LRS[:1] if args.smoke else SWEEP_LRS
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


def target_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """Every seed's target primary metric on train and test: method, fraction, seed, split, value."""
    rows = pd.concat([primary_test(df, "train"), primary_test(df, "test")])
    rows = rows[rows["task"] == TARGET]
    return rows[["method", "fraction", "seed", "split", "value"]].reset_index(drop=True)


def pair_tables(frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str], list[str]]:
    """For the grids of ``frames`` (pair -> long-form results whose target task is ``TARGET``):
    the target summary of every pair (:func:`target_stats`, with a ``pair`` column), every seed's
    values (:func:`target_seeds`; None without a pair), a markdown section per pair, and claim
    (d)'s line per pair (trainable parameters against scratch)."""
    records, seeds, sections, claim_d = [], [], [], []
    for pair, df in frames.items():
        s = target_stats(df)
        s.insert(0, "pair", pair)
        records.append(s)
        seeds.append(target_seeds(df).assign(pair=pair))
        fractions = sorted(s["fraction"].unique())
        cell = s.set_index(["method", "fraction"])
        methods = [m for m in REGIMES if m in set(s["method"])]
        body = [[NAMES[m], *(fmt(*cell.loc[(m, f), ["test_mean", "test_std"]]) if (m, f) in cell.index else "n/a" for f in fractions),
                 f"{cell.loc[m, 'trainable_params'].iloc[-1]:,.0f}"] for m in methods]
        sections.append("\n".join([f"### {pair}", "", "Target test accuracy (%), mean ± std over seeds, by labelled fraction of the target; trainable parameters of the target run.", "",
                                   markdown(["regime", *(f"fraction {f:g}" for f in fractions), "trainable params"], body)]))
        if SCRATCH in set(s["method"]):
            params = s.groupby("method")["trainable_params"].max()
            claim_d.append(f"{pair}: scratch {params[SCRATCH]:,.0f}; "
                           + ", ".join(f"{NAMES[m]} {params[m]:,.0f} ({params[m] / params[SCRATCH]:.2f}×)" for m in methods if m != SCRATCH))
    summary = pd.concat(records) if records else pd.DataFrame()
    per_seed = pd.concat(seeds)[["pair", "method", "fraction", "seed", "split", "value"]] if seeds else None
    return summary, per_seed, sections, claim_d


def report(frames, sweep, walls, results, smoke) -> None:
    all_stats, per_seed, sections, claim_d = pair_tables(frames)
    sweep_text = lr_sweep(sweep, results)
    figure(frames, results)
    all_stats.to_csv(results / "results.csv", index=False)
    if per_seed is not None:
        per_seed.to_csv(results / "per_seed.csv", index=False)
    verdict_text = verdicts(all_stats, per_seed) if len(all_stats) else "No pair finished: no verdicts."
    write(results, "verdicts.md", verdict_text)
    command = "python -m paper_repro.transfer_claims" + (" --smoke" if smoke else "")
    text = "\n\n".join([
        "# The transfer-learning claims: results",
        provenance(command, sum(walls.values()) or None, smoke),
        "## What the numbers say, per claim (generated)",
        "Claims (a)–(c) are judged in [verdicts.md](verdicts.md) (paired per-seed tests, Holm-corrected); "
        "the tables below describe.",
        "**(d) Fewer trainable parameters** — parameters trained in the target run (joint: trunk and both heads):\n\n"
        + "\n".join(f"- {c}" for c in claim_d),
        "## Per pair", *sections,
        "![data efficiency](data_efficiency.png)",
        sweep_text,
    ])
    write(results, "results.md", text)


CLAIMS = {
    "a": ("(a) Less labelled data", "target test accuracy, transfer regime − scratch (points; + better)", ("better", "worse")),
    "b": ("(b) Better generalization", "train − test gap of target accuracy, scratch − transfer regime (points; + smaller gap)",
          ("smaller gap", "larger gap")),
    "c": ("(c) Less brittle (seeds)", "std over seeds of target test accuracy, scratch / transfer regime (+: less spread); F-test",
          ("less spread", "more spread")),
}


@dataclass
class Verdict:
    claim: str
    pair: str
    fraction: float
    method: str
    test: stats.Difference  # (c): mean is the ratio of stds, p the F-test's


def claim_tests(summary: pd.DataFrame, per_seed: pd.DataFrame | None) -> list[Verdict]:
    """Every transfer regime against scratch, per pair and fraction, for claims (a)–(c); Holm
    over all of them. (a) and (b) are paired t-tests of per-seed differences when ``per_seed``
    is given; (a) is Welch's test from the means and stds otherwise, and (b) is then left out
    (the spread of the train accuracy was not kept). (c) is the F-test of the two variances."""
    out = []
    seeds = None if per_seed is None else per_seed.assign(fraction=per_seed["fraction"].round(6))
    summary = summary.assign(fraction=summary["fraction"].round(6))
    for (pair, fraction), group in summary.groupby(["pair", "fraction"], sort=False):
        at = group.set_index("method")
        if SCRATCH not in at.index:
            continue
        base = at.loc[SCRATCH]
        for method in [m for m in REGIMES if m in at.index and m != SCRATCH]:
            row = at.loc[method]
            if seeds is None:
                a = stats.welch_from_summary(100 * row.test_mean, 100 * row.test_std, int(row.n_seeds),
                                             100 * base.test_mean, 100 * base.test_std, int(base.n_seeds))
                out.append(Verdict("a", pair, fraction, method, a))
            else:
                values = seeds[(seeds["pair"] == pair) & (seeds["fraction"] == fraction)]
                v = values.pivot_table(index="seed", columns=["method", "split"], values="value")
                both = v[[(method, "test"), (SCRATCH, "test"), (method, "train"), (SCRATCH, "train")]].dropna()
                test = 100 * (both[(method, "test")] - both[(SCRATCH, "test")])
                gap = 100 * ((both[(SCRATCH, "train")] - both[(SCRATCH, "test")]) - (both[(method, "train")] - both[(method, "test")]))
                out.append(Verdict("a", pair, fraction, method, stats.Difference.of(test.to_numpy())))
                out.append(Verdict("b", pair, fraction, method, stats.Difference.of(gap.to_numpy())))
            ratio = base.test_std / row.test_std if row.test_std > 0 else float("nan")
            p = stats.variance_ratio_test(base.test_std, int(base.n_seeds), row.test_std, int(row.n_seeds))
            n = int(min(base.n_seeds, row.n_seeds))
            out.append(Verdict("c", pair, fraction, method, stats.Difference(n, ratio, float("nan"), float("nan"), p, float("nan"))))
    stats.correct([v.test for v in out])
    return out


def _words(v: Verdict, m: int) -> str:
    good, bad = CLAIMS[v.claim][2]
    t = v.test
    if v.claim != "c":
        text = t.verdict(m=m)
        return {"better": good, "worse": bad}.get(text, text)
    if t.n < 2:
        return "one seed: no test"
    decision = stats.decide(math.log(t.mean) if t.mean > 0 else 0.0, t.p_holm)
    if decision:
        return good if decision > 0 else bad
    k = stats.variance_ratio_seeds_needed(t.mean, stats.ALPHA / m)
    more = f"more than {stats.MAX_SEEDS:,}" if k is None else f"about {k}"
    return f"no resolved difference at {t.n} seeds; {more} seeds would resolve a ratio of this size at 80% power"


def verdicts(summary: pd.DataFrame, per_seed: pd.DataFrame | None = None,
             command: str = "python -m paper_repro.transfer_claims --verdicts", title: str = "The transfer-learning claims") -> str:
    """results/verdicts.md: claims (a)–(c) judged by the tests of :func:`claim_tests` only."""
    tests = claim_tests(summary, per_seed)
    m = sum(1 for v in tests if not math.isnan(v.test.p))
    how = ("paired t-tests of per-seed differences (results/per_seed.csv)" if per_seed is not None else
           "Welch's unpaired t-test from the means and stds of results.csv: this run kept no per-seed values, so "
           "the pairing by seed cannot be used, and claim (b) cannot be tested (the train accuracy's spread was not kept)")
    lines = [
        f"# {title}: verdicts",
        f"_Generated by `{command}` from the results files (no training). "
        "Do not edit by hand._",
        f"Every transfer regime against scratch, per pair and labelled fraction. Tests: {how}; claim (c): the F-test "
        f"of the two variances. p (Holm): Holm-corrected over all {m} tests of this file. A verdict other than "
        "\"no resolved difference\" needs p (Holm) < 0.05; the seeds that would resolve the observed difference at 80% "
        f"power are at level 0.05/{m} (Holm's strictest step)." if m else
        "**One seed: no test is possible**, so no claim is judged; run 2 or more seeds (3 or more to resolve anything "
        "but very large differences).",
    ]
    for claim, (title, what, _) in CLAIMS.items():
        rows = [v for v in tests if v.claim == claim]
        if not rows:
            missing = "the train accuracy of each seed was not kept" if claim == "b" and per_seed is None else "no scratch rows"
            lines.append(f"## {title}\n\nNot tested: {missing}.")
            continue
        body = []
        for v in rows:
            t = v.test
            shown = (f"{t.mean:.2f}" if claim == "c" else
                     f"{t.mean:+.1f}" + ("" if math.isnan(t.low) else f" [{t.low:+.1f}, {t.high:+.1f}]"))
            p = "–" if math.isnan(t.p) else f"{t.p:.3f}"
            ph = "–" if math.isnan(t.p_holm) else f"{t.p_holm:.3f}"
            body.append([v.pair, f"{v.fraction:g}", NAMES[v.method], str(t.n), shown, p, ph, _words(v, max(m, 1))])
        resolved = [v for v in rows if _words(v, max(m, 1)) in CLAIMS[claim][2]]
        counts = ", ".join(f"{sum(_words(v, max(m, 1)) == w for v in resolved)} {w}" for w in CLAIMS[claim][2])
        lines.append("\n\n".join([
            f"## {title}",
            f"{what}. Resolved: {counts}, of {len(rows)} comparisons; the rest not resolved.",
            markdown(["pair", "fraction", "regime", "n", "difference [95% CI]" if claim != "c" else "std ratio",
                      "p", "p (Holm)", "verdict"], body),
        ]))
    a = [v for v in tests if v.claim == "a" and not math.isnan(v.test.dz)]
    if a:
        lowest = {pair: min(v.fraction for v in a if v.pair == pair) for pair in {v.pair for v in a}}
        head = max((v for v in a if v.fraction == lowest[v.pair]), key=lambda v: v.test.mean)
        alone, holm = stats.seeds_needed(head.test.dz), stats.seeds_needed(head.test.dz, stats.ALPHA / max(m, 1))
        lines.append("\n\n".join([
            "## Seeds needed for the headline difference",
            f"The largest gain over scratch at a pair's smallest labelled fraction: {NAMES[head.method]} on {head.pair} at "
            f"{head.fraction:g}, {head.test.mean:+.1f} points (d_z ≈ {head.test.dz:.2f}"
            + (", from the stds assuming uncorrelated seeds" if per_seed is None else "")
            + f"). At 80% power it would take about {alone} seeds as the only test at α = 0.05, and about {holm} at "
            f"Holm's level 0.05/{m} among this file's tests.",
        ]))
    return "\n\n".join(lines)


def lr_sweep(sweep: dict[float, pd.DataFrame], results) -> str:
    if len(sweep) < 2:
        return "## Learning-rate sweep\n\nNot in this run (fewer than two learning rates: skipped with --no-sweep, or not finished)."
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
        # 95% t-interval of the seed mean from the mean, std and n kept per (method, lr).
        half = [100 * sd * scipy_stats.t.ppf(0.975, n - 1) / math.sqrt(n) if n > 1 else 0.0
                for sd, n in zip(part["test_std"], part["n_seeds"])]
        x = part["lr"] * 1.06 ** (i - (len(methods) - 1) / 2)  # dodged on the log axis
        ax.errorbar(x, 100 * part["test_mean"], half, marker="o", capsize=3, color=f"C{i}", label=NAMES[m])
    ax.set_xscale("log")
    ax.set_xlabel("target learning rate (Adam)")
    ax.set_ylabel("target test accuracy (%), 95% CI")
    ax.set_title(f"{SWEEP_PAIR}, fraction {SWEEP_FRACTION:g}")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(results / "lr_sweep.png", dpi=150)
    fig.savefig(results / "lr_sweep.pdf")
    s.to_csv(results / "lr_sweep.csv", index=False)
    return "\n\n".join([
        "## Learning-rate sweep (claim c)",
        "Target test accuracy (%), mean ± std over seeds, at each learning rate of the target stage "
        "(the source stage keeps its own); the last columns: std and range of the seed means over the rates (points; smaller = less brittle).",
        markdown(["regime", *(f"lr {lr:g}" for lr in lrs), "std over lr", "range over lr"], body),
        "![learning-rate sweep](lr_sweep.png)",
    ])


def figure(frames, results, regimes: list[str] = REGIMES, names: dict[str, str] = NAMES) -> None:
    """Target test accuracy against the labelled fraction, one panel per pair: the seed mean with
    its 95% t-interval (``mtl.stats.t_interval``; none with one seed), the regimes dodged along
    the log axis so their bars do not overlap, each regime one colour in every panel. PNG at
    150 dpi and PDF."""
    if not frames:
        return
    fig = Figure(figsize=(4.2 * len(frames), 3.6))
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    for ax, (pair, df) in zip(axes, frames.items()):
        seeds = target_seeds(df)
        test = seeds[seeds["split"] == "test"]
        methods = [r for r in regimes if r in set(test["method"])]
        for i, m in enumerate(methods):
            rows = []
            for fraction, group in test[test["method"] == m].groupby("fraction"):
                mean, low, high = stats.t_interval(100 * group["value"].to_numpy())
                rows.append((fraction, float(mean), float(low), float(high)))
            part = pd.DataFrame(rows, columns=["fraction", "mean", "low", "high"])
            x = part["fraction"] * 1.06 ** (i - (len(methods) - 1) / 2)  # dodge: a few % apart on the log axis
            yerr = None if part["low"].isna().all() else [part["mean"] - part["low"], part["high"] - part["mean"]]
            ax.errorbar(x, part["mean"], yerr=yerr, marker="o", capsize=3, color=f"C{regimes.index(m)}", label=names[m])
        ax.set_xscale("log")
        # Ticks at the fractions run, labelled plainly: the log axis's own minor labels pile up
        # over a narrow range (one fraction, dodged).
        fractions = sorted(test["fraction"].unique())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_xlabel("labelled fraction of the target")
        ax.set_ylabel("target test accuracy (%), 95% CI")
        ax.set_title(pair)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(results / "data_efficiency.png", dpi=150)
    fig.savefig(results / "data_efficiency.pdf")


if __name__ == "__main__":
    raise SystemExit(main())
