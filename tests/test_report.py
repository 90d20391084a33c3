import json
import math
import statistics
import struct

import numpy as np
import pandas as pd
import pytest

from mtl import stats
from mtl.report import (
    REQUIRED_COLUMNS, Stop, analyse, budget_stops, comparison_table, convergence, delta_m, delta_m_keys, delta_m_paired,
    still_improving, write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIRECTIONS = {"accuracy": "max", "mae": "min", "macro_f1": "max", "loss": "min"}
PRIMARY = {"src": "accuracy", "tgt": "mae"}


def cell_rows(method, seed, fraction, task, test, params=(100, 100), **other_metrics):
    """Rows of one cell's task: the primary metric on train/val/test (train better than test
    by 0.05 accuracy or 0.3 mae), a method-dependent loss that Δm% must ignore, and any
    further test metrics."""
    regime, _, recipe = method.partition("/")
    metric = PRIMARY[task]
    train = test + 0.05 if DIRECTIONS[metric] == "max" else test - 0.3
    values = [("train", metric, train), ("val", metric, test), ("test", metric, test)]
    values += [("test", "loss", 10 * test)] + [("test", m, v) for m, v in other_metrics.items()]
    return [
        {
            "method": method, "regime": regime, "recipe": recipe or "fine_tune", "seed": seed,
            "fraction": fraction, "task": task, "split": split, "metric": m, "value": v,
            "direction": DIRECTIONS[m], "primary": m == metric, "trainable_params": params[0],
            "total_params": params[1], "wall_time_s": 1.5, "cell": f"{method}/{task}/{fraction}/{seed}",
        }
        for split, m, v in values
    ]


@pytest.fixture
def results():
    """Two seeds, target fractions 0.1 and 1; "src" is a source task whose single-task baseline
    exists at fraction 1 only; sequential reports the target only, joint reports both."""
    rows = []
    for seed in (0, 1):
        rows += cell_rows("single_task", seed, 1.0, "src", [0.80, 0.82][seed])
        for fraction, mae in ((0.1, [2.0, 2.2]), (1.0, [1.0, 1.2])):
            rows += cell_rows("single_task", seed, fraction, "tgt", mae[seed])
        for fraction, mae in ((0.1, [1.6, 1.8]), (1.0, [1.0, 1.0])):
            rows += cell_rows("sequential/fine_tune", seed, fraction, "tgt", mae[seed], (10, 200))
        for fraction, acc, mae in ((0.1, [0.70, 0.72], [2.4, 2.6]), (1.0, [0.84, 0.86], [1.0, 1.2])):
            rows += cell_rows("joint", seed, fraction, "src", acc[seed], (150, 150))
            rows += cell_rows("joint", seed, fraction, "tgt", mae[seed], (150, 150))
    return pd.DataFrame(rows)


def test_delta_m_mixed_directions():
    method = {("a", "accuracy"): 0.8, ("b", "mae"): 0.9}
    baseline = {("a", "accuracy"): 0.75, ("b", "mae"): 1.0}
    directions = {("a", "accuracy"): "max", ("b", "mae"): "min"}
    assert delta_m(method, baseline, directions) == pytest.approx(50 * (0.05 / 0.75 + 0.1 / 1.0))
    assert delta_m(method, baseline, directions) == pytest.approx(8.3333333)


def test_delta_m_worse_method_is_negative():
    method = {("a", "accuracy"): 0.7, ("b", "mae"): 1.2}
    baseline = {("a", "accuracy"): 0.75, ("b", "mae"): 1.0}
    directions = {("a", "accuracy"): "max", ("b", "mae"): "min"}
    assert delta_m(method, baseline, directions) == pytest.approx(50 * (-0.05 / 0.75 - 0.2))


def test_delta_m_rejects_missing_or_zero_baseline():
    directions = {("a", "mae"): "min"}
    with pytest.raises(ValueError, match="no baseline"):
        delta_m({("a", "mae"): 1.0}, {}, directions)
    with pytest.raises(ValueError, match="is 0"):
        delta_m({("a", "mae"): 1.0}, {("a", "mae"): 0.0}, directions)


def test_source_task_baseline_is_taken_at_fraction_one(results):
    fraction = {a.fraction: a for a in analyse(results)}
    # At fraction 0.1 joint's "src" is compared with the single-task "src" run at fraction 1, in
    # the all-tasks Δm% (joint reports both tasks; sequential only the target).
    joint = 50 * ((0.71 - 0.81) / 0.81 - (2.5 - 2.1) / 2.1)
    assert fraction[0.1].delta_all["joint"].mean == pytest.approx(joint)
    assert fraction[1.0].delta_all["joint"].mean == pytest.approx(50 * 0.04 / 0.81)
    assert "sequential/fine_tune" not in fraction[0.1].delta_all
    # The table's Δm% is over the tasks every method reports: the target alone, matched by
    # fraction (1.7 against 2.1 at 0.1, not against 1.1).
    table = comparison_table(results).set_index(["method", "fraction"])
    assert table.loc[("joint", 0.1), "delta_m_pct"] == pytest.approx(-100 * 0.4 / 2.1)
    assert table.loc[("sequential/fine_tune", 0.1), "delta_m_pct"] == pytest.approx(100 * 0.4 / 2.1)
    # Its std is over per-seed Δm%, each seed against the same seed's baseline: 0.4/2.0, 0.4/2.2.
    per_seed = [100 * 0.4 / 2.0, 100 * 0.4 / 2.2]
    assert table.loc[("sequential/fine_tune", 0.1), "delta_m_pct_std"] == pytest.approx(statistics.stdev(per_seed))
    assert table.loc[("single_task", 0.1), "test/src/accuracy/mean"] == pytest.approx(0.81)
    assert table.loc[("single_task", 0.1), "delta_m_pct"] == pytest.approx(0.0)


def test_comparison_table_columns(results):
    table = comparison_table(results)
    assert list(table.columns) == [
        "method", "fraction", "n_seeds", "test/src/accuracy/mean", "test/src/accuracy/std",
        "test/tgt/mae/mean", "test/tgt/mae/std", "delta_m_pct", "delta_m_pct_std", "delta_m_pct_low", "delta_m_pct_high",
    ]
    assert len(table) == 6 and set(table["n_seeds"]) == {2}
    assert table.set_index(["method", "fraction"])["test/src/accuracy/mean"].isna()[("sequential/fine_tune", 1.0)]


def test_delta_m_metrics_all_or_primary():
    rows = []
    for method, acc, f1 in (("single_task", 0.8, 0.5), ("joint", 0.8, 0.6)):
        rows += cell_rows(method, 0, 1.0, "src", acc, macro_f1=f1)
    # all: accuracy unchanged, macro-F1 +20%, over K = 2; the loss (10 × accuracy) would add a term.
    table = comparison_table(pd.DataFrame(rows)).set_index("method")
    assert table.loc["joint", "delta_m_pct"] == pytest.approx(10.0)
    assert math.isnan(table.loc["joint", "delta_m_pct_std"])  # one seed
    # primary: accuracy alone.
    assert comparison_table(pd.DataFrame(rows), metrics="primary").set_index("method").loc["joint", "delta_m_pct"] == 0
    with pytest.raises(ValueError, match="metrics must be one of"):
        delta_m_keys([("src", "accuracy")], {"src": "accuracy"}, "some")


def test_delta_m_paired_by_hand():
    keys = [("a", "accuracy"), ("b", "mae")]
    directions = {keys[0]: "max", keys[1]: "min"}
    method = pd.DataFrame([[0.8, 0.9], [0.7, 1.1], [0.9, 1.0]], index=[0, 1, 2], columns=pd.MultiIndex.from_tuples(keys))
    base = pd.DataFrame([[0.75, 1.0], [0.7, 1.0], [0.8, 1.2], [0.5, 0.5]], index=[0, 1, 2, 3], columns=pd.MultiIndex.from_tuples(keys))
    d = delta_m_paired(method, base, directions, keys)
    assert d.seeds == [0, 1, 2]  # seed 3 has no method run: not paired
    # Seed means 0.8, 1.0 against 0.75, 1.0667: 50 (0.05/0.75 + 0.0667/1.0667) = 6.458.
    assert d.mean == pytest.approx(50 * (0.05 / 0.75 + (3.2 / 3 - 1.0) / (3.2 / 3)))
    # Per seed, against the same seed's baseline.
    expected = [50 * (0.05 / 0.75 + 0.1), 50 * (0 - 0.1), 50 * (0.1 / 0.8 + 0.2 / 1.2)]
    assert d.per_seed.tolist() == pytest.approx(expected)
    assert d.low <= d.mean <= d.high
    assert d.test.n == 3 and d.test.mean == pytest.approx(np.mean(expected))
    # A NaN (a metric that could not be computed) drops that seed from the pairing.
    method.iloc[1, 0] = float("nan")
    assert delta_m_paired(method, base, directions, keys).seeds == [0, 2]


def png_size(path):
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_write_report(results, tmp_path):
    text = write_report(results, tmp_path, title="Toy comparison")
    assert (tmp_path / "report.md").read_text() == text
    assert text.startswith("# Toy comparison")
    assert "validation split only" in text and "paired by seed" in text
    assert "Δm% = (100 / K) Σ_k (−1)^{l_k} (M_m,k − M_b,k) / M_b,k" in text
    assert "Positive Δm% means better than single-task" in text
    # Best per column, direction-aware: highest accuracy, lowest mae.
    assert "**0.8100 ± 0.0141**" in text
    assert "**1.7000 ± 0.1414**" in text
    # Every Δm% table says which metrics it averages, over which tasks.
    assert "### Over tasks every method reports: tgt (metrics: all)" in text
    assert "### Over all tasks, methods that report every task: src, tgt (metrics: all)" in text
    assert "| sequential/fine_tune | +19.05 [+18.18, +20.00] (2) |" in text
    assert "| joint | -15.70 [" in text
    # Verdicts come from the paired tests only; no generated "findings" remain.
    assert "## Findings" not in text and "beats single-task" not in text
    # The same loss at both seeds: zero spread, so no t-test (p = 0 there made false verdicts on coarse metrics).
    assert ("| joint | src: accuracy | 2 | -0.1000 [-0.1000, -0.1000] | -inf | – | – | "
            "the same difference at all 2 seeds: no t-test (zero spread); add seeds |") in text
    assert ("| sequential/fine_tune | tgt: mae | 2 | +0.1000 [-1.1706, +1.3706] | +0.71 | 0.5000 | 1.0000 | "
            "no resolved difference at 2 seeds; about 31 seeds would resolve a difference of this size at 80% power |") in text
    assert "Holm-corrected over all 10 tested comparisons" in text
    assert "## Mean rank" in text and "| sequential/fine_tune | 1.00 [1.00, 1.00] (2) |" in text
    # Generalization gap is positive when train beats test, for both directions.
    assert "+0.0500" in text and "+0.3000" in text
    plots = ["data_efficiency_tgt", "paired_differences", "generalization", "parameters"]
    assert not (tmp_path / "data_efficiency_src.png").exists()
    for name in plots:
        assert f"]({name}.png)" in text
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        assert (tmp_path / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    # 150 dpi: a 5.5 × 3.6 inch figure is 825 × 540 pixels.
    assert png_size(tmp_path / "data_efficiency_tgt.png") == (825, 540)


def test_verdict_wording_is_symmetric(tmp_path):
    """A small gain and a small loss of the same size get the same words: not resolved."""
    rows = []
    noise = [0.03, -0.02, -0.01]
    for seed in range(3):
        rows += cell_rows("single_task", seed, 1.0, "src", 0.80 + noise[seed])
        rows += cell_rows("joint", seed, 1.0, "src", 0.81 + noise[seed] + [0.02, -0.03, 0.0][seed])
        rows += cell_rows("stages", seed, 1.0, "src", 0.79 + noise[seed] - [0.02, -0.03, 0.0][seed])
    text = write_report(pd.DataFrame(rows), tmp_path)
    gain = [line for line in text.splitlines() if line.startswith("| joint | src: accuracy")][0]
    loss = [line for line in text.splitlines() if line.startswith("| stages | src: accuracy")][0]
    assert gain.split("|")[-2] == loss.split("|")[-2]
    assert "no resolved difference at 3 seeds; about" in gain


def test_one_seed_gets_no_test_and_says_so(results, tmp_path):
    text = write_report(results[results["seed"] == 0], tmp_path)
    assert "**One seed: no test is possible.**" in text
    assert "one seed: no test" in text and "better |" not in text and "worse |" not in text
    assert "Holm-corrected over all 0 tested comparisons" in text


def test_still_improving():
    assert still_improving([0.1, 0.2, 0.3, 0.4, 0.5]) is True  # the last epoch is the best
    assert still_improving([0.1, 0.5, 0.4, 0.4, 0.45]) is False
    assert still_improving([1.0, 0.9, 0.8, 0.7, 0.6], higher_is_better=False) is True
    # 10 epochs: the last 20% are epochs 9 and 10.
    assert still_improving([0.1] * 7 + [0.5, 0.4, 0.45]) is False
    assert still_improving([0.1] * 7 + [0.5, 0.4, 0.55]) is True
    assert still_improving([0.3]) is None


def test_convergence_is_flagged_from_each_cells_metrics_jsonl(results, tmp_path):
    def history(cell, values):
        folder = tmp_path / cell
        folder.mkdir(parents=True, exist_ok=True)
        task = "src" if cell.split("/")[-3] == "src" else "tgt"
        metric = "accuracy" if task == "src" else "mae"
        lines = [{"step": 10 * (e + 1), "loss": 1.0} for e in range(len(values))]
        lines += [{"step": 10 * (e + 1), f"val/{task}/{metric}": v, "epoch": e + 1} for e, v in enumerate(values)]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))

    cells = sorted(set(results["cell"]))
    for cell in cells:
        history(cell, [2.0, 1.8, 1.7, 1.75, 1.72])  # best at epoch 3: converged
    history("joint/tgt/0.1/1", [2.0, 1.8, 1.7, 1.75, 1.6])  # a lower mae at the last epoch
    conv = convergence(results, tmp_path).set_index(["cell", "task"])
    assert conv.loc[("joint/tgt/0.1/1", "tgt"), "still_improving"] == True  # noqa: E712 (a numpy bool)
    assert conv["still_improving"].sum() == 1 and (conv["epochs"] == 5).all()
    text = write_report(results, tmp_path)
    assert "1 of " in text and "judged (cell, task) pairs flagged" in text
    assert "| joint | 0.1 | tgt | 1 of 2 | 1 | 5 |" in text


def test_report_counts_single_task_params_over_its_runs(results, tmp_path):
    text = write_report(results, tmp_path)
    assert "| single_task | 2 | 200 | 200 | 100.0% | 3.0 |" in text
    assert "| sequential/fine_tune | 1 | 10 | 200 | 5.0% | 1.5 |" in text


def test_report_reads_the_same_from_csv(results, tmp_path):
    # results.csv stores booleans and fractions as text; the report must not change.
    results.to_csv(tmp_path / "results.csv", index=False)
    from_csv = pd.read_csv(tmp_path / "results.csv")
    assert write_report(from_csv, tmp_path / "csv") == write_report(results, tmp_path / "frame")


def test_report_without_baseline_says_so(results, tmp_path):
    text = write_report(results[results["method"] != "single_task"], tmp_path)
    assert "Δm% cannot be computed" in text
    assert "nothing is compared against single-task" in text
    assert "Not checked: the cells' metrics.jsonl" in text


def test_bad_input(results, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_report(results.iloc[:0], tmp_path)
    with pytest.raises(ValueError, match="empty"):
        comparison_table(pd.DataFrame(columns=REQUIRED_COLUMNS))
    with pytest.raises(ValueError, match=r"\['direction', 'cell'\]"):
        write_report(results.drop(columns=["cell", "direction"]), tmp_path)
    with pytest.raises(ValueError, match="no test-split rows"):
        write_report(results[results["split"] != "test"], tmp_path)


@pytest.mark.slow
def test_a_seed_fixes_the_labelled_subset_and_the_initialisation_in_every_regime(tmp_path):
    """What pairing by seed rests on, checked on the quickstart grid: for one seed, every
    regime's target stage trains on the same labelled subset of digits, evaluates on the same
    test set and starts from the same trunk initialisation (a sequential target stage then
    loads its source trunk, which the same seed initialised); another seed draws another subset."""
    import torch

    from conftest import QUICKSTART
    from mtl.builders import build_components
    from mtl.compare import plan, roles, stage_config
    from mtl.config import load_config
    from mtl.trainer import seed_everything

    cfg = load_config(QUICKSTART, ["compare.fractions=[0.05]", "compare.seeds=[0,1]", "compare.regimes.sequential.recipes=[fine_tune]"])
    targets, _ = roles(cfg)
    built = {}
    for cell in plan(cfg):
        if cell.variant == "mnist":
            continue
        assert {stage_config(cfg, cell, i, tmp_path, {}, targets).seed for i in range(len(cell.stages))} == {cell.seed}
        stage = stage_config(cfg, cell, len(cell.stages) - 1, tmp_path, {}, targets)
        seed_everything(stage.seed, stage.deterministic)
        parts = build_components(stage)
        splits = parts.splits["digits"]
        built[(cell.label, cell.seed)] = (splits.train.tensors[0], splits.test.tensors[0], parts.model.trunk.state_dict())
    assert {label for label, _ in built} == {"single_task", "sequential/fine_tune", "joint"}
    for (label, seed), (train, test, trunk) in built.items():
        ref_train, ref_test, ref_trunk = built[("single_task", seed)]
        assert torch.equal(train, ref_train) and torch.equal(test, ref_test), label
        assert all(torch.equal(trunk[k], ref_trunk[k]) for k in trunk), label
    assert not torch.equal(built[("single_task", 0)][0], built[("single_task", 1)][0])


def budget_results():
    """Four seeds of a target "tgt" (mae, lower is better): fine_tune improves on single-task by
    d = 0.5, 0.5, 0.6, 0.55; linear_probe by d = 0.1, −0.1, 0.05, −0.05 (nothing)."""
    rows = []
    base = [2.0, 2.2, 2.1, 2.3]
    for seed in range(4):
        rows += cell_rows("single_task", seed, 1.0, "tgt", base[seed])
        rows += cell_rows("sequential/fine_tune", seed, 1.0, "tgt", base[seed] - [0.5, 0.5, 0.6, 0.55][seed])
        rows += cell_rows("sequential/linear_probe", seed, 1.0, "tgt", base[seed] - [0.1, -0.1, 0.05, -0.05][seed])
    return pd.DataFrame(rows)


def test_budget_stops_by_hand():
    """Budget 2 to 4 seeds, levels α_2 = 0.0056, α_3 = 0.0181, α_4 = 0.0264; four comparisons
    (two methods, each on tgt's mae and on Δm%). At 2 seeds fine_tune's differences are equal
    (0.5, 0.5): no test there (a fixed-n report would say p = 0). At 3 seeds, d = 0.5, 0.5, 0.6:
    t = 0.5333 / (0.05774 / √3) = 16.0, p = 0.0039; its per-seed Δm% 25, 22.73, 28.57 gives
    t = 14.95, p = 0.0044. Holm over the four open ones: 4 × 0.0039 = 0.0155 and 3 × 0.0044 =
    0.0133 are both < 0.0181, so both resolve at 3 seeds; linear_probe never does."""
    budget = stats.SeedBudget(2, 4)
    levels = budget.levels()
    assert levels.tolist() == pytest.approx([0.0056, 0.0181, 0.0264], abs=1e-4)
    stops = budget_stops(budget_results(), budget)
    assert set(stops) == {(1.0, m, on) for m in ("sequential/fine_tune", "sequential/linear_probe") for on in ("tgt: mae", "Δm%")}
    for on in ("tgt: mae", "Δm%"):
        assert stops[(1.0, "sequential/fine_tune", on)] == Stop(verdict=1, resolved=True, n=3, level=pytest.approx(levels[1]))
        assert stops[(1.0, "sequential/linear_probe", on)] == Stop(verdict=0, resolved=False, n=4, level=pytest.approx(levels[2]))
    # After 2 seeds nothing is resolved: compare adds seed 2 for both methods.
    two = budget_stops(budget_results().query("seed < 2"), budget)
    assert not any(s.resolved for s in two.values()) and {s.n for s in two.values()} == {2}


def test_budget_report_gives_each_comparison_its_seeds_and_why_it_stopped(tmp_path):
    text = write_report(budget_results(), tmp_path, budget=stats.SeedBudget(2, 4))
    assert "a budget of 2 to 4, added one at a time" in text
    assert "(seeds: level; 2: 0.0056, 3: 0.0181, 4: 0.0264)" in text
    line = next(l for l in text.splitlines() if l.startswith("| sequential/fine_tune | tgt: mae"))
    assert line.endswith("| resolved at 3 seeds (level 0.0181) | better |")
    line = next(l for l in text.splitlines() if l.startswith("| sequential/linear_probe | Δm%"))
    assert "| max reached (4 seeds) | no resolved difference at 4 seeds;" in line
    assert "| sequential/fine_tune | 1 | 4 |" in text  # the seeds each method ran
    # A grid stopped before its budget was spent says so.
    text = write_report(budget_results().query("seed < 3"), tmp_path, budget=stats.SeedBudget(2, 4))
    assert "not resolved; budget unfinished (3 of 4 seeds)" in text


def test_tuning_section_lists_selected_values_and_runs(results, tmp_path):
    """What `mtl compare` writes to tune.json, read back into the report."""
    units = [
        {"method": "single_task", "variant": "tgt", "fraction": 1.0, "selected": {"trainer.optimizer.lr": 0.01},
         "validation": -1.1, "runs": 4, "points": [{}, {}]},
        {"method": "joint", "variant": "", "fraction": 1.0, "selected": {"trainer.optimizer.lr": 0.001, "weighting.name": "rlw"},
         "validation": None, "runs": 8, "points": [{}] * 4},
    ]
    info = {"seeds": [10000, 10001], "grid": {"trainer.optimizer.lr": [0.001, 0.01]}, "extra": {"joint": {"weighting.name": ["equal", "rlw"]}},
            "selected_on": "validation: primary metric", "units": units}
    (tmp_path / "tune.json").write_text(json.dumps(info))
    text = write_report(results, tmp_path)
    assert "## Tuning" in text and "same grid (trainer.optimizer.lr: [0.001, 0.01])" in text
    assert "(joint: weighting.name: ['equal', 'rlw'])" in text and "tuning seeds 10000, 10001" in text
    assert "| single_task | tgt | 1 | trainer.optimizer.lr=0.01 | -1.1000 | 2 | 4 |" in text
    assert "| joint |  | 1 | trainer.optimizer.lr=0.001, weighting.name=rlw | n/a | 4 | 8 |" in text
    # Runs per method: the tuning runs, and the evaluation cells of results (fine_tune: 2 seeds × 2 fractions).
    assert "| joint | 8 |" in text and "| sequential/fine_tune | 0 | 4 |" in text


# ---- forgetting and accuracy against trainable parameters ----


def chain_rows(method, seed, fraction, task, final, after, first, last, stages, params, metric="accuracy"):
    """Test rows of one task of a multi-stage cell, with the forgetting columns of `mtl compare`."""
    sign = 1.0 if DIRECTIONS[metric] == "max" else -1.0
    earlier = last < stages - 1
    return [{
        "method": method, "regime": method.partition("/")[0], "recipe": "fine_tune", "seed": seed, "fraction": fraction,
        "task": task, "split": "test", "metric": metric, "value": final, "direction": DIRECTIONS[metric], "primary": True,
        "trainable_params": params, "total_params": 1000, "wall_time_s": 1.0, "cell": f"{method}/{fraction}/{seed}",
        "stages": stages, "trained_first": first, "trained_last": last, "after_training": after,
        "backward_transfer": sign * (final - after) if earlier else math.nan,
        "retention": final / after if earlier else math.nan,
    }]


@pytest.fixture
def chain_results():
    """Tasks a, b, c: single-task b_i, a 3-stage chain a -> b -> c (the GEM matrix of
    tests/test_forgetting.py at seed 0, shifted by 0.02 at seed 1), and joint."""
    R = [[0.9, 0.1, 0.2], [0.8, 0.7, 0.3], [0.6, 0.65, 0.5]]
    base = {"a": 0.85, "b": 0.6, "c": 0.55}
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        for task, b in base.items():
            rows += chain_rows("single_task", seed, 1.0, task, b + shift, b + shift, 0, 0, 1, 100)
            rows += chain_rows("joint", seed, 1.0, task, 0.7 + shift, 0.7 + shift, 0, 0, 1, 300)
        for i, task in enumerate(base):
            rows += chain_rows("chain", seed, 1.0, task, R[2][i] + shift, R[i][i] + 2 * shift, i, i, 3, 100 if i == 2 else 77)
    df = pd.DataFrame(rows)
    df["primary"] = True
    PRIMARY.update(a="accuracy", b="accuracy", c="accuracy")
    yield df
    for t in "abc":
        PRIMARY.pop(t)


def test_forgetting_gives_acc_bwt_fwt_per_seed_and_the_report_shows_them(chain_results, tmp_path):
    from mtl.report import forgetting_stats

    (chain,) = forgetting_stats(chain_results)
    # Seed 0 is the hand-worked matrix: ACC 1.75/3, BWT -0.175, FWT 0.025. Seed 1: final +0.02, after
    # training +0.04, baselines +0.02: ACC +0.02, BWT -0.02, FWT +0.02.
    assert chain.acc == pytest.approx([1.75 / 3, 1.75 / 3 + 0.02])
    assert chain.bwt.n == 2 and chain.bwt.mean == pytest.approx((-0.175 - 0.195) / 2)
    assert chain.fwt.mean == pytest.approx((0.025 + 0.045) / 2)
    assert chain.vs_joint.mean == pytest.approx(1.75 / 3 - 0.7)  # ACC − joint's ACC (0.7), the same at both seeds
    write_report(chain_results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    line = next(l for l in report.splitlines() if l.startswith("| chain | 1 | 2 |"))
    assert f"{np.mean(chain.acc):.4f} ± {np.std(chain.acc, ddof=1):.4f}" in line
    assert f"{chain.bwt.mean:+.4f} [{chain.bwt.low:+.4f}, {chain.bwt.high:+.4f}]" in line
    assert f"{chain.fwt.mean:+.4f} [{chain.fwt.low:+.4f}, {chain.fwt.high:+.4f}]" in line
    # Per earlier task: a after training 0.9 / 0.94, final 0.6 / 0.62.
    assert "| chain | 1 | a | accuracy ↑ | 2 | 0.9200 | 0.6100 | -0.3100 [" in report
    # Single-stage methods have no forgetting row.
    assert "| joint | 1 |" not in report.split("## Forgetting")[1].split("## Parameters")[0]


def test_forgetting_averages_only_tasks_that_share_a_metric(chain_results):
    from mtl.report import forgetting_stats

    df = chain_results.copy()
    c = df["task"] == "c"
    df.loc[c, "metric"], df.loc[c, "direction"] = "mae", "min"
    PRIMARY["c"] = "mae"
    (chain,) = forgetting_stats(df)
    assert len(chain.acc) == 0 and chain.bwt is None and chain.fwt is None


def test_a_table_without_forgetting_columns_has_no_forgetting_section(results, tmp_path):
    from mtl.report import forgetting_stats

    assert forgetting_stats(results) == []
    assert "## Forgetting" not in write_report(results, tmp_path)


def test_accuracy_against_trainable_parameters_table_and_plot(results, tmp_path):
    report = write_report(results, tmp_path)
    for suffix, magic in (("png", PNG_MAGIC), ("pdf", b"%PDF")):
        assert (tmp_path / f"accuracy_vs_parameters.{suffix}").read_bytes()[: len(magic)] == magic
    section = report.split("## Accuracy against trainable parameters")[1]
    # tgt is the target (single-task at two fractions): one row per method and fraction; src is not plotted.
    assert "| src |" not in section
    seq = results[(results.method == "sequential/fine_tune") & (results.split == "test") & (results.metric == "mae") & (results.fraction == 0.1)]
    mean, (_, low, high) = seq.value.mean(), stats.t_interval(seq.value.to_numpy())
    assert f"| tgt | 0.1 | sequential/fine_tune | 10 | 2 | {mean:.4f} [{low:.4f}, {high:.4f}] |" in section
    assert "| tgt | 1 | joint | 150 | 2 |" in section
