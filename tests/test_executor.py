"""`mtl compare` with its cells in parallel: worker processes, a local Ray instance, faults."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from mtl.cli import main
from mtl.compare import Grid
from mtl.config import load_config
from mtl.executor import jobs

from conftest import QUICKSTART
from test_wandb import read_offline_run, run_info

# Four jobs, one an edge: mnist alone, digits alone, the seed's source stage, then the probe from it.
# Four steps a stage with a checkpoint after each, so a stop or a kill lands mid-stage.
GRID = [
    "compare.seeds=[0]",
    "compare.fractions=[0.05]",
    "~compare.regimes.joint",
    "compare.regimes.sequential.recipes=[linear_probe]",
    "trainer.epochs=1",
    "trainer.steps_per_epoch=4",
    "trainer.checkpoint_every=1",
    "deterministic=true",
    "device=cpu",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
]
TIMING = ["wall_time_s"]
MTL = str(Path(sys.executable).with_name("mtl"))


def results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").drop(columns=TIMING)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "run"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *GRID]) == 0
    return results(out)


def test_the_graph_runs_a_source_once_per_seed_before_its_cells(tmp_path):
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "compare.seeds=[0,1]", "compare.fractions=[0.05,1.0]",
                                   "compare.regimes.sequential.recipes=[linear_probe,fine_tune]"])
    grid = Grid(cfg)
    todo = {j.key: j for j in jobs(grid.cells, grid.root)}
    sources = {k for k, j in todo.items() if k.startswith("sources/")}
    assert sources == {"sources/seed0", "sources/seed1"}
    for j in todo.values():
        assert j.after == ([f"sources/seed{j.cell.seed}"] if j.cell.shared_source and j.key not in sources else [])
        assert j.stages == ([0] if j.key in sources else [1] if j.cell.shared_source else [0])
    assert len(todo) == len(grid.cells) + 2
    # A finished source is no job and no edge; a finished cell is no job.
    for d in (grid.root / "sources/seed0", grid.cells[0].dirs[-1]):
        d.mkdir(parents=True)
        (d / "results.json").write_text("{}")
    left = {j.key: j for j in jobs(grid.cells, grid.root)}
    assert "sources/seed0" not in left and grid.cells[0].dirs[-1].relative_to(grid.root).as_posix() not in left
    assert all(j.after == [] for j in left.values() if j.cell.seed == 0)


@pytest.mark.parametrize("extra, message", [
    (["compare.workers=0"], "compare.workers: must be a whole number >= 1"),
    (["compare.workers=64"], "compare.workers: 64 workers, but this machine has"),
    (["compare.workers=2", "compare.threads=64"], "compare.threads: 2 workers x 64 threads exceed"),
    (["compare.executor=dask"], "compare.executor: must be local"),
    (["compare.executor=ray", "compare.ray_address=127.0.0.1:9"], "compare.ray_address: the Ray cluster at '127.0.0.1:9' does not answer"),
])
def test_bad_executor_input_fails_in_seconds_before_any_training(tmp_path, extra, message, capsys):
    start = time.perf_counter()
    assert main(["compare", QUICKSTART, f"output_dir={tmp_path / 'run'}", *GRID, *extra]) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 30 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ray_not_installed_names_the_extra(tmp_path):
    # A fresh interpreter where `import ray` fails as it does without the package.
    code = ("import sys; sys.modules['ray'] = None; from mtl.cli import main; "
            f"sys.exit(main(['compare', {QUICKSTART!r}, 'output_dir={tmp_path / 'run'}', 'compare.executor=ray']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pip install 'mtl[ray]'" in done.stderr, done.stderr


@pytest.mark.slow
def test_workers_and_ray_write_the_results_of_a_serial_grid(tmp_path, serial):
    # Serial training ran on the machine's threads, each worker on fewer: deterministic mode gives the same numbers.
    out = tmp_path / "workers"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *GRID, "compare.workers=2", "logging.wandb.mode=offline"]) == 0
    pd.testing.assert_frame_equal(results(out), serial)
    # W&B: every stage's run, written from the workers, in the comparison's one group, and the report run.
    infos = [run_info(read_offline_run(d)) for d in sorted((out / "wandb").glob("offline-run-*"))]
    assert sorted(r["job_type"] for r in infos) == ["report", "sequential", "sequential", "single_task", "single_task"]
    assert {r["run_group"] for r in infos} == {"quickstart"}

    out = tmp_path / "ray"
    assert main(["compare", QUICKSTART, f"output_dir={out}", *GRID, "compare.executor=ray"]) == 0
    pd.testing.assert_frame_equal(results(out), serial)


def _compare(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([MTL, "compare", QUICKSTART, f"output_dir={out}", *GRID, "compare.workers=2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _mid_stage(out: Path, process: subprocess.Popen, timeout: float = 240, where: str = "**") -> Path:
    """A stage folder (under ``where``) with a step checkpoint written by ``process`` and no results yet, once one exists."""
    since, deadline = time.time(), time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        for found in out.glob(f"{where}/checkpoints/step-*.pt"):
            stage = found.parent.parent
            try:
                fresh = found.stat().st_mtime > since
            except FileNotFoundError:  # an older checkpoint the run just deleted
                continue
            if fresh and not (stage / "results.json").exists() and _workers(process):
                return stage
        time.sleep(0.05)
    raise AssertionError(f"no stage was mid-way: {process.communicate()[0]}")


def _workers(process: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(process.pid).children() if "spawn_main" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_a_killed_worker_resumes_and_nothing_is_lost(tmp_path, serial):
    out = tmp_path / "run"
    # Ctrl-C: every worker stops at a step with a checkpoint, the command exits, the grid is resumable.
    process = _compare(out)
    # A single-task stage, the grid's longest: caught at its first checkpoint it is seconds from done, so the
    # signal lands mid-stage (the last, sub-second cell could finish before it, and the grid would end with 0).
    _mid_stage(out, process, where="cells/single_task/**")
    workers = _workers(process)
    assert len(workers) == 2
    process.send_signal(signal.SIGINT)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == 130, log
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), log
    assert not (out / "results.csv").exists()

    # The rerun resumes; a worker SIGKILLed mid-stage loses its job, which runs again from its checkpoint.
    process = _compare(out)
    stage = _mid_stage(out, process)
    os.kill(_workers(process)[0].pid, signal.SIGKILL)
    log = process.communicate(timeout=300)[0]
    assert process.returncode == 0, log
    assert "its worker died (BrokenProcessPool); run again (1/2), resuming from its checkpoint" in log
    assert f"{stage.relative_to(out)}: resuming from step-" in log
    pd.testing.assert_frame_equal(results(out), serial)


def test_a_stop_that_reached_a_worker_between_stages_stops_the_next_at_its_first_step(tmp_path):
    """A worker keeps a Ctrl-C that arrives while no stage trains (``signals.remember``); the next
    training loop takes it: one step, a checkpoint, KeyboardInterrupt, and nothing kept pending."""
    from mtl import signals
    from mtl.trainer import Trainer

    from conftest import quick

    trainer = Trainer(load_config(QUICKSTART, quick(tmp_path / "run", 2, 5)))
    signals.remember(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt, match="SIGINT at step 1: checkpoint written"):
        trainer.fit()
    assert signals.requested == [] and (tmp_path / "run" / "checkpoints" / "step-000000001.pt").exists()
