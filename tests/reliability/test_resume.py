"""Exact resume: a run killed at any step (SIGKILL, no warning) and rerun with resume=true
ends with bitwise the same metrics, logs and weights as a run never interrupted.

Joint training of the quickstart's two tasks with a gradient-level weighting (PCGrad: its
own seeded generator) and with a sampling scheduler (temperature: random task draws), with
deterministic algorithms on, mid-epoch checkpoints every 2 steps, on CPU."""

import json
import signal

import pytest
import torch

from mtl import checkpoint

from processes import comparable_metrics, last_step, run, run_until

pytestmark = pytest.mark.slow

PCGRAD = ["weighting.name=pcgrad", "scheduler.name=all"]
SAMPLING = ["weighting.name=equal", "scheduler.name=temperature"]


def _args(run_dir, setup):
    return [
        f"output_dir={run_dir}", "deterministic=true", "trainer.epochs=3", "trainer.steps_per_epoch=6",
        "trainer.checkpoint_every=2", "logging.log_every=1", "logging.progress_bar=false", "logging.wandb.mode=disabled", *setup,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = {}
    for name, setup in (("pcgrad", PCGRAD), ("sampling", SAMPLING)):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        done = run("train", _args(run_dir, setup))
        assert done.returncode == 0, done.stderr
        runs[name] = run_dir
    return runs


def _assert_same_run(run_dir, reference_dir):
    a = json.loads((run_dir / "results.json").read_text())
    b = json.loads((reference_dir / "results.json").read_text())
    assert a["splits"] == b["splits"] and a["steps"] == b["steps"] == 18 and a["best_epoch"] == b["best_epoch"]
    # The log of an interrupted run says where it stopped; the rest is as if never stopped.
    assert [l for l in comparable_metrics(run_dir) if "stopped" not in l] == comparable_metrics(reference_dir)
    mine = checkpoint.latest(run_dir / "checkpoints")[1]
    theirs = checkpoint.latest(reference_dir / "checkpoints")[1]
    for part in ("model", "weighting", "optimizer", "scheduler", "sources", "rng"):
        assert _equal(mine[part], theirs[part]), part


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# (setup, the steps at which successive runs are killed). Step 1 is before the first
# checkpoint; 5 is between the checkpoints of steps 4 and 6; 6 is an epoch end (its
# validation line is being written); 13 is mid-epoch 3; [3, 9] kills the resumed run again.
KILLS = [("pcgrad", [1]), ("pcgrad", [5]), ("pcgrad", [6]), ("pcgrad", [13]), ("pcgrad", [3, 9]), ("sampling", [7]), ("sampling", [2, 11])]


@pytest.mark.parametrize("setup, kills", KILLS, ids=[f"{s}-{'-'.join(map(str, k))}" for s, k in KILLS])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(setup, kills, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(run_dir, PCGRAD if setup == "pcgrad" else SAMPLING)
    for i, step in enumerate(kills):
        resume = ["resume=true"] if i else []
        proc = run_until("train", args + resume, lambda: last_step(run_dir / "metrics.jsonl") >= step)
        assert proc.returncode == -signal.SIGKILL, f"the run ended before step {step}: {proc.stderr[-2000:]}"
    done = run("train", args + ["resume=true"])
    assert done.returncode == 0, done.stderr
    _assert_same_run(run_dir, reference[setup])


def test_ctrl_c_writes_a_checkpoint_and_resume_continues_exactly(reference, tmp_path):
    from test_wandb import exit_code, read_offline_run

    run_dir = tmp_path / "run"
    args = [*_args(run_dir, PCGRAD), "logging.wandb.mode=offline"]
    proc = run_until("train", args, lambda: last_step(run_dir / "metrics.jsonl") >= 3, sig=signal.SIGINT)
    assert proc.returncode == 130, proc.stderr
    assert "SIGINT at step" in proc.stderr and "resume=true" in proc.stderr
    # The checkpoint is of the step the signal interrupted, not the last periodic one.
    step = checkpoint.latest(run_dir / "checkpoints")[1]["step"]
    assert step == last_step(run_dir / "metrics.jsonl") >= 3
    stopped = [l for l in comparable_metrics(run_dir) if "stopped" in l]
    assert stopped == [{"step": step, "stopped": "interrupted", "reason": stopped[0]["reason"]}]
    assert stopped[0]["reason"].startswith(f"SIGINT at step {step}")
    (interrupted,) = (run_dir / "wandb").glob("offline-run-*")
    assert exit_code(read_offline_run(interrupted)) == 130  # W&B shows it failed, not finished
    done = run("train", args + ["resume=true"])
    assert done.returncode == 0, done.stderr
    _assert_same_run(run_dir, reference["pcgrad"])
    (resumed,) = set((run_dir / "wandb").glob("offline-run-*")) - {interrupted}
    assert exit_code(read_offline_run(resumed)) == 0


def test_killed_comparison_resumes_to_the_same_table(tmp_path):
    grid = [
        "compare.targets=[digits]", "compare.fractions=[0.25]", "compare.seeds=[0]",
        "compare.regimes={single_task: {}, sequential: {recipes: [fine_tune]}}",
        "trainer.epochs=2", "trainer.steps_per_epoch=4", "trainer.checkpoint_every=1", "deterministic=true",
        "logging.progress_bar=false", "logging.wandb.mode=disabled",
    ]
    whole = run("compare", [f"output_dir={tmp_path / 'whole'}", *grid])
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"

    def in_the_source_stage():  # the sequential cell's pretraining, mid-way
        return any(last_step(p) >= 3 for p in out.glob("sources/**/metrics.jsonl"))

    proc = run_until("compare", [f"output_dir={out}", *grid], in_the_source_stage)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    done = run("compare", [f"output_dir={out}", *grid])
    assert done.returncode == 0, done.stderr
    import pandas as pd

    a, b = pd.read_csv(tmp_path / "whole" / "results.csv"), pd.read_csv(out / "results.csv")
    timing = [c for c in a.columns if "time" in c]
    pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))
