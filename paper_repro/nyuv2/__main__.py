"""NYUv2 (segmentation, depth, normals) with the published settings of the MTL weighting
benchmark: 200 epochs, Adam 1e-4 halved after 100, batch 2, 3 seeds, single-task baselines and
the weighting methods of the Nash-MTL / FAMO table.

    python -m paper_repro.nyuv2 --root /path/to/nyuv2            # the folder holding train/ and val/
    python -m paper_repro.nyuv2 --smoke --root TINY_TREE          # CI: 2 steps at 16x24, random trunk
"""

from paper_repro.common import SMOKE, STUDIES
from paper_repro import recipe

# A tiny tree in the real layout: small images, a random-weight trunk (no download), the data
# read in-process, the baseline and two methods (one loss-level, one gradient-level).
SMOKE_OVERRIDES = [
    *SMOKE, "device=cpu", "trunk.weights=null", "trainer.batch_size=2", "trainer.eval_batch_size=4", "trainer.num_workers=0",
    *(f"tasks.{t}.{key}" for t in ("semantic", "depth", "normal") for key in ("size=[16,24]", "val_fraction=0.34")),
    *(f"~compare.regimes.{m}" for m in ("log", "rlw", "dwa", "uncertainty", "mgda", "graddrop", "cagrad", "imtl_g", "nash_mtl", "famo")),
]



def main(argv=None) -> int:
    return recipe.main("nyuv2", __doc__, STUDIES / "nyuv2" / "config.yaml", "tasks.semantic.root", SMOKE_OVERRIDES,
                       "NYUv2 (MTAN, 3 tasks)", argv)


if __name__ == "__main__":
    raise SystemExit(main())
