"""Published Δm% of weighting methods, for reference beside this framework's benchmark.

Source actually read: the tables of "Injecting Imbalance Sensitivity for Multi-Task Learning"
(IMGrad, arXiv 2503.08006), Tables 2-4, which reprint the benchmark of Nash-MTL (Navon et al.
2022, ICML) and FAMO (Liu et al. 2023, NeurIPS): MTAN on NYUv2 and CityScapes, 200 epochs,
Adam 1e-4 halved after 100; a 9-layer CNN on CelebA (40 tasks), Adam 3e-4, 15 epochs, batch
256; 3 seeds. The original papers' PDFs could not be opened on this offline machine, so these
values are as that reprint gives them (rounded there: depth errors to 2 decimals).

Sign: these papers report Δm% as a performance DROP (lower is better); this framework's Δm%
(mtl.report.delta_m) is the same formula with the opposite sign (higher is better).
QM9: no reprint of the Nash-MTL/FAMO QM9 table was found offline, so none is given.
"""

SOURCE = "IMGrad (arXiv 2503.08006) Tables 2-4, reprinting Nash-MTL (Navon et al. 2022) and FAMO (Liu et al. 2023)"

# Δm% (lower is better), per benchmark, per method; None: not in that table.
DELTA_M_DROP = {
    "NYUv2 (MTAN, 3 tasks)": {
        "LS (equal)": 5.46, "RLW": 7.67, "DWA": 3.49, "MGDA": 1.47, "GradDrop": 3.61, "PCGrad": 3.83,
        "CAGrad": 0.29, "IMTL": -0.59, "Nash-MTL": -4.04, "MoCo": 0.16, "FAMO": -4.10,
    },
    "CityScapes (MTAN, 2 tasks)": {
        "LS (equal)": 22.60, "RLW": 24.37, "DWA": 21.43, "MGDA": 44.14, "GradDrop": 23.67, "PCGrad": 18.21,
        "CAGrad": 11.58, "IMTL": 11.04, "Nash-MTL": 6.82, "MoCo": 9.90, "FAMO": 8.13,
    },
    "CelebA (CNN, 40 tasks)": {
        "LS (equal)": 4.15, "SI (log)": 7.20, "RLW": 1.46, "DWA": 3.20, "UW (uncertainty)": 3.23, "MGDA": 14.85,
        "PCGrad": 3.17, "CAGrad": 2.48, "Nash-MTL": 2.84, "FAMO": 1.21,
    },
}

# NYUv2 single-task (STL, "Independent") test numbers of the same table: the baseline of the Δm%.
NYUV2_SINGLE_TASK = {
    "semantic mIoU (%)": 38.30, "semantic pixel acc. (%)": 63.76, "depth abs. err.": 0.68, "depth rel. err.": 0.28,
    "normal mean angle (°)": 25.01, "normal median angle (°)": 19.21, "normal within 11.25° (%)": 30.14,
    "normal within 22.5° (%)": 57.20, "normal within 30° (%)": 69.15,
}
CITYSCAPES_SINGLE_TASK = {"semantic mIoU (%)": 74.01, "semantic pixel acc. (%)": 93.16, "depth abs. err.": 0.0125, "depth rel. err.": 27.77}


def tables_markdown() -> str:
    methods = list(dict.fromkeys(m for table in DELTA_M_DROP.values() for m in table))
    benchmarks = list(DELTA_M_DROP)
    lines = ["| method | " + " | ".join(benchmarks) + " |", "|" + "---|" * (len(benchmarks) + 1)]
    for m in methods:
        cells = [f"{DELTA_M_DROP[b][m]:+.2f}" if m in DELTA_M_DROP[b] else "–" for b in benchmarks]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
