"""The four transfer claims on genuinely pretrained trunks: ImageNet EfficientNet-Lite0 on
Fashion-MNIST and sklearn digits, all-MiniLM-L6-v2 on BBC News topics and WordNet noun
categories, each against the same network trained from scratch.

    python -m paper_repro.pretrained_claims                  # both parts, then results/
    python -m paper_repro.pretrained_claims --part vision    # one part (its grid resumes; the report reads every finished part)
    python -m paper_repro.pretrained_claims --report-only
    python -m paper_repro.pretrained_claims --smoke --part vision   # CI: 2 steps, 1 seed

Each part is the grid of configs/pretrained_<part>.yaml with <part>.yaml of this folder merged
over it (more seeds, a folder of its own). Per target task, its rows become one "pair" of
paper_repro.transfer_claims (source: the pretraining), with the regimes renamed to that study's:
the scratch regime of the target is the baseline, the pretrained trunk fine-tuned alone is
"fine-tune", the frozen trunk "linear probe", LP-FT "LP-FT" (vision only), and "joint" is the
target trained with the part's other task on one fine-tuned pretrained trunk. Claims (a)–(c)
are judged by transfer_claims' paired tests (Holm over every test of the file), claim (d) by
the trainable parameters. Writes results/results.md, results/verdicts.md, results/results.csv,
results/per_seed.csv and results/data_efficiency.png (and .pdf).
"""

from __future__ import annotations

import json
import time

import pandas as pd

from paper_repro.common import ROOT, SMOKE, STUDIES, folders, parser, provenance, run_grid, write
from paper_repro.transfer_claims.__main__ import SCRATCH, TARGET, figure, pair_tables, verdicts

HERE = STUDIES / "pretrained_claims"
# part -> (the shipped config, this study's file merged over it, the pretraining's name, and per
# target task the suffix of its own regimes in that config: scratch_<suffix>, lp_ft_<suffix>).
PARTS = {
    "vision": (ROOT / "configs" / "pretrained_vision.yaml", HERE / "vision.yaml", "imagenet",
               {"fashion_mnist": "fashion", "digits": "digits"}),
    "text": (ROOT / "configs" / "pretrained_text.yaml", HERE / "text.yaml", "minilm",
             {"bbc_news": "bbc", "wordnet_category": "wordnet"}),
}


def regimes(suffix: str) -> dict[str, str]:
    """A pretrained config's method names -> transfer_claims' names, for one target task."""
    return {f"scratch_{suffix}": SCRATCH, "single_task": "sequential/fine_tune", "linear_probe": "sequential/linear_probe",
            f"lp_ft_{suffix}": "sequential/lp_ft", "joint": "joint"}


def as_pairs(df: pd.DataFrame, part: str) -> dict[str, pd.DataFrame]:
    """One part's long-form results as transfer_claims pairs: ``<pretraining>_to_<task>`` -> the
    target task's rows, its regimes renamed and the task called ``TARGET``."""
    _, _, source, targets = PARTS[part]
    pairs = {}
    for task, suffix in targets.items():
        names = regimes(suffix)
        rows = df[(df["task"] == task) & df["method"].isin(list(names))]
        if len(rows):
            pairs[f"{source}_to_{task}"] = rows.assign(method=rows["method"].map(names), task=TARGET)
    return pairs


def main(argv=None) -> int:
    p = parser("pretrained_claims", __doc__)
    # One part per flag (--part vision --part text): a list option would swallow the overrides after it.
    p.add_argument("--part", action="append", choices=list(PARTS), dest="parts",
                   help="a part to run; repeat for more (default: both)")
    args = p.parse_args(argv)
    args.parts = args.parts or list(PARTS)
    runs, results = folders(args, "pretrained_claims")
    timing = runs / "wall_time.json"
    walls = json.loads(timing.read_text()) if timing.exists() else {}
    frames = {}
    # The report reads every part that has finished cells, so a part run alone adds to it. The
    # overrides belong to the parts asked for (run or, with --report-only, read); --smoke, to
    # every part (a smoke run's other part was a smoke run too).
    for part in PARTS:
        config, extra, _, _ = PARTS[part]
        selected = part in args.parts
        run = selected and not args.report_only
        start = time.perf_counter()
        try:
            df = run_grid(config, [*(SMOKE if args.smoke else []), *(args.overrides if selected else [])], runs / part,
                          train=run, extra=extra)
        except FileNotFoundError as e:  # not run yet: nothing to report for it
            print(f"skipped {part}: {e}")
            continue
        if run:
            walls[part] = walls.get(part, 0.0) + time.perf_counter() - start
            timing.parent.mkdir(parents=True, exist_ok=True)
            timing.write_text(json.dumps(walls))
        frames |= as_pairs(df, part)
    if not frames:
        raise SystemExit(f"{runs} holds no finished part: run `python -m paper_repro.pretrained_claims` first.")
    report(frames, walls, results, args.smoke)
    print(f"results: {results / 'results.md'}")
    return 0


def report(frames: dict[str, pd.DataFrame], walls: dict[str, float], results, smoke: bool) -> None:
    summary, per_seed, sections, claim_d = pair_tables(frames)
    summary.to_csv(results / "results.csv", index=False)
    per_seed.to_csv(results / "per_seed.csv", index=False)
    command = "python -m paper_repro.pretrained_claims" + (" --smoke" if smoke else "")
    write(results, "verdicts.md", verdicts(summary, per_seed, command=command + " (its report)",
                                           title="The transfer claims on pretrained trunks"))
    figure(frames, results)
    text = "\n\n".join([
        "# The transfer claims on pretrained trunks: results",
        provenance(command, sum(walls.values()) or None, smoke),
        "Pretraining: ImageNet-1k (EfficientNet-Lite0, for fashion_mnist and digits) and sentence-transformers' "
        "training of all-MiniLM-L6-v2 (for bbc_news and wordnet_category). Scratch is the same network randomly "
        "initialised; joint trains the target with the part's other task on one fine-tuned pretrained trunk.",
        "Claims (a)–(c) are judged in [verdicts.md](verdicts.md) (paired per-seed tests, Holm-corrected); the tables "
        "below describe.",
        "**(d) Fewer trainable parameters** — parameters trained in the target run (joint: trunk and both heads):\n\n"
        + "\n".join(f"- {c}" for c in claim_d),
        "## Per target", *sections,
        "![data efficiency](data_efficiency.png)",
    ])
    write(results, "results.md", text)


if __name__ == "__main__":
    raise SystemExit(main())
