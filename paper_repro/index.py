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
    from paper_repro.multi_mnist.__main__ import NAMES, PUBLISHED

    df = pd.read_csv(STUDIES / "multi_mnist" / "results" / "results.csv")
    published = sorted(PUBLISHED, key=lambda m: -sum(PUBLISHED[m]))
    parts = []
    for dataset, group in df.groupby("dataset", sort=False):
        mean = group.groupby("method")["test_accuracy_mean"].mean().sort_values(ascending=False)
        order = list(mean.index)
        tau = kendall_tau([m for m in published if m in order], order) if set(order) == set(PUBLISHED) else float("nan")
        best_mtl = next(m for m in order if m != SCRATCH)
        parts.append(f"{dataset}: order {' > '.join(order)} (Kendall τ vs published {tau:+.2f}); single task "
                     f"{100 * mean[SCRATCH]:.1f}%, best MTL {NAMES[best_mtl]} {100 * mean[best_mtl]:.1f}% (mean of left/right)")
    return "; ".join(parts)


def weighting_benchmark() -> str:
    t = pd.read_csv(STUDIES / "weighting_benchmark" / "results" / "results.csv")
    mtl = t[t["method"] != SCRATCH]
    best = mtl.sort_values("delta_m_pct", ascending=False).iloc[0]
    equal = mtl.set_index("method").loc["equal", "delta_m_pct"]
    above = int((mtl["delta_m_pct"] > equal).sum())
    seeds = f"{int(mtl['n_seeds'].min())}–{int(mtl['n_seeds'].max())}" if mtl["n_seeds"].nunique() > 1 else str(int(mtl["n_seeds"].iloc[0]))
    return (f"{len(mtl)} methods on MultiFashion ({seeds} seeds): best Δm% {best['method']} {best['delta_m_pct']:+.2f}, "
            f"equal {equal:+.2f}; {above} of {len(mtl) - 1} above equal weighting; {int((mtl['delta_m_pct'] > 0).sum())} above single-task")


def transfer_claims() -> str:
    s = pd.read_csv(STUDIES / "transfer_claims" / "results" / "results.csv")
    margins, gaps, stds = [], 0, 0
    for pair, g in s.groupby("pair", sort=False):
        low = g[g["fraction"] == g["fraction"].min()].set_index("method")
        margins.append(100 * (low.drop(index=SCRATCH)["test_mean"].max() - low.loc[SCRATCH, "test_mean"]))
        by = g.groupby("method")
        gaps += int((by["gap"].mean().drop(SCRATCH) < by["gap"].mean()[SCRATCH]).any())
        stds += int((by["test_std"].mean().drop(SCRATCH) < by["test_std"].mean()[SCRATCH]).any())
    n = s["pair"].nunique()
    return (f"(a) at the smallest labelled fraction the best transfer regime beats scratch on {sum(m > 0 for m in margins)}/{n} pairs "
            f"({', '.join(f'{m:+.1f}' for m in margins)} points); (b) some transfer regime has a smaller train–test gap on {gaps}/{n}; "
            f"(c) a smaller seed spread on {stds}/{n}; (d) a linear probe trains only the head")


LINES = {
    "transfer_claims": ("transfer_claims/", transfer_claims),
    "multi_mnist": ("multi_mnist/", multi_mnist),
    "weighting_benchmark": ("weighting_benchmark/", weighting_benchmark),
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
