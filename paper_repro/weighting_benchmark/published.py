"""Where the published Δm% tables of the weighting methods are. Their numbers are not reprinted:
they could not be checked against the papers on this offline machine, and a number copied from
memory is worse than none. Each entry names the paper and table to read."""

PUBLISHED_TABLES = [
    {"benchmark": "NYUv2 (3 tasks, SegNet/MTAN)", "source": "Navon et al. 2022, Multi-Task Learning as a Bargaining Game (Nash-MTL), ICML", "table": "Table 2"},
    {"benchmark": "NYUv2 (3 tasks, SegNet/MTAN)", "source": "Liu et al. 2023, FAMO: Fast Adaptive Multitask Optimization, NeurIPS", "table": "Table 3"},
    {"benchmark": "CityScapes (2 tasks)", "source": "Navon et al. 2022 (Nash-MTL)", "table": "Table 2"},
    {"benchmark": "CityScapes (2 tasks)", "source": "Liu et al. 2023 (FAMO)", "table": "Table 3"},
    {"benchmark": "CelebA (40 tasks)", "source": "Liu et al. 2023 (FAMO)", "table": "Table 3"},
    {"benchmark": "QM9 (11 tasks)", "source": "Navon et al. 2022 (Nash-MTL)", "table": "Table 3"},
    {"benchmark": "QM9 (11 tasks)", "source": "Liu et al. 2023 (FAMO)", "table": "Table 3"},
]
