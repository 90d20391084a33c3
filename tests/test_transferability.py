"""Transferability scores (mtl.transferability): each on a case small enough to check by hand,
LogME against the evidence computed directly, and every score against its reference code's
value on one fixed case."""

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from mtl.registry import ComponentError, build
from mtl.transferability import CLASSIFICATION, REGRESSION, SCORES, HScore, LEEP, LogME, NCE, TransRate

# The fixed case of the reference comparison: no random generator, so the same on every machine.
_I = np.arange(12)[:, None]
FEATURES = np.sin((_I + 1) * np.arange(1, 4)[None, :])  # [12, 3]
LABELS = np.arange(12) % 3
_LOGITS = np.cos(_I + 2 * np.arange(4)[None, :])  # [12, 4] source logits
PROBS = np.exp(_LOGITS) / np.exp(_LOGITS).sum(1, keepdims=True)
REGRESSION_TARGETS = np.cos(np.arange(12) / 3.0)[:, None]


def test_every_score_is_registered():
    assert SCORES.names() == ["hscore", "leep", "logme", "nce", "transrate"]


def test_leep_by_hand():
    # P(y, z) = [[0.4, 0.1], [0.1, 0.4]], P(z) = [0.5, 0.5], P(y | z) = [[0.8, 0.2], [0.2, 0.8]]:
    # each sample's empirical prediction of its own label is 0.8 * 0.8 + 0.2 * 0.2 = 0.68.
    probs = np.array([[0.8, 0.2], [0.2, 0.8]])
    assert LEEP().score(np.zeros((2, 1)), np.array([0, 1]), probs) == pytest.approx(math.log(0.68))


def test_nce_by_hand():
    # z = 0 for the first two samples (labels 0, 1: entropy log 2), z = 1 for the last two
    # (labels 1, 1: entropy 0); P(z) = 1/2 each.
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    assert NCE().score(np.zeros((4, 1)), np.array([0, 1, 1, 1]), probs) == pytest.approx(-0.5 * math.log(2))


def test_nce_is_zero_when_the_source_prediction_determines_the_label():
    probs = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.0, 0.2, 0.8]])
    assert NCE().score(np.zeros((3, 1)), np.array([5, 2, 7]), probs) == pytest.approx(0.0)


def test_hscore_by_hand():
    # One feature: f = [0, 2, 4, 6] (variance 20/3), class means [1, 1, 5, 5] (variance 16/3).
    assert HScore().score(np.array([[0.0], [2.0], [4.0], [6.0]]), np.array([0, 0, 1, 1])) == pytest.approx(0.8)


def test_transrate_by_hand():
    # Centred z = [1, -1, 3, -3], ε = 1: R(Z) = 1/2 log(1 + 20/4); class 0 ({1, -1}) has R = 1/2 log(1 + 2/2),
    # class 1 ({3, -3}) R = 1/2 log(1 + 18/2); TrR = 1/2 log 6 - (1/2 log 2 + 1/2 log 10) / 2.
    z = np.array([[1.0], [-1.0], [3.0], [-3.0]]) + 7.0  # the score centres the features itself
    expected = 0.5 * math.log(6) - 0.25 * (math.log(2) + math.log(10))
    assert TransRate(eps=1.0).score(z, np.array([0, 0, 1, 1])) == pytest.approx(expected)


def test_logme_is_the_maximum_evidence_computed_directly():
    # The evidence of y under y ~ N(0, α⁻¹FFᵀ + β⁻¹I), maximised numerically over (α, β); column 0
    # of the fixed case has its maximum inside the range (the other columns' α runs off to infinity).
    y = (LABELS == 0).astype(float)

    def negative_evidence(log_ab):
        alpha, beta = np.exp(log_ab)
        cov = FEATURES @ FEATURES.T / alpha + np.eye(len(y)) / beta
        return -scipy.stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y) / len(y)

    best = scipy.optimize.minimize(negative_evidence, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
    assert LogME().score(FEATURES, y[:, None]) == pytest.approx(-best.fun, abs=1e-7)


def test_logme_counts_every_feature_when_the_features_outnumber_the_samples():
    # Four samples, five features: FᵀF has a zero eigenvalue, whose log α term the evidence keeps
    # (log|A| sums over all D eigenvalues of A = αI + βFᵀF), as the evidence computed directly does.
    f = np.array([[1.0, 0.0, 2.0, 1.0, 0.0], [0.0, 1.0, -1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 2.0, 1.0, 1.0, 0.0]])
    y = np.array([10.0, 8.0, 13.0, 5.0])

    def negative_evidence(log_ab):
        alpha, beta = np.exp(log_ab)
        return -scipy.stats.multivariate_normal(np.zeros(4), f @ f.T / alpha + np.eye(4) / beta).logpdf(y) / 4

    best = scipy.optimize.minimize(negative_evidence, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-14})
    assert LogME().score(f, y[:, None]) == pytest.approx(-best.fun, abs=1e-8)


# Reference values: the reference code run on FEATURES, LABELS, PROBS and REGRESSION_TARGETS above
# (numpy 2.4, numba's @njit replaced by the plain function).
def test_logme_matches_its_reference_code():
    # thuml/LogME, LogME.py (commit 56551ca94a3295bcc37e6a01b1291911af985f07), LogME().fit(features, labels):
    # -0.8322879093076597. It stops once α/β changes by < 1e-3, short of the fixed point; with that stop
    # rule tightened to 1e-13 (and 1000 iterations) the same code gives -0.8320769498782493.
    ours = LogME().score(FEATURES, LABELS)
    assert ours == pytest.approx(-0.8320769498782493, abs=1e-8)
    assert ours == pytest.approx(-0.8322879093076597, rel=5e-4)
    # LogME(regression=True).fit(features, targets), same file and commit: -1.1500945635740873.
    assert LogME().score(FEATURES, REGRESSION_TARGETS) == pytest.approx(-1.1500945635740873, rel=1e-6)


def test_leep_matches_its_reference_code():
    # thuml/LogME, LEEP.py (commit 56551ca94a3295bcc37e6a01b1291911af985f07), LEEP(probs, labels); TLlib's
    # tllib/ranking/leep.py (commit c4aa59eb565650a552b809411601d0589efbbfe4) gives the same.
    assert LEEP().score(FEATURES, LABELS, PROBS) == pytest.approx(-1.0786715349479474, rel=1e-12)


def test_nce_hscore_transrate_match_tllib():
    # thuml/Transfer-Learning-Library, commit c4aa59eb565650a552b809411601d0589efbbfe4, tllib/ranking/:
    # nce.py negative_conditional_entropy(probs.argmax(1), labels), hscore.py h_score(features, labels),
    # transrate.py transrate(features, labels).
    assert NCE().score(FEATURES, LABELS, PROBS) == pytest.approx(-0.46209812037329684, rel=1e-12)
    assert HScore().score(FEATURES, LABELS) == pytest.approx(0.9416852865326266, rel=1e-9)
    assert TransRate().score(FEATURES, LABELS) == pytest.approx(1.5040470091959737, rel=1e-9)


def test_labels_need_not_be_contiguous():
    # Class indices 3 and 9 (others absent from the scored sample) score as classes 0 and 1.
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    assert HScore().score(f, np.array([3, 3, 9, 9])) == pytest.approx(HScore().score(f, np.array([0, 0, 1, 1])))
    assert TransRate().score(f, np.array([3, 3, 9, 9])) == pytest.approx(TransRate().score(f, np.array([0, 0, 1, 1])))


def test_better_features_score_higher():
    # Features that encode the label beat the same features scrambled, for every feature-based score.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    informative = np.eye(3)[labels] * 3 + rng.normal(size=(60, 3))
    scrambled = informative[rng.permutation(60)]
    for score in (LogME(), HScore(), TransRate()):
        assert score.score(informative, labels) > score.score(scrambled, labels), type(score).__name__


@pytest.mark.parametrize(
    "score, kind, has_source, reason",
    [
        (LEEP(), REGRESSION, True, "classification targets only"),
        (LEEP(), CLASSIFICATION, False, "no source classifier head"),
        (NCE(), CLASSIFICATION, False, "no source classifier head"),
        (HScore(), REGRESSION, False, "classification targets only"),
        (LogME(), REGRESSION, False, None),
        (LogME(), CLASSIFICATION, False, None),
    ],
)
def test_not_applicable_says_why(score, kind, has_source, reason):
    got = score.not_applicable(kind, has_source)
    assert got is None if reason is None else reason in got


def test_bad_arguments_and_names_name_the_key():
    with pytest.raises(ValueError, match="transrate.eps must be a number > 0"):
        TransRate(eps=0)
    with pytest.raises(ComponentError, match=r"rank.scores\[0\].*unknown argument.*Accepted: eps"):
        build(SCORES, {"name": "transrate", "epsilon": 1}, "rank.scores[0]")
    with pytest.raises(ComponentError, match="unknown score 'lgme'. Did you mean 'logme'"):
        SCORES.get("lgme")
