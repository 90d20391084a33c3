"""The step benchmark (``python -m mtl.bench.step``) on CPU with tiny settings: every requested
row is timed, and the ratio columns are the row's time over the reference rows' times."""

import json
import math

import pytest

from mtl.bench import step as bench


def test_bench_step_tiny_cpu_run(tmp_path, capsys):
    # One thread: on a shared 2-core machine, two OpenMP threads slow down several-fold when
    # another process holds a core.
    out = tmp_path / "bench.json"
    rows = bench.main(
        [
            "--device", "cpu", "--tasks", "2", "--batch", "4", "--size", "32",
            "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--methods", "equal", "mgda_ub", "naive", "--out", str(out),
        ]
    )  # fmt: skip
    expected = [("single", "-", 1), ("naive", "loop", 2), ("equal", "loss", 2), ("mgda_ub", "representation", 2)]
    assert [(r["method"], r["mode"], r["tasks"]) for r in rows] == expected
    for r in rows:
        assert r["error"] is None, r
        assert math.isfinite(r["ms"]) and r["ms"] > 0
    single = rows[0]["ms"]
    assert rows[0]["ratio_single"] == pytest.approx(1.0)
    for r in rows:
        assert r["ratio_single"] == pytest.approx(r["ms"] / single)
    naive = rows[1]["ms"]
    assert rows[3]["ratio_naive"] == pytest.approx(rows[3]["ms"] / naive)
    assert rows[2]["ratio_naive"] is None  # loss-level rows have no naive ratio
    assert all(r["peak_mib"] is None for r in rows)  # peak memory is CUDA-only

    printed = capsys.readouterr().out
    table = [line.split() for line in printed.splitlines()]
    for r in rows:
        line = next(cells for cells in table if cells[:3] == [r["method"], r["mode"], str(r["tasks"])])
        assert float(line[3]) == pytest.approx(r["ms"], abs=0.051)
        assert float(line[4]) == pytest.approx(r["ratio_single"], abs=0.0051)
        assert float(line[4]) == pytest.approx(float(line[3]) / single, rel=0.01, abs=0.01)

    saved = json.loads(out.read_text())
    assert saved["rows"] == rows
    assert saved["settings"]["batch"] == 4


def test_bench_step_unknown_method_lists_the_available_ones(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--methods", "pcgard"])
    err = capsys.readouterr().err
    assert "pcgard" in err and "pcgrad" in err and "naive" in err


def test_bench_step_plan_adds_representation_rows_where_the_method_allows_it():
    rows = bench.plan(["mgda", "gradnorm", "graddrop", "equal", "naive"], [2, 10])
    assert rows[:5] == [
        ("naive", "loop", 2),
        ("mgda", "parameters", 2),
        ("mgda", "representation", 2),
        ("gradnorm", "last_shared", 2),
        ("graddrop", "representation", 2),
    ]
    assert rows[5] == ("equal", "loss", 2)
    assert len(rows) == 12


def test_bench_step_plan_times_both_gramian_paths_on_request():
    rows = bench.plan(["upgrad", "mgda", "graddrop"], [2], gramian="both")
    assert rows == [
        ("upgrad", "parameters", 2),
        ("upgrad", "parameters/J", 2),
        ("upgrad", "representation", 2),  # J there is [T, batch·features]: nothing to stage
        ("mgda", "parameters", 2),
        ("mgda", "parameters/J", 2),
        ("mgda", "representation", 2),
        ("graddrop", "representation", 2),  # needs J itself
    ]
    assert bench.plan(["upgrad"], [2], gramian="jacobian") == [("upgrad", "parameters/J", 2), ("upgrad", "representation", 2)]


def test_bench_step_times_the_trainers_own_step(monkeypatch):
    """Every weighting's row runs ``mtl.step.Step.step``, the step ``Trainer`` calls, not a copy of it."""
    from mtl.step import Step

    calls = []
    real = Step.step

    def counted(self, inputs, targets):
        calls.append(type(self).__name__)
        return real(self, inputs, targets)

    monkeypatch.setattr(Step, "step", counted)
    args = ["--device", "cpu", "--tasks", "2", "--batch", "2", "--size", "16", "--repeats", "2", "--warmup", "1", "--threads", "1"]
    rows = bench.main([*args, "--methods", "equal", "famo", "pcgrad"])
    assert all(r["error"] is None for r in rows)
    kinds = [("LossStep" if r["mode"] == "loss" else "EngineStep") for r in rows[1:]]
    assert [r["method"] for r in rows[1:]][:3] == ["equal", "famo", "pcgrad"]
    assert calls == [kind for kind in kinds for _ in range(3)]  # one warmup and two timed steps a row


def test_bench_architectures_tiny_cpu_run(capsys):
    """Every row times the trainer's step; ratios are against hard sharing at the same T."""
    from mtl.bench import architectures

    architectures.main(["--tasks", "2", "--batch", "4", "--repeats", "1", "--threads", "1", "--architectures", "mmoe", "cross_stitch", "--loop"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    names = [" ".join(row[1:-6]) for row in rows]
    assert names == ["hard", "cross_stitch vmap", "cross_stitch loop", "mmoe"]
    numbers = [[float(v.replace(",", "")) for v in row[-6:]] for row in rows]  # params, x, ms, x, peak MiB, x
    assert [numbers[0][i] for i in (1, 3, 5)] == [1.0, 1.0, 1.0]
    for n in numbers:
        assert n[2] > 0 and n[4] > 0
        assert n[1] == pytest.approx(n[0] / numbers[0][0], abs=0.01)


def test_bench_architectures_unknown_name_lists_the_registered_ones(capsys):
    from mtl.bench import architectures

    with pytest.raises(SystemExit):
        architectures.main(["--architectures", "mmeo"])
    assert "unknown architecture(s) mmeo; registered: cgc, cross_stitch" in capsys.readouterr().err


def test_bench_trunks_times_fine_tune_probe_and_the_cache_on_a_real_batch(tmp_path, capsys):
    from mtl.bench import trunks

    out = tmp_path / "trunks.json"
    rows = trunks.main(["--case", "{trunk: {name: seed_net}, task: {name: digits, size: 28}}", "--batch", "4",
                        "--rounds", "2", "--threads", "1", "--out", str(out)])
    assert [r["row"] for r in rows] == ["fine_tune", "probe", "cached"]
    assert all(r["batch"] == 4 and r["ms"] > 0 for r in rows)
    ms = {r["row"]: r["ms"] for r in rows}
    for r in rows:
        assert r["vs_fine_tune"] == pytest.approx(r["ms"] / ms["fine_tune"], rel=1e-2)
    assert rows[2]["probe_vs_cached"] == pytest.approx(ms["probe"] / ms["cached"], rel=0.05)
    written = json.loads(out.read_text())
    assert written["rows"] == rows and written["settings"]["threads"] == 1 and written["settings"]["batch"] == 4
    assert "{name: seed_net} on digits" in capsys.readouterr().out


def test_bench_trunks_bad_case_names_the_form():
    from mtl.bench import trunks

    with pytest.raises(SystemExit, match="trunk and task"):
        trunks.main(["--case", "seed_net"])
