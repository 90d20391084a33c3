"""Golden tests of the published tables (paper_repro/published.py): each printed Δm% is
recomputed from the same table's printed per-task values with the project's Δm%
(mtl.report.delta_m) and must agree to printing precision, except the rows listed, with the
reason, in DEVIATIONS."""

from decimal import Decimal

import numpy as np
import pytest
from scipy.stats import rankdata

from mtl.report import delta_m
from paper_repro import published
from paper_repro.published import DEVIATIONS, MEAN_RANKS_RECOMPUTE, RECORD, REPRINT, TABLES, Row, Table, half_unit

WITH_VALUES = [t for t in TABLES if t.metrics and t.baseline is not None]
ROWS = [(t, m) for t in WITH_VALUES for m, r in t.rows.items() if r.delta_m is not None]


def rounding_box(table: Table, method: str, worst: bool) -> tuple[dict, dict]:
    """The method's and the baseline's values at one corner of their rounding intervals: each
    Δm% term s_k (M_m,k − M_b,k) / M_b,k (all printed values are positive) is lowest with the
    method's value at the worse end of its interval and the baseline's at the better end, so
    these two corners bound the Δm% over every pair of unrounded values that print as printed."""
    directions = table.directions()
    corner = {}
    for name, values in (("method", table.values(method)), ("baseline", table.values(None))):
        toward_worse = (name == "method") == worst
        corner[name] = {
            k: float(Decimal(v) + (half_unit(v) if (directions[k] == "min") == toward_worse else -half_unit(v)))
            for k, v in values.items()
        }
    return corner["method"], corner["baseline"]


def recomputed_drop(table: Table, method: str) -> tuple[float, float, float]:
    """Δm% as a drop (the papers' sign) from the printed values: (value, lowest, highest) over the
    rounding of every per-task and baseline value."""
    directions = table.directions()
    as_printed = delta_m({k: float(v) for k, v in table.values(method).items()},
                         {k: float(v) for k, v in table.values(None).items()}, directions)
    highest = -delta_m(*rounding_box(table, method, worst=True), directions)
    lowest = -delta_m(*rounding_box(table, method, worst=False), directions)
    return -as_printed, lowest, highest


def agrees(printed: str, lowest: float, highest: float) -> bool:
    """Whether the printed value's own rounding interval meets the recomputed interval."""
    p, h = Decimal(printed), half_unit(printed)
    return float(p - h) <= highest and float(p + h) >= lowest


@pytest.mark.parametrize("table,method", ROWS, ids=[f"{t.key}-{m}" for t, m in ROWS])
def test_printed_delta_m_follows_from_the_printed_values(table, method):
    value, lowest, highest = recomputed_drop(table, method)
    consistent = agrees(table.rows[method].delta_m, lowest, highest)
    listed = (table.key, method, "delta_m") in DEVIATIONS
    assert consistent != listed, (
        f"{table.key}, {method}: printed Δm% {table.rows[method].delta_m}, recomputed {value:.3f} "
        f"(rounding interval {lowest:.3f} to {highest:.3f}); "
        + ("listed in DEVIATIONS but consistent: remove it" if listed else "not consistent: fix the transcription or list it")
    )


def test_the_deviating_rows_are_far_outside_printing_precision():
    value, lowest, highest = recomputed_drop(published.NASH_MTL_NYUV2, "IMTL-G")
    # Printed -0.76: even the lowest Δm% the rounded values allow is more than 0.1 above it.
    assert round(value, 2) == -0.60 and lowest > -0.76 + 0.1
    assert recomputed_drop(published.FAMO_NYUV2, "IMTL-G")[0] == value


def test_the_recomputation_works_on_a_row_small_enough_to_check_by_hand():
    """One task, two metrics: accuracy 50 -> 55 (+10%), error 2.0 -> 2.5 (worse by 25%): a drop
    of (−10 + 25) / 2 = 7.5. Printed as whole numbers and one decimal, 50 stands for 49.5..50.5
    and 2.0 for 1.95..2.05, so the drop lies between about 3.70 and 11.42."""
    table = Table("hand", "Table 0", "toy", "here", (("t", "acc", "max"), ("t", "err", "min")), "50 2.0",
                  {"m": Row("55 2.5", None, "7.5")})
    value, lowest, highest = recomputed_drop(table, "m")
    assert value == pytest.approx(7.5)
    # Worst corner: method 54.5 and 2.55, baseline 50.5 and 1.95 -> (−(4/50.5) + 0.6/1.95) / 2.
    assert highest == pytest.approx(100 * (-(54.5 - 50.5) / 50.5 + (2.55 - 1.95) / 1.95) / 2)
    assert lowest == pytest.approx(100 * (-(55.5 - 49.5) / 49.5 + (2.45 - 2.05) / 2.05) / 2)
    assert agrees("7.5", lowest, highest) and agrees("11.4", lowest, highest) and not agrees("11.5", lowest, highest)


def test_famo_copies_nash_mtl_baselines_except_the_listed_rows():
    """FAMO's Appendix E: the baselines' numbers are taken from Nash-MTL's paper."""
    for nash, famo in ((published.NASH_MTL_NYUV2, published.FAMO_NYUV2), (published.NASH_MTL_CITYSCAPES, published.FAMO_CITYSCAPES)):
        assert famo.values(None) == nash.values(None)
        for method, row in nash.rows.items():
            same = [Decimal(a) for a in famo.rows[method].values.split()] == [Decimal(a) for a in row.values.split()]
            same = same and famo.rows[method].delta_m == row.delta_m
            assert same != ((famo.key, method, "values") in DEVIATIONS), (famo.key, method)


def test_imgrad_reprints_the_same_values_with_depth_rounded_to_two_decimals():
    from decimal import ROUND_HALF_UP

    def rounded(table, method):
        return {k: str(Decimal(v).quantize(Decimal("0.01"), ROUND_HALF_UP)) if k[0] == "depth" else v
                for k, v in table.values(method).items()}

    imgrad = published.IMGRAD_NYUV2
    assert imgrad.values(None) == rounded(published.FAMO_NYUV2, None)
    for method in imgrad.rows:
        ours = published.REPRINT_NAMES.get(method, method)
        if ours in published.FAMO_NYUV2.rows:
            assert imgrad.values(method) == rounded(published.FAMO_NYUV2, ours), method
    for method, row in published.IMGRAD_CITYSCAPES.rows.items():
        ours = published.REPRINT_NAMES.get(method, method)
        if ours in published.NASH_MTL_CITYSCAPES.rows:
            assert row.values == published.NASH_MTL_CITYSCAPES.rows[ours].values, method


def test_every_listed_deviation_names_a_printed_row():
    tables = {t.key: t for t in TABLES}
    for table, method, what in DEVIATIONS:
        assert method in tables[table].rows and what in ("delta_m", "values")


def mean_ranks(table: Table) -> np.ndarray:
    """Each method's rank per metric (1 = best, ties averaged) over the table's rows, averaged over the metrics."""
    directions = table.directions()
    values = np.array([[float(table.values(m)[k]) for k in directions] for m in table.rows])
    signs = np.array([-1.0 if d == "max" else 1.0 for d in directions.values()])
    return rankdata(values * signs, axis=0).mean(axis=1)


def test_mean_ranks_follow_from_the_printed_values_where_said():
    recomputable = []
    for table in WITH_VALUES:
        if all(r.mean_rank is not None for r in table.rows.values()):
            printed = np.array([float(r.mean_rank) for r in table.rows.values()])
            if np.all(np.abs(mean_ranks(table) - printed) <= 0.005 + 1e-9):
                recomputable.append(table.key)
    assert tuple(recomputable) == MEAN_RANKS_RECOMPUTE


def test_famo_celeba_columns_are_delta_m_then_mean_rank():
    """Mean ranks of n methods without ties average (n + 1) / 2: the column read as mean rank
    does (to printing precision), the one read as Δm% does not."""
    rows = published.FAMO_CELEBA.rows.values()
    ranks, deltas = [Decimal(r.mean_rank) for r in rows], [Decimal(r.delta_m) for r in rows]
    n = len(ranks)
    assert abs(sum(ranks) / n - Decimal(n + 1) / 2) <= Decimal("0.005")
    assert abs(sum(deltas) / n - Decimal(n + 1) / 2) > 1


def test_imgrad_reprints_famo_celeba_values_and_leaves_out_the_best():
    famo, imgrad = published.FAMO_CELEBA.rows, published.IMGRAD_CELEBA.rows
    assert all(famo[m].delta_m == r.delta_m for m, r in imgrad.items() if m != "IMGrad")
    assert set(famo) - set(imgrad) == {"GradDrop", "IMTL-G"}
    assert published.FAMO_CELEBA.best() == ["IMTL-G"]


def test_best_methods_of_record():
    """What the READMEs say: lowest printed Δm% FAMO on NYUv2 (Nash-MTL the lowest mean rank),
    UW on CityScapes, IMTL-G on CelebA."""
    assert published.best_of_record("NYUv2 (MTAN, 3 tasks)") == ["FAMO"]
    assert published.FAMO_NYUV2.best("mean_rank") == ["Nash-MTL"]
    assert published.best_of_record("CityScapes (MTAN, 2 tasks)") == ["UW"]
    assert published.best_of_record("CelebA (CNN, 40 tasks)") == ["IMTL-G"]


def test_reprint_column_stays_apart_and_every_record_row_is_shown():
    text = published.tables_markdown()
    for benchmark, tables in RECORD.items():
        for method in published.delta_m_of_record(benchmark):
            assert f"| {method} | " in text
        assert f"IMGrad {REPRINT[benchmark].number.split(' (')[0]}" in text
    assert "| IMTL-G | 0.84 | FAMO Table 3 (CelebA columns) | left out |" in text
    assert "| UW | 5.89 | Nash-MTL Table 3 | left out |" in text


def test_multi_mnist_study_quotes_sener_koltun_table_3():
    from paper_repro.multi_mnist.__main__ import PUBLISHED

    table = published.SENER_KOLTUN_MULTIMNIST
    names = {"equal": "Uniform scaling", "uncertainty": "Kendall et al. 2018", "gradnorm": "GradNorm", "mgda_ub": "Ours (MGDA-UB)"}
    assert PUBLISHED["single_task"] == tuple(float(v) for v in table.baseline.split())
    for ours, theirs in names.items():
        assert PUBLISHED[ours] == tuple(float(v) for v in table.rows[theirs].values.split())


def test_printed_values_of_record_not_the_reprint():
    """Nash-MTL's 5.59 for LS on NYUv2, not IMGrad's recomputed 5.46; MoCo, printed by neither
    paper, only in the reprint's column."""
    record = published.delta_m_of_record("NYUv2 (MTAN, 3 tasks)")
    assert record["LS"][0] == "5.59" and "MoCo" not in record
    assert "| MoCo | not printed | – | 0.16 |" in published.tables_markdown(["NYUv2 (MTAN, 3 tasks)"])


@pytest.mark.parametrize("readme,tables", [
    ("nyuv2", (published.NASH_MTL_NYUV2, published.FAMO_NYUV2)),
    ("nyuv2", (published.NASH_MTL_CITYSCAPES, published.FAMO_CITYSCAPES)),
    ("celeba", (published.FAMO_CELEBA,)),
    ("celeba", (published.SENER_KOLTUN_CELEBA,)),
    ("multi_mnist", (published.SENER_KOLTUN_MULTIMNIST,)),
])
def test_readmes_quote_the_tables_of_published_py(readme, tables):
    from paper_repro.common import STUDIES

    assert published.values_markdown(*tables) in (STUDIES / readme / "README.md").read_text()
