import subprocess
import sys

import pytest

from mtl.cli import main

from conftest import QUICKSTART, ROOT, quick


def test_validate_reports_ok_and_sizes(capsys):
    assert main(["validate", QUICKSTART]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "task mnist: MNIST, train 3500, val 500, test 1000" in out


def test_validate_bad_config_exits_2_with_one_line(tmp_path, capsys):
    assert main(["validate", QUICKSTART, "trainer.epoch=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and "Did you mean 'epochs'" in err and "\n" not in err


def test_train_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", QUICKSTART, *quick(out), "tasks.mnist.name=mnst"]) == 2
    assert "unknown task 'mnst'" in capsys.readouterr().err
    assert not out.exists()


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "mtl", "list", "heads"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "linear" in done.stdout
