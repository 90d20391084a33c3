"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process with the
same global batch, with every label or with half of one task's labels missing. Tolerance:
each rank's loss is the mean of its half (weighted by its share of the labelled samples),
and the gradient all-reduce sums in another order than one process does, so values agree
to float32 rounding: every metric within 1e-5 (absolute) after 10 steps."""

import json
import os
import subprocess
import sys

import pytest

from conftest import MULTI_MNIST, ROOT
from processes import command, env, run

pytestmark = pytest.mark.slow

COMMON = ["trainer.epochs=2", "trainer.steps_per_epoch=5", "trunk.dropout=0", "logging.progress_bar=false", "logging.wandb.mode=disabled"]
# Half of digits' training labels missing (tests/reliability/partial_labels.py): the shards
# of a batch hold different numbers of labelled samples, which the ranks' losses must weigh.
PARTIAL = ["tasks.digits.name=partial_labels:PartialDigits"]
SETUPS = {
    "equal": [],
    "mgda-parameters": ["weighting.name=mgda"],
    "mgda_ub-representation": ["weighting.name=mgda_ub", *MULTI_MNIST],
    "uncertainty": ["weighting.name=uncertainty"],
    "nash_mtl-capped": ["weighting.name=nash_mtl", "weighting.max_norm=0.05"],  # the cap binds: one norm after the all-reduce
    "partial-labels-equal": PARTIAL,
    "partial-labels-pcgrad": [*PARTIAL, "weighting.name=pcgrad", "engine.staged_gramian=false"],
    "partial-labels-upgrad-staged": [*PARTIAL, "weighting.name=upgrad"],
}
# partial_labels.py is imported by name from the config.
PATH = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "reliability")])


def torchrun(overrides, kind="train", processes=2):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = launcher + command(kind, overrides)[1:]  # `-m mtl KIND CONFIG ...` after the launcher
    return subprocess.run(cmd, env=env(PYTHONPATH=PATH), capture_output=True, text=True, timeout=300, cwd=ROOT)


def one_and_two_processes(tmp_path, args: list[str]) -> tuple[dict, dict, object]:
    """`mtl train` in one process (tmp_path/one) and under torchrun with 2 (tmp_path/two): both results, and the 2-process run."""
    single = run("train", [f"output_dir={tmp_path / 'one'}", *args], PYTHONPATH=PATH)
    assert single.returncode == 0, single.stderr
    double = torchrun([f"output_dir={tmp_path / 'two'}", *args])
    assert double.returncode == 0, double.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    return a, b, double


@pytest.mark.parametrize("setup", SETUPS)
def test_two_processes_equal_one_with_the_same_global_batch(setup, tmp_path):
    a, b, double = one_and_two_processes(tmp_path, [*COMMON, *SETUPS[setup]])
    assert (a["processes"], b["processes"]) == (1, 2) and a["steps"] == b["steps"] == 10
    for split in ("train", "val", "test"):
        assert a["splits"][split].keys() == b["splits"][split].keys() and a["splits"][split], split
        for task, metrics in a["splits"][split].items():
            for name, value in metrics.items():
                assert b["splits"][split][task][name] == pytest.approx(value, abs=1e-5), (split, task, name)
    # Only rank 0 wrote: one table printed, one metrics file with one line per event.
    assert double.stdout.count("best epoch") == 1
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())



def test_ranks_evaluate_disjoint_shares_with_sum_type_metrics(tmp_path):
    # digits split 1257/181/359: every split's shares differ in size between the 2 ranks, and
    # batches of 50 end part-full. Counting metrics are N-fold too large if ranks evaluate the
    # same samples (torchmetrics sums their states); the best epoch is chosen on the loss,
    # which is wrong if a rank's share stands for the split.
    args = [
        *COMMON, "tasks.digits.name=counted_digits:CountedDigits", "tasks.digits.val_fraction=0.1006",
        "trainer.eval_batch_size=50", "trainer.select_on=loss",
    ]
    a, b, _ = one_and_two_processes(tmp_path, args)
    assert b["processes"] == 2 and a["best_epoch"] == b["best_epoch"]
    for split, size in {"train": 1257, "val": 181, "test": 359}.items():
        assert a["splits"][split]["digits"]["samples"] == b["splits"][split]["digits"]["samples"] == size
        assert a["splits"][split]["digits"]["correct"] == b["splits"][split]["digits"]["correct"]
        for task, metrics in a["splits"][split].items():
            for name, value in metrics.items():
                assert b["splits"][split][task][name] == pytest.approx(value, abs=1e-5), (split, task, name)
    # The validation lines of every epoch, which select the model, agree too.
    def val_lines(run):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k.startswith("val/")} for line in lines if "epoch" in line]

    assert len(val_lines("one")) == len(val_lines("two")) == 2
    for one, two in zip(val_lines("one"), val_lines("two")):
        assert one["val/digits/samples"] == two["val/digits/samples"] == 181
        assert two == pytest.approx(one, abs=1e-5)

def test_a_batch_that_does_not_split_evenly_is_refused_before_training(tmp_path):
    done = torchrun([f"output_dir={tmp_path / 'run'}", *COMMON, "trainer.batch_size=63"])
    assert done.returncode != 0
    assert "trainer.batch_size: a batch of 63" in done.stderr and "divisible by 2" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_comparison_under_torchrun_equals_one_process(tmp_path):
    grid = [
        "compare.targets=[digits]", "compare.fractions=[0.25]", "compare.seeds=[0]",
        "compare.regimes={single_task: {}, sequential: {recipes: [fine_tune]}}", *COMMON,
    ]
    one = run("compare", [f"output_dir={tmp_path / 'one'}", *grid])
    assert one.returncode == 0, one.stderr
    two = torchrun([f"output_dir={tmp_path / 'two'}", *grid], kind="compare")
    assert two.returncode == 0, two.stderr[-3000:]
    import pandas as pd

    a, b = pd.read_csv(tmp_path / "one" / "results.csv"), pd.read_csv(tmp_path / "two" / "results.csv")
    keys = ["method", "seed", "fraction", "task", "split", "metric"]
    merged = a.merge(b, on=keys, suffixes=("_one", "_two"))
    assert len(merged) == len(a) == len(b)
    assert (merged["value_one"] - merged["value_two"]).abs().max() <= 1e-5
    # Rank 0 alone reports (and writes): each progress line and the summary appear once.
    assert two.stdout.count("cells; model selection on validation only") == 1
    assert two.stdout.count("[1/") == 1
