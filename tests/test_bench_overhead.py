"""The overhead benchmark (``python -m mtl.bench.overhead``) at a tiny size: both sides run,
the ratio is of the medians it prints, and the plain loop refuses a config it does not mirror."""

import math

import pytest

from mtl.bench import overhead

TINY = ["trainer.epochs=2", "trainer.steps_per_epoch=2", "logging.wandb.mode=disabled", "logging.progress_bar=false"]
# About 100 samples per split and task: the evaluations stay short.
TINY += [f"tasks.{t}.{k}={v}" for t, v in (("mnist", 0.02), ("digits", 0.06)) for k in ("val_fraction", "test_fraction", "train_fraction")]


@pytest.mark.slow  # four Trainers built, two runs of each side
def test_overhead_tiny_run(capsys, one_thread):
    summary = overhead.main(["--repeats", "1", *TINY])
    assert summary["steps"] == 4 and len(summary["mtl_runs_s"]) == len(summary["plain_runs_s"]) == 1
    assert summary["mtl_s"] > 0 and summary["plain_s"] > 0
    assert summary["ratio"] == pytest.approx(summary["mtl_s"] / summary["plain_s"])
    assert summary["cpu_ratio"] == pytest.approx(summary["mtl_cpu_s"] / summary["plain_cpu_s"])
    assert summary["paired_ratio"] == pytest.approx(summary["mtl_runs_s"][0] / summary["plain_runs_s"][0])  # one round
    assert all(math.isfinite(summary[k]) and summary[k] >= 0 for k in ("mtl_setup_s", "mtl_open_close_s", "plain_setup_s"))
    printed = capsys.readouterr().out.splitlines()
    for name, key in (("ratio", "ratio"), ("paired ratio", "paired_ratio"), ("cpu ratio", "cpu_ratio")):
        line = next(line for line in printed if line.strip().startswith(name + " "))
        assert float(line.split()[len(name.split())]) == pytest.approx(summary[key], abs=1e-3)


@pytest.mark.slow
def test_plain_loop_trains(tmp_path, one_thread):
    model, data, settings = overhead._plain_inputs(overhead.QUICKSTART, TINY, str(tmp_path / "run"))
    result = overhead.plain_loop(model, data, {**settings, "steps_per_epoch": 15, "log_every": 5})
    assert len(result["logged_losses"]) == 6 and all(math.isfinite(v) for v in result["logged_losses"])
    assert result["logged_losses"][-1] < result["logged_losses"][0]  # it learns: 10 classes start near log(10) = 2.3
    assert set(result["accuracy"]) == {"train", "val", "test"}
    assert all(0 <= acc <= 1 for split in result["accuracy"].values() for acc in split.values())


def test_a_config_the_plain_loop_does_not_mirror_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="weighting=pcgrad"):
        overhead._plain_inputs(overhead.QUICKSTART, [*TINY, "weighting.name=pcgrad"], str(tmp_path / "run"))


def test_zero_repeats_is_refused_before_any_run(capsys):
    from mtl.bench.overhead import main

    with pytest.raises(SystemExit):
        main(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
