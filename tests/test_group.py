"""`mtl group` end to end on two tiny tabular tasks: its files, the W&B run, the compare
overrides it prints, training untouched by the measurement, the trainer's numbers in its
outputs, resuming, and bad input."""

import csv
import json

import pytest
import torch

from mtl.cli import main
from mtl.compare import plan
from mtl.config import load_config, read_yaml
from mtl.affinity import Grouping
from mtl.group import GroupRun, compare_overrides

from cli_harness import run_cli
from conftest import QUICKSTART, ROOT

WINE = str(ROOT / "configs" / "tabular_wine.yaml")
# Two tasks on one MLP trunk: wine twice, on two different splits (its own batches each).
TWO = ["tasks.wine2.name=wine", "tasks.wine2.split_seed=1", "logging.wandb.mode=disabled", "logging.log_every=2", "logging.progress_bar=false"]


def test_cli_writes_affinity_groups_and_prints_the_table(tmp_path, capsys, one_thread):
    out = tmp_path / "g"
    assert main(["group", WINE, f"output_dir={out}", *TWO, "--steps", "5", "--every", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| from \\ onto | wine | wine2 |" in printed and "written:" in printed
    result = json.loads((out / "groups.json").read_text())
    assert result["measured_steps"] == 3 and result["every"] == 2 and result["steps"] == 5
    rows = list(csv.DictReader((out / "affinity.csv").open()))
    assert [int(r["step"]) for r in rows] == [0] * 4 + [2] * 4 + [4] * 4
    for a in ("wine", "wine2"):
        for b in ("wine", "wine2"):
            mine = [float(r["affinity"]) for r in rows if (r["from"], r["onto"]) == (a, b)]
            assert result["affinity"][a][b] == pytest.approx(sum(mine) / 3)
            for r in rows:  # each row is Z = 1 - L_after / L_before of its own losses
                assert float(r["affinity"]) == pytest.approx(1 - float(r["loss_after"]) / float(r["loss_before"]), abs=1e-6)
    assert [g["groups"] for g in result["groupings"]] == [[["wine", "wine2"]]] * 2
    timing = result["step_time"]
    assert timing["affinity_steps"] == 3 and timing["plain_steps"] == 2 and timing["ratio"] > 1
    assert "## Cost" in (out / "groups.md").read_text()
    assert json.loads((out / "written_by.json").read_text()) == {"command": "group"}
    # --steps 5: one epoch of 5 steps, trained, validated and checkpointed as `mtl train` does.
    trained = json.loads((out / "results.json").read_text())
    assert trained["steps"] == 5 and trained["epochs"] == 1 and trained["affinity"] == result["affinity"]
    assert read_yaml(out / "config.yaml")["engine"]["affinity_every"] == 2


@pytest.mark.parametrize("weighting", ["equal", "uncertainty", "famo"])  # famo: losses after the step; uncertainty: its own parameters
def test_training_does_not_depend_on_when_affinity_is_measured(tmp_path, weighting, one_thread):
    models = []
    for every in (1, 3):
        cfg = load_config(WINE, [f"output_dir={tmp_path / str(every)}", *TWO, f"weighting.name={weighting}"])
        run = GroupRun(cfg, every=every, steps=4)
        run.run()
        trained = run.trainer
        models.append({**trained.model.state_dict(), **{f"weighting.{k}": v for k, v in trained.weighting.state_dict().items()}})
    assert "every step measured: no step without the measurement" in (tmp_path / "1" / "groups.md").read_text()
    for (name, a), b in zip(models[0].items(), models[1].values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_wandb_offline_run_holds_the_matrix(tmp_path, one_thread):
    from test_wandb import read_records

    out = tmp_path / "g"
    overrides = [f"output_dir={out}", *(o for o in TWO if "wandb" not in o), "logging.wandb.mode=offline", "--steps", "4", "--every", "2"]
    assert main(["group", WINE, *overrides]) == 0
    records = read_records(out)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["job_type"] == "group"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    measured = [h for h in history if "affinity/wine/wine2" in h]
    # The trainer's log intervals of 2 steps, each with the mean of its one measurement (steps 0 and 2).
    assert [h["global_step"] for h in measured] == [2, 4]
    (logged,) = [h for h in history if "affinity_matrix._type" in h]  # the mean matrix as a W&B table
    assert logged["affinity_matrix._type"] == "table-file"
    (table,) = (out / "wandb").glob("offline-run-*/files/media/table/affinity_matrix_*.table.json")
    table = json.loads(table.read_text())
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    written = json.loads((out / "groups.json").read_text())
    assert summary["affinity_mean/wine/wine2"] == pytest.approx(written["affinity"]["wine"]["wine2"])
    assert table["columns"] == ["from", "wine", "wine2"]
    assert table["data"] == [[a, *(pytest.approx(written["affinity"][a][b]) for b in ("wine", "wine2"))] for a in ("wine", "wine2")]


def test_the_mean_is_the_trainers_and_the_rows_average_to_it(tmp_path, one_thread):
    """`mtl group --every 2 --steps 6` and `mtl train` of the same config with
    engine.affinity_every=2 over one epoch of 6 steps measure the same affinity; affinity.csv's
    rows average to it."""
    group, train = tmp_path / "group", tmp_path / "train"
    assert main(["group", WINE, f"output_dir={group}", *TWO, "--steps", "6", "--every", "2"]) == 0
    assert main(["train", WINE, f"output_dir={train}", *TWO, "engine.affinity_every=2", "trainer.epochs=1", "trainer.steps_per_epoch=6"]) == 0
    grouped = json.loads((group / "groups.json").read_text())
    trained = json.loads((train / "results.json").read_text())
    assert grouped["affinity"] == trained["affinity"] and grouped["measured_steps"] == trained["affinity_steps"] == 3
    rows = list(csv.DictReader((group / "affinity.csv").open()))
    for a, row in trained["affinity"].items():
        for b, mean in row.items():
            mine = [float(r["affinity"]) for r in rows if (r["from"], r["onto"]) == (a, b)]
            assert len(mine) == 3 and mean == pytest.approx(sum(mine) / 3, rel=1e-6)


def test_a_resumed_run_keeps_the_rows_and_times_of_its_first_part(tmp_path, one_thread):
    """The measurements and step times are checkpointed with the run: a run of 2 epochs resumed
    to 3 writes the rows of an uninterrupted 3-epoch run; a finished run is rerun with resume=true."""
    epochs = ["trainer.steps_per_epoch=3", "--every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["group", WINE, f"output_dir={full}", *TWO, "trainer.epochs=3", *epochs]) == 0
    assert main(["group", WINE, f"output_dir={part}", *TWO, "trainer.epochs=2", *epochs]) == 0
    assert main(["group", WINE, f"output_dir={part}", *TWO, "trainer.epochs=3", *epochs]) == 2  # a run is there: resume=true or another output_dir
    assert main(["group", WINE, f"output_dir={part}", *TWO, "trainer.epochs=3", *epochs, "resume=true"]) == 0
    a, b = (list(csv.DictReader((r / "affinity.csv").open())) for r in (full, part))
    assert a == b and [int(r["step"]) for r in a[::4]] == [0, 2, 4, 6, 8]
    timing = json.loads((part / "groups.json").read_text())["step_time"]
    assert timing["affinity_steps"] == 5 and timing["plain_steps"] == 4


def test_printed_compare_overrides_plan_the_grouping_as_one_regime():
    base = ["output_dir=/tmp/unused", "tasks.digits2.name=digits", "tasks.digits2.size=28", "tasks.digits2.split_seed=1"]
    cfg = load_config(QUICKSTART, base)
    grouping = Grouping([["mnist", "digits"], ["digits", "digits2"]], 0.0, {"mnist": 0, "digits": 1, "digits2": 1}, {})
    overrides = compare_overrides(cfg, grouping, written=read_yaml(QUICKSTART)["compare"]["regimes"])
    assert "~compare.regimes.sequential" in overrides
    cells = plan(load_config(QUICKSTART, base + overrides))
    by_regime = {c.regime: c for c in cells}
    assert set(by_regime) == {"single_task", "joint", "tag"}
    assert [s.tasks for s in by_regime["tag"].stages] == [["mnist", "digits"], ["digits", "digits2"]]
    assert by_regime["tag"].serve == {"mnist": 0, "digits": 1, "digits2": 1}
    assert by_regime["joint"].stages[0].tasks == ["mnist", "digits", "digits2"]


def test_compare_overrides_of_a_config_without_regimes_name_the_baselines():
    base = ["output_dir=/tmp/unused", *TWO, "tasks.wine3.name=wine", "tasks.wine3.split_seed=2"]
    grouping = Grouping([["wine", "wine2"], ["wine2", "wine3"]], 0.0, {"wine": 0, "wine2": 0, "wine3": 1}, {})
    overrides = compare_overrides(load_config(WINE, base), grouping, written={})
    cells = plan(load_config(WINE, base + overrides))
    assert {c.regime for c in cells} == {"single_task", "joint", "tag"}


@pytest.mark.parametrize("args,message", [
    (["--every", "0"], "--every: must be a whole number of steps >= 1"),
    (["--groups", "0"], "--groups: must be >= 1"),
    (["--groups", "3"], "--groups: 3 groups for 2 tasks"),
    (["~tasks.wine2"], "tasks: `mtl group` measures how tasks affect each other and needs two or more"),
    # The trainer's checks (builders.check_affinity_every), which `mtl train engine.affinity_every=K` shares:
    (["weighting.name=mgda"], "weighting 'mgda' is gradient-level: use weighting.name=equal"),
    (["scheduler.name=round_robin"], "scheduler 'round_robin' samples tasks: use scheduler.name=all"),
    (["recipe.name=linear_probe"], "recipe 'linear_probe' freezes them in epoch 1: use recipe.name=fine_tune"),
])
def test_bad_input_is_one_clear_error_before_training(tmp_path, args, message, one_thread):
    out = tmp_path / "g"
    result = run_cli(["group", WINE, f"output_dir={out}", *TWO, *args], seconds=120)
    assert result.one_clear_error(), result.stderr
    assert message in result.stderr
    assert not (out / "affinity.csv").exists()


def test_a_lookahead_that_diverges_names_the_step_and_task(tmp_path, one_thread):
    # SGD at an absurd LR: the lookahead on one task's gradient alone overflows the losses.
    result = run_cli(["group", WINE, f"output_dir={tmp_path / 'g'}", *TWO, "trainer.optimizer={name: sgd, lr: 1.0e+38}",
                      "--steps", "2"], seconds=120)
    assert result.code == 1 and len(result.lines) == 1, result.stderr
    assert "mtl: error: step 0: the lookahead step on task 'wine' alone gives task 'wine' a loss of" in result.stderr
    assert "lower trainer.optimizer.lr" in result.stderr


def test_another_commands_directory_is_refused(tmp_path, one_thread):
    out = tmp_path / "g"
    out.mkdir()
    (out / "written_by.json").write_text(json.dumps({"command": "train"}))
    result = run_cli(["group", WINE, f"output_dir={out}", *TWO], seconds=120)
    assert result.one_clear_error() and "holds the files of `mtl train`" in result.stderr


def test_a_run_with_no_measured_step_says_why_instead_of_failing_on_a_missing_key(tmp_path, one_thread):
    """With trainer.on_nonfinite=skip, a run whose every measuring step was non-finite has no
    affinity in its results; the grouping then stops with the cause and the fix."""
    from mtl.affinity import NonFiniteAffinity

    run = GroupRun(load_config(WINE, [f"output_dir={tmp_path / 'g'}", *TWO]), every=2, steps=2)
    with pytest.raises(NonFiniteAffinity, match=r"no step was measured: each measuring step \(--every 2\) had a non-finite loss .* set trainer.grad_clip"):
        run._finish({"steps": 2, "tasks": {}}, loggers=None)
