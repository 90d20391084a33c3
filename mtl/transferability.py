"""Transferability scores: how well a candidate source will transfer to a target task, estimated
from one forward pass of the target's training data, without training (``mtl rank``).

A score sees the candidate trunk's features of the target's inputs, ``features`` [N, D] (pooled
to vectors), the target's labels, and, for the scores that need them (LEEP, NCE), the source
model's class probabilities on the same inputs, ``source_probs`` [N, C_s] (a softmax of a source
classifier head). Classification labels are class indices [N]; regression targets are
real values [N, K]. Higher is better for every score. A score that is not defined for a target
or candidate says why (``not_applicable``) instead of returning a number.

numpy and scipy only: no library computes these scores (TLlib's reference code is research code,
not a package), so each is written here from its paper's formula.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.stats

from mtl.registry import Registry

CLASSIFICATION = "classification"
REGRESSION = "regression"


class TransferabilityScore:
    """Base class of transferability scores: ``score(features, labels, source_probs) -> float``,
    higher meaning better expected transfer. ``labels`` are integer class indices [N] for a
    classification target, floats [N, K] for a regression target.

    ``kinds`` are the target kinds the score is defined for (classification, regression);
    ``needs_source`` marks scores that read the source model's class probabilities."""

    kinds: tuple[str, ...] = (CLASSIFICATION,)
    needs_source = False

    def not_applicable(self, kind: str, has_source: bool) -> str | None:
        """Why the score cannot be computed for a target of ``kind`` (and a candidate with or
        without a source classifier head); None when it can."""
        if kind not in self.kinds:
            return f"defined for {' and '.join(self.kinds)} targets only; this target is {kind}"
        if self.needs_source and not has_source:
            return "needs the source model's class probabilities; this candidate has no source classifier head"
        return None

    def score(self, features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
        raise NotImplementedError


SCORES: Registry[TransferabilityScore] = Registry("score", TransferabilityScore, builtins=("mtl.transferability",))
register_score = SCORES.register


def class_indices(labels: np.ndarray) -> np.ndarray:
    """Labels as 0..C-1 over the classes present: a class absent from the scored sample would
    otherwise be an empty group (a mean of nothing in H-score, a log of 0 in TransRate)."""
    return np.unique(np.asarray(labels).reshape(-1), return_inverse=True)[1]


def one_hot(labels: np.ndarray) -> np.ndarray:
    y = class_indices(labels)
    return np.eye(int(y.max()) + 1)[y]


def gram_eigenvalues(f: np.ndarray) -> np.ndarray:
    """The eigenvalues of FᵀF (the squared singular values of F), from the smaller of the two Gram
    matrices FᵀF and FFᵀ; tiny negative rounding clipped to 0."""
    n, d = f.shape
    return np.clip(scipy.linalg.eigvalsh(f @ f.T if n <= d else f.T @ f), 0.0, None)


def left_singular(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, σ): the left singular vectors of F [N, r] and the eigenvalues σ = s² of FᵀF [r], for the
    r singular values that are not 0 in floating point.

    From the eigenvectors of the smaller Gram matrix, not an SVD of F: on features wider than the
    sample (1,280 pooled features of 500 images) LAPACK's SVD took 10x as long here, and LogME's
    reference code computes the spectrum from FᵀF too."""
    n, d = f.shape
    if n <= d:
        sigma, u = scipy.linalg.eigh(f @ f.T)
    else:
        sigma, v = scipy.linalg.eigh(f.T @ f)
    keep = sigma > sigma.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    sigma = sigma[keep]
    u = u[:, keep] if n <= d else f @ v[:, keep] / np.sqrt(sigma)
    return u, sigma


@register_score("logme")
class LogME(TransferabilityScore):
    """LogME: the log maximum evidence of a Bayesian linear model on the features, per sample
    (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML).

    For each target column y (a class's 0/1 indicator, or one regression output) with prior
    w ~ N(0, α⁻¹I_D) and likelihood y | F, w ~ N(Fw, β⁻¹I_N), the evidence is
        L(α, β) = D/2 log α + N/2 log β − N/2 log 2π − β/2 ‖Fm − y‖² − α/2 ‖m‖² − 1/2 log|A|,
        A = αI + βFᵀF,  m = βA⁻¹Fᵀy,
    maximised by the fixed point α = γ/‖m‖², β = (N − γ)/‖Fm − y‖², γ = Σ_i βσ_i/(α + βσ_i), σ_i the
    eigenvalues of FᵀF (You et al. 2021, Algorithm 1; in F's singular basis each iteration costs
    O(min(N, D)), as in their arXiv:2110.10545). LogME = (1/K) Σ_columns L(α*, β*)/N. Classification and regression.
    """

    kinds = (CLASSIFICATION, REGRESSION)

    def __init__(self, max_iterations: int = 100, tolerance: float = 1e-8):
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
            raise ValueError(f"logme.max_iterations must be an integer >= 1, got {max_iterations!r}.")
        if not tolerance > 0:
            raise ValueError(f"logme.tolerance must be > 0, got {tolerance!r}.")
        self.max_iterations = max_iterations
        self.tolerance = tolerance

    def score(self, features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
        f = np.asarray(features, dtype=np.float64)
        n, d = f.shape
        labels = np.asarray(labels)
        y = labels.astype(np.float64).reshape(n, -1) if labels.dtype.kind == "f" else one_hot(labels)
        u, sigma = left_singular(f)
        sigma = sigma[:, None]  # [r, 1]
        x2 = (u.T @ y) ** 2  # [r, K]: y's squared coordinates along the features' singular directions
        outside = (y**2).sum(0) - x2.sum(0)  # ‖y‖² off the span of F: a residual whatever w is
        zeros = d - len(sigma)  # eigenvalues of FᵀF that are 0: each adds log α to log|A|
        alpha, beta = np.ones(y.shape[1]), np.ones(y.shape[1])
        for _ in range(self.max_iterations):
            t = alpha / beta
            gamma, m2, res2 = self._moments(sigma, x2, outside, t)
            # The 1e-5 is LogME's reference code's: a column fitted exactly (res2 = 0) gets a large
            # finite β instead of a division by zero.
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if np.all(np.abs(alpha / beta - t) <= self.tolerance * t):
                break
        _, m2, res2 = self._moments(sigma, x2, outside, alpha / beta)
        log_det = np.log(alpha + beta * sigma).sum(0) + zeros * np.log(alpha)
        evidence = (
            d / 2 * np.log(alpha) + n / 2 * np.log(beta) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * res2 - alpha / 2 * m2 - log_det / 2
        )
        return float(np.mean(evidence / n))

    @staticmethod
    def _moments(sigma: np.ndarray, x2: np.ndarray, outside: np.ndarray, t: np.ndarray):
        """γ, ‖m‖² and ‖Fm − y‖² at the ratio t = α/β, in the singular basis of F."""
        gamma = (sigma / (sigma + t)).sum(0)
        m2 = (sigma * x2 / (sigma + t) ** 2).sum(0)
        res2 = (x2 * (t / (sigma + t)) ** 2).sum(0) + outside
        return gamma, m2, res2


@register_score("leep")
class LEEP(TransferabilityScore):
    """LEEP: the log expected empirical prediction of the source classifier's outputs
    (Nguyen et al. 2020, "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations", ICML).

    With θ(x)_z the source model's probability of source class z:
        P̂(y, z) = (1/N) Σ_{i: y_i = y} θ(x_i)_z,   P̂(y | z) = P̂(y, z) / Σ_y' P̂(y', z),
        LEEP = (1/N) Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z.
    Needs a source classifier head; classification targets only.
    """

    needs_source = True

    def score(self, features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
        theta = np.asarray(source_probs, dtype=np.float64)
        y = one_hot(labels)  # [N, C_t]
        joint = y.T @ theta / len(theta)  # P̂(y, z), [C_t, C_s]
        conditional = joint / joint.sum(0, keepdims=True)  # P̂(y | z)
        expected = theta @ conditional.T  # [N, C_t]: the empirical predictor's probability of each target class
        return float(np.mean(np.log((expected * y).sum(1))))


@register_score("nce")
class NCE(TransferabilityScore):
    """NCE: the negative conditional entropy of the target labels given the source model's
    predicted labels (Tran et al. 2019, "Transferability and Hardness of Supervised
    Classification Tasks", ICCV).

    With z_i = argmax_z θ(x_i)_z the source prediction and P̂ the empirical joint of (y, z):
        NCE = −H(Y | Z) = Σ_{y,z} P̂(y, z) log P̂(y | z) = −Σ_z P̂(z) H(P̂(· | z)).
    Needs a source classifier head; classification targets only.
    """

    needs_source = True

    def score(self, features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
        z = np.asarray(source_probs).argmax(1)
        y = class_indices(labels)
        counts = np.zeros((y.max() + 1, z.max() + 1))
        np.add.at(counts, (y, z), 1.0)
        seen = counts.sum(0) > 0  # source classes predicted at least once
        p_z = counts[:, seen].sum(0) / len(y)
        return float(-(p_z * scipy.stats.entropy(counts[:, seen], axis=0)).sum())


@register_score("hscore")
class HScore(TransferabilityScore):
    """H-score: how well the class-conditional means of the features separate, relative to the
    features' own spread (Bao et al. 2019, "An Information-Theoretic Approach to Transferability in
    Task Transfer Learning", ICIP).

        H(f) = tr(cov(f)⁻¹ cov(E[f | y])),
    with E[f | y] each sample's class mean and cov(f)⁻¹ a pseudo-inverse (features may be
    collinear). Computed in the sample space: with F the centred features, U its left singular
    vectors and P the projection onto the class indicators (P F = the centred class means),
    H = tr((FᵀF)⁺ FᵀPF) = tr(UᵀPU) = Σ_c ‖Uᵀ1_c‖²/n_c, which needs no D×D inverse.
    Classification targets only.
    """

    def score(self, features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
        f = np.asarray(features, dtype=np.float64)
        u, _ = left_singular(f - f.mean(0, keepdims=True))
        y = one_hot(labels)
        return float((((u.T @ y) ** 2).sum(0) / y.sum(0)).sum())


@register_score("transrate")
class TransRate(TransferabilityScore):
    """TransRate: the mutual information between features and labels, measured by the coding rate
    (Huang et al. 2022, "Frustratingly Easy Transferability Estimation", ICML).

    With Z the centred features (n rows, d columns) and R(Z, ε) = 1/2 log det(I_d + ZᵀZ/(nε)):
        TrR = R(Z, ε) − (1/C) Σ_c R(Z_c, ε),
    Z_c the rows of class c; ε = 1e-4 and the (1/C) average over classes as in TLlib's
    tllib/ranking/transrate.py. Classification targets only.
    """

    def __init__(self, eps: float = 1e-4):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"transrate.eps must be a number > 0, got {eps!r}.")
        self.eps = float(eps)

    def rate(self, z: np.ndarray) -> float:
        """R(Z, ε), the coding rate of ``z``'s rows: 1/2 Σ_i log(1 + σ_i/(nε)), σ_i the eigenvalues of
        ZᵀZ (the determinant's, taken from the smaller Gram matrix: a class has fewer rows than features)."""
        return 0.5 * float(np.log1p(gram_eigenvalues(z) / (len(z) * self.eps)).sum())

    def score(self, features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
        z = np.asarray(features, dtype=np.float64)
        z = z - z.mean(0, keepdims=True)
        y = class_indices(labels)
        classes = range(y.max() + 1)
        return float(self.rate(z) - np.mean([self.rate(z[y == c]) for c in classes]))
