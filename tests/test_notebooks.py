"""The notebooks run top to bottom on a kernel of this interpreter, and are kept without outputs."""

import json
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"
NAMES = ["quickstart", "define_a_task", "compare_regimes", "weighting_methods"]
KERNEL = "mtl-tests"
# Appended to the executed copy: which Python the kernel really ran.
PROBE = "import sys\nprint(sys.executable)\nprint(sys.prefix)"


def test_notebooks_are_listed_and_committed_without_outputs():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{path.name}, cell {i}: has outputs; clear them before committing "
                    f"(jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)})"
                )


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernel spec that starts this interpreter, so the notebooks run in this environment
    whatever kernels (a user-level "python3", another venv's) the machine has installed."""
    root = tmp_path_factory.mktemp("kernels")
    (root / KERNEL).mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": KERNEL, "language": "python"}
    (root / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(root)])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_specs, tmp_path, monkeypatch):
    # Each notebook on its own: a fresh runs directory, so nothing is read back from another.
    monkeypatch.setenv("MTL_NOTEBOOK_RUNS", str(tmp_path))
    # Tiny models are as fast on one thread, and two threads stall when another process holds a core.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    # The kernel starts in notebooks/, as Jupyter starts it; a cell that raises fails the test.
    try:
        NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        # A kernel manager passed in is not the client's to stop: left running, each kernel held about
        # 1 GB until pytest exited (four were alive at the end of a CI run).
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert nb.cells[-1].outputs[0]["text"].split() == [sys.executable, sys.prefix]
    assert any(tmp_path.iterdir()), "the notebook wrote no run under MTL_NOTEBOOK_RUNS"
