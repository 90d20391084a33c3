"""Loss-level weightings: one backward of a combination of the task losses."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from mtl.weighting.base import GramianWeighting, LossWeighting, register_weighting

# Added inside logs so that a task whose loss reaches exactly 0 keeps a finite objective,
# as the official FAMO and DB-MTL code do.
_EPS = 1e-8


def _positive(value: float, arg: str) -> None:
    if not value > 0:
        raise ValueError(f"weighting.{arg} must be > 0, got {value!r}.")


def _non_negative(value: float, arg: str) -> None:
    if not value >= 0:
        raise ValueError(f"weighting.{arg} must be >= 0, got {value!r}.")


@register_weighting("equal")
class EqualWeighting(LossWeighting):
    """Equal weights: L = Σ_t L_t (reduction="sum") or L = (1/T) Σ_t L_t (reduction="mean")."""

    requires_all_tasks = False  # a task missing from a step contributes 0

    def __init__(self, tasks: Sequence[str], reduction: str = "sum"):
        super().__init__(tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"weighting.reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.reduction = reduction

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        total = losses.sum()
        return total / self.num_tasks if self.reduction == "mean" else total

    def weights(self) -> torch.Tensor:
        value = 1.0 / self.num_tasks if self.reduction == "mean" else 1.0
        return torch.full((self.num_tasks,), value)


@register_weighting("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting: learnable log-variances s_t, L = Σ_t exp(−s_t) L_t + s_t.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018. With s_t = log σ_t², the paper's per-task term
    L_t/(cσ_t²) + log σ_t (c = 2 for regression, 1 for classification) is written in the
    common single form L = Σ_t exp(−s_t) L_t + s_t. LibMTL's ``UW`` uses half of it,
    Σ_t exp(−s_t) L_t / 2 + s_t / 2: same minimiser, half the gradient.
    s_t starts at 0 (weights 1, the equal-sum start) and trains with the model's optimizer.
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(self.num_tasks))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return (torch.exp(-self.log_vars) * losses + self.log_vars).sum()

    def weights(self) -> torch.Tensor:
        return torch.exp(-self.log_vars.detach())


@register_weighting("dwa")
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average: weights from the ratio of each task's last two epoch losses.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019:
    w_t(e) = T · exp(r_t(e−1)/temperature) / Σ_k exp(r_k(e−1)/temperature),
    r_t(e−1) = L_t(e−1) / L_t(e−2), with L_t(e) the mean training loss of task t over epoch e.
    Epochs 0 and 1 use w_t = 1. L = Σ_t w_t L_t.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks)
        _positive(temperature, "temperature")
        self.temperature = temperature
        # NaN until an epoch has ended: the ratio is then NaN and the weights stay 1.
        self.register_buffer("last_epoch_losses", torch.full((self.num_tasks,), float("nan")))
        self.register_buffer("loss_weights", torch.ones(self.num_tasks))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.loss_weights * losses).sum()

    def weights(self) -> torch.Tensor:
        return self.loss_weights.clone()

    def on_epoch_end(self, epoch_losses: torch.Tensor) -> None:
        losses = epoch_losses.detach().to(self.last_epoch_losses)
        ratio = losses / self.last_epoch_losses
        dwa = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        self.loss_weights.copy_(torch.where(torch.isnan(ratio), torch.ones_like(ratio), dwa))
        self.last_epoch_losses.copy_(losses)


@register_weighting("gls")
class GeometricLossStrategy(LossWeighting):
    """Geometric loss strategy: the geometric mean of the task losses, L = (Π_t L_t)^(1/T).

    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation
    and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019. Computed as
    exp(mean_t log L_t), which neither overflows nor underflows for many tasks.
    """

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.log(losses + _EPS).mean())


@register_weighting("rlw")
class RandomLossWeighting(LossWeighting):
    """Random loss weighting: fresh random weights each step, w = softmax(λ), λ ~ N(0, I).

    Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning", TMLR 2022. L = Σ_t w_t L_t. λ is drawn on the CPU from the
    module's own generator (seeded by ``seed``), whose state is in the state dict, so a
    resumed run draws the same weights as an uninterrupted one.
    """

    def __init__(self, tasks: Sequence[str], seed: int = 0):
        super().__init__(tasks)
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("last_weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks), persistent=False)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(torch.randn(self.num_tasks, generator=self.generator), dim=0)
        self.last_weights = weights.to(losses.device, non_blocking=True)
        return (self.last_weights * losses).sum()

    def weights(self) -> torch.Tensor:
        return self.last_weights.clone()

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"])


@register_weighting("log")
class LogLosses(LossWeighting):
    """Scale-invariant log losses: L = Σ_t log L_t (each task's gradient scaled by 1/L_t).

    The scale-invariant (SI) baseline of Navon et al., "Multi-Task Learning as a Bargaining
    Game", ICML 2022, also used by Liu et al., "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023: invariant to rescaling any task's loss by a constant.
    """

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.log(losses + _EPS).sum()


@register_weighting("imtl_l")
class IMTLLoss(LossWeighting):
    """IMTL-L: learnable loss scales, L = Σ_t (exp(s_t) L_t − s_t).

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (the loss-balance part, IMTL-L). The −s_t term keeps exp(s_t) from collapsing
    to 0; at the optimum exp(s_t) L_t = 1, so every scaled loss is balanced. s_t starts at 0
    and trains with the model's optimizer.

    This is uncertainty weighting (``uncertainty``, L = Σ_t exp(−s'_t) L_t + s'_t) with
    s'_t = −s_t: the same objective, from the same start (0). The gradient w.r.t. s_t is minus
    that w.r.t. s'_t and the model's gradients are equal, so under any optimizer whose step is
    odd in the gradient (SGD, Adam, AdamW with s excluded from weight decay, as the trainer
    does) s_t = −s'_t at every step and the two runs are bit-identical (tested). Benchmarks
    count them as one method. The paper combines IMTL-L with IMTL-G (the full IMTL, as
    LibMTL's ``IMTL``); here each is a separate weighting.
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__(tasks)
        self.log_scales = nn.Parameter(torch.zeros(self.num_tasks))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return (torch.exp(self.log_scales) * losses - self.log_scales).sum()

    def weights(self) -> torch.Tensor:
        return torch.exp(self.log_scales.detach())


@register_weighting("famo")
class FAMO(LossWeighting):
    """FAMO: task logits ξ adapted so that all log losses decrease at the same rate.

    Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
    (Algorithm 1, and the official code github.com/Cranial-XIX/FAMO). With z = softmax(ξ),
    the model minimises L = c Σ_t z_t log L_t, c = 1 / Σ_t (z_t / L_t) held constant, so the
    update direction is Σ_t (c z_t / L_t) ∇L_t. After the optimizer step, with the same
    batch's losses before and after it, δ_t = log L_t(before) − log L_t(after) and
    ξ ← ξ − lr · (∇_ξ (z · δ) + gamma · ξ): tasks that improved least gain weight.
    ξ is a buffer updated by this plain gradient step (the paper's rule; the official code
    applies Adam with weight decay gamma to the same gradient).
    """

    wants_losses_after_step = True

    def __init__(self, tasks: Sequence[str], lr: float = 0.025, gamma: float = 0.001):
        super().__init__(tasks)
        _positive(lr, "lr")
        _non_negative(gamma, "gamma")
        self.lr, self.gamma = lr, gamma
        self.register_buffer("logits", torch.zeros(self.num_tasks))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        z = torch.softmax(self.logits, dim=0)
        losses = losses + _EPS
        c = 1.0 / (z / losses.detach()).sum()
        return c * (z * torch.log(losses)).sum()

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def update(self, losses: torch.Tensor, after: torch.Tensor | None = None) -> None:
        if after is None:
            raise ValueError("FAMO.update needs the same batch's losses after the optimizer step (after=...).")
        delta = torch.log(losses.detach().to(self.logits) + _EPS) - torch.log(after.detach().to(self.logits) + _EPS)
        z = torch.softmax(self.logits, dim=0)
        # ∇_ξ (z · δ) through the softmax Jacobian diag(z) − z zᵀ.
        grad = z * (delta - (z * delta).sum())
        self.logits.sub_(self.lr * (grad + self.gamma * self.logits))


@register_weighting("gradnorm")
class GradNorm(GramianWeighting):
    """GradNorm: weights that equalise the tasks' gradient norms at their relative training rates.

    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018 (Algorithm 1). J holds the
    gradients of the unweighted losses w.r.t. the last shared layer group, so with weights w:
    G_t = ||w_t ∇L_t||, Ḡ = mean_t G_t, r_t = (L_t/L_t(0)) / mean_k (L_k/L_k(0)),
    L_grad = Σ_t |G_t − Ḡ r_t^alpha| (targets constant),
    w ← w − lr ∇_w L_grad, then w ← T w / Σ_k w_k.
    This step is trained on Σ_t w_t(before the update) L_t, as in the paper; the updated w
    is used from the next step. L_t comes from ``observe(losses)``, which the engine calls
    before ``aggregate``; L_t(0) are the first observed losses. w is a buffer updated by the
    plain gradient step above (lr), clamped at 0 before renormalising because a large step
    can cross zero and a negative weight would ascend that task's loss.
    """

    modes = ("last_shared", "parameters")

    def __init__(self, tasks: Sequence[str], mode: str | None = None, alpha: float = 1.5, lr: float = 0.025):
        super().__init__(tasks, mode)
        _non_negative(alpha, "alpha")
        _positive(lr, "lr")
        self.alpha, self.lr = alpha, lr
        self.register_buffer("loss_weights", torch.ones(self.num_tasks))
        # NaN until the first observed step records L_t(0).
        self.register_buffer("initial_losses", torch.full((self.num_tasks,), float("nan")))
        self._loss_ratios: torch.Tensor | None = None

    def observe(self, losses: torch.Tensor) -> None:
        """This step's task losses (before weighting), for the training rates r_t."""
        losses = losses.detach().to(self.initial_losses)
        self.initial_losses.copy_(torch.where(torch.isnan(self.initial_losses), losses, self.initial_losses))
        self._loss_ratios = losses / self.initial_losses

    def weights(self) -> torch.Tensor:
        return self.loss_weights.clone()

    def weigh(self, G: torch.Tensor) -> torch.Tensor:
        if self._loss_ratios is None:
            raise RuntimeError("GradNorm needs this step's losses: call observe(losses) before aggregate or weigh.")
        norms = G.diagonal().clamp_min(0).sqrt()  # ||∇L_t||
        w = self.loss_weights.to(G, copy=True)  # returned: must not see the update below
        grad_norms = w * norms
        ratios = self._loss_ratios.to(G)
        target = grad_norms.mean() * (ratios / ratios.mean()) ** self.alpha
        # d|G_t − target_t|/dw_t = sign(G_t − target_t) · ||∇L_t||, since G_t = w_t ||∇L_t||.
        new = (w - self.lr * torch.sign(grad_norms - target) * norms).clamp_min(0)
        self.loss_weights.copy_(self.num_tasks * new / new.sum())
        self._loss_ratios = None
        return w
