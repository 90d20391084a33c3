"""Gradient methods solved in the space of task weights: MGDA, CAGrad, Nash-MTL, UPGrad, DualProj.

Each maps the Gramian ``G = J Jᵀ`` of the per-task gradients to a small problem
(``mtl.weighting.solvers``) whose answer is a combination ``d = Σ_t w_t g_t`` of the rows
of J (``GramianWeighting.weigh``). For all but CAGrad the weights weigh the task losses, so
the engine back-propagates Σ_t w_t L_t; CAGrad's d updates the shared parameters and each
head gets its own loss's gradient. The weights are solved in float64.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mtl.weighting import solvers
from mtl.weighting.base import GramianWeighting, checked_max_norm, register_weighting

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register_weighting("mgda")
class MGDA(GramianWeighting):
    """MGDA: weights of the min-norm point in the convex hull of the task gradients.

    Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization" (after
    Désidéri 2012). α = argmin_{α ∈ Δ} ||Σ_t α_t g_t||², Δ the probability simplex; the update
    Σ_t α_t g_t decreases every task's loss unless the point is Pareto-stationary (then 0).
    Returns the weights α (the engine back-propagates Σ_t α_t L_t).

    ``mode="parameters"`` (default) is MGDA on the shared parameters' gradients;
    ``mode="representation"`` is MGDA-UB, the paper's upper bound, on the gradients w.r.t.
    the shared representation (also registered as ``mgda_ub``).

    ``normalization`` as in the authors' code (isl-org/MultiObjectiveOptimization,
    ``multi_task/min_norm_solvers.py``, ``gradient_normalizers``), applied to the g_t before
    the solve while α weighs the raw losses (as there): g_t / n_t with n_t = 1 (``"none"``,
    default: the paper's method), ||g_t|| (``"l2"``), L_t (``"loss"``) or L_t·||g_t||
    (``"loss+"``, the setting of the code's ``sample.json``). None of them is in the paper:
    a comment in ``multi_task/train_multi_task.py`` marks the step as optional and absent
    from the paper. The loss-based ones take this step's losses from
    ``observe(losses)``, which the engine calls before ``aggregate``.
    """

    modes = ("parameters", "representation")

    def __init__(self, tasks: Sequence[str], mode: str | None = None, normalization: str = "none"):
        super().__init__(tasks, mode)
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"weighting.normalization must be one of {', '.join(_NORMALIZATIONS)}, got {normalization!r}.")
        self.normalization = normalization
        self._losses: torch.Tensor | None = None

    def observe(self, losses: torch.Tensor) -> None:
        """This step's task losses, for the ``loss`` and ``loss+`` normalizations."""
        self._losses = losses.detach()

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        G = G.to(solvers.DTYPE)
        if self.normalization != "none":
            d = torch.ones_like(G.diagonal())  # 1 / n_t
            if self.normalization in ("l2", "loss+"):
                d = solvers.inverse_norms(G)
            if self.normalization in ("loss", "loss+"):
                if self._losses is None:
                    raise RuntimeError(f"MGDA normalization={self.normalization!r} needs this step's losses: call observe(losses) first.")
                d = d / self._losses.to(G).clamp_min(torch.finfo(G.dtype).tiny)
                self._losses = None
            G = d[:, None] * G * d[None, :]  # the Gramian of the rows g_t / n_t
        return solvers.min_norm_weights(G)


@register_weighting("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB: MGDA on the gradients w.r.t. the shared representation (Sener & Koltun's upper bound).

    Sener & Koltun 2018: ||Σ_t α_t ∇_θ L_t|| ≤ ||∂Z/∂θ||·||Σ_t α_t ∇_Z L_t||, so minimizing the
    right-hand side needs only the cheap gradients w.r.t. the representation Z. ``mgda`` with
    ``mode="representation"``; the same ``normalization``.
    """

    modes = ("representation",)


@register_weighting("cagrad")
class CAGrad(GramianWeighting):
    """CAGrad: the mean gradient moved, within a ball around it, to help the worst-off task.

    Liu, Liu, Jin, Stone & Liu 2021, "Conflict-Averse Gradient Descent for Multi-task
    Learning". With g_0 = (1/T) Σ_t g_t and φ = c²||g_0||²:
    w* = argmin_{w ∈ Δ} g_wᵀg_0 + √φ·||g_w||, g_w = Σ_t w_t g_t, and
    d = (g_0 + √φ / ||g_w*|| · g_w*) / s, s = 1 + c² (``rescale=1``, the official code's
    default), 1 + c (``rescale=2``) or 1 (``rescale=0``).

    The inner problem is solved to a tolerance by an interior-point method with a line
    search (``solvers.cagrad_weights``) where the official code calls scipy's SLSQP. d is the
    weighted sum of the task gradients with weights (1/T + √φ/||g_w*||·w*) / s.
    """

    weigh_heads = False

    def __init__(self, tasks: Sequence[str], mode: str | None = None, c: float = 0.5, rescale: int = 1):
        super().__init__(tasks, mode)
        if not c >= 0:
            raise ValueError(f"weighting.c must be >= 0, got {c!r}.")
        if rescale not in (0, 1, 2):
            raise ValueError(f"weighting.rescale must be 0, 1 or 2, got {rescale!r}.")
        self.c = float(c)
        self.rescale = rescale

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        G = G.to(solvers.DTYPE)
        w = solvers.cagrad_weights(G, self.c)
        radius = self.c * G.mean().clamp_min(0).sqrt()  # √φ = c·||g_0||
        norm_w = (w @ G @ w).clamp_min(0).sqrt()
        lam = torch.where(norm_w > 0, radius / norm_w, torch.zeros_like(norm_w))
        divisor = (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]
        return (1.0 / G.shape[0] + lam * w) / divisor


@register_weighting("nash_mtl")
class NashMTL(GramianWeighting):
    """Nash-MTL: weights of the Nash bargaining solution, Gα = 1/α.

    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game". The update d = Σ_t α_t g_t
    with α > 0 solving g_tᵀd = 1/α_t for every t, i.e. Gα = 1/α element-wise (G = J Jᵀ).
    Returns the weights α (not normalized, as in the paper: they scale as 1/||g||).

    The official code (AvivNavon/nash-mtl, ``methods/weight_methods.py``, ``NashMTL``) has
    the defaults ``optim_niter=20``, ``update_weights_every=1`` and ``max_norm=1.0``:

    - ``optim_niter``: up to 20 convex-concave iterations of cvxpy (ECOS), warm-started from
      the previous step's α and stopped once ||Gα − 1/α|| < 1e-3 on G / ||G||_F; here a
      damped Newton solve of the same equation to a tolerance (``solvers.nash_weights``),
      so α is the solution the official iterations approach;
    - ``update_weights_every``: the engine's every-k-steps option, ``engine.every``
      (default 1, as there);
    - ``max_norm``: after the backward of Σ_t α_t L_t the official code clips the gradient of
      the shared parameters to norm ``max_norm`` (``clip_grad_norm_``; the heads are not
      clipped). Here the same (default 1.0; 0 turns it off): the trainer caps the trunk's
      gradient after the method's update and the mean over ranks, before
      ``trainer.grad_clip``, which clips every parameter together (``trainer.GradientClip``).
    """

    def __init__(self, tasks: Sequence[str], mode: str | None = None, max_norm: float = 1.0):
        super().__init__(tasks, mode)
        self.max_norm = checked_max_norm(max_norm)

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        return solvers.nash_weights(G.to(solvers.DTYPE))


@register_weighting("upgrad")
class UPGrad(GramianWeighting):
    """UPGrad: the mean of the task gradients, each projected onto the dual cone of all of them.

    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization":
    d = (1/T) Σ_i π(g_i), π(g) = argmin_{x: Jx ≥ 0} ||x − g||², where Jx ≥ 0 says that x
    conflicts with no task. The Lagrangian ½||x − g||² − λᵀJx (λ ≥ 0) gives x = g + Jᵀλ and
    the dual min_{λ ≥ 0} ½λᵀGλ + (Jg)ᵀλ; for g = g_i = Jᵀe_i, Jg = Ge_i. So
    π(g_i) = Jᵀ(e_i + λ_i) with λ_i = argmin_{λ ≥ 0} ½λᵀGλ + (Ge_i)ᵀλ, and d is the weighted
    sum of the rows Σ_t w_t g_t with w = (1/T) Σ_i (e_i + λ_i). Returns w.
    Gw = Jd ≥ 0: d has a non-negative inner product with every task gradient, up to the
    solver's ridge (``solvers.nonneg_qp``): g_tᵀd ≥ −1e-8·w_t·||g_t||².
    """

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        G = G.to(solvers.DTYPE)
        lam = solvers.nonneg_qp(G, -G)  # column i: λ_i
        return (1.0 + lam.sum(dim=1)) / G.shape[0]


@register_weighting("dualproj")
class DualProj(GramianWeighting):
    """DualProj: the mean gradient projected onto the dual cone of the task gradients.

    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization":
    d = π(g_0), g_0 = (1/T) Σ_t g_t, π(g) = argmin_{x: Jx ≥ 0} ||x − g||². As for UPGrad,
    π(g_0) = Jᵀ(1/T + λ) with λ = argmin_{λ ≥ 0} ½λᵀGλ + (G1/T)ᵀλ: a weighted sum of the
    rows with w = 1/T + λ. Returns w; Gw = Jd ≥ 0 (g_tᵀd ≥ −1e-8·w_t·||g_t||², as for UPGrad).
    """

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        G = G.to(solvers.DTYPE)
        lam = solvers.nonneg_qp(G, -G.mean(dim=1, keepdim=True)).squeeze(1)
        return 1.0 / G.shape[0] + lam
