"""End to end: the CLI on the quickstart's real data, at reduced length."""

import json

import pytest
import torch
import yaml

from mtl import checkpoint
from mtl.cli import main
from mtl.config import load_config

from conftest import QUICKSTART, quick


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_train_writes_config_metrics_results_and_prints_the_table(run_dir, capsys):
    assert main(["train", QUICKSTART, *quick(run_dir, epochs=2, steps=3)]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "digits" in out and "accuracy*" in out

    results = _results(run_dir)
    assert set(results["tasks"]) == {"mnist", "digits"}
    assert results["tasks"]["mnist"]["directions"] == {"accuracy": "max", "macro_f1": "max", "loss": "min"}
    for split in ("train", "val", "test"):
        for task in ("mnist", "digits"):
            assert 0 <= results["splits"][split][task]["accuracy"] <= 1
    assert results["steps"] == 6 and results["epochs"] == 2 and 1 <= results["best_epoch"] <= 2
    assert results["selected_on"] == "validation: primary_mean"
    assert results["parameters"]["trainable"] == results["parameters"]["total"] > 0

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["epochs"] == 2 and saved["trunk"] == {"name": "seed_net"}
    assert load_config(run_dir / "config.yaml") == load_config(QUICKSTART, quick(run_dir, epochs=2, steps=3))

    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_lines = [l for l in lines if "epoch" in l]
    assert all("val/mnist/accuracy" in l for l in val_lines)
    assert [l["epoch"] for l in val_lines] == [1, 2] and [l["step"] for l in val_lines] == [3, 6]
    assert any("test/digits/accuracy" in l for l in lines)

    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "lr_schedule", "weighting", "scheduler", "sources", "rng", "step"} <= set(last)
    trunk = checkpoint.load(run_dir / "trunk.pt")
    assert set(trunk["trunk"]) == {k.removeprefix("trunk.") for k in last["model"] if k.startswith("trunk.")}


def test_joint_training_learns_both_tasks(run_dir):
    assert main(["train", QUICKSTART, *quick(run_dir, epochs=2, steps=54)]) == 0
    test = _results(run_dir)["splits"]["test"]
    # Chance is 0.10; two short epochs of the small CNN already get far beyond it.
    assert test["mnist"]["accuracy"] > 0.85
    assert test["digits"]["accuracy"] > 0.85


def test_same_seed_same_results_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["train", QUICKSTART, *quick(tmp_path / name, 1, 4, f"seed={seed}")]) == 0
        runs[name] = _results(tmp_path / name)["splits"]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_resume_continues_exactly(tmp_path):
    args = ["trainer.lr_schedule.name=constant", "trainer.lr_schedule.warmup_steps=0"]
    assert main(["train", QUICKSTART, *quick(tmp_path / "full", 3, 4, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 2, 4, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 3, 4, *args, "resume=true")]) == 0
    full, part = _results(tmp_path / "full"), _results(tmp_path / "part")
    assert part["steps"] == full["steps"] == 12
    assert part["splits"] == full["splits"]
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_never_overwritten(run_dir, capsys):
    assert main(["train", QUICKSTART, *quick(run_dir)]) == 0
    before = (run_dir / "results.json").read_bytes()
    assert main(["train", QUICKSTART, *quick(run_dir, 2)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume=true" in err and "Traceback" not in err
    assert (run_dir / "results.json").read_bytes() == before


def test_model_selection_never_uses_test(run_dir, monkeypatch):
    from mtl import results as results_module

    seen = []
    original = results_module.selection_score

    def spy(metrics, select_on, tasks):
        seen.append(metrics)
        return original(metrics, select_on, tasks)

    monkeypatch.setattr("mtl.trainer.selection_score", spy)
    assert main(["train", QUICKSTART, *quick(run_dir, 2, 3)]) == 0
    val_by_epoch = [l for l in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "epoch" in l]
    assert len(seen) == 2
    for metrics, line in zip(seen, val_by_epoch):
        assert metrics["mnist"]["accuracy"] == pytest.approx(line["val/mnist/accuracy"])
