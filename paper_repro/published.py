"""Published tables of the MTL papers this project compares with, as printed, one object per
table, with the paper, the table number and where the numbers were read.

Every value is a string exactly as the table prints it, so its printing precision (the number
of decimals) is kept: ``tests/test_published_tables.py`` recomputes each printed Δm% from the
printed per-task values and the single-task row with the project's Δm% (``mtl.report.delta_m``)
and checks it to that precision, listing the rows where a paper's own numbers disagree
(``DEVIATIONS``).

Sign: these papers print Δm% as a performance DROP (Navon et al. 2022, §6; lower is better);
``mtl.report.delta_m`` is the same formula with the opposite sign (higher is better).

Where the numbers were read (this machine has no web): text extractions of the papers' PDFs
held in the public code index that this project's sessions search (``find_string``, then
``read_file`` by the file id given in each ``source``). The Nash-MTL extraction splits the
NYUv2 table's numbers at the decimal point into separate cells, put back together here; the
other tables came out whole. Two checks of the transcription: Nash-MTL's and FAMO's tables were read from separate extractions and FAMO
copies Nash-MTL's rows, so every copied value is compared (one row differs in the papers
themselves, listed below); and a per-task value misread by more than about 0.3% (NYUv2) or 1%
(CityScapes) of its size moves the recomputed Δm% beyond the printed one. Nothing is filled in
that was not read: a table that prints no per-task values has none here.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

# (task, metric, direction) of each column, in the order the papers print them; the names are
# those of tasks/nyuv2.py where the task exists here.
NYUV2_METRICS = (
    ("semantic", "miou", "max"), ("semantic", "pixel_acc", "max"),
    ("depth", "abs_err", "min"), ("depth", "rel_err", "min"),
    ("normal", "mean_angle", "min"), ("normal", "median_angle", "min"),
    ("normal", "within_11_25", "max"), ("normal", "within_22_5", "max"), ("normal", "within_30", "max"),
)  # fmt: skip
CITYSCAPES_METRICS = (
    ("semantic", "miou", "max"), ("semantic", "pixel_acc", "max"), ("depth", "abs_err", "min"), ("depth", "rel_err", "min"),
)
MULTIMNIST_METRICS = (("left", "accuracy", "max"), ("right", "accuracy", "max"))

NASH_MTL = "Navon et al. 2022, Multi-Task Learning as a Bargaining Game (Nash-MTL), ICML 2022, arXiv 2202.01017"
FAMO = "Liu et al. 2023, FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023, arXiv 2306.03792"
IMGRAD = "Zhou et al. 2025, Injecting Imbalance Sensitivity for Multi-Task Learning (IMGrad), IJCAI 2025, arXiv 2503.08006"
SENER_KOLTUN = "Sener & Koltun 2018, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018, arXiv 1810.04650"

NASH_MTL_TEXT = "text extraction of the ICML paper in the public code index (read_file id 59652940709)"
FAMO_TEXT = "text extraction of the NeurIPS paper in the public code index (read_file id 59407772926)"
IMGRAD_TEXT = "text extraction of the IJCAI paper in the public code index (read_file id 68801583675)"
SENER_KOLTUN_TEXT = "page-by-page PDF text of the NeurIPS paper in the public code index (read_file id 52686274209)"


@dataclass(frozen=True)
class Row:
    """One printed row: per-task values (space-separated, in the table's column order), mean
    rank and Δm% (a drop), each as printed; None where the table prints none."""

    values: str | None = None
    mean_rank: str | None = None
    delta_m: str | None = None


@dataclass(frozen=True)
class Table:
    """One printed table. ``baseline`` is its single-task row; ``rows`` every other row, in
    the printed order, under the paper's own method names."""

    paper: str
    number: str
    benchmark: str
    source: str
    metrics: tuple[tuple[str, str, str], ...]
    baseline: str | None
    rows: dict[str, Row]
    note: str = ""

    @property
    def cite(self) -> str:
        return f"{self.paper}, {self.number}"

    @property
    def key(self) -> str:
        """Short name: "Nash-MTL Table 2"."""
        return f"{SHORT[self.paper]} {self.number}"

    def values(self, method: str) -> dict[tuple[str, str], str]:
        """The (task, metric) -> printed value of ``method``, or of the single-task row for
        ``method=None``."""
        text = self.baseline if method is None else self.rows[method].values
        if text is None:
            raise ValueError(f"{self.cite} prints no per-task values for {method or 'single-task'}")
        cells = text.split()
        if len(cells) != len(self.metrics):
            raise ValueError(f"{self.cite}, {method or 'single-task'}: {len(cells)} values for {len(self.metrics)} columns")
        return {(t, m): v for (t, m, _), v in zip(self.metrics, cells)}

    def directions(self) -> dict[tuple[str, str], str]:
        return {(t, m): d for t, m, d in self.metrics}

    def best(self, by: str = "delta_m") -> list[str]:
        """The methods with the lowest printed Δm% (``by="delta_m"``) or mean rank, ties kept."""
        printed = {m: Decimal(getattr(r, by)) for m, r in self.rows.items() if getattr(r, by) is not None}
        low = min(printed.values())
        return [m for m, v in printed.items() if v == low]


def half_unit(printed: str) -> Decimal:
    """Half a unit of the last printed digit: the rounding error of a printed value."""
    return Decimal(1).scaleb(Decimal(printed).as_tuple().exponent) / 2


# ---------------------------------------------------------------- Nash-MTL (Navon et al. 2022)

NASH_MTL_NYUV2 = Table(
    NASH_MTL, "Table 2", "NYUv2 (MTAN, 3 tasks)", NASH_MTL_TEXT, NYUV2_METRICS,
    "38.30 63.76 0.6754 0.2780 25.01 19.21 30.14 57.20 69.15",
    {
        "LS": Row("39.29 65.33 0.5493 0.2263 28.15 23.96 22.09 47.50 61.08", "8.11", "5.59"),
        "SI": Row("38.45 64.27 0.5354 0.2201 27.60 23.37 22.53 48.57 62.32", "7.11", "4.39"),
        "RLW": Row("37.17 63.77 0.5759 0.2410 28.27 24.18 22.26 47.05 60.62", "10.11", "7.78"),
        "DWA": Row("39.11 65.31 0.5510 0.2285 27.61 23.18 24.17 50.18 62.39", "6.88", "3.57"),
        "UW": Row("36.87 63.17 0.5446 0.2260 27.04 22.61 23.54 49.05 63.65", "6.44", "4.05"),
        "MGDA": Row("30.47 59.90 0.6070 0.2555 24.88 19.45 29.18 56.88 69.36", "5.44", "1.38"),
        "PCGrad": Row("38.06 64.64 0.5550 0.2325 27.41 22.80 23.86 49.83 63.14", "6.88", "3.97"),
        "GradDrop": Row("39.39 65.12 0.5455 0.2279 27.48 22.96 23.38 49.44 62.87", "6.44", "3.58"),
        "CAGrad": Row("39.79 65.49 0.5486 0.2250 26.31 21.58 25.61 52.36 65.58", "3.77", "0.20"),
        "IMTL-G": Row("39.35 65.60 0.5426 0.2256 26.02 21.19 26.20 53.13 66.24", "3.11", "-0.76"),
        "Nash-MTL": Row("40.13 65.93 0.5261 0.2171 25.26 20.08 28.40 55.47 68.15", "1.55", "-4.04"),
    },
    note="The extraction drops a trailing zero in two cells (IMTL-G 26.2, Nash-MTL 28.4); FAMO's reprint of "
    "the same rows prints 26.20 and 28.40.",
)

NASH_MTL_CITYSCAPES = Table(
    NASH_MTL, "Table 3", "CityScapes (MTAN, 2 tasks)", NASH_MTL_TEXT, CITYSCAPES_METRICS,
    "74.01 93.16 0.0125 27.77",
    {
        "LS": Row("75.18 93.49 0.0155 46.77", "6.12", "22.60"),
        "SI": Row("70.95 91.73 0.0161 33.83", "8.00", "14.11"),
        "RLW": Row("74.57 93.41 0.0158 47.79", "9.25", "24.38"),
        "DWA": Row("75.24 93.52 0.0160 44.37", "6.00", "21.45"),
        "UW": Row("72.02 92.85 0.0140 30.13", "5.25", "5.89"),
        "MGDA": Row("68.84 91.54 0.0309 33.50", "8.75", "44.14"),
        "PCGrad": Row("75.13 93.48 0.0154 42.07", "6.37", "18.29"),
        "GradDrop": Row("75.27 93.53 0.0157 47.54", "5.50", "23.73"),
        "CAGrad": Row("75.16 93.48 0.0141 37.60", "5.37", "11.64"),
        "IMTL-G": Row("75.33 93.49 0.0135 38.41", "3.62", "11.10"),
        "Nash-MTL": Row("75.41 93.66 0.0129 35.02", "1.75", "6.82"),
    },
)

# ---------------------------------------------------------------- FAMO (Liu et al. 2023)

FAMO_NYUV2 = Table(
    FAMO, "Table 1", "NYUv2 (MTAN, 3 tasks)", FAMO_TEXT, NYUV2_METRICS,
    "38.30 63.76 0.6754 0.2780 25.01 19.21 30.14 57.20 69.15",
    {
        "LS": Row("39.29 65.33 0.5493 0.2263 28.15 23.96 22.09 47.50 61.08", "8.89", "5.59"),
        "SI": Row("38.45 64.27 0.5354 0.2201 27.60 23.37 22.53 48.57 62.32", "7.89", "4.39"),
        "RLW": Row("37.17 63.77 0.5759 0.2410 28.27 24.18 22.26 47.05 60.62", "11.22", "7.78"),
        "DWA": Row("39.11 65.31 0.5510 0.2285 27.61 23.18 24.17 50.18 62.39", "7.67", "3.57"),
        "UW": Row("36.87 63.17 0.5446 0.2260 27.04 22.61 23.54 49.05 63.65", "7.44", "4.05"),
        "MGDA": Row("30.47 59.90 0.6070 0.2555 24.88 19.45 29.18 56.88 69.36", "6.00", "1.38"),
        "PCGrad": Row("38.06 64.64 0.5550 0.2325 27.41 22.80 23.86 49.83 63.14", "8.00", "3.97"),
        "GradDrop": Row("39.39 65.12 0.5455 0.2279 27.48 22.96 23.38 49.44 62.87", "7.00", "3.58"),
        "CAGrad": Row("39.79 65.49 0.5486 0.2250 26.31 21.58 25.61 52.36 65.58", "4.56", "0.20"),
        "IMTL-G": Row("39.35 65.60 0.5426 0.2256 26.02 21.19 26.20 53.13 66.24", "3.78", "-0.76"),
        "Nash-MTL": Row("40.13 65.93 0.5261 0.2171 25.26 20.08 28.40 55.47 68.15", "2.11", "-4.04"),
        "FAMO": Row("38.88 64.90 0.5474 0.2194 25.06 19.57 29.21 56.61 68.98", "3.44", "-4.10"),
    },
    note="FAMO's Appendix E: the baselines' numbers are taken from Nash-MTL; the mean ranks differ from "
    "Nash-MTL's Table 2 because FAMO's row enters the ranking.",
)

FAMO_CITYSCAPES = Table(
    FAMO, "Table 3 (CityScapes columns)", "CityScapes (MTAN, 2 tasks)", FAMO_TEXT, CITYSCAPES_METRICS,
    "74.01 93.16 0.0125 27.77",
    {
        "LS": Row("70.95 91.73 0.0161 33.83", "6.50", "14.11"),
        "SI": Row("70.95 91.73 0.0161 33.83", "9.25", "14.11"),
        "RLW": Row("74.57 93.41 0.0158 47.79", "9.25", "24.38"),
        "DWA": Row("75.24 93.52 0.0160 44.37", "6.50", "21.45"),
        "UW": Row("72.02 92.85 0.0140 30.13", "6.00", "5.89"),
        "MGDA": Row("68.84 91.54 0.0309 33.50", "9.75", "44.14"),
        "PCGrad": Row("75.13 93.48 0.0154 42.07", "6.75", "18.29"),
        "GradDrop": Row("75.27 93.53 0.0157 47.54", "6.00", "23.73"),
        "CAGrad": Row("75.16 93.48 0.0141 37.60", "5.75", "11.64"),
        "IMTL-G": Row("75.33 93.49 0.0135 38.41", "4.00", "11.10"),
        "Nash-MTL": Row("75.41 93.66 0.0129 35.02", "2.00", "6.82"),
        "FAMO": Row("74.54 93.29 0.0145 32.59", "6.25", "8.13"),
    },
    note="FAMO's LS row repeats the SI row (values and Δm%), where Nash-MTL's Table 3, the stated source of "
    "the baselines, prints LS as 75.18 93.49 0.0155 46.77, Δm% 22.60 (see DEVIATIONS).",
)

# The extraction heads these two columns "MR, Δm%" but lists the Δm% values first: the second
# column is the mean rank, since its values average to (12 + 1) / 2 = 6.50 over the 12 methods
# as mean ranks without ties must (tests/test_published_tables.py), and the first column is
# the one IMGrad's Table 4 reprints as Δm%.
FAMO_CELEBA = Table(
    FAMO, "Table 3 (CelebA columns)", "CelebA (CNN, 40 tasks)", FAMO_TEXT, (), None,
    {
        "LS": Row(None, "6.28", "4.15"),
        "SI": Row(None, "7.83", "7.20"),
        "RLW": Row(None, "5.22", "1.46"),
        "DWA": Row(None, "6.95", "3.20"),
        "UW": Row(None, "5.78", "3.23"),
        "MGDA": Row(None, "10.93", "14.85"),
        "PCGrad": Row(None, "6.65", "3.17"),
        "GradDrop": Row(None, "7.80", "3.29"),
        "CAGrad": Row(None, "6.20", "2.48"),
        "IMTL-G": Row(None, "4.67", "0.84"),
        "Nash-MTL": Row(None, "4.97", "2.84"),
        "FAMO": Row(None, "4.72", "1.21"),
    },
    note="No per-attribute values are printed. The metric is each attribute's positive-class F1, the "
    "epoch chosen by the mean validation F1 (FAMO's code: Cranial-XIX/FAMO experiments/celeba/trainer.py, "
    "CelebaMetrics and best_val_f1).",
)

# ---------------------------------------------------------------- IMGrad (Zhou et al. 2025): a later reprint

IMGRAD_NYUV2 = Table(
    IMGRAD, "Table 3", "NYUv2 (MTAN, 3 tasks)", IMGRAD_TEXT, NYUV2_METRICS,
    "38.30 63.76 0.68 0.28 25.01 19.21 30.14 57.20 69.15",
    {
        "LS": Row("39.29 65.33 0.55 0.23 28.15 23.96 22.09 47.50 61.08", None, "5.46"),
        "RLW": Row("37.17 63.77 0.58 0.24 28.27 24.18 22.26 47.05 60.62", None, "7.67"),
        "DWA": Row("39.11 65.31 0.55 0.23 27.61 23.18 24.17 50.18 62.39", None, "3.49"),
        "MGDA": Row("30.47 59.90 0.61 0.26 24.88 19.45 29.18 56.88 69.36", None, "1.47"),
        "GradDrop": Row("39.39 65.12 0.55 0.23 27.48 22.96 23.38 49.44 62.87", None, "3.61"),
        "PCGrad": Row("38.06 64.64 0.56 0.23 27.41 22.80 23.86 49.83 63.14", None, "3.83"),
        "CAGrad": Row("39.79 65.49 0.55 0.23 26.31 21.58 25.61 52.36 65.58", None, "0.29"),
        "IMTL": Row("39.35 65.60 0.54 0.23 26.02 21.19 26.20 53.13 66.24", None, "-0.59"),
        "Nash-MTL": Row("40.13 65.93 0.53 0.22 25.26 20.08 28.40 55.47 68.15", None, "-4.04"),
        "MoCo": Row("40.30 66.07 0.56 0.21 26.67 21.83 25.61 51.78 64.85", None, "0.16"),
        "FAMO": Row("38.88 64.90 0.55 0.22 25.06 19.57 29.21 56.61 68.98", None, "-4.10"),
        "IMGrad": Row("40.20 66.19 0.52 0.22 25.15 19.94 28.69 55.80 68.44", None, "-4.57"),
    },
    note="Depth errors to 2 decimals; the Δm% of LS, RLW, DWA, MGDA, GradDrop, PCGrad, CAGrad and IMTL differ "
    "from Nash-MTL's Table 2 (up to 0.17), those of Nash-MTL and FAMO are theirs. SI and UW are left out.",
)

IMGRAD_CITYSCAPES = Table(
    IMGRAD, "Table 2", "CityScapes (MTAN, 2 tasks)", IMGRAD_TEXT, CITYSCAPES_METRICS,
    "74.01 93.16 0.0125 27.77",
    {
        "LS": Row("75.18 93.49 0.0155 46.77", None, "22.60"),
        "RLW": Row("74.57 93.41 0.0158 47.79", None, "24.37"),
        "DWA": Row("75.24 93.52 0.0160 44.37", None, "21.43"),
        "MGDA": Row("68.84 91.54 0.0309 33.50", None, "44.14"),
        "GradDrop": Row("75.27 93.53 0.0157 47.54", None, "23.67"),
        "PCGrad": Row("75.13 93.48 0.0154 42.07", None, "18.21"),
        "CAGrad": Row("75.16 93.48 0.0141 37.60", None, "11.58"),
        "IMTL": Row("75.33 93.49 0.0135 38.41", None, "11.04"),
        "Nash-MTL": Row("75.41 93.66 0.0129 35.02", None, "6.82"),
        "MoCo": Row("75.42 93.55 0.0149 34.19", None, "9.90"),
        "FAMO": Row("74.54 93.29 0.0145 32.59", None, "8.13"),
        "IMGrad": Row("75.13 93.45 0.0128 34.95", None, "6.61"),
    },
    note="The per-task values are Nash-MTL's and FAMO's; the Δm% of RLW, DWA, GradDrop, PCGrad, CAGrad and IMTL "
    "differ from Nash-MTL's Table 3 by 0.01-0.08. SI and UW (the lowest Δm%, 5.89, in Nash-MTL's and FAMO's "
    "tables) are left out.",
)

IMGRAD_CELEBA = Table(
    IMGRAD, "Table 4 (CelebA columns)", "CelebA (CNN, 40 tasks)", IMGRAD_TEXT, (), None,
    {
        "LS": Row(None, None, "4.15"), "SI": Row(None, None, "7.20"), "RLW": Row(None, None, "1.46"),
        "DWA": Row(None, None, "3.20"), "UW": Row(None, None, "3.23"), "MGDA": Row(None, None, "14.85"),
        "PCGrad": Row(None, None, "3.17"), "CAGrad": Row(None, None, "2.48"), "Nash-MTL": Row(None, None, "2.84"),
        "FAMO": Row(None, None, "1.21"), "IMGrad": Row(None, None, "1.27"),
    },
    note="FAMO's values; GradDrop and IMTL-G (the lowest Δm%, 0.84, in FAMO's Table 3) are left out.",
)

# ---------------------------------------------------------------- Sener & Koltun 2018 (no Δm%)

SENER_KOLTUN_MULTIMNIST = Table(
    SENER_KOLTUN, "Table 3", "MultiMNIST (Multi-LeNet, 2 tasks)", SENER_KOLTUN_TEXT, MULTIMNIST_METRICS,
    "97.23 95.90",
    {
        "Uniform scaling": Row("96.46 94.99"),
        "Kendall et al. 2018": Row("96.47 95.29"),
        "GradNorm": Row("96.27 94.84"),
        "Ours (MGDA-UB)": Row("97.26 95.90"),
    },
    note="Test accuracy (%) of the left and right digit; single-task baselines are separate models shown in "
    "one row. The method is printed as 'Ours'.",
)

SENER_KOLTUN_CELEBA = Table(
    SENER_KOLTUN, "Table 1", "CelebA (ResNet-18, 40 tasks)", SENER_KOLTUN_TEXT, (("celeba", "error", "min"),),
    "8.77",
    {
        "Uniform scaling": Row("9.62"),
        "Kendall et al. 2018": Row("9.53"),
        "GradNorm": Row("8.44"),
        "Ours (MGDA-UB)": Row("8.25"),
    },
    note="Mean over the 40 attributes of the test error (%), not an F1.",
)

TABLES = (
    NASH_MTL_NYUV2, NASH_MTL_CITYSCAPES, FAMO_NYUV2, FAMO_CITYSCAPES, FAMO_CELEBA,
    IMGRAD_NYUV2, IMGRAD_CITYSCAPES, IMGRAD_CELEBA, SENER_KOLTUN_MULTIMNIST, SENER_KOLTUN_CELEBA,
)  # fmt: skip

SHORT = {NASH_MTL: "Nash-MTL", FAMO: "FAMO", IMGRAD: "IMGrad", SENER_KOLTUN: "Sener & Koltun"}

# Where a paper's own numbers disagree: (table key, method, what) -> why. "delta_m": the printed
# Δm% does not follow, to printing precision, from the same row's printed values and the
# single-task row; "values": the row differs from the table it says it copies.
# tests/test_published_tables.py fails on any other disagreement and on any entry here that
# turns out to agree.
DEVIATIONS: dict[tuple[str, str, str], str] = {
    ("Nash-MTL Table 2", "IMTL-G", "delta_m"): "printed -0.76; its printed values give -0.60 (interval from "
    "rounding: -0.63 to -0.57). IMGrad's Table 3 prints -0.59 for the same row.",
    ("FAMO Table 1", "IMTL-G", "delta_m"): "printed -0.76, copied from Nash-MTL's Table 2; its printed values give -0.60.",
    ("FAMO Table 3 (CityScapes columns)", "LS", "values"): "repeats the SI row (70.95 91.73 0.0161 33.83, Δm% "
    "14.11); Nash-MTL's Table 3, which FAMO's Appendix E names as the source of the baselines, prints LS as "
    "75.18 93.49 0.0155 46.77, Δm% 22.60.",
}
# The tables whose printed mean ranks follow from their printed values (ranks per metric over
# the table's methods, averaged; ties cannot change them here). Nash-MTL's Tables 2 and 3 and
# FAMO's CityScapes columns print mean ranks that differ from that by up to 0.5 (LS's repeated
# row aside), with average or minimum ranks for ties: their ranks were not taken from the
# printed, rounded values alone, so they are quoted, not checked.
MEAN_RANKS_RECOMPUTE = ("FAMO Table 1",)

# Each benchmark's table of record: the paper that introduced the benchmark's numbers (Nash-MTL
# for NYUv2 and CityScapes, with FAMO's own row from FAMO's table; FAMO for CelebA), then the
# later reprint in its own column.
RECORD = {
    "NYUv2 (MTAN, 3 tasks)": (NASH_MTL_NYUV2, FAMO_NYUV2),
    "CityScapes (MTAN, 2 tasks)": (NASH_MTL_CITYSCAPES, FAMO_CITYSCAPES),
    "CelebA (CNN, 40 tasks)": (FAMO_CELEBA,),
}
REPRINT = {"NYUv2 (MTAN, 3 tasks)": IMGRAD_NYUV2, "CityScapes (MTAN, 2 tasks)": IMGRAD_CITYSCAPES, "CelebA (CNN, 40 tasks)": IMGRAD_CELEBA}
# The reprint's names for the same methods.
REPRINT_NAMES = {"IMTL": "IMTL-G"}
# The paper's method names -> this framework's weighting names (mtl list weightings).
WEIGHTING_NAMES = {
    "LS": "equal", "SI": "log", "RLW": "rlw", "DWA": "dwa", "UW": "uncertainty", "MGDA": "mgda", "PCGrad": "pcgrad",
    "GradDrop": "graddrop", "CAGrad": "cagrad", "IMTL-G": "imtl_g", "Nash-MTL": "nash_mtl", "FAMO": "famo",
}  # fmt: skip


def delta_m_of_record(benchmark: str) -> dict[str, tuple[str, Table]]:
    """Method -> (printed Δm% (a drop), the table printing it) on ``benchmark``: every row of
    the first table of record, and the rows only a later one prints (FAMO's own)."""
    merged: dict[str, tuple[str, Table]] = {}
    for table in RECORD[benchmark]:
        for method, row in table.rows.items():
            merged.setdefault(method, (row.delta_m, table))
    return merged


def best_of_record(benchmark: str) -> list[str]:
    """The methods with the lowest printed Δm% of record on ``benchmark`` (ties kept)."""
    record = {m: Decimal(v) for m, (v, _) in delta_m_of_record(benchmark).items()}
    return [m for m, v in record.items() if v == min(record.values())]


def tables_markdown(benchmarks=tuple(RECORD)) -> str:
    """One Markdown table per benchmark: each method's printed Δm% (a drop, lower is better)
    with the table printing it, and IMGrad's reprint in its own column ("left out" where it
    has no such row); deviations of ``DEVIATIONS`` marked."""
    parts = []
    for benchmark in benchmarks:
        record, reprint = delta_m_of_record(benchmark), REPRINT[benchmark]
        keys = {t.key for t in RECORD[benchmark]}
        reprinted = {REPRINT_NAMES.get(m, m): r.delta_m for m, r in reprint.rows.items()}
        lines = [
            f"**{benchmark}**", "",
            f"| method | Δm% ↓ as printed | printed in | IMGrad {reprint.number.split(' (')[0]} (later reprint) |",
            "|---|---|---|---|",
        ]
        for method in dict.fromkeys([*record, *reprinted]):
            value, table = record.get(method, ("not printed", None))
            flagged = any(k[0] in keys and k[1] == method for k in DEVIATIONS)
            lines.append(f"| {method} | {value}{' (†)' if flagged else ''} | {table.key if table else '–'} | "
                         f"{reprinted.get(method, 'left out')} |")
        lines += ["", f"Lowest printed Δm%: {', '.join(best_of_record(benchmark))}."]
        if any(k[0] in keys for k in DEVIATIONS):
            lines.append("(†) the paper's own numbers disagree here: see `DEVIATIONS` in paper_repro/published.py.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


LABELS = {
    "miou": "mIoU ↑", "pixel_acc": "pix acc ↑", "abs_err": "abs err ↓", "rel_err": "rel err ↓",
    "mean_angle": "mean angle ↓", "median_angle": "median angle ↓", "within_11_25": "11.25° ↑",
    "within_22_5": "22.5° ↑", "within_30": "30° ↑", "accuracy": "acc. (%) ↑", "error": "error (%) ↓",
}  # fmt: skip


def values_markdown(*tables: Table) -> str:
    """A Markdown table of per-task values, mean rank and Δm% as printed: every row of the first
    table, then the rows only a later one prints, each with the table it comes from; this
    framework's weighting name beside the paper's where one is registered; (†) where
    ``DEVIATIONS`` lists the row."""
    first = tables[0]
    tasks = {t for t, _, _ in first.metrics}
    header = [LABELS[m] if len(tasks) == 1 else f"{t} {LABELS[m]}" for t, m, _ in first.metrics]
    lines = [
        "| method | " + "".join(f"{h} | " for h in header) + "mean rank ↓ | Δm% ↓ | printed in |",
        "|---" * (len(header) + 4) + "|",
    ]
    if first.baseline is not None:
        lines.append("| single task | " + " | ".join(first.baseline.split()) + " | | | " + " · ".join(t.key for t in tables) + " |")
    seen = set()
    for table in tables:
        for method, row in table.rows.items():
            if method in seen:
                continue
            seen.add(method)
            name = f"{method} (`{WEIGHTING_NAMES[method]}`)" if method in WEIGHTING_NAMES else method
            flag = " (†)" if any(k[0] == table.key and k[1] == method for k in DEVIATIONS) else ""
            cells = row.values.split() if row.values else ["–"] * len(header)
            lines.append(f"| {name}{flag} | " + "".join(f"{c} | " for c in cells) + f"{row.mean_rank or '–'} | {row.delta_m or '–'} | {table.key} |")
    return "\n".join(lines)
