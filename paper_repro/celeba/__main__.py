"""CelebA as 40 binary attribute tasks with the published settings of the FAMO benchmark:
64x64, Adam 3e-4, 15 epochs, batch 256, 3 seeds, single-task baselines and the weighting
methods of its CelebA table; each attribute's positive-class F1, selected on the mean
validation F1, Δm% over the 40 test F1s (metrics: primary), as FAMO's Table 3.

    python -m paper_repro.celeba --root /path/to/root         # holding celeba/img_align_celeba/ ...
    python -m paper_repro.celeba --smoke --root TINY_TREE      # CI: 2 attributes, 2 steps at 16x16
"""

from paper_repro.common import SMOKE, STUDIES
from paper_repro import recipe

FIRST, SECOND = "a5_o_clock_shadow", "arched_eyebrows"  # the tasks the smoke run keeps
METHODS = ["equal", "log", "rlw", "dwa", "uncertainty", "mgda", "pcgrad", "graddrop", "cagrad", "imtl_g", "nash_mtl", "famo"]
SMOKE_METHODS = ["equal", "famo", "pcgrad"]


def smoke_overrides() -> list[str]:
    """Two attributes (the other 38 tasks and the regimes naming them replaced), 16x16 images."""
    from mtl.config import load_config

    cfg = load_config(STUDIES / "celeba" / "config.yaml")
    kept = f"[{FIRST},{SECOND}]"
    return [
        *SMOKE, "device=cpu", "trainer.batch_size=2", "trainer.num_workers=0", f"tasks.{FIRST}.size=16",
        *(f"~tasks.{t}" for t in cfg.tasks if t not in (FIRST, SECOND)),
        # Deletions apply after the sets, so the kept regimes get new stage lists rather than being re-added.
        *(f"~compare.regimes.{m}" for m in METHODS if m not in SMOKE_METHODS),
        f"compare.regimes.equal.stages=[{{tasks: {kept}}}]",
        *(f"compare.regimes.{m}.stages=[{{tasks: {kept}, weighting: {{name: {m}}}}}]" for m in SMOKE_METHODS if m != "equal"),
    ]


def main(argv=None) -> int:
    import sys

    smoke = "--smoke" in (sys.argv[1:] if argv is None else argv)
    return recipe.main("celeba", __doc__, STUDIES / "celeba" / "config.yaml", f"tasks.{FIRST}.root",
                       smoke_overrides() if smoke else [], "CelebA (CNN, 40 tasks)", argv, metrics="primary")


if __name__ == "__main__":
    raise SystemExit(main())
