import subprocess
import sys

import pytest

from mtl.cli import LISTS, main
from mtl.registry import import_path

from conftest import QUICKSTART, ROOT, quick


@pytest.mark.parametrize("kind", sorted(LISTS))
def test_list_prints_every_registered_name_with_a_description(kind, capsys):
    assert main(["list", kind]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = import_path(LISTS[kind]).names()
    assert [l.split()[0] for l in lines] == names
    assert all(len(l.split(maxsplit=1)) == 2 for l in lines), "every entry needs a one-line docstring"


def test_list_covers_the_issue_components(capsys):
    main(["list", "trunks"])
    trunks = capsys.readouterr().out
    for name in ("seed_net", "multi_lenet", "mlp", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "timm"):
        assert f"\n{name} " in "\n" + trunks


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
