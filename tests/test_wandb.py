"""W&B offline logging, read back with wandb's own reader of the run's .wandb log."""

import pytest

import json
import subprocess
import sys
from pathlib import Path

from mtl.cli import main

from conftest import QUICKSTART

COMPARISON = [
    "compare.seeds=[0]",
    "compare.fractions=[0.5]",
    "~compare.regimes.joint",  # a mapping override merges; ~ removes a key
    "compare.regimes.sequential.recipes=[linear_probe]",
    "trainer.epochs=1",
    "trainer.steps_per_epoch=2",
    "logging.progress_bar=false",
    "logging.wandb.mode=offline",
]


WANDB = str(Path(sys.executable).with_name("wandb"))


def read_offline_run(offline: Path) -> list[dict]:
    done = subprocess.run([WANDB, "leet", "inspect", "--json", str(offline)], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def read_records(run_dir: Path) -> list[dict]:
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    return read_offline_run(offline)


def run_info(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r["type"] == "run")


def exit_code(records: list[dict]) -> int:
    return next(r["exit"] for r in records if r["type"] == "exit").get("exit_code", 0)


@pytest.mark.slow
def test_offline_run_holds_metrics_config_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"output_dir={run_dir}",
        "trainer.epochs=2",
        "trainer.steps_per_epoch=20",
        "logging.log_every=10",
        "logging.progress_bar=false",
        "logging.wandb.mode=offline",
        "logging.wandb.group=cmp1",
        "logging.wandb.tags=[quick,test]",
    ]
    assert main(["train", QUICKSTART, *args]) == 0
    records = read_records(run_dir)

    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["job_type"] == "train" and run["project"] == "mtl" and run["run_group"] == "cmp1"
    assert run["tags"] == ["quick", "test"]
    config = run["config"]["update"]
    assert config["trainer"]["epochs"] == 2 and config["trunk"]["name"] == "seed_net"

    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    train = [h for h in history if "train/mnist/batch_loss" in h]
    assert [h["global_step"] for h in train] == [10, 20, 30, 40]
    val = [h for h in history if "epoch" in h]
    assert [h["global_step"] for h in val] == [20, 40]
    assert all(0 <= h["val/digits/accuracy"] <= 1 for h in val)

    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    results = json.loads((run_dir / "results.json").read_text())
    assert summary["test/mnist/accuracy"] == results["splits"]["test"]["mnist"]["accuracy"]
    assert summary["best_epoch"] == results["best_epoch"]
    assert (run_dir / "wandb_run_id").read_text() == run["run_id"]


@pytest.mark.slow
def test_a_comparison_is_one_group_that_one_wandb_sync_uploads(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *COMPARISON]) == 0
    command = f"wandb sync {out / 'wandb'}"
    assert command in capsys.readouterr().out
    runs = {d: read_offline_run(d) for d in sorted((out / "wandb").glob("offline-run-*"))}
    infos = [run_info(records) for records in runs.values()]
    # mnist alone, digits alone at 0.5, the source stage, the probe, the report
    assert sorted(r["job_type"] for r in infos) == ["report", "sequential", "sequential", "single_task", "single_task"]
    assert {r["run_group"] for r in infos} == {"quickstart"}
    assert all(exit_code(records) == 0 for records in runs.values())
    dry = subprocess.run([WANDB, "sync", "--dry-run", *command.split()[2:]], capture_output=True, text=True, check=True)
    assert "Would sync 5 run(s)" in dry.stdout + dry.stderr, dry.stdout + dry.stderr

    configs = {r["display_name"]: r["config"]["update"] for r in infos}
    # Every run holds the comparison as the user set it, and the stage's place in the grid apart.
    assert all(c["compare"]["fractions"] == [0.5] and c["compare"]["targets"] == ["digits"] for c in configs.values())
    assert configs["sequential/linear_probe/target/f0.5/s0"]["cell"] == {
        "regime": "sequential", "method": "sequential/linear_probe", "recipe": "linear_probe", "stage": "target",
        "tasks": ["digits"], "seed": 0, "fraction": 0.5, "targets": ["digits"],
    }
    source = configs["sequential/source/s0"]["cell"]
    assert source["stage"] == "source" and source["tasks"] == ["mnist"] and source["fraction"] is None
    assert configs["single_task/mnist/f1/s0"]["cell"]["targets"] == []  # not a target: all of its labels
    report = configs["quickstart/report"]
    assert "cell" not in report and report["logging"]["wandb"]["group"] == "quickstart"
    report_records = next(records for records in runs.values() if run_info(records)["job_type"] == "report")
    logged = {k: v for r in report_records if r["type"] == "history" for k, v in r["history"]["item"].items()}
    # The reader flattens logged media into "<key>.<field>".
    assert logged["comparison._type"] == "table-file"
    assert logged["plots/generalization._type"] == logged["plots/parameters._type"] == "image-file"

    # A rerun of the finished grid adds no run; one that finishes a cell updates the same runs.
    assert main(["compare", QUICKSTART, f"output_dir={out}", *COMPARISON]) == 0
    assert sorted((out / "wandb").glob("offline-run-*")) == list(runs)
    (out / "cells" / "sequential" / "linear_probe" / "f0.5" / "seed0" / "results.json").unlink()
    assert main(["compare", QUICKSTART, f"output_dir={out}", *COMPARISON]) == 0
    again = [run_info(read_offline_run(d)) for d in sorted((out / "wandb").glob("offline-run-*")) if d not in runs]
    assert sorted(r["display_name"] for r in again) == ["quickstart/report", "sequential/linear_probe/target/f0.5/s0"]
    assert {r["run_id"] for r in again} <= {r["run_id"] for r in infos}
