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
import math
import time

import pandas as pd

from mtl import stats
from paper_repro.common import ROOT, SMOKE, STUDIES, folders, markdown, parser, provenance, run_grid, write
from paper_repro.transfer_claims.__main__ import NAMES, REGIMES, SCRATCH, TARGET, figure, pair_tables, verdicts

HERE = STUDIES / "pretrained_claims"
# part -> (the shipped config, this study's file merged over it, the pretraining's name, and per
# target task the suffix of its own regimes in that config: scratch_<suffix>, lp_ft_<suffix>).
PARTS = {
    "vision": (ROOT / "configs" / "pretrained_vision.yaml", HERE / "vision.yaml", "imagenet",
               {"fashion_mnist": "fashion", "digits": "digits"}),
    "text": (ROOT / "configs" / "pretrained_text.yaml", HERE / "text.yaml", "minilm",
             {"bbc_news": "bbc", "wordnet_category": "wordnet"}),
}


LONG = "scratch_long"  # scratch_<suffix>_long of this study's yaml: scratch with 10x the steps
FINE_TUNE = "sequential/fine_tune"
TRANSFER = [FINE_TUNE, "sequential/linear_probe", "sequential/lp_ft", "joint"]
LABELS = {**NAMES, LONG: "scratch, 10× steps"}


def regimes(suffix: str) -> dict[str, str]:
    """A pretrained config's method names (and this study's longer scratch) -> transfer_claims'
    names, for one target task."""
    return {f"scratch_{suffix}": SCRATCH, "single_task": FINE_TUNE, "linear_probe": "sequential/linear_probe",
            f"lp_ft_{suffix}": "sequential/lp_ft", "joint": "joint", f"scratch_{suffix}_long": LONG}


def smoke_overrides(part: str) -> list[str]:
    """CI's settings, the longer scratch regimes' own epochs included (a stage's trainer wins)."""
    return [*SMOKE, *(f"compare.regimes.scratch_{suffix}_long.stages.0.trainer.epochs=1" for suffix in PARTS[part][3].values())]


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
            df = run_grid(config, [*(smoke_overrides(part) if args.smoke else []), *(args.overrides if selected else [])], runs / part,
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
    write(results, "baselines.md", baselines(per_seed, command + " (its report)"))
    figure(frames, results, [*REGIMES, LONG], LABELS)
    text = "\n\n".join([
        "# The transfer claims on pretrained trunks: results",
        provenance(command, sum(walls.values()) or None, smoke),
        "Pretraining: ImageNet-1k (EfficientNet-Lite0, for fashion_mnist and digits) and sentence-transformers' "
        "training of all-MiniLM-L6-v2 (for bbc_news and wordnet_category). Scratch is the same network randomly "
        "initialised; joint trains the target with the part's other task on one fine-tuned pretrained trunk.",
        "Claims (a)–(c) are judged in [verdicts.md](verdicts.md) (paired per-seed tests, Holm-corrected); the tables "
        "below describe. [baselines.md](baselines.md) tests every regime against scratch trained with 10× the steps, "
        "and against fine-tuning.",
        "**(d) Fewer trainable parameters** — parameters trained in the target run (joint: trunk and both heads):\n\n"
        + "\n".join(f"- {c}" for c in claim_d),
        "## Per target", *sections,
        "![data efficiency](data_efficiency.png)",
    ])
    write(results, "results.md", text)


def _paired(seeds: pd.DataFrame, method: str, base: str, measure: str = "test") -> stats.Difference | None:
    """``method`` − ``base`` per seed, in points: test accuracy, or with ``measure="gap"`` the
    train − test gap of ``base`` minus that of ``method`` (+: ``method``'s gap is smaller)."""
    v = seeds.pivot_table(index="seed", columns=["method", "split"], values="value")
    keys = [(m, s) for m in (method, base) for s in ("test", "train")]
    if any(k not in v.columns for k in keys):
        return None
    v = v[keys].dropna()
    if measure == "test":
        return stats.Difference.of(100 * (v[(method, "test")] - v[(base, "test")]).to_numpy())
    gap = {m: v[(m, "train")] - v[(m, "test")] for m in (method, base)}
    return stats.Difference.of(100 * (gap[base] - gap[method]).to_numpy())


# key -> (section title, what the difference is, the baseline, the regimes tested, test or gap, verdict words)
FAMILIES = {
    "a": ("(a) Test accuracy against scratch with 10× the steps", "regime − scratch 10× steps, target test accuracy (points; + better)",
          LONG, TRANSFER, "test", ("better", "worse")),
    "b": ("(b) Generalization gap against scratch with 10× the steps",
          "train − test gap, scratch 10× steps − regime (points; + smaller gap)", LONG, TRANSFER, "gap", ("smaller gap", "larger gap")),
    "f": ("Which way to transfer: against fine-tuning", "regime − fine-tune, target test accuracy (points; + better)",
          FINE_TUNE, TRANSFER[1:], "test", ("better", "worse")),
}


def baseline_tests(per_seed: pd.DataFrame) -> list[tuple[str, str, float, str, stats.Difference]]:
    """(family of ``FAMILIES``, pair, fraction, regime, paired test) for every comparison the
    seeds allow, Holm-corrected over all of them."""
    seeds = per_seed.assign(fraction=per_seed["fraction"].round(6))
    tests = []
    for (pair, fraction), group in seeds.groupby(["pair", "fraction"], sort=False):
        for key, (_, _, base, methods, measure, _) in FAMILIES.items():
            for method in methods:
                t = _paired(group, method, base, measure)
                if t is not None:
                    tests.append((key, pair, fraction, method, t))
    stats.correct([t for *_, t in tests])
    return tests


def baselines(per_seed: pd.DataFrame | None, command: str) -> str:
    """results/baselines.md: every transfer regime against scratch trained with 10× the steps,
    (a) test accuracy and (b) the train − test gap, and every other regime against fine-tuning;
    paired t-tests of per-seed differences, Holm over every test of this file."""
    head = ["# Against a longer scratch run, and against fine-tuning: verdicts",
            f"_Generated by `{command}` from results/per_seed.csv (no training). Do not edit by hand._"]
    if per_seed is None or LONG not in set(per_seed["method"]):
        return "\n\n".join([*head, "Not tested: the grids hold no scratch run with 10× the steps (scratch_<task>_long)."])
    tests = baseline_tests(per_seed)
    means = per_seed.assign(fraction=per_seed["fraction"].round(6)).groupby(["pair", "fraction", "method", "split"])["value"].mean()
    reached = [[pair, f"{fraction:g}", *(f"{100 * means.get((pair, fraction, m, s), float('nan')):.1f}"
                                          for m in (SCRATCH, LONG) for s in ("train", "test"))]
               for pair, fraction in dict.fromkeys((p, f) for p, f, method, _ in means.index if method == LONG)]
    m = sum(1 for *_, t in tests if not math.isnan(t.p))
    lines = [*head,
             f"Tests: paired t-tests of per-seed differences (a seed fixes the labelled subset and the batch order of every "
             f"regime); p (Holm): Holm-corrected over all {m} tests of this file. A verdict other than \"no resolved "
             "difference\" needs p (Holm) < 0.05.",
             "## What scratch reached\n\nTarget accuracy (%), mean over seeds: scratch at the grid's steps and with 10× "
             "the steps. A baseline that does not fit its training set makes neither (a) nor (b) a fair test.\n\n"
             + markdown(["pair", "fraction", "scratch train", "scratch test", "10× train", "10× test"], reached)]
    for key, (title, what, _, _, _, words) in FAMILIES.items():
        rows = [r for r in tests if r[0] == key]
        body = []
        for _, pair, fraction, method, t in rows:
            text = t.verdict(m=max(m, 1))
            text = {"better": words[0], "worse": words[1]}.get(text, text)
            p = "–" if math.isnan(t.p) else f"{t.p:.3f}"
            ph = "–" if math.isnan(t.p_holm) else f"{t.p_holm:.3f}"
            shown = f"{t.mean:+.1f}" + ("" if math.isnan(t.low) else f" [{t.low:+.1f}, {t.high:+.1f}]")
            body.append([pair, f"{fraction:g}", LABELS[method], str(t.n), shown, p, ph, text])
        counts = ", ".join(f"{sum(r[-1] == w for r in body)} {w}" for w in words)
        lines.append("\n\n".join([f"## {title}", f"{what}. Resolved: {counts}, of {len(body)} comparisons; the rest not resolved.",
                                   markdown(["pair", "fraction", "regime", "n", "difference [95% CI]", "p", "p (Holm)", "verdict"], body)]))
    return "\n\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
