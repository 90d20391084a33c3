"""Rewrite the "Results at a glance" block of paper_repro/README.md from the studies' results
files (one line each), so no number there is typed by hand:

    python -m paper_repro.index
"""

from __future__ import annotations

import re

import pandas as pd

from paper_repro.common import STUDIES, kendall_tau

START, END = "<!-- results:start -->", "<!-- results:end -->"
SCRATCH = "single_task"


def multi_mnist() -> str:
    from paper_repro.multi_mnist.__main__ import NAMES, PUBLISHED, verdicts

    results = STUDIES / "multi_mnist" / "results"
    df = pd.read_csv(results / "results.csv")
    published = sorted(PUBLISHED, key=lambda m: -sum(PUBLISHED[m]))
    parts = []
    for dataset, group in df.groupby("dataset", sort=False):
        mean = group.groupby("method")["test_accuracy_mean"].mean().sort_values(ascending=False)
        order = list(mean.index)
        tau = kendall_tau([m for m in published if m in order], order) if set(order) == set(PUBLISHED) else float("nan")
        parts.append(f"{dataset}: order of means {' > '.join(order)} (Kendall τ vs published {tau:+.2f})")
    if not (results / "per_seed.csv").exists():
        return "seed means, no test (per-seed values not kept): " + "; ".join(parts)
    # The report's tests, recomputed from every seed's test accuracy.
    rows = pd.read_csv(results / "per_seed.csv").assign(split="test", primary=True, direction="max")
    tests = verdicts({name: g for name, g in rows.groupby("dataset", sort=False)})
    m = sum(1 for by in tests.values() for deltas in by.values() for _ in deltas)
    resolved = [f"{NAMES[method]} {d.test.verdict(m=m)} than {baseline.replace('_', ' ')} on {name}"
                for name, by in tests.items() for baseline, deltas in by.items() for method, d in deltas.items()
                if d.test.verdict(m=m) in ("better", "worse")]
    return (f"paired t-tests of per-seed Δm%, Holm over {m}: resolved: {'; '.join(resolved) or 'none'}; the rest not "
            "resolved. " + "; ".join(parts))


def weighting_benchmark(folder: str = "results") -> str:
    t = pd.read_csv(STUDIES / "weighting_benchmark" / folder / "results.csv")
    mtl = t[t["method"] != SCRATCH]
    seeds = f"{int(mtl['n_seeds'].min())}–{int(mtl['n_seeds'].max())}" if mtl["n_seeds"].nunique() > 1 else str(int(mtl["n_seeds"].iloc[0]))
    if "vs_equal_pct_verdict" not in t.columns:
        best = mtl.sort_values("delta_m_pct", ascending=False).iloc[0]
        return (f"{len(mtl)} methods on MultiFashion ({seeds} seeds), Δm% of seed means (metrics: primary), no test (per-seed "
                f"values not kept): highest {best['method']} {best['delta_m_pct']:+.2f}")

    def listed(column: str, word: str) -> str:
        return ", ".join(mtl.loc[mtl[column] == word, "method"]) or "none"

    return (f"{len(mtl)} methods on MultiFashion ({seeds} seeds), paired t-tests of per-seed Δm% (metrics: primary), Holm "
            f"over the file: against single-task resolved better: {listed('delta_m_pct_verdict', 'better')}, worse: "
            f"{listed('delta_m_pct_verdict', 'worse')}; against equal weighting better: {listed('vs_equal_pct_verdict', 'better')}, "
            f"worse: {listed('vs_equal_pct_verdict', 'worse')}; the rest not resolved")


def weighting_benchmark_converged() -> str:
    return "tuned, 15 passes: " + weighting_benchmark("results_converged")


def transfer_claims(folder: str = "results", study: str = "transfer_claims") -> str:
    from mtl.stats import seeds_needed
    from paper_repro.transfer_claims.__main__ import NAMES, claim_tests

    results = STUDIES / study / folder
    per_seed = pd.read_csv(results / "per_seed.csv") if (results / "per_seed.csv").exists() else None
    tests = claim_tests(pd.read_csv(results / "results.csv"), per_seed)
    m = sum(1 for v in tests if v.test.p == v.test.p)
    resolved = [v for v in tests if v.test.p_holm < 0.05]
    a = [v for v in tests if v.claim == "a"]
    lowest = {pair: min(v.fraction for v in a if v.pair == pair) for pair in {v.pair for v in a}}
    head = max((v for v in a if v.fraction == lowest[v.pair]), key=lambda v: v.test.mean)

    def listed(claim: str, sign: int) -> str:
        found = [f"{NAMES[v.method]} on {v.pair} at {v.fraction:g}" for v in resolved if v.claim == claim and (v.test.mean > 0) == (sign > 0)]
        return ", ".join(found) or "none"

    test = "paired t-tests" if per_seed is not None else "Welch's test from means and stds (per-seed values not kept)"
    b = (f"(b) smaller train–test gap resolved: {listed('b', 1)}" if per_seed is not None
         else "(b) not tested (per-seed train accuracy not kept)")
    # (c) compares the ratio scratch std / regime std with 1.
    c_less = [v for v in resolved if v.claim == "c" and v.test.mean > 1]
    return (f"{test}, Holm over {m} tests: (a) gains over scratch resolved: {listed('a', 1)}; losses resolved: {listed('a', -1)}; "
            f"the largest gain at a pair's smallest fraction, {NAMES[head.method]} on {head.pair} at {head.fraction:g}, "
            f"{head.test.mean:+.1f} points, p = {head.test.p:.2f}, is "
            + ("resolved" if head.test.p_holm < 0.05 else f"not resolved (about {seeds_needed(head.test.dz)} seeds would resolve it alone at 80% power)")
            + f"; {b}; (c) smaller seed spread resolved on {len(c_less)} of "
            f"{sum(v.claim == 'c' for v in tests)} comparisons (F-test); (d) a linear probe trains only the head")


def transfer_claims_10seeds() -> str:
    return "the 10-seed rerun at each pair's two smallest fractions: " + transfer_claims("results_10seeds")


def pretrained_claims() -> str:
    from paper_repro.pretrained_claims.__main__ import FAMILIES, LABELS, baseline_tests
    from paper_repro.transfer_claims.__main__ import CLAIMS, SCRATCH, claim_tests

    results = STUDIES / "pretrained_claims" / "results"
    per_seed = pd.read_csv(results / "per_seed.csv")
    theirs = [(v.claim, v.test) for v in claim_tests(pd.read_csv(results / "results.csv"), per_seed)]
    baselines = baseline_tests(per_seed)
    ours = [(k, t) for k, _, _, _, t in baselines]

    def counted(tests, key: str, words: tuple[str, str]) -> str:
        rows = [t for k, t in tests if k == key and t.p_holm < 0.05]
        neutral = 1.0 if key == "c" else 0.0  # (c) tests the ratio of the stds
        up = sum(t.mean > neutral for t in rows)
        return f"{up} {words[0]}, {len(rows) - up} {words[1]} of {sum(k == key for k, _ in tests)}"

    def listed(sign: int) -> str:
        return ", ".join(f"{LABELS[method]} on {pair} at {fraction:g}" for k, pair, fraction, method, t in baselines
                         if k == "f" and t.p_holm < 0.05 and (t.mean > 0) == (sign > 0)) or "none"

    scratch = per_seed[(per_seed["method"] == SCRATCH) & (per_seed["split"] == "train")]
    fitted = 100 * scratch.groupby(["pair", "fraction"])["value"].mean().max()
    return (f"ImageNet EfficientNet-Lite0 and MiniLM, 5 seeds, paired t-tests. Against scratch at the grid's 30 steps (Holm over "
            f"{len(theirs)}; its training accuracy is at most {fitted:.0f}%): "
            + "; ".join(f"({c}) {counted(theirs, c, CLAIMS[c][2])}" for c in CLAIMS)
            + f". Against scratch with 10× the steps (Holm over {len(ours)}): "
            + "; ".join(f"({c}) {counted(ours, c, FAMILIES[c][5])}" for c in ("a", "b"))
            + f". Against fine-tuning: better {listed(1)}; worse {listed(-1)}")


def transfer_recipes() -> str:
    results = STUDIES / "transfer_recipes" / "results"
    t = pd.read_csv(results / "results.csv")
    d = pd.read_csv(results / "delta_m.csv")
    compared = t[t["method"] != SCRATCH]

    def count(frame, column, word):
        return int((frame[column] == word).sum())

    tasks = "; ".join(
        f"{task}: {count(g, 'vs_single_verdict', 'better')} better, {count(g, 'vs_single_verdict', 'worse')} worse of {len(g)}"
        for task, g in compared.groupby("task", sort=False)
    )
    dm = d[d["baseline"] == "single_task"]
    return (f"MNIST → digits, sequential recipes, joint and merges against single-task, {int(t['n_seeds'].max())} seeds, paired "
            f"t-tests with Holm over the report: per task {tasks}; Δm% {count(dm, 'verdict', 'better')} better, "
            f"{count(dm, 'verdict', 'worse')} worse of {len(dm)}")


def architectures() -> str:
    t = pd.read_csv(STUDIES / "architectures" / "results" / "results.csv")
    a = t[t["method"] != SCRATCH]
    best = a.sort_values("delta_m_pct", ascending=False).iloc[0]

    def resolved(column: str) -> int:
        return int(a[column].isin(["better", "worse"]).sum())

    return (f"{len(a)} architectures (equal weighting, defaults) on MultiFashion, {int(a['n_seeds'].min())} seeds, paired tests "
            f"of Δm% with Holm: {resolved('delta_m_pct_verdict')} of {int(a['delta_m_pct'].notna().sum())} resolved against "
            f"single-task, {resolved('vs_hard_pct_verdict')} of {int(a['vs_hard_pct'].notna().sum())} against hard sharing; "
            f"highest mean {best['method']} {best['delta_m_pct']:+.2f} (not a verdict)")


def transferability() -> str:
    results = STUDIES / "transferability" / "results"
    v = pd.read_csv(results / "validation.csv")
    g = pd.read_csv(results / "groupings.csv")
    tested = v[v["verdict"] != "not applicable"]
    counts = tested["verdict"].value_counts()
    proposed = g[g["proposed"]].iloc[0]
    place = int((g["delta_m_pct"] > proposed["delta_m_pct"]).sum()) + 1
    return (f"five scores against measured fine-tune and linear-probe accuracy, {v['target'].nunique()} targets, up to "
            f"{int(v['candidates'].max())} candidates, {int(v['seeds'].max())} seeds (τ_w, bootstrap CI): "
            f"{counts.get('agrees', 0)} agree, {counts.get('disagrees', 0)} disagree, {counts.get('not resolved', 0)} not resolved "
            f"of {len(tested)}; TAG's proposed grouping of four tasks is {place} of {len(g)} groupings by mean Δm%, against all-joint: "
            f"{proposed['vs_joint_verdict'] if isinstance(proposed['vs_joint_verdict'], str) else 'n/a'}")


LINES = {
    "transfer_claims": ("transfer_claims/", transfer_claims),
    "transfer_claims_10seeds": ("transfer_claims/", transfer_claims_10seeds),
    "pretrained_claims": ("pretrained_claims/", pretrained_claims),
    "multi_mnist": ("multi_mnist/", multi_mnist),
    "weighting_benchmark": ("weighting_benchmark/", weighting_benchmark),
    "weighting_benchmark_converged": ("weighting_benchmark/", weighting_benchmark_converged),
    "transfer_recipes": ("transfer_recipes/", transfer_recipes),
    "architectures": ("architectures/", architectures),
    "transferability": ("transferability/", transferability),
}


def main() -> int:
    lines = []
    for study, (folder, summary) in LINES.items():
        try:
            text = summary()
        except FileNotFoundError:
            text = "not run yet"
        lines.append(f"- [{folder}]({folder}README.md): {text}.")
    lines.append("- [nyuv2/](nyuv2/README.md), [celeba/](celeba/README.md): recipes with the published settings; "
                 "smoke-tested on tiny trees; no full results (the data is not on this machine).")
    readme = STUDIES / "README.md"
    text = readme.read_text()
    block = f"{START}\n" + "\n".join(lines) + f"\n{END}"
    readme.write_text(re.sub(re.escape(START) + ".*" + re.escape(END), lambda _: block, text, flags=re.S))
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
