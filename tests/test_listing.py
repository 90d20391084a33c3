"""`mtl list`: every registered component, read from the source without importing torch."""

import json
import subprocess
import sys

import pytest

from mtl.cli import main
from mtl.listing import KINDS, registry, summaries, summary
from mtl.registry import ComponentError, Registry

from conftest import ROOT

ALL = [(kind, name) for kind in sorted(KINDS) for name in registry(kind).names()]


def test_static_index_equals_the_live_registries():
    # The source-only index must never drift from what the registries hold after import. A fresh
    # interpreter: tests register their own plugins (my_plugin:MyDigits) in this one.
    code = "import json; from mtl.listing import KINDS, registry; print(json.dumps({k: registry(k).describe() for k in KINDS}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    live = json.loads(done.stdout.strip().splitlines()[-1])
    assert {kind: [list(row) for row in summaries(kind)] for kind in KINDS} == live


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_list_prints_every_registered_name_with_a_description(kind, capsys):
    assert main(["list", kind]) == 0
    lines = capsys.readouterr().out.strip().split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in lines] == [name for name, _ in summaries(kind)]
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines), "every entry needs a docstring"


def test_list_covers_the_issue_components(capsys):
    main(["list", "trunks"])
    trunks = capsys.readouterr().out
    for name in ("seed_net", "multi_lenet", "mlp", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "timm"):
        assert f"\n{name} " in "\n" + trunks


def test_summary_is_the_whole_first_paragraph():
    doc = """Gradient surgery: project each task gradient off
    the others it conflicts with.

    Yu et al. 2020."""
    assert summary(doc) == "Gradient surgery: project each task gradient off the others it conflicts with."


@pytest.mark.parametrize("kind,name", ALL)
def test_list_kind_name_explains_every_component(kind, name, capsys):
    assert main(["list", kind, name]) == 0
    out = capsys.readouterr().out
    builder = registry(kind).get(name)
    assert out.startswith(f"{name}  (") and builder.__qualname__ in out.splitlines()[0]
    assert dict(summaries(kind))[name].split(" (see")[0] in " ".join(out.split())


def test_list_kind_name_shows_defaults_and_the_paper(capsys):
    assert main(["list", "schedulers", "temperature"]) == 0
    out = capsys.readouterr().out
    assert "scheduler.name: temperature" in out and "default" in out
    assert main(["list", "weightings", "pcgrad"]) == 0
    out = capsys.readouterr().out
    assert "Yu et al. 2020" in out and "seed: int  (default 0)" in out
    assert "tasks: " not in out, "the framework supplies the task names; they are no config argument"


def test_unknown_name_or_kind_gets_one_line(capsys):
    assert main(["list", "weightings", "pcgard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and "Did you mean 'pcgrad'" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["list", "weighting"])


def test_list_does_not_import_torch():
    code = "import sys; from mtl.cli import main; main(['list', 'weightings']); assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "mtl", "list", "heads"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "linear" in done.stdout


@pytest.mark.parametrize("shadow", ["tasks.py", "tasks/__init__.py"])
def test_a_tasks_module_in_the_working_directory_does_not_hide_the_task_library(tmp_path, shadow):
    (tmp_path / shadow).parent.mkdir(exist_ok=True)
    (tmp_path / shadow).write_text("MINE = True\n")
    code = "import sys; sys.path.insert(0, '.'); from mtl.task import TASKS; print(len(TASKS.names()), 'mnist' in TASKS)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    count, has_mnist = done.stdout.split()
    assert int(count) > 10 and has_mnist == "True"


def test_a_user_module_already_named_tasks_is_named_in_the_error(tmp_path):
    (tmp_path / "tasks.py").write_text("MINE = True\n")
    code = "import sys; sys.path.insert(0, '.'); import tasks; from mtl.task import TASKS; TASKS.names()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "ComponentError" in last and str(tmp_path / "tasks.py") in last and "rename your tasks.py" in last


def test_a_builtin_module_that_registers_nothing_is_an_error():
    # mtl.listing is one of mtl's own modules and imports fine; registering nothing is what fails.
    empty = Registry("widget", object, builtins=("mtl.listing",))
    with pytest.raises(ComponentError, match="registered no widget"):
        empty.names()


@pytest.mark.parametrize(
    "kind,path",
    [("schedulers", "mtl.scheduler:TaskScheduler"), ("weightings", "mtl.weighting.base:GramianWeighting"), ("weightings", "mtl.weighting.surgery:_PairwiseSurgery")],
)
def test_a_base_class_by_import_path_is_refused(kind, path):
    with pytest.raises(ComponentError, match="base class of mtl"):
        registry(kind).get(path)


def test_a_registered_class_by_import_path_is_accepted():
    from mtl.weighting.surgery import PCGrad

    assert registry("weightings").get("mtl.weighting.surgery:PCGrad") is PCGrad


def test_builtins_imported_before_the_registry_is_read_still_count():
    # Importing one task module first (as paper_repro does) registers the whole library early.
    code = "import tasks.fashion_mnist; from mtl.task import TASKS; print(len(TASKS.names()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 10
