"""Faults during a run: corrupt checkpoints, non-finite losses and gradients, W&B down,
an output directory that cannot hold the run. Each is reported with the fix, and nothing
already written is lost."""

import json
import math
import resource
import signal
import subprocess
import textwrap

import pytest
import torch

from mtl import checkpoint
from mtl.cli import main

from conftest import QUICKSTART, quick
from processes import command, env


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


# -- corrupt checkpoints ---------------------------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the size is unchanged: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte], ids=["truncated", "bit-flipped"])
def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(damage, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    args = quick(run_dir, 3, 4, "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3")
    assert main(["train", QUICKSTART, *args]) == 0
    finished = _results(run_dir)
    newest, previous, _ = checkpoint.step_checkpoints(run_dir / "checkpoints")
    assert newest.name == "step-000000012.pt" and previous.name == "step-000000010.pt"
    damage(newest)
    with pytest.warns(UserWarning, match=r"step-000000012\.pt.*(cannot be read|corrupt).*Resuming from the previous checkpoint, step-000000010\.pt"):
        assert main(["train", QUICKSTART, *args, "resume=true"]) == 0
    # Steps 11 and 12 were trained again from step 10's exact state: the same final model.
    assert _results(run_dir)["splits"] == finished["splits"]
    assert newest.exists()  # the intact rewrite of step 12 replaced the damaged file
    checkpoint.load(newest)


def test_no_intact_checkpoint_left_is_an_error_naming_the_fix(tmp_path, capsys, one_thread):
    run_dir = tmp_path / "run"
    args = quick(run_dir, 1, 2)
    assert main(["train", QUICKSTART, *args]) == 0
    for path in checkpoint.step_checkpoints(run_dir / "checkpoints"):
        _truncate(path)
    assert main(["train", QUICKSTART, *args, "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "No intact checkpoint is left" in err and "start a new output_dir" in err


# -- non-finite losses and gradients ---------------------------------------------------

FAULTY_TASK = """
import sys

import torch
from tasks.digits import Digits


def in_a_training_step():
    # The task contract check before training calls loss with gradients too.
    frame = sys._getframe()
    while frame is not None and frame.f_code.co_name != "_train_step":
        frame = frame.f_back
    return frame is not None


class Faulty(Digits):
    '''sklearn digits whose training loss goes wrong at training step {step}.'''

    calls = 0

    def loss(self, output, target):
        loss = super().loss(output, target)
        if not torch.is_grad_enabled() or not in_a_training_step():  # evaluation, the contract check
            return loss
        type(self).calls += 1
        if type(self).calls == {step} + 1:
            {fault}
        return loss
"""
NAN_LOSS = "return loss * float('nan')"
# A finite loss whose gradient is NaN: d/dx sqrt(x) at 0 is inf, times 0.
NAN_GRADIENT = "return loss + 0 * torch.sqrt(output - output.detach()).sum(dim=1)"


@pytest.fixture
def faulty(tmp_path, monkeypatch, request):
    def make(fault, step=2):
        name = f"faulty_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
        (tmp_path / f"{name}.py").write_text(FAULTY_TASK.format(step=step, fault=fault))
        monkeypatch.syspath_prepend(str(tmp_path))
        return [f"tasks.digits.name={name}:Faulty"]

    return make


@pytest.mark.parametrize("weighting", ["equal", "pcgrad"])
def test_a_nan_loss_stops_with_task_step_and_value(weighting, tmp_path, capsys, faulty, one_thread):
    run_dir = tmp_path / "run"
    code = main(["train", QUICKSTART, *quick(run_dir, 2, 3, f"weighting.name={weighting}", *faulty(NAN_LOSS))])
    assert code == 1
    err = capsys.readouterr().err
    assert "step 2 (epoch 1)" in err and "task 'digits' loss nan" in err
    assert "The update was not applied" in err and "trainer.on_nonfinite=skip" in err
    assert not (run_dir / "results.json").exists()


def test_a_nan_gradient_with_a_finite_loss_stops(tmp_path, capsys, faulty, one_thread):
    assert main(["train", QUICKSTART, *quick(tmp_path / "run", 1, 3, *faulty(NAN_GRADIENT))]) == 1
    err = capsys.readouterr().err
    assert "step 2 (epoch 1): non-finite gradient (model gradient norm nan) with finite losses" in err


@pytest.mark.parametrize("fault", [NAN_LOSS, NAN_GRADIENT], ids=["loss", "gradient"])
def test_skip_mode_counts_the_step_and_never_applies_it(fault, tmp_path, faulty, one_thread):
    run_dir = tmp_path / "run"
    args = quick(run_dir, 2, 3, "trainer.on_nonfinite=skip", "logging.log_every=1", *faulty(fault))
    assert main(["train", QUICKSTART, *args]) == 0
    results = _results(run_dir)
    assert results["skipped_steps"] == 1 and results["steps"] == 6
    state = checkpoint.latest(run_dir / "checkpoints")[1]
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(torch.isfinite(v).all() for v in moments)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("skipped_steps") for line in lines if line["step"] == 3 and "lr" in line] == [1]
    assert all(math.isfinite(m["loss"]) for m in results["splits"]["test"].values())


# -- W&B unavailable ---------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_unreachable_warns_and_the_run_keeps_its_local_logs(tmp_path):
    run_dir = tmp_path / "run"
    # A real online init against a closed port with a made-up key: W&B's own failure path.
    unreachable = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40, "WANDB_INIT_TIMEOUT": "5"}
    args = [f"output_dir={run_dir}", "trainer.epochs=1", "trainer.steps_per_epoch=3", "logging.progress_bar=false", "logging.wandb.mode=online"]
    done = subprocess.run(command("train", args), env=env(**unreachable), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "W&B logging is off for this run" in done.stderr and "local logs" in done.stderr
    assert _results(run_dir)["steps"] == 3
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if "epoch" in line] == [1] and "test/digits/accuracy" in lines[-1]


# -- the output directory ----------------------------------------------------------------


def test_an_output_dir_under_a_file_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    assert main(["train", QUICKSTART, *quick(tmp_path / "file" / "run")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_too_little_space_for_the_checkpoints_fails_before_training(tmp_path, capsys):
    assert main(["train", QUICKSTART, *quick(tmp_path / "run", 1, 3, "trainer.keep_checkpoints=1000000000000")]) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err and "lower trainer.keep_checkpoints" in err
    assert not (tmp_path / "run").exists()


def _file_size_limit(limit):
    def apply():
        # Writes past `limit` bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_write_failing_mid_run_names_the_fix_and_leaves_no_half_file(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"output_dir={run_dir}", "trainer.epochs=2", "trainer.steps_per_epoch=3", "logging.progress_bar=false", "logging.wandb.mode=disabled"]
    done = subprocess.run(
        command("train", args), env=env(), capture_output=True, text=True, timeout=300, cwd=tmp_path, preexec_fn=_file_size_limit(60_000)
    )
    assert done.returncode == 2, done.stderr
    assert "writing a checkpoint" in done.stderr and "failed at step 3" in done.stderr
    assert "Free space" in done.stderr and "resume=true" in done.stderr and "Traceback" not in done.stderr
    assert not list(run_dir.rglob("*.tmp"))
    assert not (run_dir / "results.json").exists()
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
