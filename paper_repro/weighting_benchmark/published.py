"""The published Δm% that the weighting benchmark and the nyuv2/celeba recipes print beside
their own: a view of the printed tables in ``paper_repro/published.py`` (one place for every
published number, with paper, table number and where it was read).

``DELTA_M_DROP[benchmark][method]``: the Δm% as printed, a drop (lower is better), from the
benchmark's table of record: Nash-MTL (Navon et al. 2022) Tables 2-3 for NYUv2 and CityScapes
with FAMO's own row from FAMO (Liu et al. 2023) Tables 1 and 3, and FAMO's Table 3 for CelebA.
IMGrad's later reprint (arXiv 2503.08006, Tables 2-4) is a column of its own in
``tables_markdown``, never mixed into these values. QM9 (Nash-MTL Table 1, FAMO Table 2) is not
reprinted: no benchmark here runs it.
"""

from paper_repro.published import RECORD, delta_m_of_record, tables_markdown

DELTA_M_DROP = {benchmark: {m: float(v) for m, (v, _) in delta_m_of_record(benchmark).items()} for benchmark in RECORD}
SOURCE = ("as printed in Nash-MTL (Navon et al. 2022, arXiv 2202.01017) Tables 2-3 and FAMO (Liu et al. 2023, "
          "arXiv 2306.03792) Tables 1 and 3; IMGrad's later reprint (arXiv 2503.08006) in its own column")

__all__ = ["DELTA_M_DROP", "SOURCE", "tables_markdown"]
