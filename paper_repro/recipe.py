"""The runner of the published-settings recipes (nyuv2/, celeba/): run the recipe's grid on a
data root in the real layout, then write results.md / results.csv beside the published Δm%.

Used as ``python -m paper_repro.nyuv2 --root PATH`` (see each recipe's __main__.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from paper_repro.common import folders, fmt, markdown, parser, provenance, run_grid, write
from paper_repro.published import tables_markdown


def main(study: str, doc: str, config: Path, root_key: str, smoke_overrides: Sequence[str], benchmark: str, argv=None,
         metrics: str = "all") -> int:
    """``metrics``: the test metrics Δm% averages, as the benchmark's paper does (mtl.report.METRICS)."""
    p = parser(study, doc)
    p.add_argument("--root", help=f"the data root in the real layout (sets {root_key}; the other tasks follow it)")
    args = p.parse_args(argv)
    runs, results = folders(args, study)
    overrides = [*(smoke_overrides if args.smoke else []), *([f"{root_key}={args.root}"] if args.root else []), *args.overrides]
    start = time.perf_counter()
    df = run_grid(config, overrides, runs / "grid", train=not args.report_only)
    timing = runs / "wall_time.json"
    if not args.report_only:
        timing.write_text(json.dumps(time.perf_counter() - start))
    wall = json.loads(timing.read_text()) if timing.exists() else None
    report(df, results, study, benchmark, wall, args.smoke, metrics)
    print(f"results: {results / 'results.md'}")
    return 0


def report(df: pd.DataFrame, results: Path, study: str, benchmark: str, wall, smoke: bool, delta_m_metrics: str = "all") -> None:
    from mtl.report import comparison_table

    table = comparison_table(df, delta_m_metrics)
    table.to_csv(results / "results.csv", index=False)
    metrics = [c[: -len("/mean")] for c in table.columns if c.startswith("test/") and c.endswith("/mean")]
    body = [[r["method"], int(r["n_seeds"]), *(fmt(r[f"{m}/mean"], r[f"{m}/std"], scale=1, digits=4) for m in metrics),
             fmt(r["delta_m_pct"], r["delta_m_pct_std"], scale=1, signed=True)] for _, r in table.iterrows()]
    text = "\n\n".join([
        f"# {study}: results",
        provenance(f"python -m paper_repro.{study}" + (" --smoke" if smoke else "") + " --root ...", wall, smoke),
        "Test values of each task's primary metric, mean ± std over seeds (checkpoint selected on validation); "
        f"Δm% against single-task (metrics: {delta_m_metrics}: "
        + ("every test metric but the loss" if delta_m_metrics == "all" else "each task's primary metric")
        + "; mtl.report; higher is better).",
        markdown(["method", "seeds", *(m.split("/")[1] + " " + m.split("/")[2] for m in metrics), "Δm% ↑"], body),
        f"## Published Δm% on {benchmark} (lower is better there: a drop)\n\n"
        + tables_markdown([benchmark])
        + "\n\nCompare orderings, not values: the trunk and model selection differ (README.md).",
    ])
    write(results, "results.md", text)
