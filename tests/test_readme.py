"""The README's custom-task example works as printed."""

import json
import re

from mtl.cli import main

from conftest import QUICKSTART, ROOT, quick


def test_readme_task_example_trains_by_import_path(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(# my_tasks.py\n.*?)```", readme, re.S).group(1)
    assert len(block.splitlines()) <= 30
    (tmp_path / "my_tasks.py").write_text(block)
    monkeypatch.chdir(tmp_path)
    command = re.search(r"mtl train configs/quickstart.yaml (tasks\.parity\.name=\S+)", readme).group(1)
    assert main(["train", QUICKSTART, command, *quick(tmp_path / "run", 1, 30)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["tasks"]) == {"mnist", "digits", "parity"}
    assert results["tasks"]["parity"]["directions"]["accuracy"] == "max"
    # 30 steps of the shared CNN are enough to beat chance (0.5) on parity.
    assert results["splits"]["test"]["parity"]["accuracy"] > 0.6
