"""Statistics of a comparison: paired per-seed differences, their test, CI, effect size,
multiplicity correction, power, bootstrap CIs and mean ranks.

Every function takes plain arrays. Those that test or summarize differences work along the
last axis (the seeds), so a stack of comparisons (methods, tasks, simulated grids) is one
call; ``tests/test_stats.py`` simulates thousands of grids this way.

Pairing: a comparison grid runs every method with the same seeds, and a seed fixes the
target's labelled subset (``subset_seed``), the train/val/test split (``split_seed``, the
same for every seed) and the torch/numpy/python RNGs that initialise the trunk and heads and
order the batches. The difference method − baseline at one seed therefore cancels what that
seed's labelled subset contributes to both, which is why differences are taken per seed
before they are averaged.

Which test. The paired t-test (Student 1908; ``scipy.stats.ttest_rel`` is the one-sample
t-test of the differences) is used rather than the Wilcoxon signed-rank test: with n seeds
the signed-rank test's smallest two-sided p-value is 2 / 2ⁿ, so below n = 6 it cannot reach
p < 0.05 whatever the difference (0.25 at 3 seeds, 0.0625 at 5), and comparisons here
typically have 3–10 seeds. The t-test assumes roughly normal differences; its false-verdict
rate under that assumption is checked by simulation in ``tests/test_stats.py``.

Seeds as a budget (:class:`SeedBudget`): a grid that adds seeds until its comparisons
resolve looks at the data after every seed, and testing each look at α would let chance
resolve a null comparison at some look far more often than α (about 17% at 3 to 10 seeds
for one comparison). Its looks split α instead, so the false-verdict rate stays ≤ α.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1000  # beyond this, "seeds needed" is reported as "more than MAX_SEEDS"


def paired_differences(method, baseline, higher_is_better: bool = True) -> np.ndarray:
    """Per-seed ``method − baseline``, signed so that positive means the method is better
    (negated where lower is better). Both arrays hold the same seeds in the same order on
    their last axis; leading axes broadcast (several methods against one baseline)."""
    method, baseline = np.asarray(method, float), np.asarray(baseline, float)
    if method.shape[-1:] != baseline.shape[-1:]:
        raise ValueError(f"paired values need the same seeds: shapes {method.shape} and {baseline.shape}")
    return (method - baseline) if higher_is_better else (baseline - method)


def _quiet(fn, *args, **kwargs):
    # Differences that are (nearly) equal at every seed make scipy warn of lost precision in
    # the variance; the limits it then returns (t = ±inf, p = 0, or NaN when all are 0) are
    # handled by the callers.
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def t_interval(diffs, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of the differences along the last axis and its two-sided t confidence interval,
    ``mean ± t_{1−α/2, n−1} · s / √n`` (Student 1908), ``scipy.stats.t`` quantiles.
    Returns (mean, low, high); low and high are NaN with one seed."""
    d = np.asarray(diffs, float)
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * d.std(axis=-1, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def _constant(d: np.ndarray) -> np.ndarray:
    """Whether the differences are equal at every seed, up to float rounding (0.8 − 0.4 and
    0.9 − 0.5 differ in the last bit); their t statistic would be that rounding's artefact."""
    spread = d.max(axis=-1) - d.min(axis=-1)
    return spread <= 1e-9 * np.maximum(np.abs(d).max(axis=-1), np.finfo(float).tiny)


def paired_t_test(diffs) -> np.ndarray:
    """Two-sided p-value of the paired t-test (H0: mean difference 0) along the last axis:
    ``scipy.stats.ttest_1samp(diffs, 0)``, identical to ``ttest_rel(method, baseline)``.
    Differences equal at every seed give p = 1 when all are zero, and NaN (no test) when they
    are not: the t statistic divides by a spread of zero, and coarse metrics (accuracy on a
    small test set) tie by chance often enough that p = 0 there made false verdicts. One seed
    gives NaN (no test)."""
    d = np.asarray(diffs, float)
    if d.shape[-1] < 2:
        return np.full(d.shape[:-1], np.nan)
    p = np.asarray(_quiet(stats.ttest_1samp, d, 0.0, axis=-1).pvalue, float)
    return np.where(_constant(d), np.where(d.mean(axis=-1) != 0, np.nan, 1.0), p)


def cohen_dz(diffs) -> np.ndarray:
    """Effect size of paired data, Cohen's d_z = mean(d) / sd(d) (Cohen 1988, §2.3.5; Lakens
    2013, eq. 5) along the last axis; ±inf where the differences do not vary, NaN with one seed
    or all differences zero."""
    d = np.asarray(diffs, float)
    if d.shape[-1] < 2:
        return np.full(d.shape[:-1], np.nan)
    mean = d.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dz = mean / d.std(axis=-1, ddof=1)
        return np.where(_constant(d), np.where(mean != 0, np.sign(mean) * np.inf, np.nan), dz)


def holm(pvalues) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values along the last axis: sorted ascending, the i-th
    (from 0) of m is multiplied by m − i, made non-decreasing, and capped at 1. Rejecting where
    the adjusted p < α controls the family-wise error rate at α under any dependence. NaN
    p-values (no test) are left NaN and do not count towards m."""
    p = np.asarray(pvalues, float)
    out = np.full_like(p, np.nan)
    tested = ~np.isnan(p)
    m = tested.sum(axis=-1, keepdims=True)
    order = np.argsort(np.where(tested, p, np.inf), axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1)
    i = np.arange(p.shape[-1])
    scaled = np.where(i < m, np.minimum(1.0, (m - i) * ranked), np.nan)
    scaled = np.fmax.accumulate(scaled, axis=-1)
    np.put_along_axis(out, order, scaled, axis=-1)
    return np.where(tested, out, np.nan)


def power(dz, n, alpha: float = ALPHA) -> np.ndarray:
    """Power of the two-sided paired t-test at level ``alpha`` with n seeds when the true
    effect size is d_z: the noncentral t with n − 1 degrees of freedom and noncentrality
    d_z·√n (``scipy.stats.nct``; Cohen 1988, ch. 2) falling beyond ±t_{1−α/2, n−1}."""
    dz, n = np.asarray(dz, float), np.asarray(n, float)
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = dz * np.sqrt(n)
    return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


def seeds_needed(dz: float, alpha: float = ALPHA, target: float = POWER) -> int | None:
    """Smallest n ≥ 2 at which :func:`power` reaches ``target`` for effect size d_z; None when
    d_z is 0 or NaN (no difference to resolve) or more than ``MAX_SEEDS`` would be needed."""
    if np.isinf(dz):  # differences equal at every seed: two seeds show it
        return 2
    if np.isnan(dz) or dz == 0:
        return None
    n = np.arange(2, MAX_SEEDS + 1)
    reached = power(abs(dz), n, alpha) >= target
    return int(n[reached.argmax()]) if reached.any() else None


def bootstrap_ci(statistic, data: tuple, level: float = 0.95, n_resamples: int = 2000, seed: int = 0):
    """Percentile bootstrap CI (Efron & Tibshirani 1993, ch. 13) of ``statistic(*data, axis=-1)``
    with ``scipy.stats.bootstrap``, resampling the seeds (the last axis of every array in
    ``data``) jointly, so paired values stay paired. Leading axes are a batch: one CI each.
    Seeded, so a report is reproducible. With few seeds the interval is too narrow (3 seeds
    have 10 distinct resamples); NaN bounds with one seed. Returns (low, high)."""
    n = np.asarray(data[0]).shape[-1]
    if n < 2:
        shape = np.shape(statistic(*data, axis=-1))
        return np.full(shape, np.nan), np.full(shape, np.nan)
    res = _quiet(stats.bootstrap, data, statistic, paired=True, vectorized=True, axis=-1, confidence_level=level,
                 n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return res.confidence_interval.low, res.confidence_interval.high


def ranks(scores, higher_is_better: bool = True) -> np.ndarray:
    """Per seed, the rank of each method (axis 0) on ``scores`` [methods, seeds]: 1 is best,
    ties share their mean rank (``scipy.stats.rankdata``)."""
    s = np.asarray(scores, float)
    return stats.rankdata(-s if higher_is_better else s, axis=0)


def mean_ranks(scores, higher_is_better: bool = True, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean rank over seeds of each method on ``scores`` [methods, seeds] and its percentile
    bootstrap CI over seeds (the seeds resampled jointly for all methods, as ranks are taken
    within a seed). Returns (mean, low, high)."""
    r = ranks(scores, higher_is_better)
    low, high = bootstrap_ci(np.mean, (r,), level)
    return r.mean(axis=-1), low, high


def variance_ratio_test(sd_a: float, n_a: int, sd_b: float, n_b: int) -> float:
    """Two-sided p-value of the F-test of equal variances (Snedecor & Cochran 1989, §6.9):
    F = s_a² / s_b² against F(n_a − 1, n_b − 1), ``scipy.stats.f``. Sensitive to
    non-normality; with 3 seeds each a ratio of standard deviations must exceed about 6.2
    to reach p < 0.05."""
    if n_a < 2 or n_b < 2 or sd_b == 0:
        return math.nan
    f = (sd_a / sd_b) ** 2
    one_sided = stats.f.sf(f, n_a - 1, n_b - 1) if f >= 1 else stats.f.cdf(f, n_a - 1, n_b - 1)
    return float(min(1.0, 2 * one_sided))


def decide(mean, p_holm, alpha: float = ALPHA) -> np.ndarray:
    """The verdict as a number: +1 better, −1 worse where the Holm-adjusted p < α, else 0
    (not resolved, or no test). Vectorized, so the simulation checks this very rule."""
    mean, p_holm = np.asarray(mean, float), np.asarray(p_holm, float)
    return np.where(p_holm < alpha, np.sign(mean), 0.0).astype(int)


@dataclass(frozen=True)
class SeedBudget:
    """Seeds as a budget, ``compare.seeds: {min, max}``: a group-sequential stop rule with a
    look after every seed from ``min`` to ``max`` (Jennison & Turnbull 2000, ch. 1–2).

    Look k (n_k seeds) tests at level α_k = α(t_k) − α(t_{k−1}), t_k = n_k / max, where
    α(t) = 2 − 2Φ(z_{1−α/2} / √t) is the O'Brien–Fleming-type spending function of Lan &
    DeMets (1983, eq. 4), so Σ_k α_k = α(1) = α: early looks, with few seeds, spend little.
    At each look, Holm at α_k over the comparisons not resolved yet; a comparison that
    passes is resolved (better/worse by the sign of its mean there) and gets no more seeds.
    Why the false-verdict rate stays ≤ α: until a first false verdict, every resolved
    comparison is a true difference, so all m₀ true nulls are still tested and Holm rejects
    one at look k only if the smallest of their p-values is < α_k / m₀, probability ≤ α_k
    (Bonferroni); summed over the looks, ≤ α. This union bound ignores how alike successive
    looks are (they share all but one seed), so the rule is conservative: exact Pocock or
    O'Brien–Fleming boundaries would need the joint law of the looks' t statistics, which
    the union bound does without. ``tests/test_stats.py`` checks the rate and the power by
    simulation. (Among the splits of α tried there, equal α/K and the Pocock-type
    α·ln(1 + (e − 1)t), this one had the most power at d_z = 0.5–1.5 for min 3, max 10.)"""

    min: int
    max: int
    alpha: float = ALPHA

    @property
    def looks(self) -> np.ndarray:
        """The number of seeds at each look: min, min + 1, ..., max."""
        return np.arange(self.min, self.max + 1)

    def levels(self) -> np.ndarray:
        """α_k of each look (``scipy.stats.norm``); they sum to α."""
        spent = 2 * stats.norm.sf(stats.norm.isf(self.alpha / 2) / np.sqrt(self.looks / self.max))
        return np.diff(spent, prepend=0.0)

    def decide(self, means, pvalues) -> tuple[np.ndarray, np.ndarray]:
        """Verdicts of the rule from each comparison's mean difference and paired-test p-value
        at every look, ``[..., comparisons, looks]`` (leading axes: a batch of grids; NaN: no
        test at that look). Returns (verdict, look): +1 better / −1 worse / 0 not resolved, and
        the index of the look that resolved it (−1: none), each ``[..., comparisons]``."""
        means, pvalues = np.asarray(means, float), np.asarray(pvalues, float)
        verdict = np.zeros(pvalues.shape[:-1], int)
        look = np.full(pvalues.shape[:-1], -1)
        for k, level in enumerate(self.levels()):
            open_p = np.where(look < 0, pvalues[..., k], np.nan)  # Holm over the unresolved only
            now = holm(open_p) < level
            verdict = np.where(now, np.sign(np.nan_to_num(means[..., k])).astype(int), verdict)
            look = np.where(now, k, look)
        return verdict, look


def variance_ratio_power(sd_ratio: float, n, alpha: float = ALPHA) -> np.ndarray:
    """Power of the two-sided F-test of :func:`variance_ratio_test` with n seeds in each group
    (n may be an array) when the true ratio of standard deviations is ``sd_ratio``: s_a²/s_b²
    divided by the true variance ratio follows F(n − 1, n − 1), so the test rejects with
    probability P(F > c_hi / ρ) + P(F < c_lo / ρ), ρ = sd_ratio² (``scipy.stats.f``)."""
    df = np.asarray(n, float) - 1
    rho = sd_ratio**2
    low, high = stats.f.ppf(alpha / 2, df, df), stats.f.isf(alpha / 2, df, df)
    return stats.f.sf(high / rho, df, df) + stats.f.cdf(low / rho, df, df)


def variance_ratio_seeds_needed(sd_ratio: float, alpha: float = ALPHA, target: float = POWER) -> int | None:
    """Smallest n ≥ 2 seeds per group at which :func:`variance_ratio_power` reaches ``target``;
    None for a ratio of 1 (or NaN) or beyond ``MAX_SEEDS``."""
    if not np.isfinite(sd_ratio) or sd_ratio <= 0 or sd_ratio == 1:
        return None
    n = np.arange(2, MAX_SEEDS + 1)
    reached = variance_ratio_power(sd_ratio, n, alpha) >= target
    return int(n[reached.argmax()]) if reached.any() else None


@dataclass
class Difference:
    """One comparison, method against baseline (positive: method better): n seeds, the mean
    difference and its 95% CI, the test's p-value, d_z. ``p_holm`` is set by :func:`correct`
    over all comparisons of a report. Built by :meth:`of` from per-seed differences (paired),
    or by :func:`welch_from_summary` where only means and stds were kept."""

    n: int
    mean: float
    low: float
    high: float
    p: float
    dz: float
    p_holm: float = math.nan

    @classmethod
    def of(cls, diffs) -> "Difference":
        d = np.asarray(diffs, float)
        mean, low, high = t_interval(d)
        return cls(len(d), float(mean), float(low), float(high), float(paired_t_test(d)), float(cohen_dz(d)))

    def verdict(self, alpha: float = ALPHA, m: int = 1) -> str:
        """better / worse where the Holm-adjusted p < α; otherwise "no resolved difference",
        with the seeds that would resolve a difference of the observed d_z at 80% power at
        level α/m (Holm's strictest step, so an upper estimate); one seed: no test."""
        if self.n < 2:
            return "one seed: no test"
        if math.isnan(self.p) and math.isinf(self.dz):
            return f"the same difference at all {self.n} seeds: no t-test (zero spread); add seeds"
        decision = decide(self.mean, self.p_holm, alpha)
        if decision:
            return "better" if decision > 0 else "worse"
        text = f"no resolved difference at {self.n} seeds"
        if self.mean == 0:
            return text + "; the observed difference is 0"
        k = seeds_needed(self.dz, alpha / m)
        more = f"more than {MAX_SEEDS:,}" if k is None else f"about {k}"
        return text + f"; {more} seeds would resolve a difference of this size at {POWER:.0%} power"


def welch_from_summary(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int) -> Difference:
    """a − b from summaries only (mean, std, n of each), when per-seed values were not kept:
    Welch's unpaired t-test (Welch 1947; ``scipy.stats.ttest_ind_from_stats``, equal_var=False)
    and its CI with the Welch–Satterthwaite degrees of freedom. It cannot use the pairing, so
    it gives up the power pairing would add when seeds move both runs alike. ``dz`` is the
    difference over √(s_a² + s_b²), the d_z of paired differences if the runs of a seed were
    uncorrelated, so the seeds it says would resolve a difference are those of a paired
    design without that gain."""
    diff = mean_a - mean_b
    if min(n_a, n_b) < 2:
        return Difference(min(n_a, n_b), diff, math.nan, math.nan, math.nan, math.nan)
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(min(n_a, n_b), diff, diff, diff, 0.0 if diff else 1.0, math.copysign(math.inf, diff) if diff else math.nan)
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    half = stats.t.ppf(0.975, df) * se
    p = float(stats.ttest_ind_from_stats(mean_a, sd_a, n_a, mean_b, sd_b, n_b, equal_var=False).pvalue)
    return Difference(min(n_a, n_b), diff, diff - half, diff + half, p, diff / math.sqrt(sd_a**2 + sd_b**2))


def correct(comparisons: list[Difference]) -> list[Difference]:
    """Set ``p_holm`` of every comparison, Holm over all of them (one report's family)."""
    adjusted = holm([c.p for c in comparisons]) if comparisons else []
    for c, p in zip(comparisons, adjusted):
        c.p_holm = float(p)
    return comparisons
