"""The published Δm% the weighting benchmark prints beside its own results: a view of the
printed tables in ``paper_repro/published.py`` (one place for every published number, with
paper, table number and where it was read).

``tables_markdown()``: per benchmark (NYUv2, CityScapes, CelebA), each method's Δm% as
printed, a drop (lower is better), from the benchmark's table of record (Nash-MTL, Navon et
al. 2022, Tables 2-3 for NYUv2 and CityScapes, with FAMO's own row from FAMO, Liu et al. 2023,
Tables 1 and 3; FAMO's Table 3 for CelebA), and IMGrad's later reprint (arXiv 2503.08006,
Tables 2-4) in a column of its own. QM9 (Nash-MTL Table 1, FAMO Table 2) is not reprinted: no
benchmark here runs it.
"""

from paper_repro.published import tables_markdown

SOURCE = ("as printed in Nash-MTL (Navon et al. 2022, arXiv 2202.01017) Tables 2-3 and FAMO (Liu et al. 2023, "
          "arXiv 2306.03792) Tables 1 and 3; IMGrad's later reprint (arXiv 2503.08006) in its own column")

__all__ = ["SOURCE", "tables_markdown"]
