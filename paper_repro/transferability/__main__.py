"""Choosing what to transfer and what to train together, checked against runs (see README.md).

    python -m paper_repro.transferability             # the pair grids, `mtl rank`, TAG and its groupings, then results/
    python -m paper_repro.transferability --smoke     # digits from three MNIST sources, 2 steps, 1 seed (CI)
    python -m paper_repro.transferability --report-only

Part 1, sources: for each target (digits at 0.05, 63 labelled images; Fashion-MNIST at 0.002,
108 images; Fair's affairs survey at 0.02, 89 labelled rows, on an MLP), one `mtl compare` grid
per candidate source (base.yaml with the pair's tasks):
the source stage once per seed, then a linear probe and a full fine-tune of the target; the
first pair of a target also trains it from scratch (single_task, the random-initialisation
candidate). `mtl rank` then scores every seed's source trunk (and a random trunk) on the
target's labelled images and validates each score against the measured accuracies: weighted
Kendall τ with a bootstrap CI over seeds (``mtl.rank.Validation``).

Part 2, groupings: `mtl group configs/group_quickstart.yaml` measures TAG's lookahead affinity
of four tasks (MNIST, digits, MultiMNIST left and right) and proposes a grouping into at most
two networks; one `mtl compare` grid then trains every way of splitting the four tasks into
one or two disjoint groups, and the proposal, against single-task. Each grouping's Δm% is
paired by seed (``mtl.report.delta_m_paired``), its difference from all-joint tested paired
(``mtl.stats``, Holm over the groupings), and TAG's predicted score set against the measured
Δm% (Kendall τ over the groupings TAG can score).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from paper_repro.common import SMOKE, STUDIES, against, ci, directions, folders, markdown, parser, per_seed, primary_test, provenance, \
    run_grid, write

HERE = STUDIES / "transferability"
BASE = HERE / "base.yaml"
GROUP_CONFIG = STUDIES.parent / "configs" / "group_quickstart.yaml"
SCRATCH = "single_task"
MEASURES = {"fine_tune": "sequential/fine_tune", "linear_probe": "sequential/linear_probe"}
SCORES = ["logme", "leep", "nce", "hscore", "transrate"]

# label -> the task node of a source (or a target): every one 1x28x28, so one trunk fits all.
TASKS: dict[str, dict[str, Any]] = {
    "mnist": {"name": "mnist"},
    "fashion": {"name": "fashion_mnist"},
    "digits": {"name": "digits", "size": 28},
    "mm_left": {"name": "multi_mnist_left"},
    "mm_right": {"name": "multi_mnist_right"},
    "mf_left": {"name": "multi_fashion_left"},
    "fm_digit": {"name": "multi_fashion_mnist_left"},
    "fm_item": {"name": "multi_fashion_mnist_right"},
    # Tabular, 7 features: Fair's survey (statsmodels); both tasks read the same columns and rows.
    "affair": {"name": "fair_affair"},
    "marriage": {"name": "fair_marriage"},
    "marriage_brief": {"name": "fair_marriage"},  # the same source, pretrained for 10 steps instead of 300
}
# What a candidate source's grid sets beside its task.
SOURCE_OVERRIDES = {"marriage_brief": ["compare.stages.source.trainer.epochs=1", "compare.stages.source.trainer.steps_per_epoch=10"]}
SEED_NET = {"name": "seed_net"}
MLP = {"name": "mlp", "in_features": 7, "hidden": [64, 64], "dropout": 0.1}
TRUNKS = {"affair": MLP}  # a target's trunk (default SEED_NET: the image targets)
# target -> (its labelled fraction, its sources); a source never shares the target's images.
TARGETS = {
    "digits": (0.05, ["mnist", "fashion", "mm_left", "mm_right", "mf_left", "fm_digit", "fm_item"]),
    "fashion": (0.002, ["mnist", "digits", "mm_left", "mm_right", "mf_left", "fm_digit", "fm_item"]),
    "affair": (0.02, ["marriage", "marriage_brief"]),
}
SMOKE_TARGETS = {"digits": (0.05, ["mnist", "mm_left", "mm_right"])}
TRAIN_SIZE = {"digits": 1258, "fashion": 54000, "affair": 4456}  # each target's training split at fraction 1 (its task's default split)
SMOKE_OVERRIDES = [*SMOKE, "compare.stages.source.trainer.epochs=1", "compare.stages.source.trainer.steps_per_epoch=2"]
GROUP_SEEDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def flow(node: Any) -> str:
    """A value as one override's right-hand side (YAML flow style)."""
    return yaml.safe_dump(node, default_flow_style=True, width=10_000).strip()


def pair_overrides(target: str, source: str, first: bool) -> list[str]:
    fraction, _ = TARGETS.get(target) or SMOKE_TARGETS[target]
    out = [f"tasks.source={flow(TASKS[source])}", f"tasks.target={flow(TASKS[target])}", f"compare.fractions=[{fraction}]",
           f"compare.name=transferability_{source}_to_{target}", f"trunk={flow(TRUNKS.get(target, SEED_NET))}",
           *SOURCE_OVERRIDES.get(source, [])]
    return out + ["compare.regimes.single_task={}"] if first else out


def rank_config(target: str, fraction: float, sources: list[str], runs: Path) -> dict[str, Any]:
    """The `mtl rank` config of one target: a random trunk and every pair grid's source stages
    as candidates, scored on as many training images as the target's labelled fraction has
    (a draw of that size by seed 0, not the grids' own subsets), validated against the grids."""
    grids = {s: str(runs / f"{s}_to_{target}") for s in sources}
    n = max(2, round(fraction * TRAIN_SIZE[target]))
    return {
        "output_dir": str(runs / f"rank_{target}"),
        "seed": 0,
        "device": "cpu",
        "tasks": {"target": TASKS[target]},
        "trunk": TRUNKS.get(target, SEED_NET),
        "rank": {
            "targets": ["target"],
            "max_samples": n,
            "scores": SCORES,
            "candidates": {"random_init": {}, **{s: {"comparison": g} for s, g in grids.items()}},
            "validate": {
                "fraction": fraction,
                "resamples": 2000,
                # A rank correlation needs 3 candidates: the linear probe has no random-initialisation one.
                "measures": {
                    "fine_tune": {"random_init": {"results": grids[sources[0]], "method": SCRATCH}, **grids},
                    **({"linear_probe": dict(grids)} if len(grids) >= 3 else {}),
                },
            },
        },
    }


def run_rank(config: dict[str, Any], runs: Path, target: str) -> dict[str, Any]:
    from mtl import rank

    path = runs / f"rank_{target}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cfg, node = rank.load(str(path))
    start = time.perf_counter()
    out = rank.rank(cfg, node)
    out["wall_s"] = time.perf_counter() - start
    return out


# ---- part 2: TAG's groupings against every split into one or two groups ----------------------


def partitions(tasks: list[str]) -> list[list[list[str]]]:
    """Every way to split ``tasks`` into one or two disjoint, non-empty groups (all-joint first)."""
    out = [[list(tasks)]]
    first, rest = tasks[0], tasks[1:]
    for k in range(len(rest)):  # the first task's group takes k of the others; the rest form the second group
        for chosen in itertools.combinations(rest, k):
            group = [first, *chosen]
            out.append([group, [t for t in tasks if t not in group]])
    return out


def label(groups: list[list[str]]) -> str:
    return "joint" if len(groups) == 1 else "g_" + "__".join("_".join(g) for g in groups)


def grouping_regimes(tasks: list[str], proposal: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """compare.regimes: single-task, all-joint, every two-group split, and TAG's proposal
    (its label, ``tag``, unless the proposal is one of the splits)."""
    regimes: dict[str, Any] = {SCRATCH: {}, "joint": {}}
    for groups in partitions(tasks)[1:]:
        regimes[label(groups)] = {"kind": "groups", "groups": groups}
    proposed = [sorted(g, key=tasks.index) for g in proposal["groups"]]
    same = next((lbl for lbl, node in regimes.items() if node.get("groups") and
                 sorted(map(tuple, node["groups"])) == sorted(map(tuple, proposed))), None)
    if same is not None:
        return regimes, same
    regimes["tag"] = {"kind": "groups", "groups": proposed, "serve": dict(proposal["serving"])}
    return regimes, "tag"


def run_group(runs: Path, smoke: bool) -> dict[str, Any]:
    from mtl.config import load_config
    from mtl.group import GroupRun

    out = runs / "group"
    overrides = [f"output_dir={out}", "logging.wandb.mode=disabled", "logging.progress_bar=false"]
    start = time.perf_counter()
    result = GroupRun(load_config(GROUP_CONFIG, overrides), every=2 if smoke else 10, max_groups=2, steps=4 if smoke else None,
                      command=[str(GROUP_CONFIG), *overrides]).run()
    result["wall_s"] = time.perf_counter() - start
    return result


def grouping_table(df: pd.DataFrame, groups: dict[str, Any], proposed: str) -> tuple[pd.DataFrame, list]:
    """Per grouping: TAG's score (n/a where a task trains alone: TAG scores a lone task −10⁶),
    Δm% against single-task and the difference from all-joint, each paired by seed with its
    bootstrap CI and t-test, Holm over both families together."""
    from mtl import stats
    from mtl.affinity import grouping_score

    values, dirs = per_seed(df), directions(df)
    single, vs_joint = against(values, dirs, SCRATCH), against(values, dirs, "joint")
    tests = [d.test for d in single.values()] + [d.test for d in vs_joint.values()]
    stats.correct(tests)
    tasks = groups["tasks"]
    z = [[groups["affinity"][a][b] for b in tasks] for a in tasks]
    rows = []
    for method, d in single.items():
        members = [[*tasks]] if method == "joint" else groups["regimes"][method]["groups"]
        try:
            score = grouping_score(z, tasks, members).score
        except ValueError:  # a group of one task: it serves no task, and TAG never selects it
            score = math.nan
        other = vs_joint.get(method)
        rows.append({
            "grouping": method, "proposed": method == proposed, "groups": " · ".join("{" + ", ".join(g) + "}" for g in members),
            "tag_score": score, "delta_m_pct": d.mean, "delta_m_low": d.low, "delta_m_high": d.high, "n_seeds": len(d.seeds),
            "delta_m_p_holm": d.test.p_holm, "delta_m_verdict": d.test.verdict(m=len(tests)),
            "vs_joint": math.nan if other is None else other.mean, "vs_joint_low": math.nan if other is None else other.low,
            "vs_joint_high": math.nan if other is None else other.high,
            "vs_joint_p_holm": math.nan if other is None else other.test.p_holm,
            "vs_joint_verdict": "" if other is None else other.test.verdict(m=len(tests)),
        })
    table = pd.DataFrame(rows).sort_values("delta_m_pct", ascending=False).reset_index(drop=True)
    return table, tests


# ---- the report ------------------------------------------------------------------------------


def measured_table(frames: dict[str, pd.DataFrame], target: str, fraction: float) -> pd.DataFrame:
    """Per candidate: the target's test accuracy after a fine-tune and a linear probe (random
    initialisation: trained from scratch, in the first pair's grid), mean over seeds with a 95%
    t interval (``mtl.stats.t_interval``)."""
    from mtl import stats

    first = next(iter(frames))
    jobs = [(source, measure, method) for source in frames for measure, method in MEASURES.items()]
    rows = []
    for candidate, measure, method in [("random_init", "fine_tune", SCRATCH), *jobs]:
        test = primary_test(frames[first if candidate == "random_init" else candidate])
        values = test[(test["task"] == "target") & (test["fraction"] == fraction) & (test["method"] == method)].groupby("seed")["value"].mean()
        mean, low, high = map(float, stats.t_interval(values.to_numpy(float)))
        rows.append({"target": target, "candidate": candidate, "measure": measure, "mean": mean, "low": low, "high": high,
                     "n_seeds": len(values)})
    return pd.DataFrame(rows)


def percent(mean: float, low: float, high: float) -> str:
    return f"{100 * mean:.1f}" + ("" if pd.isna(low) else f" [{100 * low:.1f}, {100 * high:.1f}]")


def report(parts: dict[str, Any], results: Path, smoke: bool, walls: dict[str, float]) -> None:
    lines = [provenance("python -m paper_repro.transferability" + (" --smoke" if smoke else ""), sum(walls.values()) or None, smoke), "",
             "# Choosing what to transfer and what to train together", ""]
    measured, validations, scores = [], [], []
    for target, p in parts["targets"].items():
        m = measured_table(p["frames"], target, p["fraction"])
        measured.append(m)
        v = p["rank"]["validation"].assign(target=target)
        validations.append(v)
        s = p["rank"]["table"].assign(target=target)
        scores.append(s)
        lines += [f"## Target {target} at fraction {p['fraction']:g}", "",
                  "Measured test accuracy (%, mean over seeds, 95% t interval) and each score on the target's labelled "
                  "images (a source's score: the mean over its seeds' source trunks; rank among the candidates in brackets).", ""]
        wide = s.assign(base=s["candidate"].str.replace(r"/seed\d+$", "", regex=True)).groupby(["base", "score"])["value"].mean().unstack()
        header = ["candidate", "fine-tune", "linear probe", *SCORES]
        rows = []
        for cand in wide.sort_values("logme", ascending=False).index:
            cells = [cand]
            for measure in ("fine_tune", "linear_probe"):
                r = m[(m["candidate"] == cand) & (m["measure"] == measure)]
                cells.append("—" if r.empty else percent(*r[["mean", "low", "high"]].iloc[0]))
            for name in SCORES:
                value = wide.loc[cand, name] if name in wide.columns else math.nan
                rank = wide[name].rank(ascending=False, method="min").get(cand, math.nan) if name in wide.columns else math.nan
                cells.append("n/a" if pd.isna(value) else f"{value:.4g} ({int(rank)})")
            rows.append(cells)
        lines += [markdown(header, rows), "", "Each score against the measured accuracy over the candidates (weighted Kendall τ, "
                  "`mtl.rank.Validation`; the CI resamples seeds of the measured accuracy):", ""]
        lines += [markdown(["measure", "score", "τ_w", "95% CI", "verdict", "candidates", "seeds"],
                           [[r.measure, r.score, "n/a" if pd.isna(r.tau_w) else f"{r.tau_w:+.2f}",
                             "—" if pd.isna(r.ci_low) else f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]", r.verdict, r.candidates, r.seeds]
                            for r in v.itertuples()]), ""]
        per = p["rank"]["table"].groupby("candidate")[["load_s", "features_s", "score_s"]].first()
        lines += [f"`mtl rank` took {p['rank']['wall_s']:.1f} s for {len(per)} trunks ({per['features_s'].median():.3f} s median "
                  f"forward pass per trunk on {int(p['rank']['table']['samples'].iloc[0])} images).", ""]
    g = parts["groups"]
    table, tests = g["table"], g["tests"]
    lines += ["## Task groupings: TAG's proposal against every split into one or two groups", "",
              f"`mtl group configs/group_quickstart.yaml` ({g['result']['measured_steps']} measured steps of {g['result']['steps']}, "
              f"{g['result']['wall_s']:.0f} s) proposed, for at most two networks: "
              f"{' · '.join('{' + ', '.join(x) + '}' for x in g['proposal']['groups'])} (score {g['proposal']['score']:+.4f}). "
              f"Mean affinity matrix: `group/groups.md`. Each grouping below was trained on {int(table['n_seeds'].min())} seeds; "
              "Δm% over the four tasks' test accuracy against single-task, and Δm% against all-joint, each paired by seed "
              f"(bootstrap 95% CI; paired t-test, Holm over all {len(tests)} tests; the verdict is the test's, so a CI that "
              "excludes 0 may still be unresolved).", ""]

    def p(value: float) -> str:
        return "—" if pd.isna(value) else f"{value:.3g}"

    lines += [markdown(["grouping", "groups", "TAG score", "Δm% vs single-task [95% CI]", "p (Holm)", "verdict",
                        "Δm% vs all-joint [95% CI]", "p (Holm)", "verdict"],
                       [[r.grouping + (" (TAG)" if r.proposed else ""), r.groups, "n/a" if pd.isna(r.tag_score) else f"{r.tag_score:+.4f}",
                         ci(r.delta_m_pct, r.delta_m_low, r.delta_m_high), p(r.delta_m_p_holm), r.delta_m_verdict,
                         ci(r.vs_joint, r.vs_joint_low, r.vs_joint_high), p(r.vs_joint_p_holm),
                         r.vs_joint_verdict if isinstance(r.vs_joint_verdict, str) and r.vs_joint_verdict else "—"]
                        for r in table.itertuples()]), ""]
    scored = table.dropna(subset=["tag_score"])
    if len(scored) >= 3:
        import scipy.stats

        tau = scipy.stats.kendalltau(scored["tag_score"], scored["delta_m_pct"]).statistic
        lines += [f"Kendall τ between TAG's score and the measured Δm% over the {len(scored)} groupings it can score: {tau:+.2f} "
                  "(no CI: a handful of groupings).", ""]
    write(results, "results.md", "\n".join(lines))
    write(results, "measured.csv", pd.concat(measured).to_csv(index=False))
    write(results, "validation.csv", pd.concat(validations).to_csv(index=False))
    write(results, "scores.csv", pd.concat(scores).to_csv(index=False))
    write(results, "groupings.csv", table.to_csv(index=False))
    write(results, "groups.json", json.dumps({k: g["result"][k] for k in ("tasks", "affinity", "groupings", "step_time", "steps", "every")},
                                             indent=1))


def main(argv=None) -> int:
    args = parser("transferability", __doc__).parse_args(argv)
    runs, results = folders(args, "transferability")
    runs.mkdir(parents=True, exist_ok=True)
    base = [*SMOKE_OVERRIDES, *args.overrides] if args.smoke else list(args.overrides)
    targets = SMOKE_TARGETS if args.smoke else TARGETS
    timing = runs / "wall_time.json"
    walls = json.loads(timing.read_text()) if timing.exists() else {}
    parts: dict[str, Any] = {"targets": {}}
    for target, (fraction, sources) in targets.items():
        frames = {}
        for k, source in enumerate(sources):
            name = f"{source}_to_{target}"
            start = time.perf_counter()
            frames[source] = run_grid(BASE, [*base, *pair_overrides(target, source, k == 0)], runs / name, train=not args.report_only)
            if not args.report_only:
                walls[name] = walls.get(name, 0.0) + time.perf_counter() - start  # summed over interrupted runs
                timing.write_text(json.dumps(walls))
        parts["targets"][target] = {"fraction": fraction, "frames": frames,
                                    "rank": run_rank(rank_config(target, fraction, sources, runs), runs, target)}
    group_json = runs / "group" / "groups.json"
    if args.report_only or group_json.exists():  # as a grid skips its finished cells
        result = {**json.loads(group_json.read_text()), "wall_s": walls.get("group", math.nan)}
    else:
        result = run_group(runs, args.smoke)
        walls["group"] = result["wall_s"]
    proposal = next(x for x in result["groupings"] if x["max_groups"] == 2)
    regimes, proposed = grouping_regimes(result["tasks"], proposal)
    overrides = [*(SMOKE if args.smoke else [f"compare.seeds={flow(GROUP_SEEDS)}"]), *args.overrides,
                 f"compare.regimes={flow(regimes)}", "compare.name=transferability_groupings", "logging.wandb.mode=disabled", "logging.progress_bar=false"]
    start = time.perf_counter()
    df = run_grid(GROUP_CONFIG, overrides, runs / "groupings", train=not args.report_only)
    if not args.report_only:
        walls["groupings"] = walls.get("groupings", 0.0) + time.perf_counter() - start
        timing.write_text(json.dumps(walls))
    table, tests = grouping_table(df, {**result, "regimes": regimes}, proposed)
    parts["groups"] = {"result": result, "proposal": proposal, "table": table, "tests": tests}
    report(parts, results, args.smoke, {k: v for k, v in walls.items() if v == v})
    print(f"results: {results / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
