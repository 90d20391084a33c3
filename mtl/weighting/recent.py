"""Newer weightings (2023–2024): STCH, ExcessMTL, FairGrad, MoCo, SDMGrad, MoDo, ConFIG.

STCH is loss-level; the others map the per-task gradients to an update. State that carries
across steps (nadir points, accumulated squared gradients, tracked gradients, the previous
step's task weights) lives in buffers, so a checkpoint resumes it. The buffers of size
``[T, D]`` are allocated at the first call with J's shape and device (in float32 for
half-precision J) and restart from zero if J's shape changes. Task-weight iterates and solves
are in float64 (``solvers.DTYPE``), as in ``mtl.weighting.solvers``.

Auto-λ (Liu et al. 2022) is not here: its task weights are updated by a meta-gradient through
a virtual optimizer step of the model on a second batch, which a weighting cannot take (it sees
only the losses, or J, of one batch).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mtl.weighting import solvers
from mtl.weighting.base import (
    Aggregation, GradientWeighting, GramianWeighting, LossWeighting, checked_max_norm, compute_dtype, register_weighting,
)
from mtl.weighting.loss_level import _non_negative, _positive

# Inside STCH's logs, as the authors' code: a loss of exactly 0 keeps a finite objective.
_LOG_EPS = 1e-20
# ExcessMTL's AdaGrad-style denominator √(Σ g² + ε), the authors' ε.
_ADAGRAD_EPS = 1e-7
# SDMGrad's inner solver, the authors' values: SGD on the task weights, a fresh momentum
# buffer each step, then the projection onto the simplex.
_SDMGRAD_LR = 10.0
_SDMGRAD_MOMENTUM = 0.5
# SDMGrad's scale of the Gramian, mean_t √(||g_t||² + 1e-4), as the authors' code.
_SDMGRAD_SCALE_EPS = 1e-4



def _count(value: int, arg: str, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"weighting.{arg} must be an int >= {low}, got {value!r}.")


def simplex_projection(v: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of ``v`` ``[T]`` onto the probability simplex.

    Sort-based (Held, Wolfe & Crowder 1974; Duchi et al. 2008): with u = v sorted decreasingly,
    ρ = max{k : u_k − (Σ_{j≤k} u_j − 1)/k > 0}, θ = (Σ_{j≤ρ} u_j − 1)/ρ, the projection is
    max(v − θ, 0). No host synchronization."""
    u = torch.sort(v, descending=True).values
    excess = torch.cumsum(u, 0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = (u - excess / k > 0).sum().clamp_min(1)  # the condition holds on a prefix
    theta = excess.gather(0, (rho - 1).unsqueeze(0)) / rho
    return (v - theta).clamp_min(0)


class _SizedOnLoad:
    """Mixin for a module whose ``[T, D]`` buffers (``_sized``) take J's shape at the first call:
    loading a checkpoint takes the saved buffers' shapes."""

    _sized: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._sized:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _sized_like(self, name: str, G: torch.Tensor) -> torch.Tensor:
        """Buffer ``name`` with G's shape, device and dtype (zeros when the shape differs)."""
        buffer = getattr(self, name)
        buffer = torch.zeros_like(G) if buffer.shape != G.shape else buffer.to(G.device, G.dtype)
        setattr(self, name, buffer)
        return buffer


@register_weighting("stch")
class STCH(LossWeighting):
    """STCH: smooth Tchebycheff scalarization of the log losses, relative to a nadir point.

    Lin, Zhang, Zhang, Liu, Lin & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024. The smooth Tchebycheff function
    g_μ(x) = μ log Σ_t exp(λ_t (f_t(x) − z_t) / μ) is a smooth upper bound of max_t λ_t (f_t − z_t)
    (tight as μ → 0). As in the authors' MTL code (Xi-L/STCH, ``STCH_MTL``, also LibMTL's
    ``STCH``): λ_t = 1, f_t = log L_t and z_t = log(nadir_t), times T:

    L = T · μ · log Σ_t exp(log(L_t / nadir_t + 1e-20) / μ).

    Warm-up: the first ``warmup_epochs`` epochs and the one after train on Σ_t log(L_t + 1e-20);
    the mean training loss of each task over that last warm-up epoch (epoch index
    ``warmup_epochs``, counted from 0) becomes the nadir point, and STCH starts with the next
    epoch (the authors' ``epoch == warmup_epoch`` averaging). The epoch count and the nadir are
    buffers, so a resumed run continues where it was.
    """

    def __init__(self, tasks: Sequence[str], mu: float = 1.0, warmup_epochs: int = 4):
        super().__init__(tasks)
        _positive(mu, "mu")
        _count(warmup_epochs, "warmup_epochs", 0)
        self.mu, self.warmup_epochs = float(mu), warmup_epochs
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        # NaN until the averaging epoch has ended.
        self.register_buffer("nadir", torch.full((self.num_tasks,), float("nan"), dtype=solvers.DTYPE))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        warm = torch.log(losses + _LOG_EPS).sum()
        ready = ~torch.isnan(self.nadir).any()
        # Both branches are computed (no host read); a NaN-free nadir keeps the unused one's gradient finite.
        nadir = torch.where(ready, self.nadir, 1.0).to(losses)
        relative = torch.log(losses / nadir + _LOG_EPS)
        smooth = self.num_tasks * self.mu * torch.logsumexp(relative / self.mu, dim=0)
        return torch.where(ready, smooth, warm)

    def on_epoch_end(self, epoch_losses: torch.Tensor) -> None:
        if int(self.epochs_seen) == self.warmup_epochs:
            self.nadir.copy_(epoch_losses.detach().to(self.nadir))
        self.epochs_seen += 1


@register_weighting("excess_mtl")
class ExcessMTL(_SizedOnLoad, GradientWeighting):
    """ExcessMTL: task weights raised in proportion to each task's estimated excess risk.

    He, Zhou, Zhao & Li, "Robust Multi-Task Learning with Excess Risks", ICML 2024. The excess
    risk of task t is estimated from its gradient with a diagonal AdaGrad-style curvature,
    h_t ← h_t + g_t ∘ g_t (from 0), e_t = g_tᵀ diag(√(h_t + 1e-7))⁻¹ g_t, taken relative to its
    first value e_t(1); then w_t ← w_t exp(η e_t / e_t(1)), w ← T w / Σ_k w_k, from w = 1, and
    L = Σ_t w_t L_t (one backward; the heads are weighted too). As in the authors' code
    (yifei-he/ExcessMTL, also LibMTL's ``ExcessMTL``) the first step only records e_t(1) and
    trains with w = 1. η is ``step_size`` (the authors' ``robust_step_size``, default 1e-2).
    A task whose gradient is zero at the first step (where the authors' code divides by 0) takes
    e_t(1) from its first non-zero gradient, and its weight is not raised until then.
    """

    modes = ("parameters", "last_shared")
    _sized = ("grad_squares",)

    def __init__(self, tasks: Sequence[str], mode: str | None = None, step_size: float = 1e-2):
        super().__init__(tasks, mode)
        _positive(step_size, "step_size")
        self.step_size = float(step_size)
        self.register_buffer("loss_weights", torch.ones(self.num_tasks, dtype=solvers.DTYPE))
        self.register_buffer("initial_excess", torch.full((self.num_tasks,), float("nan"), dtype=solvers.DTYPE))
        self.register_buffer("grad_squares", torch.zeros(0))

    def aggregate(self, J: torch.Tensor) -> Aggregation:
        G = J.to(compute_dtype(J))
        squares = self._sized_like("grad_squares", G)
        squares.addcmul_(G, G)
        excess = (G * G / (squares + _ADAGRAD_EPS).sqrt()).sum(dim=1).to(solvers.DTYPE)
        unset = torch.isnan(self.initial_excess)
        first_step = unset.all()
        self.initial_excess.copy_(torch.where(unset & (excess > 0), excess, self.initial_excess))
        ratio = torch.nan_to_num(excess / self.initial_excess, nan=0.0)
        raised = self.loss_weights * torch.exp(self.step_size * ratio)
        raised = self.num_tasks * raised / raised.sum()
        self.loss_weights.copy_(torch.where(first_step, self.loss_weights, raised))
        return Aggregation(weights=self.loss_weights.to(J.dtype))


def _fair_weights(G: torch.Tensor, alpha: float, tol: float = solvers.TOL, max_iter: int = solvers.MAX_ITER) -> torch.Tensor:
    """w > 0 with Gw = w^(−1/α) element-wise, by damped Newton steps.

    w minimizes φ(w) = ½wᵀGw + Σ_t h(w_t) with h'(w) = −w^(−1/α) (h = −w^p/p, p = 1 − 1/α; −log w
    for α = 1), strictly convex on w > 0. Each step solves (G + diag(w^(−1/α−1)/α)) s = ∇φ by
    Cholesky, goes at most 0.99 of the way to the boundary w = 0, and halves the step until φ
    decreases enough (Armijo), all candidates at once. Stops when ||∇φ||_∞ ≤ tol (checked every
    ``solvers.CHECK_EVERY`` iterations).

    Solved on C = G / s (s the largest ||g_t||²): w = s^(−α/(α+1)) · w_C. A task whose gradient
    is zero gets C_tt = 1 (so w_C,t = 1: it does not move the update), and a ridge of 1e-13 on the
    diagonal keeps a solution where a non-negative combination of the gradients vanishes (there
    the weights grow large, as Nash-MTL's, instead of to infinity).
    """
    # Rounding gives a singular float32 Gramian negative eigenvalues far above the ridge below;
    # φ is then unbounded and Newton runs to 1e39 weights: clipped to PSD first, as Nash-MTL's.
    G = solvers._psd(G)
    T = G.shape[0]
    scale = solvers._scale(G)
    keep = solvers.nonzero(G)
    C = torch.where(keep[:, None] & keep[None, :], G / scale, 0.0) + torch.diag(torch.where(keep, 1e-13, 1.0))
    p = 1.0 - 1.0 / alpha

    def value(w: torch.Tensor) -> torch.Tensor:  # w [..., T]
        barrier = -torch.log(w) if p == 0 else -(w**p) / p
        return 0.5 * ((w @ C) * w).sum(dim=-1) + barrier.sum(dim=-1)

    halvings = 0.5 ** torch.arange(8, dtype=solvers.DTYPE, device=G.device)
    w = torch.ones(T, dtype=solvers.DTYPE, device=G.device)
    for it in range(max_iter):
        gradient = C @ w - w ** (-1.0 / alpha)
        if it % solvers.CHECK_EVERY == 0 and bool(gradient.abs().max() <= tol):
            break
        factor, _ = torch.linalg.cholesky_ex(C + torch.diag(w ** (-1.0 / alpha - 1.0) / alpha))
        step = torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1)
        ratio = torch.where(step > 0, w / step, torch.inf).min()
        longest = torch.clamp(0.99 * ratio, max=1.0)
        candidates = w - (longest * halvings)[:, None] * step
        ok = (candidates > 0).all(dim=1) & (value(candidates) <= value(w) - 1e-4 * longest * halvings * (gradient @ step))
        # The longest step that decreases φ enough; the shortest when rounding hides every decrease.
        chosen = torch.where(ok.any(), ok.to(torch.uint8).argmax(), len(halvings) - 1)
        w = candidates[chosen]
    return w * scale ** (-alpha / (alpha + 1))


@register_weighting("fairgrad")
class FairGrad(GramianWeighting):
    """FairGrad: α-fair allocation of the update among the tasks, Gw = w^(−1/α).

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024. The update d = Jᵀw
    maximizes Σ_t u_t^(1−α)/(1−α) of the tasks' utilities u_t = g_tᵀd (α-fairness; α = 1:
    Σ log u_t, the proportional fairness of Nash-MTL; α → ∞: max-min fairness), whose
    optimality condition is g_tᵀd = (Gw)_t = w_t^(−1/α) with w > 0.

    The equation is solved in float64 by damped Newton steps in torch (``_fair_weights``, on
    G's device), where the official code (OptMN-Lab/fairgrad, ``methods/weight_methods.py``)
    calls scipy's ``least_squares`` on Gw − w^(−1/α) from w = 1/T; both find the same root
    (tested against scipy). As there, the shared parameters get T·Σ_t w_t g_t ("to match the
    sum loss"), i.e. task weights T·w, and each head the gradient of its own loss
    (``weigh_heads`` False); then the shared gradient is clipped to norm ``max_norm``
    (default 1.0, the official default; 0 turns it off), as Nash-MTL's. ``alpha`` defaults to
    2.0, the value of every experiment script in the official code (its class default is 1.0).
    """

    weigh_heads = False

    def __init__(self, tasks: Sequence[str], mode: str | None = None, alpha: float = 2.0, max_norm: float = 1.0):
        super().__init__(tasks, mode)
        _positive(alpha, "alpha")
        self.alpha = float(alpha)
        self.max_norm = checked_max_norm(max_norm)

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        return G.shape[0] * _fair_weights(G, self.alpha)


@register_weighting("moco")
class MoCo(_SizedOnLoad, GradientWeighting):
    """MoCo: MGDA on tracked task gradients, with the weights moved by one projected step per update.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023 (Algorithm 1). With
    the tracked gradients Y ``[T, D]`` (from 0) and the weights λ (from 1/T), at step k:

    Y ← Y − β_k (Y − J),  λ ← Π_Δ(λ − γ_k (YYᵀ + ρI) λ),  d = Yᵀλ,

    β_k = β / k^β_σ, γ_k = γ / k^γ_σ, Π_Δ the projection onto the simplex. d updates the shared
    parameters, each head gets its own loss's gradient (as in the authors' LibMTL code). Y, λ
    and k are buffers: a checkpoint resumes them. Defaults from LibMTL's ``MoCo``, "implemented
    based on the authors' sharing code": β = 0.5, β_σ = 0.5, γ = 0.1, γ_σ = 0.5, ρ = 0; with
    β_σ = γ_σ = 0 this is the constant-step version of the authors' Trade-Off-MOL code. Not
    included: the paper's optional projection of each y_t onto a ball of radius L_t, LibMTL's
    rescaling of each g_t to norm L_t and its softmax in place of Π_Δ. With ``engine.every`` > 1
    the steps in between back-propagate Σ_t λ_t L_t (this step's gradients, λ reused).
    """

    modes = ("parameters", "last_shared")
    _sized = ("tracked",)

    def __init__(self, tasks: Sequence[str], mode: str | None = None, beta: float = 0.5, beta_sigma: float = 0.5,
                 gamma: float = 0.1, gamma_sigma: float = 0.5, rho: float = 0.0):
        super().__init__(tasks, mode)
        if not 0 < beta <= 1:
            raise ValueError(f"weighting.beta must be in (0, 1], got {beta!r}.")
        _positive(gamma, "gamma")
        for value, arg in ((beta_sigma, "beta_sigma"), (gamma_sigma, "gamma_sigma"), (rho, "rho")):
            _non_negative(value, arg)
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = map(float, (beta, beta_sigma, gamma, gamma_sigma, rho))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("lambdas", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=solvers.DTYPE))
        self.register_buffer("tracked", torch.zeros(0))

    def aggregate(self, J: torch.Tensor) -> Aggregation:
        G = J.to(compute_dtype(J))
        Y = self._sized_like("tracked", G)
        self.steps += 1
        k = self.steps.to(solvers.DTYPE)
        Y.lerp_(G, (self.beta / k**self.beta_sigma).to(G.dtype))
        gram = (Y @ Y.T).to(solvers.DTYPE) + self.rho * torch.eye(self.num_tasks, dtype=solvers.DTYPE, device=G.device)
        lam = self.lambdas.to(G.device)
        self.lambdas = simplex_projection(lam - self.gamma / k**self.gamma_sigma * (gram @ lam))
        return Aggregation(gradient=(self.lambdas.to(G.dtype) @ Y).to(J.dtype), weights=self.lambdas.to(J.dtype))


@register_weighting("sdmgrad")
class SDMGrad(GramianWeighting):
    """SDMGrad: the min-norm weights of MGDA regularized towards the mean gradient.

    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023. With g_0 = (1/T) Σ_t g_t:
    w* = argmin_{w ∈ Δ} ½||Jᵀw + λ g_0||², d = (Jᵀw* + λ g_0) / (1 + λ).

    As in the authors' code (OptMN-Lab/sdmgrad, ``methods/weight_methods.py``): the problem is
    scaled by s = mean_t √(||g_t||² + 1e-4), G' = G/s²; w takes ``niter`` steps of SGD (lr 10,
    momentum 0.5, a fresh momentum buffer each step) on the gradient G'w + λ G'1/T, each followed
    by the projection onto the simplex, warm-started from the previous step's w (a buffer, from
    1/T); the shared parameters get T·d (task weights (T w + λ) / (1 + λ)), each head the gradient
    of its own loss (``weigh_heads`` False), and the shared gradient is clipped to norm
    ``max_norm`` (default 1.0; 0: off). Defaults λ = 0.3 (``lamda``), ``niter`` = 20. That
    fixed inner loop need not reach w* (on J = diag(2, 1) it cycles: w* = (0.11, 0.89), the loop
    gives (0.97, 0.03) after 20 iterations): the method is the authors' loop, kept as is.

    One batch per step: the paper and the authors' NYUv2 code take J from three independent
    batches (ζ for d, ξ and ξ' for an unbiased G = J_ξ J_ξ'ᵀ); here all three are this step's J,
    so G is the batch's own Gramian (biased by the gradient noise, as in the authors' toy code).
    """

    weigh_heads = False

    def __init__(self, tasks: Sequence[str], mode: str | None = None, lamda: float = 0.3, niter: int = 20, max_norm: float = 1.0):
        super().__init__(tasks, mode)
        _non_negative(lamda, "lamda")
        _count(niter, "niter", 1)
        self.lamda, self.niter = float(lamda), niter
        self.max_norm = checked_max_norm(max_norm)
        self.register_buffer("simplex_weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=solvers.DTYPE))

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        G = G.to(solvers.DTYPE)
        T = G.shape[0]
        scale = (G.diagonal() + _SDMGRAD_SCALE_EPS).sqrt().mean()
        G = G / scale**2
        pull = self.lamda * G.mean(dim=1)
        w = self.simplex_weights.to(G.device)
        velocity = torch.zeros_like(w)
        for it in range(self.niter):
            gradient = G @ w + pull
            velocity = gradient if it == 0 else _SDMGRAD_MOMENTUM * velocity + gradient
            w = simplex_projection(w - _SDMGRAD_LR * velocity)
        self.simplex_weights = w
        return (T * w + self.lamda) / (1 + self.lamda)


@register_weighting("modo")
class MoDo(GramianWeighting):
    """MoDo: one projected gradient step on the task weights per update, then d = Jᵀλ.

    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023 (MoDo, multi-objective gradient with
    double sampling). λ (from 1/T, a buffer) and

    λ ← Π_Δ(λ − γ (J₁J₂ᵀλ + ρλ)),  d = J₃ᵀλ,

    Π_Δ the projection onto the simplex. d updates the shared parameters and each head gets its
    own loss's gradient, as in the authors' code (heshandevaka/Trade-Off-MOL and LibMTL's
    ``MoDo``). Defaults γ = 1e-3, ρ = 0.1 (LibMTL's).

    One batch per step: the paper draws J₁, J₂ (and LibMTL J₃) from independent batches, so that
    J₁J₂ᵀλ is an unbiased estimate of ∇_λ ½||Jλ||²; the step contract gives one batch, so here
    J₁ = J₂ = J₃ = J and G = JJᵀ is biased by the batch's gradient noise (the single-sample
    variant; MoCo with β = 1 and constant steps).
    """

    weigh_heads = False

    def __init__(self, tasks: Sequence[str], mode: str | None = None, gamma: float = 1e-3, rho: float = 0.1):
        super().__init__(tasks, mode)
        _positive(gamma, "gamma")
        _non_negative(rho, "rho")
        self.gamma, self.rho = float(gamma), float(rho)
        self.register_buffer("lambdas", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=solvers.DTYPE))

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        G = G.to(solvers.DTYPE)
        lam = self.lambdas.to(G.device)
        self.lambdas = simplex_projection(lam - self.gamma * (G @ lam + self.rho * lam))
        return self.lambdas


@register_weighting("config_grad")
class ConFIG(GramianWeighting):
    """ConFIG: the direction with equal cosine to every task gradient, its length their projections' sum.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", arXiv 2024, ICLR 2025 (registered as ``config_grad``: ``config`` would read as a
    configuration). With the unit gradients Û (rows g_t/||g_t||):
    v = Û⁺1 (least squares, least norm), u = v/||v||, d = (Σ_t g_tᵀu) u,
    so that cos(d, g_t) is the same for every task and positive whenever Û has full row rank.

    In Gramian terms, with n_t = ||g_t|| and the cosine matrix C = N⁻¹GN⁻¹: v = Jᵀr with
    r = N⁻¹C⁺1, and d = Jᵀw with w = (1ᵀGr / rᵀGr) r. v is IMTL-G's direction; the two differ
    in length only (IMTL-G: Σ_t α_t = 1). A zero gradient gets weight 0 (the official code's
    ``nan_to_num`` of its unit vector); C⁺ cuts eigenvalues below T·10·eps of the largest.
    As in the official MTL code (tum-pbs/ConFIG, ``experiments/MTL``), d updates the shared
    parameters and each head gets the gradient of its own loss (``weigh_heads`` False). The
    paper's momentum variant (M-ConFIG) is not included.
    """

    weigh_heads = False

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        rtol = 10 * G.shape[0] * torch.finfo(G.dtype).eps
        G = G.to(solvers.DTYPE)
        scale = torch.where(solvers.nonzero(G), solvers.inverse_norms(G), 0.0)
        cosines = scale[:, None] * G * scale[None, :]
        r = scale * (torch.linalg.pinv(cosines, rtol=rtol, hermitian=True) @ torch.ones_like(scale))
        squared = r @ G @ r  # ||v||²
        length = G.sum(dim=0) @ r  # Σ_t g_tᵀv
        return torch.where(squared > 0, length / torch.where(squared > 0, squared, 1.0), 0.0) * r
