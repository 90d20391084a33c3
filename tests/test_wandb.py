"""W&B offline logging, read back with wandb's own reader of the run's .wandb log."""

import pytest

import json
import subprocess
import sys
from pathlib import Path

from mtl.cli import main

from conftest import QUICKSTART


def read_records(run_dir: Path) -> list[dict]:
    exe = Path(sys.executable).with_name("wandb")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    done = subprocess.run([str(exe), "leet", "inspect", "--json", str(offline)], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


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
