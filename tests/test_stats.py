"""mtl.stats: each function against numbers a reader can check by hand, then the verdict rule
itself by simulation (null grids: false verdicts ≤ 5%; a known effect: power as the
noncentral t predicts)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from mtl import stats

# ---- each function by hand -------------------------------------------------------------------


def test_paired_differences_are_signed_by_direction():
    assert stats.paired_differences([0.8, 0.9], [0.7, 0.95]).tolist() == pytest.approx([0.1, -0.05])
    # Lower is better (an error): 1.0 against a baseline of 1.5 is +0.5.
    assert stats.paired_differences([1.0], [1.5], higher_is_better=False).tolist() == [0.5]
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_differences([1, 2], [1, 2, 3])


def test_t_interval_by_hand():
    # d = 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302653, half-width 4.302653 / √3 = 2.484138.
    mean, low, high = stats.t_interval([1.0, 2.0, 3.0])
    assert mean == 2 and low == pytest.approx(2 - 2.484138) and high == pytest.approx(2 + 2.484138)
    mean, low, high = stats.t_interval([0.5])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)


def test_paired_t_test_by_hand():
    # t = 2 / (1 / √3) = 3.4641 with 2 df: two-sided p = 0.074180 (t tables).
    assert stats.paired_t_test([1.0, 2.0, 3.0]) == pytest.approx(0.0741799, rel=1e-5)
    a, b = np.array([3.1, 2.0, 5.5, 4.0]), np.array([2.0, 1.9, 4.1, 3.3])
    assert stats.paired_t_test(a - b) == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert np.isnan(stats.paired_t_test([0.2, 0.2, 0.2]))  # the same gain at every seed: no spread, no test
    tie = stats.Difference.of([0.01, 0.01])
    stats.correct([tie])
    assert tie.verdict() == "the same difference at all 2 seeds: no t-test (zero spread); add seeds"
    assert np.isnan(stats.paired_t_test([0.8 - 0.4, 0.9 - 0.5]))  # ... up to float rounding
    assert stats.paired_t_test([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(stats.paired_t_test([0.3]))


def test_cohen_dz_by_hand():
    assert stats.cohen_dz([1.0, 2.0, 3.0]) == 2.0  # mean 2, s 1
    assert stats.cohen_dz([-1.0, 0.0, 4.0]) == pytest.approx(1 / math.sqrt(7))
    assert math.isnan(stats.cohen_dz([1.0]))
    assert stats.cohen_dz([0.8 - 0.4, 0.9 - 0.5]) == math.inf and math.isnan(stats.cohen_dz([0.0, 0.0]))


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> made monotone 0.03, 0.06, 0.06.
    assert stats.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]).tolist() == [1.0, 1.0]
    # An untested comparison (one seed) stays NaN and does not count in m.
    out = stats.holm([0.02, math.nan, 0.04])
    assert out[0] == pytest.approx(0.04) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    # Vectorized over leading axes: each row is its own family.
    np.testing.assert_allclose(stats.holm([[0.01, 0.04], [0.04, 0.01]]), [[0.02, 0.04], [0.04, 0.02]])


def test_power_and_seeds_needed_match_published_tables():
    # Cohen (1988), Table 2.3.5 / G*Power, paired t, two-sided α = 0.05: d = 0.5 needs 34 pairs
    # for 80% power, d = 0.8 needs 15; at n = 10 and d = 0.5 power is 0.293.
    assert stats.power(0.5, 10) == pytest.approx(0.2932, abs=1e-3)
    assert stats.seeds_needed(0.5) == 34
    assert stats.seeds_needed(0.8) == 15
    assert stats.seeds_needed(-0.8) == 15  # a loss is resolved as easily as a gain
    assert stats.seeds_needed(0.0) is None and stats.seeds_needed(0.01) is None  # > MAX_SEEDS
    assert stats.seeds_needed(math.inf) == 2
    # A stricter level (Holm's first step with 4 comparisons) needs more seeds.
    assert stats.seeds_needed(0.8, alpha=0.05 / 4) > 15


def test_bootstrap_ci_of_a_mean_and_of_paired_data():
    x = np.arange(1.0, 11.0)
    low, high = stats.bootstrap_ci(np.mean, (x,))
    # The percentile interval of the mean of 1..10 (mean 5.5, s/√n = 0.957) is about 5.5 ± 1.8.
    assert 3.4 < low < 4.0 and 7.0 < high < 7.6
    # Paired: the statistic sees the same resampled seeds in both arrays, so a constant
    # difference has a zero-width interval however spread the values are.
    base = np.array([1.0, 5.0, 2.0, 9.0])
    low, high = stats.bootstrap_ci(lambda a, b, axis: np.mean(a - b, axis=axis), (base + 0.5, base))
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
    assert all(math.isnan(v) for v in stats.bootstrap_ci(np.mean, (np.array([1.0]),)))


def test_mean_ranks():
    scores = np.array([[0.9, 0.8, 0.7], [0.5, 0.9, 0.6], [0.1, 0.2, 0.3]])  # 3 methods × 3 seeds
    mean, low, high = stats.mean_ranks(scores)
    assert mean.tolist() == pytest.approx([4 / 3, 5 / 3, 3.0])  # ranks per seed: (1,2,1), (2,1,2), (3,3,3)
    assert low[2] == high[2] == 3.0 and low[0] >= 1 and high[0] <= 2
    assert stats.ranks(np.array([[1.0], [1.0], [0.0]]))[:, 0].tolist() == [1.5, 1.5, 3.0]
    assert stats.ranks(np.array([[1.0], [2.0]]), higher_is_better=False)[:, 0].tolist() == [1.0, 2.0]


def test_variance_ratio_test():
    # F(2, 2): P(F > 19) = 1 / 20, so a ratio of sds √19 = 4.36 gives p = 0.1 two-sided.
    assert stats.variance_ratio_test(math.sqrt(19), 3, 1.0, 3) == pytest.approx(0.1)
    assert stats.variance_ratio_test(1.0, 3, math.sqrt(19), 3) == pytest.approx(0.1)
    assert stats.variance_ratio_test(2.0, 3, 1.0, 3) == pytest.approx(0.4)
    assert math.isnan(stats.variance_ratio_test(1.0, 1, 1.0, 3))
    # With 3 seeds each the two-sided 5% critical ratio of variances is F_{0.975}(2, 2) = 39, a
    # ratio of sds √39 = 6.24 (the "above about 6"); at that true ratio power is ≈ 0.5.
    assert sps.f.isf(0.025, 2, 2) == pytest.approx(39.0)
    assert stats.variance_ratio_power(math.sqrt(39), 3) == pytest.approx(0.5, abs=0.01)
    assert stats.variance_ratio_power(1.0, 3) == pytest.approx(0.05)
    assert stats.variance_ratio_seeds_needed(1.0) is None
    k = stats.variance_ratio_seeds_needed(2.0)
    assert stats.variance_ratio_power(2.0, k) >= 0.8 > stats.variance_ratio_power(2.0, k - 1)
    assert stats.variance_ratio_seeds_needed(0.5) == k  # less spread is found as easily as more


def test_verdicts_in_words():
    better = stats.Difference.of([1.0, 1.2, 0.9, 1.1])
    stats.correct([better])
    assert better.verdict() == "better"
    worse = stats.Difference.of([-1.0, -1.2, -0.9, -1.1])
    stats.correct([worse])
    assert worse.verdict() == "worse"
    # d = 1, 2, 3 alone has p = 0.074: not resolved; d_z = 2 needs 5 seeds at α = 0.05.
    unresolved = stats.correct([stats.Difference.of([1.0, 2.0, 3.0])])[0]
    assert unresolved.verdict() == "no resolved difference at 3 seeds; about 5 seeds would resolve a difference of this size at 80% power"
    assert stats.Difference.of([0.4]).verdict() == "one seed: no test"
    zero = stats.correct([stats.Difference.of([0.0, 0.0, 0.0])])[0]
    assert zero.verdict() == "no resolved difference at 3 seeds; the observed difference is 0"
    # Holm over a family: p = 0.03 alone is "better", beside three others it is not.
    one = stats.Difference(n=5, mean=1.0, low=0.1, high=1.9, p=0.03, dz=1.5)
    others = [stats.Difference(n=5, mean=0.1, low=-1, high=1, p=0.5, dz=0.1) for _ in range(3)]
    assert stats.correct([one])[0].verdict() == "better"
    assert stats.correct([one, *others])[0].verdict(m=4).startswith("no resolved difference at 5 seeds")


def test_welch_from_summary_by_hand():
    # Means 0.70 and 0.61, stds 0.11 and 0.0765, 3 seeds each: se = √(0.11²/3 + 0.0765²/3)
    # = 0.07736, t = 1.1634, Welch df = 3.57; scipy on the raw values agrees.
    a, b = np.array([0.58, 0.72, 0.80]), np.array([0.55, 0.60, 0.70])
    d = stats.welch_from_summary(a.mean(), a.std(ddof=1), 3, b.mean(), b.std(ddof=1), 3)
    assert d.p == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert d.mean == pytest.approx(a.mean() - b.mean()) and d.low < d.mean < d.high
    assert d.dz == pytest.approx((a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) + b.var(ddof=1)))
    ci = sps.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))
    assert math.isnan(stats.welch_from_summary(0.7, 0.1, 1, 0.6, 0.1, 3).p)


# ---- the verdict rule by simulation -----------------------------------------------------------

SEEDS = range(3, 11)
GRIDS = 2000  # per number of seeds


def simulated_verdicts(rng, n: int, effects: list[float]) -> np.ndarray:
    """GRIDS grids of one method per entry of ``effects`` against a baseline, n seeds: a seed
    effect shared by every method of a seed (sd 1, which pairing removes) plus per-run noise
    (sd 1/√2, so each difference has sd 1 and its d_z is the effect). Returns the verdicts
    [GRIDS, methods] the report's rule gives after Holm over the methods of each grid."""
    methods = len(effects)
    seed_effect = rng.normal(0, 1, (GRIDS, 1, n))
    baseline = seed_effect + rng.normal(0, 1 / math.sqrt(2), (GRIDS, 1, n))
    runs = seed_effect + np.asarray(effects)[None, :, None] + rng.normal(0, 1 / math.sqrt(2), (GRIDS, methods, n))
    diffs = stats.paired_differences(runs, baseline)
    p = stats.paired_t_test(diffs)
    return stats.decide(diffs.mean(axis=-1), stats.holm(p))


def binomial_slack(rate: float, trials: int, z: float = 3.0) -> float:
    """z binomial standard errors: with z = 3 a correct rule fails this check about once in
    700 runs of a fixed-seed test, i.e. never, as the seed is fixed."""
    return z * math.sqrt(rate * (1 - rate) / trials)


def test_null_grids_give_at_most_five_percent_false_verdicts():
    """All of four methods equal to the baseline: a grid with any better/worse verdict is a
    false one. Holm keeps that family-wise rate ≤ α; checked at each n from 3 to 10 seeds,
    2,000 grids each, with a binomial tolerance of 3 standard errors (0.0146) and pooled over
    the 16,000 grids with 3 standard errors (0.0052)."""
    rng = np.random.default_rng(13)
    rates = {}
    for n in SEEDS:
        verdicts = simulated_verdicts(rng, n, [0.0, 0.0, 0.0, 0.0])
        rates[n] = (verdicts != 0).any(axis=1).mean()
        assert rates[n] <= 0.05 + binomial_slack(0.05, GRIDS), (n, rates[n])
    pooled = np.mean(list(rates.values()))
    assert pooled <= 0.05 + binomial_slack(0.05, GRIDS * len(SEEDS))
    # The rule is not vacuous: the unadjusted t-test alone would reject about 1 − 0.95⁴ ≈ 19%
    # of null grids (less, as the tests share a baseline), so Holm is what brings it to 5%.
    assert pooled > 0.02


def test_per_comparison_null_rate_is_alpha():
    """One method against the baseline (no correction): the paired t-test's false-verdict rate
    is α = 0.05 at every n, within 3 binomial standard errors."""
    rng = np.random.default_rng(7)
    for n in SEEDS:
        rate = (simulated_verdicts(rng, n, [0.0]) != 0).mean()
        assert abs(rate - 0.05) <= binomial_slack(0.05, GRIDS), (n, rate)


@pytest.mark.parametrize("dz", [0.5, 1.0, 2.0])
def test_power_matches_the_noncentral_t(dz):
    """One method better by d_z: the rate of "better" verdicts at each n is the noncentral-t
    prediction (the upper tail, as "worse" is not a detection), within 3 binomial standard
    errors; and seeds_needed(d_z) seeds give at least 80% power."""
    rng = np.random.default_rng(int(dz * 100))
    for n in SEEDS:
        better = (simulated_verdicts(rng, n, [dz]) == 1).mean()
        crit = sps.t.ppf(0.975, n - 1)
        theory = sps.nct.sf(crit, n - 1, dz * math.sqrt(n))
        assert abs(better - theory) <= binomial_slack(theory, GRIDS), (n, better, theory)
    k = stats.seeds_needed(dz)
    if k <= max(SEEDS):
        assert (simulated_verdicts(rng, k, [dz]) == 1).mean() >= 0.8 - binomial_slack(0.8, GRIDS)


# ---- seeds as a budget: the group-sequential stop rule by simulation ---------------------------

BUDGET = stats.SeedBudget(3, 10)


def test_budget_levels_by_hand():
    # O'Brien–Fleming-type spending: α(t) = 2 − 2Φ(1.959964 / √t). At the last look t = 1 and
    # α(1) = 0.05; the first look, 3 of 10 seeds, spends 2 − 2Φ(3.578) = 0.000346.
    levels = BUDGET.levels()
    assert BUDGET.looks.tolist() == list(range(3, 11))
    assert levels.sum() == pytest.approx(0.05) and (levels > 0).all()
    assert levels[0] == pytest.approx(2 * sps.norm.sf(1.959964 / math.sqrt(0.3)), rel=1e-5)
    assert levels[0] == pytest.approx(0.000346, abs=1e-6)
    assert (np.diff(levels) > 0).all()  # early looks, with few seeds, spend least


def test_budget_decide_by_hand():
    # Two comparisons, three looks of 0.000346, 0.00161, ...: the first resolves at look 1 (Holm
    # over both: 0.0001 × 2 < 0.000346), the second is then alone and resolves at look 2.
    budget = stats.SeedBudget(3, 5)
    levels = budget.levels()
    means = [[-1.0, -1.0, -1.0], [0.5, 0.5, 0.5]]
    p = [[0.0001, 0.5, 0.5], [0.9, levels[1] * 0.9, 0.9]]
    verdict, look = budget.decide(means, p)
    assert verdict.tolist() == [-1, 1] and look.tolist() == [0, 1]
    # Never below its look's level: not resolved, and no look (NaN: no test).
    verdict, look = budget.decide([[1.0, 1.0, 1.0]], [[math.nan, levels[1] * 1.01, levels[2] * 1.01]])
    assert verdict.tolist() == [0] and look.tolist() == [-1]


def budget_grids(rng, effects, grids=GRIDS, budget=BUDGET):
    """``grids`` simulated budgeted grids (the seed and run model of :func:`simulated_verdicts`,
    every look from budget.min to budget.max seeds): the means and p-values at each look and
    the rule's verdicts. A resolved comparison's later seeds are drawn but never looked at,
    which is what stopping its method does."""
    n, methods = budget.max, len(effects)
    seed_effect = rng.normal(0, 1, (grids, 1, n))
    baseline = seed_effect + rng.normal(0, 1 / math.sqrt(2), (grids, 1, n))
    runs = seed_effect + np.asarray(effects)[None, :, None] + rng.normal(0, 1 / math.sqrt(2), (grids, methods, n))
    diffs = stats.paired_differences(runs, baseline)
    means = np.stack([diffs[..., :k].mean(axis=-1) for k in budget.looks], axis=-1)
    p = np.stack([stats.paired_t_test(diffs[..., :k]) for k in budget.looks], axis=-1)
    return means, p, *budget.decide(means, p)


def test_budget_null_grids_give_at_most_five_percent_false_verdicts():
    """Four methods equal to the baseline, seeds 3 to 10 added one by one: a grid with any
    better/worse verdict at any look is a false one. The rule keeps that rate ≤ α (4,000
    grids, 3 binomial standard errors), while testing every look at α with Holm (the naive
    rule: stop when p < 0.05) makes far more false verdicts."""
    rng = np.random.default_rng(31)
    means, p, verdict, _ = budget_grids(rng, [0.0] * 4, grids=2 * GRIDS)
    rate = (verdict != 0).any(axis=-1).mean()
    assert rate <= 0.05 + binomial_slack(0.05, 2 * GRIDS), rate
    naive = (stats.holm(np.moveaxis(p, -1, 0)) < 0.05).any(axis=(0, -1)).mean()
    assert naive > 0.12, naive  # about 0.17 here
    # One comparison alone: the same bound.
    _, _, verdict, _ = budget_grids(rng, [0.0], grids=2 * GRIDS)
    assert (verdict != 0).mean() <= 0.05 + binomial_slack(0.05, 2 * GRIDS)


@pytest.mark.parametrize("dz", [1.0, 2.0])
def test_budget_power_is_between_its_bounds(dz):
    """One method better by d_z. Power (any look's "better") is at least that of the last look
    alone at its level α_K (a fixed-n test at max seeds, noncentral t) and at most the sum of
    every look's power at its level (the union bound); the seeds used average fewer than max."""
    rng = np.random.default_rng(int(dz * 10))
    _, _, verdict, look = budget_grids(rng, [dz])
    better = (verdict == 1).mean()
    levels, n = BUDGET.levels(), BUDGET.looks
    low = sps.nct.sf(sps.t.ppf(1 - levels[-1] / 2, n[-1] - 1), n[-1] - 1, dz * math.sqrt(n[-1]))
    high = min(1.0, sum(stats.power(dz, k, a) for k, a in zip(n, levels)))
    slack = binomial_slack(max(better, 0.01), GRIDS)
    assert low - slack <= better <= high + slack, (low, better, high)
    used = np.where(look >= 0, n[np.maximum(look, 0)], BUDGET.max).mean()
    assert used < BUDGET.max
