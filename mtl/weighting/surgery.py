"""Gradient surgery and balancing: PCGrad, GradVac, GradDrop, IMTL-G, Aligned-MTL, DB-MTL.

GradDrop and DB-MTL map the per-task gradients ``J [T, D]`` to a combined gradient that is
not a weighted sum of this step's gradients. PCGrad, GradVac, IMTL-G and Aligned-MTL are
functions of the Gramian JJᵀ (``GramianWeighting.weigh``): PCGrad's and GradVac's adjusted
sum updates the shared parameters only, while IMTL-G's and Aligned-MTL's weights weigh the
losses. Half-precision ``J`` is processed in float32 and the result is returned in J's dtype. Random draws come from the module's own seeded generator,
whose state is checkpointed with the module (``get_extra_state``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mtl.weighting import solvers
from mtl.weighting.base import Aggregation, GradientWeighting, GramianWeighting, compute_dtype, register_weighting


_NORM_EPS = 1e-8  # DB-MTL's guard on ||ĝ_t|| in the reference code


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _check_beta(name: str, value: float, low_open: bool) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        bounds = "in (0, 1]" if low_open else "in [0, 1)"
        raise ValueError(f"weighting.{name} must be {bounds}, got {value!r}.")


class _Seeded:
    """Mixin for a gradient method with random draws from its own seeded, checkpointed generator.

    The state of a CPU generator is kept (a small byte tensor, not a buffer, so ``.to()``
    leaves it on the host); each step draws one seed from it for a generator on J's device,
    so large draws happen on the device without a host round trip. Draws are reproducible
    for a given seed and device type.
    """

    def __init__(self, tasks: Sequence[str], mode: str | None, seed: int):
        super().__init__(tasks, mode)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"weighting.seed must be an int, got {seed!r}.")
        self._rng_state = torch.Generator().manual_seed(seed).get_state()

    def _device_generator(self, device: torch.device) -> torch.Generator:
        host = torch.Generator()
        host.set_state(self._rng_state)
        seed = int(torch.randint(2**62, (), generator=host))
        self._rng_state = host.get_state()
        return torch.Generator(device=device).manual_seed(seed)

    def _random_orders(self, num_tasks: int, device: torch.device) -> torch.Tensor:
        """``[T, T-1]``: row i is a random order of the tasks other than i."""
        keys = torch.rand(num_tasks, num_tasks, generator=self._device_generator(device), device=device)
        keys.fill_diagonal_(2.0)  # above every draw, so task i sorts last and is cut off
        return keys.argsort(dim=1)[:, : num_tasks - 1]

    def get_extra_state(self) -> dict:
        return {"generator": self._rng_state.clone()}

    def set_extra_state(self, state: dict) -> None:
        self._rng_state = state["generator"].clone()


class _PairwiseSurgery(_Seeded, GramianWeighting):
    """Methods that adjust each g_i against the others in a random order (PCGrad, GradVac).

    Every adjusted g_i stays a combination Σ_k C_ik g_k of the originals, and every inner
    product the adjustments need is (C JJᵀ)_ij, so a method's ``coefficients`` loop runs on
    ``[T, T]`` matrices (O(T³)) after one Gramian (O(T²D)), never on ``[T, D]`` copies. The
    update Σ_i g_i is wᵀJ with w = Σ_i C_i, reported as the task weights.
    """

    weigh_heads = False

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        """``C [T, T]`` with adjusted g_i = Σ_k C_ik g_k, from the Gramian ``JJᵀ``."""
        raise NotImplementedError

    def adjusted(self, J: torch.Tensor) -> torch.Tensor:
        """The adjusted per-task gradients ``[T, D]`` (in the compute dtype)."""
        G = J.to(compute_dtype(J))
        return self.coefficients(G @ G.T) @ G

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        return self.coefficients(G).sum(dim=0)


@register_weighting("pcgrad")
class PCGrad(_PairwiseSurgery):
    """PCGrad: project each task gradient off the others it conflicts with, then sum.

    Yu et al. 2020, "Gradient Surgery for Multi-Task Learning". For each task i, over the
    other tasks j in a random order: if g_iᵀg_j < 0, g_i ← g_i − (g_iᵀg_j / ||g_j||²) g_j,
    with g_i the running projection and g_j the original gradient. The update is the **sum**
    Σ_i g_i of the projected gradients, as in the official code (some ports take the mean).
    Computed on the Gramian (see ``_PairwiseSurgery``).
    """

    def __init__(self, tasks: Sequence[str], mode: str | None = None, seed: int = 0):
        super().__init__(tasks, mode, seed)

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        T = gram.shape[0]
        squared_norms = gram.diagonal().clamp_min(_tiny(gram.dtype))
        order = self._random_orders(T, gram.device)
        rows = torch.arange(T, device=gram.device)
        C = torch.eye(T, dtype=gram.dtype, device=gram.device)
        # Step k pairs every task i with its k-th other task at once: the g_j are the
        # originals, so this equals the per-task loop, without data-dependent branches.
        for k in range(order.shape[1]):
            j = order[:, k]
            conflict = (C @ gram)[rows, j].clamp(max=0.0)
            C = C.index_put((rows, j), -conflict / squared_norms[j], accumulate=True)
        return C


@register_weighting("gradvac")
class GradVac(_PairwiseSurgery):
    """GradVac: raise each pair's gradient cosine to an EMA target similarity, then sum.

    Wang et al. 2021, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
    in Massively Multilingual Models". For each task i, over the other tasks j in a random
    order, with φ_ij = cos(g_i, g_j) (g_i running, g_j original) and the target φ̂_ij (an EMA,
    initially 0): if φ_ij < φ̂_ij,
    g_i ← g_i + ||g_i|| (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (||g_j|| √(1−φ̂_ij²)) · g_j,
    which makes cos(g_i, g_j) = φ̂_ij; then φ̂_ij ← (1−β) φ̂_ij + β φ_ij. The update is Σ_i g_i.
    The paper applies this per layer; here it acts on the whole gradient vector (J carries
    no layer boundaries). Computed on the Gramian (see ``_PairwiseSurgery``), with
    ||g_i||² = (C JJᵀ Cᵀ)_ii.
    """

    def __init__(self, tasks: Sequence[str], mode: str | None = None, beta: float = 0.01, seed: int = 0):
        super().__init__(tasks, mode, seed)
        _check_beta("beta", beta, low_open=True)
        self.beta = beta
        self.register_buffer("target", torch.zeros(self.num_tasks, self.num_tasks))

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        """As the base class; also moves the EMA targets."""
        if self.target.device != gram.device:
            self.target = self.target.to(gram.device)  # once: the statistics live with the gradients
        T = gram.shape[0]
        tiny = _tiny(gram.dtype)
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        targets = self.target.to(gram.dtype, copy=True)
        rows = torch.arange(T, device=gram.device)
        order = self._random_orders(T, gram.device)
        C = torch.eye(T, dtype=gram.dtype, device=gram.device)
        for k in range(order.shape[1]):  # all tasks at once, as in PCGrad
            j = order[:, k]
            CG = C @ gram
            norms_i = (CG * C).sum(dim=1).clamp_min(0.0).sqrt()
            cos = (CG[rows, j] / (norms_i * norms[j]).clamp_min(tiny)).clamp(-1.0, 1.0)
            goal = targets[rows, j]
            sin, goal_sin = (1 - cos**2).sqrt(), (1 - goal**2).sqrt()
            denominator = norms[j] * goal_sin
            # A zero g_j, or a target of ±1 (reachable only in the limit), leaves g_i as it is.
            apply = (cos < goal) & (denominator > 0)
            scale = norms_i * (goal * sin - cos * goal_sin) / denominator.clamp_min(tiny)
            C = C.index_put((rows, j), torch.where(apply, scale, 0.0), accumulate=True)
            targets[rows, j] = (1 - self.beta) * goal + self.beta * cos
        self.target.copy_(targets)
        return C


@register_weighting("graddrop")
class GradDrop(_Seeded, GradientWeighting):
    """GradDrop: keep, element by element, only one sign of the task gradients, drawn by purity.

    Chen et al. 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout". Element-wise purity P = ½(1 + Σ_i g_i / Σ_i |g_i|), U ~ Uniform(0, 1) per
    element (shared by the tasks), masks M_i = I[g_i > 0]·I[U < P] + I[g_i < 0]·I[U > P],
    update Σ_i M_i g_i. The paper applies it at the shared representation (the default mode).
    Not included: the paper's optional sign(activation) factor and batch-dimension sum (J
    carries no activations) and its leak parameter (paper default 0).
    """

    modes = ("representation", "parameters")

    def __init__(self, tasks: Sequence[str], mode: str | None = None, seed: int = 0):
        super().__init__(tasks, mode, seed)

    def aggregate(self, J: torch.Tensor) -> Aggregation:
        G = J.to(compute_dtype(J))
        purity = 0.5 * (1 + G.sum(dim=0) / G.abs().sum(dim=0).clamp_min(_tiny(G.dtype)))
        draw = torch.rand(G.shape[1], generator=self._device_generator(G.device), device=G.device, dtype=G.dtype)
        keep = ((G > 0) & (draw < purity)) | ((G < 0) & (draw > purity))
        return Aggregation(gradient=(G * keep).sum(dim=0).to(J.dtype))


@register_weighting("imtl_g")
class IMTLG(GramianWeighting):
    """IMTL-G: weights whose combined gradient has equal projections on every task direction.

    Liu et al. 2021, "Towards Impartial Multi-task Learning" (gradient part). With
    u_t = g_t / ||g_t||, D = [g_1 − g_t]_{t=2..T}, U = [u_1 − u_t]_{t=2..T}:
    α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ_{t≥2} α_t, so that d = Σ_t α_t g_t has the same
    projection dᵀu_t = c on every task and Σ_t α_t = 1. In Gramian terms, with n_t = ||g_t||
    and the cosine matrix C = N⁻¹GN⁻¹ (N = diag(n)): γ = C⁻¹1, α = N⁻¹γ / Σ_t (γ_t / n_t),
    c = 1 / Σ_t (γ_t / n_t) (Uᵀγ is the vector whose projection on every u_t is 1).

    The closed form needs J of full row rank and no zero row. Elsewhere the paper's formula
    stops training: a zero g_t makes u_t undefined (``J = [[1, 0], [0, 0]]`` gave weights
    (0, 1), no update), and T > rank(J) makes D Uᵀ singular (``[[1, 0], [0, 1], [1, 1]]`` gave
    d = 0 although no task conflicts). Generalisation used here, equal to the closed form
    when J has full row rank and no zero row:

    - a zero g_t (``solvers.nonzero``: ||g_t||² ≤ 1e-30·max_s ||g_s||²) gets α_t = 0 and is
      left out of C;
    - γ = C⁺1, with C⁺ the pseudo-inverse (eigenvalues below T·10·eps of the input's dtype
      times the largest are cut): Uᵀγ is the least-norm x whose projections p = Ux are the
      least-squares fit to 1, i.e. p is the orthogonal projection of 1 onto range(U). The
      fit is exact (p = 1, equal projections) whenever equal projections exist, which full
      row rank guarantees;
    - α = N⁻¹γ / Σ_t (γ_t / n_t) as above, so Σ_t α_t = 1 and dᵀu_t = c·p_t; where no
      direction has a positive least-squares fit (p = 0, e.g. two opposite gradients), α = 0.

    What holds for the update: on full row rank every task gets the same projection c, so d
    descends every task iff c > 0, as in the paper; the paper's c can be negative (then d
    ascends every task), e.g. J = [[1, 0, 0], [0, 1, 0], [0.35, 0.35, 0.05]]: this is kept,
    to stay the paper's method. Weights can be negative (``[0.98, 0.98, −0.97]`` for
    ``[[1, 0, 0], [0, 1, 0], [1, 1, 0.1]]``) although every projection is positive.

    d updates the shared parameters only and each head gets the gradient of its own loss
    (``weigh_heads`` False), as in LibMTL's ``IMTL`` (median-research-group/LibMTL,
    ``LibMTL/weighting/IMTL.py``: the per-task backward fills the heads' gradients and only
    the shared ones are replaced) and SamsungLabs/MTL's ``imtl`` balancer: with a negative
    α_t, Σ_t α_t L_t would train head t to increase its own loss. The paper takes the
    gradients at the shared representation (the default mode).
    """

    modes = ("representation", "parameters")
    weigh_heads = False

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        rtol = 10 * G.shape[0] * torch.finfo(G.dtype).eps
        G = G.to(solvers.DTYPE)
        keep = solvers.nonzero(G)
        scale = torch.where(keep, solvers.inverse_norms(G), 0.0)
        cosines = scale[:, None] * G * scale[None, :]
        ones = torch.ones_like(scale)
        gamma = torch.linalg.pinv(cosines, rtol=rtol, hermitian=True) @ ones
        fit = cosines @ gamma  # p: the projections of Uᵀγ on the u_t
        alpha = scale * gamma
        total = alpha.sum()
        # ||p||² = 1ᵀp; below rounding, 1 is orthogonal to range(U) and no direction helps.
        usable = (ones @ fit > rtol * G.shape[0]) & (total != 0)
        return torch.where(usable, alpha / torch.where(total != 0, total, 1.0), 0.0)


@register_weighting("aligned_mtl")
class AlignedMTL(GramianWeighting):
    """Aligned-MTL: align the principal components of the task gradients to equal strength.

    Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning". With the
    Gramian JJᵀ = V Λ Vᵀ and σ_min the smallest singular value of J above a rank tolerance
    (λ > λ_max · T · eps, as in the official code), B = σ_min V Λ^{-1/2} Vᵀ (over the kept
    components) and the aligned gradients are BJ, whose singular values all equal σ_min. The
    update sums them, as the official code does (task importances w = 1, no 1/T):
    Jᵀ B 1, i.e. task weights w = B 1.

    w can be negative (``[0.98, 0.98, −0.97]``-like weights on nearly dependent gradients):
    w updates the shared parameters only and each head gets the gradient of its own loss
    (``weigh_heads`` False), as in the official code (SamsungLabs/MTL,
    ``code/optim/aligned/balancer.py``: each task's backward fills its decoder's gradient,
    ``set_shared_grad`` replaces only the shared ones, and ``scale_decoder_grad`` is off by
    default) and LibMTL's ``Aligned_MTL``.
    """

    weigh_heads = False

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        eigenvalues, V = torch.linalg.eigh(G)
        tolerance = eigenvalues.max() * G.shape[0] * torch.finfo(G.dtype).eps
        kept = eigenvalues > tolerance
        # Masks rather than slicing off the null space: the rank stays on the device.
        inverse_sqrt = torch.where(kept, eigenvalues.clamp_min(_tiny(G.dtype)).rsqrt(), 0.0)
        sigma_min = torch.where(kept, eigenvalues, torch.inf).min().sqrt()
        sigma_min = torch.where(kept.any(), sigma_min, 0.0)
        B = sigma_min * (V * inverse_sqrt) @ V.T
        return B.sum(dim=1)


@register_weighting("db_mtl")
class DBMTL(GradientWeighting):
    """DB-MTL: log losses, EMA task gradients rescaled to the largest norm, then summed.

    Lin et al. 2023, "Dual-Balancing Multi-Task Learning". Loss balancing: the task objectives
    are log(L_t + ε). Gradient balancing: ĝ_t ← β ĝ_t + (1−β) g_t from ĝ_t = 0, and the update
    Σ_t (max_k ||ĝ_k|| / (||ĝ_t|| + 1e-8)) ĝ_t, as in the authors' LibMTL code
    (median-research-group/LibMTL, ``LibMTL/weighting/DB_MTL.py``: ``grad_buffer`` starts at
    zeros, no bias correction, so the first update is (1−β) times that of a buffer started
    at g_1: 10× smaller at β = 0.9). The paper's step-dependent β_k = β / k^σ is the constant
    β (LibMTL's default σ = 0). The shared parameters get the update, each head the gradient
    of its own log loss (as there). The EMA buffer ``[T, D]`` is allocated at the first call
    with J's shape and device (in float32 for half-precision J); it restarts from zero if J's
    shape changes.
    """

    modes = ("parameters", "last_shared")

    def __init__(self, tasks: Sequence[str], mode: str | None = None, beta: float = 0.9, eps: float = 1e-8):
        super().__init__(tasks, mode)
        _check_beta("beta", beta, low_open=False)
        if not eps > 0:
            raise ValueError(f"weighting.eps must be > 0, got {eps!r}.")
        self.beta = beta
        self.eps = eps
        self.register_buffer("grad_ema", torch.zeros(0))

    def transform_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.log(losses + self.eps)

    def aggregate(self, J: torch.Tensor) -> Aggregation:
        G = J.to(compute_dtype(J))
        if self.grad_ema.shape != G.shape:
            self.grad_ema = torch.zeros_like(G)
        else:
            self.grad_ema = self.grad_ema.to(G.device, G.dtype)
        # In place: a new [T, D] buffer each step cost more than the update itself on CPU.
        self.grad_ema.lerp_(G, 1 - self.beta)
        norms = self.grad_ema.norm(dim=1)
        scales = norms.max() / (norms + _NORM_EPS)
        return Aggregation(gradient=(scales @ self.grad_ema).to(J.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The buffer's size is only known once gradients have been seen: take the saved one's.
        saved = state_dict.get(prefix + "grad_ema")
        if saved is not None:
            self.grad_ema = torch.empty_like(saved, device=self.grad_ema.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
