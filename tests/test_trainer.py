"""End to end: the CLI on the quickstart's real data, at reduced length."""

import json
import threading

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
    # The trunk's effective arguments, its defaults included, are what the run used.
    assert saved["trainer"]["epochs"] == 2 and saved["trunk"] == {"name": "seed_net", "in_channels": 1, "features": 50, "dropout": 0.5}
    assert load_config(run_dir / "config.yaml") == load_config(QUICKSTART, quick(run_dir, epochs=2, steps=3))

    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_lines = [l for l in lines if "epoch" in l]
    assert all("val/mnist/accuracy" in l for l in val_lines)
    assert [l["epoch"] for l in val_lines] == [1, 2] and [l["step"] for l in val_lines] == [3, 6]
    assert any("test/digits/accuracy" in l for l in lines)

    last = checkpoint.latest(run_dir / "checkpoints")[1]
    assert {"model", "optimizer", "lr_schedule", "weighting", "update", "scheduler", "sources", "rng", "step"} <= set(last)
    assert {"running", "count"} <= set(last["update"])
    trunk = checkpoint.load(run_dir / "trunk.pt")
    assert set(trunk["trunk"]) == {k.removeprefix("trunk.") for k in last["model"] if k.startswith("trunk.")}


@pytest.mark.slow
def test_joint_training_learns_both_tasks(run_dir):
    assert main(["train", QUICKSTART, *quick(run_dir, epochs=2, steps=54)]) == 0
    test = _results(run_dir)["splits"]["test"]
    # Chance is 0.10; two short epochs of the small CNN already get far beyond it.
    assert test["mnist"]["accuracy"] > 0.85
    assert test["digits"]["accuracy"] > 0.85


@pytest.mark.slow
def test_same_seed_same_results_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["train", QUICKSTART, *quick(tmp_path / name, 1, 4, f"seed={seed}")]) == 0
        runs[name] = _results(tmp_path / name)["splits"]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    args = ["trainer.lr_schedule.name=constant", "trainer.lr_schedule.warmup_steps=0"]
    assert main(["train", QUICKSTART, *quick(tmp_path / "full", 3, 4, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 2, 4, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 3, 4, *args, "resume=true")]) == 0
    full, part = _results(tmp_path / "full"), _results(tmp_path / "part")
    assert part["steps"] == full["steps"] == 12
    assert part["splits"] == full["splits"]
    a = checkpoint.latest(tmp_path / "full" / "checkpoints")[1]["model"]
    b = checkpoint.latest(tmp_path / "part" / "checkpoints")[1]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_never_overwritten(run_dir, capsys):
    assert main(["train", QUICKSTART, *quick(run_dir)]) == 0
    before = (run_dir / "results.json").read_bytes()
    assert main(["train", QUICKSTART, *quick(run_dir, 2)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume=true" in err and "Traceback" not in err
    assert (run_dir / "results.json").read_bytes() == before


def test_resume_refuses_a_changed_config_but_allows_more_epochs(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *quick(run, 1, 4)]) == 0
    assert main(["train", QUICKSTART, *quick(run, 1, 4, "resume=true", "trainer.optimizer.lr=0.5")]) == 2
    err = capsys.readouterr().err
    assert "trainer.optimizer.lr differ" in err and "new output_dir" in err
    # How the gradient engine computes (not what): a resume may change it, e.g. after running out of memory.
    memory = ["engine.jacobian_chunk=1", "engine.staged_gramian=false"]
    assert main(["train", QUICKSTART, *quick(run, 1, 4, "resume=true", *memory)]) == 0
    # More epochs on the cosine schedule: the schedule stretches; the LR is not stuck at its old end (0).
    assert main(["train", QUICKSTART, *quick(run, 2, 4, "resume=true", "logging.log_every=1")]) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [l["lr"] for l in lines if "lr" in l and l["step"] > 4]
    assert lrs and all(lr > 0 for lr in lrs[:-1])


def test_resume_ignores_the_compare_node_that_train_never_reads(tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *quick(run, 1, 2)]) == 0
    assert main(["train", QUICKSTART, *quick(run, 2, 2, "resume=true", "compare.seeds=[5]", "compare.regimes={joint: {}}")]) == 0
    assert _results(run)["steps"] == 4


def test_resume_drops_log_lines_written_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *quick(run, 1, 4, "logging.log_every=1")]) == 0
    with open(run / "metrics.jsonl", "a") as f:  # as if the run had gone on past its checkpoint, then died
        f.write(json.dumps({"step": 5, "train/batch_loss": 1.0}) + "\n")
    assert main(["train", QUICKSTART, *quick(run, 2, 4, "logging.log_every=1", "resume=true")]) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if "train/batch_loss" in l]
    assert steps == list(range(1, 9))


def test_selection_evaluates_the_validation_sets_only(run_dir, monkeypatch):
    from mtl import trainer as trainer_module

    seen = []
    original = trainer_module.evaluate

    def spy(model, tasks, datasets, batch_size, device, **kwargs):
        seen.append(datasets)
        return original(model, tasks, datasets, batch_size, device, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    t = trainer_module.Trainer(load_config(QUICKSTART, quick(run_dir, 2, 2)))
    t.fit()
    per_epoch = seen[:2]  # the rest is the final evaluation of the selected model on every split
    for datasets in per_epoch:
        assert all(datasets[n] is t.splits[n].val for n in t.tasks)


def test_a_task_without_labelled_validation_samples_does_not_freeze_selection():
    import math

    from mtl.results import selection_score
    from mtl.task import TASKS

    tasks = {"mnist": TASKS.get("mnist")(), "digits": TASKS.get("digits")()}
    metrics = {"mnist": {"accuracy": math.nan}, "digits": {"accuracy": 0.7}}
    assert selection_score(metrics, "primary_mean", tasks) == 0.7


def test_grad_clip_bounds_the_update_of_one_sgd_step(tmp_path, one_thread):
    # SGD with lr 1: the step is the clipped gradient, so its norm is grad_clip (the raw one is far larger).
    from mtl.builders import build_components

    run_dir = tmp_path / "run"
    args = quick(
        run_dir, 1, 1, "trainer.optimizer={name: sgd, lr: 1.0}", "trainer.lr_schedule.name=constant",
        "trainer.lr_schedule.warmup_steps=0", "trainer.grad_clip=0.001",
    )
    assert main(["train", QUICKSTART, *args]) == 0
    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    before = build_components(cfg).model.state_dict()
    after = checkpoint.latest(run_dir / "checkpoints")[1]["model"]
    moved = torch.cat([(after[k] - before[k]).flatten() for k in before if before[k].is_floating_point()]).norm()
    assert moved.item() == pytest.approx(0.001, rel=1e-3)


def test_a_training_step_reads_no_config_node(run_dir):
    # An OmegaConf lookup costs tens of microseconds; a step reads the settings as plain values.
    from mtl.trainer import Trainer

    trainer = Trainer(load_config(QUICKSTART, quick(run_dir)))
    trainer.cfg = None
    for _ in range(3):
        trainer._train_step()
    assert trainer.step == 3


def test_background_checkpoint_writes_hold_the_state_when_submitted(tmp_path):
    from mtl.rundir import CheckpointWriter

    writer, release = CheckpointWriter(), threading.Event()

    def write(state, path):
        release.wait(5)  # the write starts after training changed the live tensors
        checkpoint.save(state, path)

    live = torch.nn.Linear(2, 1)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    writer.submit(write, {"model": live.state_dict(), "step": 1}, tmp_path / "a.pt")
    with torch.no_grad():
        live.weight.add_(1.0)
    release.set()
    writer.wait()
    saved = checkpoint.load(tmp_path / "a.pt")
    assert saved["step"] == 1 and saved["model"].keys() == before.keys()
    for k in before:
        torch.testing.assert_close(saved["model"][k], before[k])
    # The state dict's version metadata, which load_state_dict reads, is kept.
    assert saved["model"]._metadata == live.state_dict()._metadata
    writer.close()


def test_a_failed_background_write_is_raised_by_the_next_wait_in_order(tmp_path):
    from mtl.rundir import CheckpointWriter

    writer, done = CheckpointWriter(), []

    def write(state, name):
        if name == "bad":
            raise OSError("disk full")
        done.append(name)

    for name in ("first", "bad", "last"):
        writer.submit(write, {}, name)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    assert done == ["first", "last"]  # in order, all ended; a failure stops no later write
    writer.wait()  # raised once
    writer.close()


def test_a_resume_may_turn_the_feature_cache_on_or_off():
    """The cache changes how a frozen trunk's features are computed, not what they are."""
    from mtl.rundir import config_changes

    old = {"trunk": {"name": "seed_net", "feature_cache": True}, "seed": 0}
    assert config_changes(old, {"trunk": {"name": "seed_net", "feature_cache": False, "feature_cache_mb": 64}, "seed": 0}) == []
    assert config_changes(old, {"trunk": {"name": "seed_net", "feature_cache": True}, "seed": 1}) == ["seed"]
