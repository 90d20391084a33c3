"""`mtl compare` end to end on the quickstart's real data, at reduced length."""

import json
import re

import pandas as pd
import pytest
import torch

from mtl import checkpoint
from mtl.cli import main
from mtl.compare import Grid, run_compare, start_of
from mtl.config import ConfigError, load_config

from conftest import QUICKSTART

SHORT = ["trainer.epochs=1", "trainer.steps_per_epoch=2", "logging.wandb.mode=disabled"]


def grid_args(out, *extra):
    return [
        f"output_dir={out}",
        "compare.seeds=[0,1]",
        "compare.fractions=[0.05,1.0]",
        "compare.regimes.sequential.recipes=[linear_probe,fine_tune]",
        *SHORT,
        *extra,
    ]


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    assert main(["compare", QUICKSTART, *grid_args(out)]) == 0
    return out


@pytest.mark.slow
def test_results_csv_is_long_form_with_every_cell(grid_dir):
    df = pd.read_csv(grid_dir / "results.csv")
    assert {"regime", "recipe", "seed", "fraction", "task", "split", "metric", "value"} <= set(df.columns)
    test_acc = df[(df.split == "test") & (df.metric == "accuracy")]
    counts = test_acc.groupby(["method", "task"]).size().to_dict()
    # single-task: digits at 2 fractions and mnist once, per seed; sequential reports the
    # target and the source (its head kept, on the target stage's trunk); joint reports both
    # tasks at both fractions.
    assert counts == {
        ("single_task", "digits"): 4,
        ("single_task", "mnist"): 2,
        ("sequential/linear_probe", "digits"): 4,
        ("sequential/linear_probe", "mnist"): 4,
        ("sequential/fine_tune", "digits"): 4,
        ("sequential/fine_tune", "mnist"): 4,
        ("joint", "digits"): 4,
        ("joint", "mnist"): 4,
    }
    assert set(df.split) == {"train", "val", "test"}
    assert df.value.between(0, 10).all()


@pytest.mark.slow
def test_source_stage_trains_once_per_seed_and_transfers_its_trunk(grid_dir):
    assert sorted(p.name for p in (grid_dir / "sources").iterdir()) == ["seed0", "seed1"]
    source = checkpoint.load(grid_dir / "sources" / "seed0" / "trunk.pt")["trunk"]
    probe = grid_dir / "cells" / "sequential" / "linear_probe" / "f0.05" / "seed0"
    target = checkpoint.load(probe / "checkpoints" / "best.pt")["model"]
    # A linear probe starts from the source trunk and never changes it.
    assert all(torch.equal(source[k], target[f"trunk.{k}"]) for k in source)
    results = json.loads((probe / "results.json").read_text())
    assert results["parameters"]["trainable"] == 50 * 10 + 10 < results["parameters"]["total"]
    cfg = load_config(probe / "config.yaml")
    assert cfg.trunk.checkpoint == str(grid_dir / "sources" / "seed0" / "trunk.pt")
    assert cfg.tasks.digits.train_fraction == 0.05 and cfg.tasks.digits.subset_seed == 0
    assert list(cfg.tasks) == ["digits"]


@pytest.mark.slow
def test_report_and_plots_are_written(grid_dir):
    report = (grid_dir / "report.md").read_text()
    assert "Δm%" in report and "validation" in report
    for name in ("data_efficiency_digits.png", "generalization.png", "parameters.png", "accuracy_vs_parameters.png"):
        assert (grid_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_skips_finished_cells_and_restarts_an_interrupted_one(grid_dir, capsys):
    cell = grid_dir / "cells" / "joint" / "f0.05" / "seed1"
    stamps = {p: p.stat().st_mtime_ns for p in grid_dir.glob("cells/**/results.json") if p.parent != cell}
    (cell / "results.json").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    assert main(["compare", QUICKSTART, *grid_args(grid_dir)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    done = [l for l in lines if l.endswith("s") and "done in" in l]
    assert len(done) == 1 and "joint f=0.05 seed=1" in done[0]
    assert sum("skipped" in l for l in lines) == len(lines) - 1
    assert (cell / "results.json").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


@pytest.mark.slow
def test_finished_stages_can_drop_their_step_checkpoints_and_the_grid_still_chains(tmp_path, capsys):
    regime = "compare.regimes={curriculum: {kind: stages, stages: [{name: pre, tasks: [mnist, digits]}, {name: probe, tasks: [digits], recipe: {name: linear_probe}}]}}"
    out = tmp_path / "run"
    args = ["compare", QUICKSTART, f"output_dir={out}", "compare.seeds=[0]", "compare.fractions=[1.0]", regime, *SHORT]
    assert main([*args, "compare.keep_step_checkpoints=false"]) == 0
    stages = [p.parent for p in out.glob("**/results.json") if p.parent != out]
    assert {"pre", "probe"} <= {s.name for s in stages} and any("sources" in s.parts for s in stages)
    for stage in stages:
        assert checkpoint.step_checkpoints(stage / "checkpoints") == []
        assert not list((stage / "checkpoints").glob("step-*"))  # their SHA-256 files too
        assert (stage / "checkpoints" / "best.pt").is_file() and (stage / "trunk.pt").is_file()
    # Which checkpoints are kept decides nothing a cell computes: the grid reruns with the other value.
    capsys.readouterr()
    assert main([*args, "compare.keep_step_checkpoints=true"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_a_stage_that_ends_without_results_keeps_its_step_checkpoints(tmp_path, monkeypatch):
    import mtl.trainer
    from mtl.compare import train_cell

    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path / 'run'}", "compare.seeds=[0]", "compare.fractions=[1.0]",
                                   "compare.keep_step_checkpoints=false", *SHORT])
    grid = Grid(cfg)
    cell = next(c for c in grid.cells if len(c.stages) == 1)

    class Stopped:  # a stage that wrote a checkpoint and returned without results.json
        def __init__(self, stage, **_):
            self.checkpoints = tmp_path / "run" / cell.dirs[0].relative_to(grid.root) / "checkpoints"

        def fit(self):
            self.checkpoints.mkdir(parents=True)
            (self.checkpoints / "step-000000001.pt").write_bytes(b"state")

    monkeypatch.setattr(mtl.trainer, "Trainer", Stopped)
    train_cell(cfg, cell, [0], grid.targets, grid.root, log=lambda *_: None)
    assert [p.name for p in checkpoint.step_checkpoints(cell.dirs[0] / "checkpoints")] == ["step-000000001.pt"]


def test_one_seed_is_said_before_any_training(tmp_path):
    class Said(Exception):
        pass

    def log(message, *_):
        if "one seed" in str(message):
            raise Said(message)

    out = tmp_path / "run"
    cfg = load_config(QUICKSTART, [f"output_dir={out}", "compare.seeds=[0]", "compare.fractions=[1.0]", *SHORT])
    with pytest.raises(Said, match="no verdict; list 2 or more seeds"):
        run_compare(cfg, log=log)
    assert not (out / "cells").exists() and not (out / "sources").exists()


@pytest.mark.slow
def test_custom_stages_chain_trunk_and_continuing_heads(tmp_path):
    regime = "compare.regimes={curriculum: {kind: stages, stages: [{name: pre, tasks: [mnist, digits]}, {name: probe, tasks: [digits], recipe: {name: linear_probe}}]}}"
    out = tmp_path / "run"
    assert main(["compare", QUICKSTART, f"output_dir={out}", "compare.seeds=[0]", "compare.fractions=[1.0]", regime, *SHORT]) == 0
    cell = out / "cells" / "curriculum" / "f1" / "seed0"
    pre = checkpoint.load(cell / "pre" / "checkpoints" / "best.pt")["model"]
    probe = checkpoint.load(cell / "probe" / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(pre[k], probe[k]) for k in pre if k.startswith("trunk."))
    assert not torch.equal(pre["heads.digits.fc.weight"], probe["heads.digits.fc.weight"])  # continued, then trained
    assert load_config(cell / "probe" / "config.yaml").init_from == str(cell / "pre" / "checkpoints" / "best.pt")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["compare.targets=[digitz]"], "compare.targets: task 'digitz' is not defined under tasks. Did you mean 'digits'"),
        (["compare.fractions=[0.5,0]"], r"compare.fractions\[1\]: 0.0 is outside \(0, 1\]"),
        (["compare.fractions=[1.5]"], r"compare.fractions\[0\]: 1.5 is outside"),
        (["compare.regimes={seq: {kind: sequentail}}"], "compare.regimes.seq.kind: unknown regime kind 'sequentail'. Did you mean 'sequential'"),
        (["compare.regimes={c: {kind: stages, stages: [{tasks: [mnist, cifar]}]}}"], r"compare.regimes.c.stages\[0\].tasks: task 'cifar' is not defined"),
        (["compare.regimes.sequential.recipes=[linear_prob]"], r"compare.regimes.sequential.recipes\[0\].*unknown recipe 'linear_prob'"),
        (["compare.regimes.joint.recipes=[fine_tune]"], "compare.regimes.joint.recipes: only a sequential regime"),
        (["compare.stages={target: {trainer: {epoch: 3}}}"], r"compare.stages.target .*trainer.epoch: unknown key. Did you mean 'epochs'"),
    ],
)
def test_bad_grid_fails_before_any_training(tmp_path, extra, message, capsys):
    out = tmp_path / "never"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *SHORT, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl: error:"), err
    assert re.search(message, err), err
    assert not out.exists()


from mtl.recipes import Recipe, freeze  # noqa: E402


class NothingTrains(Recipe):
    """A recipe that freezes everything: a target stage with no trainable parameters."""

    def start_epoch(self, model, epoch):
        freeze(model)


def test_target_stage_with_nothing_to_train_fails_first(tmp_path, capsys):
    out = tmp_path / "never"
    args = [f"output_dir={out}", *SHORT, "compare.regimes.sequential.recipes=[test_compare:NothingTrains]"]
    assert main(["compare", QUICKSTART, *args]) == 2
    assert "leaves no parameter to train" in capsys.readouterr().err
    assert not out.exists()


def test_trunk_checkpoint_of_another_architecture_fails_first(tmp_path, capsys):
    from mtl.trunks import TRUNKS

    other = tmp_path / "wide.pt"
    torch.save(TRUNKS.get("seed_net")(features=64).state_dict(), other)
    out = tmp_path / "never"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *SHORT, f"trunk.checkpoint={other}"]) == 2
    err = capsys.readouterr().err
    assert "trunk.checkpoint" in err and "fc.weight" in err
    assert not out.exists()


def test_a_source_stage_with_another_trunk_fails_first(tmp_path, capsys):
    # The source stage would train a 32-feature trunk that the target stages cannot load.
    out = tmp_path / "never"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *SHORT, "compare.stages={source: {trunk: {features: 32}}}"]) == 2
    err = capsys.readouterr().err
    assert "stage 'target' of sequential/linear_probe starts from the trunk of stage 'source'" in err, err
    assert "fc.weight: (32, 320) there, (50, 320) here" in err and "compare.stages.source" in err
    assert not out.exists()


def test_plan_counts_cells():
    cfg = load_config(QUICKSTART)
    cells = Grid(cfg).cells
    # per seed: single-task mnist 1 + digits 4; sequential 3 recipes x 4; joint 4
    assert len(cells) == 3 * (5 + 12 + 4)


@pytest.mark.slow
def test_rerun_with_another_config_is_refused_before_training(grid_dir, capsys):
    assert main(["compare", QUICKSTART, *grid_args(grid_dir, "trainer.optimizer.lr=0.1")]) == 2
    err = capsys.readouterr().err
    assert "was run with another config" in err and "trainer.optimizer.lr" in err


@pytest.mark.slow
def test_rerun_with_more_epochs_is_refused_not_silently_mixed(grid_dir, capsys):
    # One run may resume with more epochs; a grid's finished cells would keep their old length.
    assert main(["compare", QUICKSTART, *grid_args(grid_dir, "trainer.epochs=9")]) == 2
    err = capsys.readouterr().err
    assert "was run with another config" in err and "trainer.epochs" in err


def _files(folder):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_another_command_or_grid_never_writes_into_a_comparison(tmp_path, capsys, one_thread):
    out = tmp_path / "cmp"
    grid = [f"output_dir={out}", "compare.seeds=[0]", "compare.fractions=[1.0]", "compare.regimes={joint: {}}", *SHORT]
    assert main(["compare", QUICKSTART, *grid]) == 0
    written = _files(out)
    capsys.readouterr()
    # `mtl train` of the same config file: its run files would land beside the report.
    assert main(["train", QUICKSTART, f"output_dir={out}", *SHORT]) == 2
    err = capsys.readouterr().err
    assert "holds a comparison" in err and f"output_dir={out}-train" in err, err
    # A smaller or other grid: its report would replace this one.
    assert main(["compare", QUICKSTART, *grid, "compare.fractions=[0.5,1.0]"]) == 2
    err = capsys.readouterr().err
    assert "was run with another config (compare.fractions differ)" in err and f"output_dir={out}-2" in err, err
    assert _files(out) == written
    # The same grid again: nothing to train, nothing refused.
    assert main(["compare", QUICKSTART, *grid]) == 0
    assert "finished earlier, skipped" in capsys.readouterr().out
    # And a comparison is not written into a training run's directory.
    run = tmp_path / "train"
    assert main(["train", QUICKSTART, f"output_dir={run}", *SHORT]) == 0
    written = _files(run)
    capsys.readouterr()
    assert main(["compare", QUICKSTART, *grid, f"output_dir={run}"]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert _files(run) == written


@pytest.mark.slow
def test_a_finished_grid_gains_regimes_in_place_but_never_loses_or_changes_one(tmp_path, capsys, one_thread):
    out = tmp_path / "cmp"
    grid = [f"output_dir={out}", "compare.seeds=[0]", "compare.fractions=[1.0]", "compare.regimes.sequential.recipes=[linear_probe]", *SHORT]
    added = "compare.regimes.probe={kind: stages, stages: [{tasks: [digits], recipe: {name: linear_probe}}]}"
    assert main(["compare", QUICKSTART, *grid]) == 0
    before = _files(out / "cells")
    capsys.readouterr()
    assert main(["compare", QUICKSTART, *grid, added]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("finished earlier, skipped" in l for l in lines) == 4  # single task x2, sequential, joint
    assert sum("done in" in l for l in lines) == 1 and any("probe f=1 seed=0: done in" in l for l in lines)
    assert all(_files(out / "cells").get(p) == v for p, v in before.items())  # the old cells untouched
    assert "probe" in set(pd.read_csv(out / "results.csv")["method"])
    assert "probe" in load_config(out / "config.yaml").compare.regimes
    written = _files(out)
    for extra, said in [([], "probe is missing"), ([added, "compare.regimes.sequential.recipes=[fine_tune]"], "sequential differs")]:
        assert main(["compare", QUICKSTART, *grid, *extra]) == 2
        err = capsys.readouterr().err
        assert f"compare.regimes: output_dir {out} holds a grid run with other regimes ({said})" in err and f"output_dir={out}-2" in err, err
    assert _files(out) == written


def test_a_source_that_is_also_a_target_is_refused(tmp_path, capsys):
    assert main(["compare", QUICKSTART, f"output_dir={tmp_path / 'x'}", *SHORT, "compare.sources=[mnist,digits]"]) == 2
    assert "compare.sources: digits is also a target" in capsys.readouterr().err


# ---- seeds as a budget, and fair tuning --------------------------------------------------------

TINY = [*SHORT, "compare.fractions=[1.0]", "~compare.regimes.sequential"]  # single-task and joint only
TUNE = "compare.tune={grid: {trainer.optimizer.lr: [0.001, 0.01]}, extra: {joint: {weighting.name: [equal, rlw]}}, seeds: 1}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["compare.seeds={min: 3, max: 2}"], "compare.seeds.max: must be >= min, got min 3 and max 2"),
        (["compare.seeds={min: 1, max: 4}"], "compare.seeds.min: must be >= 2, got 1: the budget stops on a paired test"),
        (["compare.seeds={min: 2.5, max: 4}"], "compare.seeds.min: must be a whole number of seeds, got 2.5"),
        (["compare.seeds={min: 2, mx: 4}"], "compare.seeds.mx: unknown key. Did you mean 'max'"),
        (["compare.seeds={min: 2, max: 4}", "~compare.regimes.single_task"], r"a budget adds seeds until every comparison with single_task resolves.*compare.regimes.single_task=\{\}"),
        (["compare.tune={grid: {optimizer.lr: [0.001]}}"], r"compare.tune.grid.optimizer.lr: not a key of single_task's config .*Did you mean 'trainer.optimizer.lr'"),
        (["compare.tune={extra: {joint: {weighting.gama: [0.1]}}}", "weighting={name: famo}"], r"compare.tune.extra.joint.weighting.gama: not a key of joint's config.*Did you mean 'weighting.gamma'"),
        (["compare.tune={extra: {jiont: {trainer.optimizer.lr: [0.1]}}}"], "compare.tune.extra.jiont: no method of that name. Did you mean 'joint'"),
        (["compare.tune={grid: {trainer.optimizer.lr: [-0.1]}}"], r"compare.tune \(single_task, trainer.optimizer.lr=-0.1\): .*trainer.optimizer.lr: must be > 0"),
        (["compare.tune={grid: {trainer.optimizer.lr: 0.1}}"], "compare.tune.grid.trainer.optimizer.lr: must be a non-empty list of values"),
        (["compare.tune={grids: {}}"], "compare.tune.grids: unknown key. Did you mean 'grid'"),
    ],
)
def test_bad_budget_or_tuning_fails_before_any_training(tmp_path, extra, message, capsys):
    out = tmp_path / "never"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl: error:") and re.search(message, err), err
    assert not out.exists()


def test_a_budget_plans_seeds_0_to_max_and_tuning_its_own_seeds(tmp_path):
    from mtl.compare import seed_plan
    from mtl.tune import TUNE_SEED

    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", *TINY, "compare.seeds={min: 2, max: 4}", TUNE])
    grid = Grid(cfg)
    assert seed_plan(cfg)[0] == [0, 1, 2, 3] and (grid.budget.min, grid.budget.max) == (2, 4)
    assert sorted({c.seed for c in grid.cells}) == [0, 1, 2, 3]
    # Per method and fraction: 2 learning rates, × 2 weightings for joint (its extra grid), on one tuning seed.
    points = {(c.label, c.variant): set() for c in grid.tuning.cells}
    for c in grid.tuning.cells:
        points[(c.label, c.variant)].add(c.point)
        assert c.seed == TUNE_SEED and c.dirs[-1].relative_to(tmp_path).parts[:2] == ("tune", c.point)
    assert {k: len(v) for k, v in points.items()} == {("single_task", "mnist"): 2, ("single_task", "digits"): 2, ("joint", ""): 4}
    assert "trainer.optimizer.lr=0.01,weighting.name=rlw" in points[("joint", "")]
    # An extra grid alone: the other methods have nothing to search and get no tuning runs.
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", *TINY, "compare.tune={extra: {joint: {weighting.name: [equal, rlw]}}}"])
    assert {(c.label, c.point) for c in Grid(cfg).tuning.cells} == {("joint", "weighting.name=equal"), ("joint", "weighting.name=rlw")}
    # A tuning seed's shared source stage stays out of the comparison's sources/ (which `mtl rank` reads).
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", *SHORT, "compare.regimes.sequential.recipes=[fine_tune]", TUNE])
    assert {c.dirs[0] for c in Grid(cfg).tuning.cells if c.shared_source} == {tmp_path / "tune" / "sources" / f"seed{TUNE_SEED}"}


def test_validation_score_and_tune_keys_by_hand():
    from mtl.tune import leaf_keys, point_name, validation_score

    results = {"tasks": {"a": {"primary_metric": "accuracy", "directions": {"accuracy": "max"}},
                         "b": {"primary_metric": "mae", "directions": {"mae": "min"}}},
               "splits": {"val": {"a": {"accuracy": 0.9}, "b": {"mae": 0.5}}, "test": {"a": {"accuracy": 0.0}, "b": {"mae": 9.0}}}}
    assert validation_score(results) == pytest.approx((0.9 - 0.5) / 2)  # never the test split
    results["splits"]["val"]["b"]["mae"] = None
    assert validation_score(results) == pytest.approx(0.9)
    assert leaf_keys({"trainer": {"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}, "grad_clip": None}}) == ["trainer.optimizer.lr", "trainer.grad_clip"]
    assert point_name({"trainer.optimizer.lr": 0.001, "weighting.name": "pkg/mod:W"}) == "trainer.optimizer.lr=0.001,weighting.name=pkg_mod_W"


@pytest.mark.slow
def test_a_budgeted_grid_runs_its_seeds_reports_why_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["compare", QUICKSTART, f"output_dir={out}", *TINY, "compare.seeds={min: 2, max: 3}"]
    assert main(args) == 0
    log = capsys.readouterr().out
    df = pd.read_csv(out / "results.csv")
    seeds = sorted(df.seed.unique())
    assert seeds in ([0, 1], [0, 1, 2])
    assert ("max (3 seeds) reached" in log) == (seeds == [0, 1, 2])
    report = (out / "report.md").read_text()
    assert "a budget of 2 to 3" in report and "Seeds each method ran" in report
    assert "max reached (3 seeds)" in report or "resolved at" in report
    # Rerun: every decision is replayed from the finished cells; an interrupted cell is redone.
    cell = out / "cells" / "joint" / "f1" / f"seed{seeds[-1]}"
    (cell / "results.json").unlink()
    assert main(args) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    assert [l for l in lines if "done in" in l] == [next(l for l in lines if f"joint f=1 seed={seeds[-1]}" in l)]
    assert (out / "report.md").read_text() == report


@pytest.mark.slow
def test_tuning_selects_on_validation_and_the_evaluation_runs_use_it(tmp_path):
    from mtl.tune import validation_score

    out = tmp_path / "run"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *TINY, "compare.seeds=[0,1]", TUNE]) == 0
    info = json.loads((out / "tune.json").read_text())
    assert info["seeds"] == [10000]
    joint = next(u for u in info["units"] if u["method"] == "joint")
    assert joint["runs"] == 4 and len(joint["points"]) == 4
    # The selected point is the best mean validation score of its tuning runs.
    scores = {}
    for cell in (out / "tune").glob("*/joint/f1/seed10000"):
        scores[cell.parts[-4]] = validation_score(json.loads((cell / "results.json").read_text()))
    best = max(scores, key=scores.get)
    assert best == ",".join(f"{k}={v}" for k, v in joint["selected"].items())
    cfg = load_config(out / "cells" / "joint" / "f1" / "seed0" / "config.yaml")
    assert cfg.trainer.optimizer.lr == joint["selected"]["trainer.optimizer.lr"] and cfg.weighting.name == joint["selected"]["weighting.name"]
    report = (out / "report.md").read_text()
    assert "## Tuning" in report and "| joint |  | 1 | " in report and "| joint | 4 | 2 |" in report


def test_tuned_values_set_the_last_stage_task_keys_included(tmp_path):
    from mtl.compare import stage_config

    tune = "compare.tune={extra: {sequential: {tasks.digits.size: [24], weighting.name: [rlw]}}}"
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "compare.fractions=[0.05]", "compare.regimes.sequential.recipes=[fine_tune]", tune])
    grid = Grid(cfg)
    cell = next(c for c in grid.tuning.cells if c.label == "sequential/fine_tune")
    source, target = (stage_config(cfg, cell, i, cell.dirs[i], {}, grid.targets) for i in (0, 1))
    assert target.tasks.digits.size == 24 and target.tasks.digits.train_fraction == 0.05 and target.weighting.name == "rlw"
    assert source.weighting.name == "equal" and "digits" not in source.tasks  # the shared source stage is never tuned


def test_a_budget_buys_no_seeds_for_a_sequential_methods_earlier_tasks(tmp_path):
    from mtl.report import Stop

    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "compare.seeds={min: 2, max: 4}", "compare.fractions=[0.05]",
                                   "compare.regimes.sequential.recipes=[linear_probe]"])
    grid = Grid(cfg)
    open_, done = Stop(0, False, 2, 0.01), Stop(1, True, 2, 0.01)
    stops = {(0.05, "sequential/linear_probe", "mnist: accuracy"): open_,  # the source, followed: no seeds for it
             (0.05, "sequential/linear_probe", "digits: accuracy"): done,
             (0.05, "joint", "mnist: accuracy"): open_}
    assert grid.open_comparisons(stops) == {("joint", 0.05)}
    stops[(0.05, "sequential/linear_probe", "Δm%")] = open_
    assert grid.open_comparisons(stops) == {("joint", 0.05), ("sequential/linear_probe", 0.05)}


# ---- kind groups: a grouping of the tasks (TAG's proposal) against joint and single-task --------


def groups_cfg(tmp_path, regime):
    return load_config(QUICKSTART, [f"output_dir={tmp_path / 'g'}", "compare.seeds=[0]", "compare.fractions=[1.0]",
                                    f"compare.regimes={{tag: {regime}}}", *SHORT])


@pytest.mark.parametrize(
    "regime, message",
    [
        ("{kind: groups, groups: [[mnist]]}", r"compare.regimes.tag.groups: task 'digits' is in no group"),
        ("{kind: groups, groups: []}", r"compare.regimes.tag.groups: a list of task groups"),
        ("{kind: groups, groups: [[mnist, digitz]]}", r"compare.regimes.tag.groups\[0\]: task 'digitz' is not defined"),
        ("{kind: groups, groups: [[mnist], [digits]], serve: {digits: 0}}", r"compare.regimes.tag.serve.digits: 0 is not the index of a group that has 'digits'"),
        ("{kind: joint, groups: [[mnist, digits]]}", r"compare.regimes.tag.groups: only a regime of kind groups"),
    ],
)
def test_groups_bad_input_names_the_key(tmp_path, regime, message):
    from mtl.compare import plan

    with pytest.raises(ConfigError, match=message):
        plan(groups_cfg(tmp_path, regime))


def test_groups_plan_one_independent_stage_per_group_and_serve_each_task_once(tmp_path):
    from mtl.compare import plan

    cfg = groups_cfg(tmp_path, "{kind: groups, groups: [[mnist, digits], [digits]], serve: {digits: 1}}")
    (cell,) = [c for c in plan(cfg) if c.label == "tag"]
    assert [s.tasks for s in cell.stages] == [["mnist", "digits"], ["digits"]] and cell.serve == {"mnist": 0, "digits": 1}
    grid = Grid(cfg)
    assert start_of(next(c for c in grid.cells if c.label == "tag"), 1) == {}  # the second group starts from scratch


@pytest.mark.slow
def test_groups_cell_reports_each_task_from_its_group(tmp_path):
    out = tmp_path / "g"
    args = [f"output_dir={out}", "compare.seeds=[0]", "compare.fractions=[1.0]", *SHORT,
            "compare.regimes={tag: {kind: groups, groups: [[mnist, digits], [digits]], serve: {digits: 1}}, joint: {}}"]
    assert main(["compare", QUICKSTART, *args]) == 0
    df = pd.read_csv(out / "results.csv")
    tag = df[(df.method == "tag") & (df.split == "test") & (df.metric == "accuracy")].set_index("task")
    base = out / "cells" / "tag" / "f1" / "seed0"
    for task, group in (("mnist", "group0"), ("digits", "group1")):
        own = json.loads((base / group / "results.json").read_text())
        assert tag.loc[task, "value"] == pytest.approx(own["splits"]["test"][task]["accuracy"])
    groups = [json.loads((base / g / "results.json").read_text())["parameters"]["trainable"] for g in ("group0", "group1")]
    assert (tag["trainable_params"] == sum(groups)).all() and tag["backward_transfer"].isna().all()
    assert "tag" in (out / "report.md").read_text()


# ---- kind merge: single-task fine-tunes of one common trunk, merged (mtl.merging) ----------

MERGE_QUICKSTART = str(QUICKSTART).replace("quickstart.yaml", "merge_quickstart.yaml")
ONLY = ["~compare.regimes.single_task", "~compare.regimes.sequential", "~compare.regimes.joint"]


def merge_args(out, regime, *extra):
    return [f"output_dir={out}", "compare.seeds=[0]", "compare.fractions=[1.0]", *ONLY, f"compare.regimes={{m: {regime}}}", *SHORT, *extra]


@pytest.mark.parametrize(
    "regime, message",
    [
        ("{kind: merge, stages: [{tasks: [mnist]}]}", r"compare.regimes.m: merging combines the fine-tunes of 2 or more tasks, and this regime has 1"),
        ("{kind: merge, stages: [{tasks: [mnist, digits]}]}", r"compare.regimes.m.stages\[0\].tasks: a merge fine-tunes each task alone"),
        ("{kind: merge, stages: [{tasks: [mnist]}, {tasks: [mnist]}]}", r"compare.regimes.m.stages: task 'mnist' is fine-tuned twice"),
        ("{kind: merge, method: tis}", r"compare.regimes.m.method.*unknown merge 'tis'. Did you mean 'ties'"),
        ("{kind: merge, method: ties, top_k: 0}", r"compare.regimes.m.method: top_k must be in \(0, 1\]"),
        ("{kind: merge, drop: 0.5}", r"compare.regimes.m.method.drop: unknown argument for TaskArithmetic"),
        ("{kind: merge, coefficients: []}", r"compare.regimes.m.coefficients: a non-empty list"),
        ("{kind: joint, method: ties}", r"compare.regimes.m.method: only a regime of kind merge takes method"),
        ("{kind: merge, forgetting: [mnist]}", r"compare.regimes.m.forgetting: a merge's fine-tunes train side by side"),
    ],
)
def test_merge_bad_input_names_the_key(tmp_path, regime, message):
    from mtl.compare import plan

    with pytest.raises(ConfigError, match=message):
        plan(load_config(QUICKSTART, merge_args(tmp_path / "m", regime)))


def test_merge_plans_one_fine_tune_per_task_from_the_common_trunk_then_the_merge(tmp_path):
    grid = Grid(load_config(QUICKSTART, merge_args(tmp_path / "m", "{kind: merge, method: dare}")))
    (cell,) = grid.cells
    assert [s.tasks for s in cell.stages] == [["mnist"], ["digits"], ["mnist", "digits"]]
    assert cell.merge == {"method": {"name": "dare", "seed": 0}, "coefficients": [0.2, 0.4, 0.6, 0.8, 1.0]}  # the cell's seed
    base = tmp_path / "m" / "cells" / "m" / "f1" / "seed0"
    assert cell.dirs == [base / "mnist", base / "digits", base]
    assert start_of(cell, 1) == {"trunk": {"checkpoint": str(base / "common_trunk.pt")}}


@pytest.mark.parametrize("recipe", ["linear_probe", "bitfit"])
def test_merge_of_a_recipe_without_a_task_vector_fails_first(tmp_path, recipe, capsys):
    out = tmp_path / "never"
    assert main(["compare", QUICKSTART, *merge_args(out, "{kind: merge}", f"compare.stages={{target: {{recipe: {{name: {recipe}}}}}}}")]) == 2
    err = capsys.readouterr().err
    assert f"recipe '{recipe}' does not fine-tune the whole trunk, so the run has no task vector to merge" in err, err
    assert "LoRA, IA3" in err and not out.exists()


def test_merge_of_fine_tunes_from_different_trunks_fails_first(tmp_path, capsys):
    out = tmp_path / "never"
    regime = "{kind: merge, stages: [{tasks: [mnist]}, {tasks: [digits], trunk: {features: 32}}]}"
    assert main(["compare", QUICKSTART, *merge_args(out, regime)]) == 2
    err = capsys.readouterr().err
    assert "compare.regimes.m.stages[1] (stage 'digits' of m): a merge combines fine-tunes of one common trunk" in err, err
    assert "trunk.features: 50 there, 32 here" in err and not out.exists()


@pytest.mark.slow
def test_merge_quickstart_validates(capsys):
    assert main(["validate", MERGE_QUICKSTART]) == 0
    assert "compare: 18 cells; every distinct stage builds" in capsys.readouterr().out


@pytest.mark.slow
def test_merge_cells_merge_on_validation_and_report_like_any_cell(tmp_path, capsys):
    from mtl.merging import Ties

    out = tmp_path / "m"
    args = [f"output_dir={out}", "compare.seeds=[0]", *SHORT, "~compare.regimes.joint", "~compare.regimes.dare"]
    assert main(["compare", MERGE_QUICKSTART, *args]) == 0
    df = pd.read_csv(out / "results.csv")
    test = df[(df.split == "test") & (df.metric == "accuracy")].set_index(["method", "task"])
    for method, merge in (("task_arithmetic", None), ("ties", Ties(0.2))):
        cell = out / "cells" / method / "f1" / "seed0"
        record, results = json.loads((cell / "merge.json").read_text()), json.loads((cell / "results.json").read_text())
        scores = [row["val_score"] for row in record["coefficients"]]
        assert record["chosen"] == record["coefficients"][scores.index(max(scores))]["coefficient"] and record["merge_s"] > 0
        for task in ("mnist", "digits"):
            assert test.loc[(method, task), "value"] == pytest.approx(results["splits"]["test"][task]["accuracy"])
            assert load_config(cell / task / "config.yaml").trunk.checkpoint == str(cell / "common_trunk.pt")
        # The merged trunk, by hand: θ_0 + λ τ_m from the common trunk and the fine-tunes' selected checkpoints.
        base = checkpoint.load(cell / "common_trunk.pt")["trunk"]
        tuned = [{k[6:]: v for k, v in checkpoint.load(cell / t / "checkpoints" / "best.pt")["model"].items() if k.startswith("trunk.")}
                 for t in ("mnist", "digits")]
        merged, lam = checkpoint.load(cell / "merged_trunk.pt")["trunk"], record["chosen"]
        if merge is None:
            expected = {k: base[k] + lam * ((tuned[0][k] - base[k]) + (tuned[1][k] - base[k])) for k in base}
        else:
            flat = torch.stack([torch.cat([(s[k] - base[k]).reshape(-1) for k in base]) for s in tuned])
            vector, offset, expected = merge.combine(flat), 0, {}
            for k in base:
                expected[k] = base[k] + lam * vector[offset : offset + base[k].numel()].view_as(base[k])
                offset += base[k].numel()
        assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in base)
        heads = sum(v.numel() for s in ("mnist", "digits") for k, v in checkpoint.load(cell / s / "checkpoints" / "best.pt")["model"].items()
                    if k.startswith(f"heads.{s}."))
        assert (df[df.method == method].trainable_params == sum(v.numel() for v in base.values()) + heads).all()
    assert "ties" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["compare", MERGE_QUICKSTART, *args]) == 0
    assert "ties f=1 seed=0: finished earlier, skipped" in capsys.readouterr().out


def test_tuned_values_set_every_fine_tune_of_a_merge(tmp_path):
    from mtl.compare import stage_config

    cfg = load_config(QUICKSTART, [*merge_args(tmp_path / "m", "{kind: merge}"), "compare.tune={grid: {trainer.optimizer.lr: [0.01]}}"])
    grid = Grid(cfg)
    cell = next(c for c in grid.tuning.cells if c.label == "m")
    assert [stage_config(cfg, cell, i, cell.dirs[i], {}, grid.targets).trainer.optimizer.lr for i in (0, 1)] == [0.01, 0.01]
