import math
import statistics

import pandas as pd
import pytest

from mtl.report import REQUIRED_COLUMNS, comparison_table, delta_m, write_report

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
    table = comparison_table(results).set_index(["method", "fraction"])
    # At fraction 0.1 joint's "src" is compared with the single-task "src" run at fraction 1.
    joint = 50 * ((0.71 - 0.81) / 0.81 - (2.5 - 2.1) / 2.1)
    assert table.loc[("joint", 0.1), "delta_m_pct"] == pytest.approx(joint)
    assert table.loc[("joint", 1.0), "delta_m_pct"] == pytest.approx(50 * 0.04 / 0.81)
    # The target is matched by fraction: 1.7 against 2.1 at 0.1, not against 1.1.
    per_seed = [-100 * (1.6 - 2.1) / 2.1, -100 * (1.8 - 2.1) / 2.1]
    assert table.loc[("sequential/fine_tune", 0.1), "delta_m_pct"] == pytest.approx(statistics.mean(per_seed))
    assert table.loc[("sequential/fine_tune", 0.1), "delta_m_pct_std"] == pytest.approx(statistics.stdev(per_seed))
    assert table.loc[("single_task", 0.1), "test/src/accuracy/mean"] == pytest.approx(0.81)
    assert table.loc[("single_task", 0.1), "delta_m_pct"] == pytest.approx(0.0)


def test_comparison_table_columns(results):
    table = comparison_table(results)
    assert list(table.columns) == [
        "method", "fraction", "n_seeds", "test/src/accuracy/mean", "test/src/accuracy/std",
        "test/tgt/mae/mean", "test/tgt/mae/std", "delta_m_pct", "delta_m_pct_std",
    ]
    assert len(table) == 6 and set(table["n_seeds"]) == {2}
    assert table.set_index(["method", "fraction"])["test/src/accuracy/mean"].isna()[("sequential/fine_tune", 1.0)]


def test_delta_m_uses_every_metric_but_the_loss():
    rows = []
    for method, acc, f1 in (("single_task", 0.8, 0.5), ("joint", 0.8, 0.6)):
        rows += cell_rows(method, 0, 1.0, "src", acc, macro_f1=f1)
    table = comparison_table(pd.DataFrame(rows)).set_index("method")
    # Accuracy unchanged, macro-F1 +20%, over K = 2; the loss (10 × accuracy) would add a term.
    assert table.loc["joint", "delta_m_pct"] == pytest.approx(10.0)
    assert math.isnan(table.loc["joint", "delta_m_pct_std"])


def test_write_report(results, tmp_path):
    text = write_report(results, tmp_path, title="Toy comparison")
    assert (tmp_path / "report.md").read_text() == text
    assert text.startswith("# Toy comparison")
    assert "validation split only" in text
    assert "Δm% = (100 / K) Σ_k (−1)^{l_k} (M_m,k − M_b,k) / M_b,k" in text
    assert "Positive Δm% means better than single-task" in text
    # Best per column, direction-aware: highest accuracy, lowest mae.
    assert "**0.8100 ± 0.0141**" in text
    assert "**1.7000 ± 0.1414**" in text
    assert "+19.05 ± 6.73" in text
    assert "-15.70" in text
    assert "joint does not beat single-task (Δm% = -15.70" in text
    assert "worse than single-task on src (0.7100 vs 0.8100), tgt (2.5000 vs 2.1000)" in text
    assert "sequential/fine_tune beats single-task on average (Δm% = +19.05" in text
    # Generalization gap is positive when train beats test, for both directions.
    assert "+0.0500" in text and "+0.3000" in text
    pngs = ["data_efficiency_tgt.png", "generalization.png", "parameters.png"]
    assert not (tmp_path / "data_efficiency_src.png").exists()
    for name in pngs:
        assert f"]({name})" in text
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


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


def test_bad_input(results, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_report(results.iloc[:0], tmp_path)
    with pytest.raises(ValueError, match="empty"):
        comparison_table(pd.DataFrame(columns=REQUIRED_COLUMNS))
    with pytest.raises(ValueError, match=r"\['direction', 'cell'\]"):
        write_report(results.drop(columns=["cell", "direction"]), tmp_path)
    with pytest.raises(ValueError, match="no test-split rows"):
        write_report(results[results["split"] != "test"], tmp_path)
