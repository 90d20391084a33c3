"""Forgetting in sequential transfer: the GEM summaries by hand, the accuracy matrix of real
grids (a sequential regime and a 3-stage chain), its reuse on a rerun, and bad input."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from mtl.cli import main
from mtl.forgetting import average_accuracy, backward_transfer, followable, forward_transfer, gem_summary, retention

from conftest import QUICKSTART

SHORT = ["trainer.epochs=1", "trainer.steps_per_epoch=3", "logging.wandb.mode=disabled", "trainer.optimizer.lr=0.01"]

# R[k][i]: task i after stage k (task i trained at stage i); b: each task trained alone.
R = [[0.9, 0.1, 0.2],
     [0.8, 0.7, 0.3],
     [0.6, 0.65, 0.5]]
B = [0.85, 0.6, 0.55]


def test_gem_summaries_on_a_hand_worked_matrix():
    # ACC = (0.6 + 0.65 + 0.5) / 3; BWT = ((0.6 − 0.9) + (0.65 − 0.7)) / 2; FWT = ((0.7 − 0.6) + (0.5 − 0.55)) / 2.
    acc, bwt, fwt = gem_summary(R, B)
    assert acc == pytest.approx(1.75 / 3)
    assert bwt == pytest.approx(-0.175)
    assert fwt == pytest.approx(0.025)
    # The same values as errors (lower is better): a rise is forgetting, so the signs flip; ACC is a plain mean.
    acc, bwt, fwt = gem_summary(R, B, higher_is_better=False)
    assert (acc, bwt, fwt) == pytest.approx((1.75 / 3, 0.175, -0.025))
    assert average_accuracy([0.6, 0.65, 0.5]) == pytest.approx(1.75 / 3)
    assert backward_transfer([0.6], [0.9]) == pytest.approx(-0.3)
    assert forward_transfer([0.7, 0.5], [0.6, 0.55]) == pytest.approx(0.025)
    assert retention(0.6, 0.9) == pytest.approx(2 / 3) and retention(0.6, 0.3, higher_is_better=False) == pytest.approx(0.5)
    assert np.isnan(retention(0.6, 0.0)) and np.isnan(retention(-0.1, 0.5))


def test_summaries_refuse_what_they_cannot_measure():
    with pytest.raises(ValueError, match="T×T with T >= 2"):
        gem_summary([[0.9]], [0.5])
    with pytest.raises(ValueError, match="BWT needs"):
        backward_transfer([], [])
    with pytest.raises(ValueError, match="FWT needs"):
        forward_transfer([0.5, 0.6], [0.5])


def test_followable_tasks_are_those_trained_before_the_last_stage():
    assert followable([["a", "b"], ["c"]]) == ["a", "b"]
    assert followable([["a", "b"], ["b"], ["c"]]) == ["a", "b"]
    assert followable([["a"], ["b"], ["a"]]) == ["b"]  # retrained last: nothing later evaluates it
    assert followable([["a", "b"]]) == []


CHAIN = ("compare.regimes={{{name}: {{kind: stages, stages: [{{name: first, tasks: [mnist]}}, {{name: second, tasks: [shifted]}}, "
         "{{name: third, tasks: [digits]}}]{extra}}}}}")
SHIFTED = "tasks.shifted={name: digits, size: 28, margin: 6}"  # a third task on 28x28 inputs, cheap to load


@pytest.mark.parametrize(
    "extra, message",
    [
        (["compare.regimes={joint: {forgetting: [mnist]}}"],
         "compare.regimes.joint.forgetting: a joint regime trains its tasks in one stage, so no later stage can evaluate them"),
        (["compare.regimes={sequential: {forgetting: [digits]}}"],
         r"compare.regimes.sequential.forgetting\[0\]: task 'digits' is trained in the last stage \(target\).*trained before the last stage: mnist"),
        (["compare.regimes={sequential: {forgetting: [mnsit]}}"],
         "compare.regimes.sequential.forgetting: task 'mnsit' is not defined under tasks. Did you mean 'mnist'"),
        (["compare.regimes={sequential: {forgetting: mnist}}"], "compare.regimes.sequential.forgetting: must be a list of task names"),
        (["compare.regimes={c: {kind: stages, stages: [{tasks: [mnist, digits]}], forgetting: [mnist]}}"],
         "compare.regimes.c.forgetting: the regime has 1 stage; backward transfer .* needs 2 or more stages"),
        ([SHIFTED, CHAIN.format(name="c", extra=", forgetting: [mnist, digits]")],
         r"compare.regimes.c.forgetting\[1\]: task 'digits' is trained in the last stage \(third\)"),
    ],
)
def test_bad_forgetting_request_fails_before_any_training(tmp_path, extra, message, capsys):
    out = tmp_path / "never"
    assert main(["compare", QUICKSTART, f"output_dir={out}", "compare.targets=[digits]", *SHORT, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl: error:") and re.search(message, err), err
    assert not out.exists()


def test_every_earlier_task_is_followed_by_default_and_none_on_request(tmp_path):
    from mtl.compare import Grid
    from mtl.config import load_config

    def followed(*extra):
        cells = Grid(load_config(QUICKSTART, [f"output_dir={tmp_path}", SHIFTED, *extra])).cells
        return {c.label: c.forgetting for c in cells}

    assert followed() == {"single_task": [], "sequential/linear_probe": ["mnist", "shifted"], "sequential/fine_tune": ["mnist", "shifted"],
                          "sequential/lp_ft": ["mnist", "shifted"], "joint": []}
    assert followed("compare.regimes.sequential.forgetting=[shifted]")["sequential/fine_tune"] == ["shifted"]
    assert followed("compare.regimes.sequential.forgetting=[]")["sequential/fine_tune"] == []
    assert followed(CHAIN.format(name="c", extra=""))["c"] == ["mnist", "shifted"]


def test_the_cells_job_leaves_its_matrix_so_the_report_evaluates_nothing(tmp_path, one_thread, capsys):
    """A worker's job computes its cell's matrix (in parallel with the other jobs); the grid's
    rows then read it back instead of evaluating every cell in the command's process."""
    from mtl.compare import Grid, _cell_dir, roles, train_cell
    from mtl.config import load_config
    from mtl.forgetting import FILE

    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "compare.seeds=[0]", "compare.fractions=[0.5]", *SHORT])
    grid = Grid(cfg)
    cell = next(c for c in grid.cells if c.label == "sequential/linear_probe")
    assert train_cell(cfg, cell, list(range(len(cell.stages))), roles(cfg)[0], tmp_path) == 2
    assert (_cell_dir(tmp_path, cell) / FILE).exists()
    capsys.readouterr()
    rows = grid.rows([cell])
    assert {r["task"] for r in rows} == {"mnist", "digits"} and "forgetting:" not in capsys.readouterr().out


# ---- a real grid: single-task, sequential (linear probe, fine-tune), a 3-stage chain, joint ----


def grid_args(out):
    chain = "{kind: stages, stages: [{name: first, tasks: [mnist]}, {name: second, tasks: [shifted]}, {name: third, tasks: [digits]}]}"
    regimes = f"compare.regimes={{single_task: {{}}, sequential: {{recipes: [linear_probe, fine_tune]}}, chain: {chain}, joint: {{}}}}"
    return [f"output_dir={out}", SHIFTED, "compare.seeds=[0,1]", "compare.fractions=[0.5]", "compare.sources=[mnist]", regimes, *SHORT]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("forget") / "run"
    assert main(["compare", QUICKSTART, *grid_args(out)]) == 0
    return out, pd.read_csv(out / "results.csv")


def _test_primary(df, method):
    return df[(df.method == method) & (df.split == "test") & df.primary]


@pytest.mark.slow
def test_sequential_cells_report_their_source_tasks_with_backward_transfer(grid):
    out, df = grid
    for method in ("sequential/linear_probe", "sequential/fine_tune"):
        rows = _test_primary(df, method)
        assert sorted(rows.task) == ["digits", "digits", "mnist", "mnist"]  # the source task is no longer n/a
        source = rows[rows.task == "mnist"]
        assert (source.trained_last == 0).all() and (source.stages == 2).all()
        # after_training is the source stage's own test value, shared by every recipe of the seed.
        for seed, after in zip(source.seed, source.after_training):
            own = json.loads((out / "sources" / f"seed{seed}" / "results.json").read_text())
            assert after == pytest.approx(own["splits"]["test"]["mnist"]["accuracy"])
        assert np.allclose(source.backward_transfer, source.value - source.after_training)
        target = rows[rows.task == "digits"]
        assert target.backward_transfer.isna().all() and (target.after_training == target.value).all()
    # A linear probe never moves the trunk: the source head on it scores exactly what it scored.
    probe = _test_primary(df, "sequential/linear_probe")
    assert (probe[probe.task == "mnist"].backward_transfer == 0).all()
    assert (probe[probe.task == "mnist"].retention == 1).all()
    # Only the val and test splits are evaluated for an earlier task.
    assert set(df[(df.method == "sequential/fine_tune") & (df.task == "mnist")].split) == {"val", "test"}
    # Its training run is the source stage, not the cell's: the cell's convergence is judged on the target only.
    from mtl.report import convergence

    judged = convergence(df, out)
    assert set(judged[judged.method.str.startswith("sequential")].task) == {"digits"}


@pytest.mark.slow
def test_an_earlier_task_is_scored_on_the_later_trunk_with_its_own_head(grid):
    """The matrix's value, recomputed by another route: the source stage's own model (built by
    the trainer's builders from its config) with the fine-tuned trunk loaded into it."""
    import torch

    from mtl import checkpoint
    from mtl.builders import build_components
    from mtl.config import load_config
    from mtl.results import evaluate

    out, df = grid
    cell = out / "cells" / "sequential" / "fine_tune" / "f0.5" / "seed1"
    parts = build_components(load_config(out / "sources" / "seed1" / "config.yaml"))
    model = parts.model
    model.load_state_dict(checkpoint.load(out / "sources" / "seed1" / "checkpoints" / "best.pt")["model"])
    tuned = checkpoint.load(cell / "checkpoints" / "best.pt")["model"]
    model.trunk.load_state_dict({k[len("trunk."):]: v for k, v in tuned.items() if k.startswith("trunk.")})
    expected = evaluate(model, parts.tasks, {"mnist": parts.splits["mnist"].test}, 256, torch.device("cpu"))["mnist"]
    row = df[(df.method == "sequential/fine_tune") & (df.seed == 1) & (df.task == "mnist") & (df.split == "test")]
    assert dict(zip(row.metric, row.value)) == pytest.approx(expected)
    stored = json.loads((cell / "forgetting.json").read_text())
    assert stored["after"][1]["test"]["mnist"] == pytest.approx(expected)
    assert [s["name"] for s in stored["stages"]] == ["source", "target"] and stored["follow"] == ["mnist"]


@pytest.mark.slow
def test_a_three_stage_chain_reports_acc_bwt_and_fwt(grid):
    out, df = grid
    rows = _test_primary(df, "chain")
    assert sorted(set(rows.task)) == ["digits", "mnist", "shifted"] and (rows.stages == 3).all()
    matrix = json.loads((out / "cells" / "chain" / "f0.5" / "seed0" / "forgetting.json").read_text())
    after = [{t: v["accuracy"] for t, v in stage["test"].items()} for stage in matrix["after"]]
    assert [sorted(a) for a in after] == [["mnist"], ["mnist", "shifted"], ["digits", "mnist", "shifted"]]
    base = _test_primary(df, "single_task").set_index(["seed", "task"])["value"]
    # By hand, for seed 0, from the stored matrix R and the single-task runs b.
    acc = (after[2]["mnist"] + after[2]["shifted"] + after[2]["digits"]) / 3
    bwt = ((after[2]["mnist"] - after[0]["mnist"]) + (after[2]["shifted"] - after[1]["shifted"])) / 2
    fwt = ((after[1]["shifted"] - base[(0, "shifted")]) + (after[2]["digits"] - base[(0, "digits")])) / 2
    from mtl.report import forgetting_stats

    chain = next(f for f in forgetting_stats(df) if f.method == "chain")
    seed0 = rows[rows.seed == 0]
    assert seed0.value.mean() == pytest.approx(acc) and chain.acc[0] == pytest.approx(acc)
    per_seed_bwt = rows[rows.trained_last < 2].groupby("seed").backward_transfer.mean()
    assert per_seed_bwt[0] == pytest.approx(bwt) and chain.bwt.mean == pytest.approx(per_seed_bwt.mean())
    assert chain.bwt.n == 2 and chain.fwt.n == 2
    later = rows[rows.trained_first > 0]
    per_seed_fwt = (later.after_training - [base[(s, t)] for s, t in zip(later.seed, later.task)]).groupby(later.seed).mean()
    assert per_seed_fwt[0] == pytest.approx(fwt) and chain.fwt.mean == pytest.approx(per_seed_fwt.mean())
    report = (out / "report.md").read_text()
    line = next(l for l in report.splitlines() if l.startswith("| chain | 0.5 | 2 |"))
    assert f"{chain.bwt.mean:+.4f} [{chain.bwt.low:+.4f}, {chain.bwt.high:+.4f}]" in line
    assert f"{chain.fwt.mean:+.4f} [{chain.fwt.low:+.4f}, {chain.fwt.high:+.4f}]" in line
    assert "## Forgetting in sequential transfer" in report and "| chain | 0.5 | shifted | accuracy ↑ | 2 |" in report


@pytest.mark.slow
def test_report_plots_accuracy_against_trainable_parameters(grid):
    out, df = grid
    for suffix, magic in (("png", b"\x89PNG\r\n\x1a\n"), ("pdf", b"%PDF")):
        assert (out / f"accuracy_vs_parameters.{suffix}").read_bytes()[: len(magic)] == magic
    report = (out / "report.md").read_text()
    assert "![accuracy against trainable parameters](accuracy_vs_parameters.png)" in report
    probe = _test_primary(df, "sequential/linear_probe")
    digits = probe[probe.task == "digits"]
    # The probe trains the digits head only: 50 features x 10 classes + 10.
    assert (digits.trainable_params == 510).all()
    assert f"| digits | 0.5 | sequential/linear_probe | 510 | 2 | {digits.value.mean():.4f} [" in report


@pytest.mark.slow
def test_a_rerun_recomputes_only_the_missing_or_stale_matrix(grid, capsys):
    out, df = grid
    matrices = sorted(out.glob("cells/**/forgetting.json"))
    assert len(matrices) == 3 * 2  # linear probe, fine-tune and the chain, 2 seeds each
    gone, stale = matrices[0], matrices[-1]
    kept = {p: p.stat().st_mtime_ns for p in matrices if p not in (gone, stale)}
    before = json.loads(gone.read_text())
    gone.unlink()
    data = json.loads(stale.read_text())
    data["stages"][0]["checkpoint_sha256"] = "0" * 64  # as if that stage had been retrained since
    stale.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["compare", QUICKSTART, *grid_args(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("forgetting:") == 2 and str(gone) in log and str(stale) in log
    assert json.loads(gone.read_text()) == before
    assert json.loads(stale.read_text())["stages"][0]["checkpoint_sha256"] != "0" * 64
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), df)
