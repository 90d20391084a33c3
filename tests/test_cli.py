import subprocess
import sys

import pytest

from mtl.cli import main
from mtl.trunks import Trunk

from conftest import QUICKSTART, ROOT, quick


def test_validate_reports_ok_and_sizes(capsys):
    assert main(["validate", QUICKSTART]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "task mnist: MNIST, train 3500, val 500, test 1000" in out
    assert "judged for `mtl train` and `mtl compare`" in out and "compare: " in out


def test_validate_judges_what_the_command_will_run(capsys):
    # Without mnist the quickstart trains digits alone, but its comparison has no source task left.
    assert main(["validate", QUICKSTART, "~tasks.mnist"]) == 2
    err = capsys.readouterr().err
    assert "sequential transfer needs compare.targets and at least one source task" in err
    assert "judged for `mtl compare`" in err and "--for train" in err
    assert main(["validate", QUICKSTART, "--for", "train", "~tasks.mnist", "trainer.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "judged for `mtl train`\n" in out and "2 epochs of" in out and "compare:" not in out


def test_validate_is_bounded_whatever_the_epochs(capsys):
    """Checking a config does no work per epoch: the run's length is a number, not a loop."""
    import signal

    def too_slow(signum, frame):
        raise TimeoutError("validate did not return within 60 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        code = main(["validate", QUICKSTART, "--for", "train", "trainer.epochs=1000000000000"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 0, capsys.readouterr().err


class Exploding(Trunk):
    """A trunk whose constructor fails in a way no check foresees."""

    def __init__(self):
        super().__init__()
        raise RuntimeError("boom\nsecond line")


def test_a_library_message_inside_a_config_error_is_cut_to_one_line(capsys, monkeypatch):
    # torch's overflow message carries its C++ stack: a dozen lines inside the error for trunk.features.
    monkeypatch.delenv("MTL_DEBUG", raising=False)
    assert main(["validate", QUICKSTART, "--for", "train", "trunk.features=18446744073709551616"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("mtl: error: ") and "trunk" in err, err
    assert "MTL_DEBUG=1 prints them all" in err


def test_an_unexpected_error_is_one_line_without_a_traceback(capsys, monkeypatch):
    monkeypatch.delenv("MTL_DEBUG", raising=False)
    argv = ["validate", QUICKSTART, "--for", "train", f"trunk.name={__name__}:Exploding"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("mtl: error: validate failed with an unexpected RuntimeError at ")
    assert "test_cli.py:" in err and ": boom." in err and "MTL_DEBUG=1" in err
    monkeypatch.setenv("MTL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_a_model_too_large_for_memory_is_one_clear_error(capsys, monkeypatch):
    """Found by the config fuzzer: trunk.features=2**32 made the CPU allocator fail while
    building the model (5.5 TB asked), reported as an unexpected bug."""
    monkeypatch.delenv("MTL_DEBUG", raising=False)
    assert main(["validate", QUICKSTART, "--for", "train", f"trunk.features={2**32}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error: validate ran out of memory") and "\n" not in err, err
    assert "trunk" in err and "trainer.batch_size" in err


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


def test_mtl_debug_shows_the_users_own_traceback_behind_a_task_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "raising_tasks.py").write_text(
        "from tasks.digits import Digits\n\n\nclass Raising(Digits):\n    def build_datasets(self):\n        raise ValueError('no data here')\n"
    )
    monkeypatch.chdir(tmp_path)
    args = ["validate", QUICKSTART, "--for", "train", "tasks.digits.name=raising_tasks:Raising"]
    monkeypatch.delenv("MTL_DEBUG", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no data here" in err and "Traceback" not in err
    monkeypatch.setenv("MTL_DEBUG", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "raising_tasks.py" in err and err.strip().splitlines()[-1].startswith("mtl: error:")
