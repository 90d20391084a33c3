"""Mutated configs, as a user would write them, never end in a traceback, a hang, or a
clearly wrong value silently accepted.

Each example mutates ``configs/quickstart.yaml`` once (a deleted or misspelled key, a value
of the wrong type, out of range or not finite, damaged YAML) in the file or as a CLI
override, runs ``mtl validate`` in this process and classifies what happened:

  ok           exit 0, and the mutation is not clearly wrong
  clean        exit 2 with at most 3 lines on stderr and no "Traceback"
  unexpected   exit 1 with ``main``'s one line for an error no check foresaw (a bug to fix)
  traceback    an exception escaped ``main``, or stderr holds a traceback or more than 3 lines
  hang         no answer within ``TIMEOUT_S``
  accepted     exit 0 although the mutation is clearly wrong (see ``clearly_wrong``)

Mutations outside the ``compare`` node are made to the quickstart without that node (what
``mtl train`` runs, the cheaper check); mutations of the node itself keep it, so validate
judges the comparison. MTL_FUZZ_EXAMPLES sets the number of examples (CI: 50, about 90 s);
MTL_FUZZ_RECORD=FILE skips the assertions and records each example's outcome as a JSON line,
to count outcomes over a long run.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_harness import run_cli
from conftest import QUICKSTART

EXAMPLES = int(os.environ.get("MTL_FUZZ_EXAMPLES", "50"))
RECORD = os.environ.get("MTL_FUZZ_RECORD")
TIMEOUT_S = 60

FULL = yaml.safe_load(open(QUICKSTART))
FULL["logging"]["wandb"]["mode"] = "disabled"
TRAIN = {k: v for k, v in FULL.items() if k != "compare"}

# Keys the quickstart leaves at their defaults, with a valid value to start from.
ABSENT = {
    ("trainer", "grad_clip"): 1.0,
    ("trainer", "eval_batch_size"): 256,
    ("engine", "every"): 1,
    ("engine", "jacobian_chunk"): 0,
    ("engine", "affinity_every"): 0,
    ("trainer", "device_data_limit_mb"): 1024.0,
    ("trainer", "checkpoint_every"): 0,
    ("trainer", "keep_checkpoints"): 2,
    ("trainer", "num_workers"): 0,
    ("trainer", "precision"): "fp32",
    ("trainer", "optimizer", "weight_decay"): 0.0,
    ("trainer", "lr_schedule", "min_factor"): 0.0,
    ("trunk", "features"): 50,
    ("trunk", "dropout"): 0.5,
    ("trunk", "in_channels"): 1,
    ("tasks", "digits", "train_fraction"): 1.0,
    ("tasks", "digits", "val_fraction"): 0.1,
    ("tasks", "digits", "split_seed"): 0,
    ("tasks", "digits", "subset_seed"): 0,
    ("tasks", "mnist", "head"): {"name": "mlp", "hidden": [32]},
    ("tasks", "mnist", "head", "hidden"): [32],
    ("tasks", "mnist", "head", "dropout"): 0.0,
    ("scheduler", "tau"): 2.0,
    ("recipe", "probe_epochs"): 1,
    ("compare", "sources"): ["mnist"],
    ("compare", "stages"): {"target": {"trainer": {"epochs": 2}}},
    ("compare", "stages", "target"): {"trainer": {"epochs": 2}},
}
# Whole components swapped in, so that their own arguments get mutated too.
SWAPS = {
    ("scheduler",): {"name": "temperature", "tau": 2.0, "cap": 1000},
    ("trainer", "lr_schedule"): {"name": "step", "step_size": 10, "gamma": 0.5},
    ("recipe",): {"name": "layerwise_lr_decay", "decay": 0.5},
    ("tasks", "mnist", "head"): {"name": "mlp", "hidden": [32], "dropout": 0.1},
}

VALUES = [
    -1, 0, 1, 2, -0.5, 0.5, 1.5, 2.5, 2**32, 2**64, 10**12, 1e-3,
    math.nan, math.inf, -math.inf, True, False, None,
    "", "abc", "8", "0.5", [], [1, 2], [-4], [0], ["x"], {}, {"a": 5}, {"target": 5},
]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        out += [p for k, v in node.items() for p in _paths(v, (*prefix, k))]
    elif isinstance(node, list):
        out += [p for i, v in enumerate(node) for p in _paths(v, (*prefix, i))]
    return out


PATHS = [p for p in _paths(FULL) if p[0] != "compare"] + [p for p in ABSENT if p[0] != "compare"]
COMPARE_PATHS = [p for p in _paths(FULL) if p[0] == "compare"] + [p for p in ABSENT if p[0] == "compare"]

# -- the oracle: values that are wrong whatever the rest of the config -------------------

SEED, FRACTION, COUNT, NONNEG, POSITIVE, FACTOR, DROPOUT, SIZES = range(8)
RULES = [
    (r"seed|compare\.seeds\.\d+|tasks\.\w+\.(split|subset)_seed", SEED),
    (r"compare\.fractions\.\d+|tasks\.\w+\.train_fraction", FRACTION),
    (r"tasks\.\w+\.(val|test)_fraction", FACTOR),
    (r"trainer\.(epochs|batch_size|eval_batch_size|keep_checkpoints|steps_per_epoch)|engine\.every"
     r"|logging\.log_every|tasks\.digits\.size|trunk\.(features|in_channels)|recipe\.probe_epochs"
     r"|trainer\.lr_schedule\.step_size|scheduler\.cap", COUNT),
    (r"engine\.(jacobian_chunk|affinity_every)|trainer\.(checkpoint_every|num_workers|lr_schedule\.warmup_steps|device_data_limit_mb)"
     r"|trainer\.optimizer\.weight_decay", NONNEG),
    (r"trainer\.optimizer\.lr|trainer\.grad_clip|scheduler\.tau", POSITIVE),
    (r"trainer\.lr_schedule\.(min_factor|gamma)|recipe\.decay", FACTOR),
    (r"trunk\.dropout|tasks\.\w+\.head\.dropout", DROPOUT),
    (r"tasks\.\w+\.head\.hidden", SIZES),
]
NONEMPTY_LISTS = ("compare.fractions", "compare.seeds", "tasks.mnist.head.hidden")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _valid(kind: int, v: Any, key: str) -> bool:
    if v is None:
        return key in ("trainer.grad_clip", "trainer.steps_per_epoch", "scheduler.cap", "tasks.digits.subset_seed")
    if kind == SIZES:
        return isinstance(v, list) and bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)
    if isinstance(v, str):
        try:
            v = float(v)  # a number written as a string may be converted; the rules still apply
        except ValueError:
            return False
    if not _number(v) or not math.isfinite(v):
        return False
    return {
        SEED: float(v).is_integer() and 0 <= v < 2**32,
        FRACTION: 0 < v <= 1,
        COUNT: float(v).is_integer() and v >= 1,
        NONNEG: v >= 0,
        POSITIVE: v > 0,
        FACTOR: 0 <= v <= 1,
        DROPOUT: 0 <= v < 1,
    }[kind]


def clearly_wrong(mutation: dict) -> bool:
    """Whether exit 0 would accept a value that is wrong whatever the rest of the config."""
    if mutation["op"] == "misspell":
        return True
    if mutation["op"] != "set":
        return False
    key, value = ".".join(map(str, mutation["path"])), mutation["value"]
    if isinstance(value, float) and not math.isfinite(value):
        return True
    if key == "output_dir":
        return value is None or isinstance(value, (dict, list)) or not str(value).strip()
    if key in NONEMPTY_LISTS and value == []:
        return True
    for pattern, kind in RULES:
        if re.fullmatch(pattern, key):
            return not _valid(kind, value, key)
    return False


# -- applying a mutation ----------------------------------------------------------------


def _set(node: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        if isinstance(node, dict) and not isinstance(node.get(k), (dict, list)):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _misspell(key: str, i: int) -> str:
    i %= len(key)
    return key[:i] + key[i + 1 :] if len(key) > 2 else key + "x"


@st.composite
def mutations(draw) -> dict:
    compare = draw(st.integers(0, 7)) == 0
    paths = COMPARE_PATHS if compare else PATHS
    op = draw(st.sampled_from(["set", "set", "set", "delete", "misspell", "damage"]))
    if op == "damage":
        return {"op": op, "compare": compare, "at": draw(st.integers(0, 10**6)), "char": draw(st.sampled_from(list(":{}[]-,'\"\t#& ") + ["", "\n"]))}
    path = draw(st.sampled_from(paths))
    mutation = {"op": op, "compare": compare, "path": path, "override": draw(st.booleans())}
    if path in SWAPS and op == "set" and draw(st.booleans()):
        mutation["value"] = SWAPS[path]
        return mutation
    if op == "set":
        mutation["value"] = draw(st.sampled_from(VALUES))
    if op == "misspell":
        mutation["at"] = draw(st.integers(0, 50))
        mutation["override"] = False
        if not isinstance(path[-1], str):
            mutation["op"] = "delete"
    return mutation


def apply(mutation: dict, folder) -> list[str]:
    """Write the mutated config into ``folder``; the command line for ``mtl``."""
    raw = json.loads(json.dumps(FULL if mutation["compare"] else TRAIN))
    raw["output_dir"] = str(folder / "run")
    overrides: list[str] = []
    op = mutation["op"]
    path = mutation.get("path")
    if op == "set" and mutation["override"]:
        overrides.append(f"{_dotted(path)}={_yaml(mutation['value'])}")
    elif op == "set":
        _set(raw, path, mutation["value"])
    elif op == "delete" and mutation["override"]:
        overrides.append(f"~{_dotted(path)}")
    elif op == "delete":
        parent = raw
        for k in path[:-1]:
            parent = parent.get(k, {}) if isinstance(parent, dict) else parent[k]
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif isinstance(parent, list) and path[-1] < len(parent):
            parent.pop(path[-1])
    elif op == "misspell":
        parent = raw
        for k in path[:-1]:
            parent = parent.setdefault(k, {}) if isinstance(parent, dict) else parent[k]
        old = path[-1]
        new = _misspell(old, mutation["at"])
        value = parent.pop(old, ABSENT.get(path))
        parent[new] = value
    text = yaml.safe_dump(raw, sort_keys=False)
    if op == "damage":
        at = mutation["at"] % (len(text) + 1)
        text = text[:at] + mutation["char"] + text[at + 1 :]
    config = folder / "config.yaml"
    config.write_text(text)
    return ["validate", str(config), *overrides]


def run(argv: list[str]) -> tuple[str, int | None, str]:
    """(outcome without the oracle: ok, clean, unexpected, traceback or hang; exit code; stderr)."""
    r = run_cli(argv, TIMEOUT_S)
    if r.hang:
        return "hang", None, r.stderr
    if r.escaped:
        return "traceback", None, r.stderr + r.escaped
    if r.code == 0:
        return "ok", 0, r.stderr
    if r.one_clear_error():
        return "clean", 2, r.stderr
    if r.code == 1 and len(r.lines) == 1 and "unexpected" in r.stderr and "MTL_DEBUG=1" in r.stderr:
        return "unexpected", 1, r.stderr
    return "traceback", r.code, r.stderr


def outcome(mutation: dict, folder) -> tuple[str, str]:
    result, code, err = run(apply(mutation, folder))
    return ("accepted" if result == "ok" and clearly_wrong(mutation) else result), err


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _outcome_in_fresh_folder(mutation, tmp_path_factory, monkeypatch) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(folder)  # relative paths a mutation writes stay out of the repository
    return outcome(mutation, folder)


@pytest.mark.slow
@pytest.mark.skipif(bool(RECORD), reason="MTL_FUZZ_RECORD is set: test_record_outcomes records, nothing is asserted")
@FUZZ
@given(mutation=mutations())
def test_mutated_configs_get_a_run_or_one_clear_error(mutation, tmp_path_factory, one_thread, monkeypatch):
    result, err = _outcome_in_fresh_folder(mutation, tmp_path_factory, monkeypatch)
    assert result in ("ok", "clean"), f"{result}: {mutation}\n{err}"


@pytest.mark.slow
@pytest.mark.skipif(not RECORD, reason="set MTL_FUZZ_RECORD=FILE to record each example's outcome")
@FUZZ
@given(mutation=mutations())
def test_record_outcomes(mutation, tmp_path_factory, one_thread, monkeypatch):
    result, err = _outcome_in_fresh_folder(mutation, tmp_path_factory, monkeypatch)
    with open(RECORD, "a") as f:
        f.write(json.dumps({"mutation": mutation, "outcome": result, "stderr": err[-600:]}, default=repr) + "\n")
