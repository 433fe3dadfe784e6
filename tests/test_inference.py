"""Inference helpers against closed forms, brute force and simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from bids_ketdcm.group.inference import (
    auc_rows,
    balanced_accuracy_rows,
    benjamini_hochberg,
    calibration,
    holm,
    max_statistic_p,
    paired_swap_test,
    prior_corrected,
)


def test_holm_and_bh_match_their_definitions():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.005])
    # Holm by hand: sorted 0.005 0.01 0.03 0.04 times 4 3 2 1, running max
    np.testing.assert_allclose(holm(p), [0.03, 0.06, np.nan, 0.06, 0.02])
    # BH by hand: 0.005*4/1=.02, .01*4/2=.02, .03*4/3=.04, .04*4/4=.04, running min from the top
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, 0.04, np.nan, 0.04, 0.02])


def test_metrics_rows_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (5, 30))
    s = rng.random((5, 30))
    pred = (s > 0.5).astype(int)
    expected = [balanced_accuracy_score(a, b) for a, b in zip(y, pred, strict=True)]
    np.testing.assert_allclose(balanced_accuracy_rows(y, pred), expected)
    np.testing.assert_allclose(auc_rows(y, s), [roc_auc_score(a, b) for a, b in zip(y, s, strict=True)])


def test_max_statistic_is_brute_force():
    nulls = np.array([[0.1, 0.5, 0.2], [0.3, 0.1, 0.6]])
    # max over tests per permutation: 0.3, 0.5, 0.6
    np.testing.assert_allclose(max_statistic_p(np.array([0.55, 0.25]), nulls), [2 / 4, 4 / 4])


def test_prior_correction_restores_calibration():
    """Balanced class weights inflate the minority's probability; the correction undoes it."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 1))
    y = (rng.random(20000) < expit(-1.5 + 1.0 * x[:, 0])).astype(int)
    balanced = LogisticRegression(class_weight="balanced", C=1e6).fit(x, y).predict_proba(x)[:, 1]
    fixed = prior_corrected(balanced, y.sum(), len(y) - y.sum())
    assert balanced.mean() > y.mean() + 0.1
    assert fixed.mean() == pytest.approx(y.mean(), abs=0.01)
    cal = calibration(y, fixed, np.full(len(y), y.mean()))
    assert cal["intercept"] == pytest.approx(0, abs=0.05) and cal["slope"] == pytest.approx(1, abs=0.05)
    assert cal["brier"] < cal["brier_prevalence"]
    # decision curve: treat-all's net benefit at threshold t is prevalence - (1 - prevalence) t / (1 - t)
    row = cal["decision_curve"][0]
    assert row["treat_all"] == pytest.approx(y.mean() - (1 - y.mean()) * row["threshold"] / (1 - row["threshold"]))


def test_paired_swap_test_is_calibrated_under_the_null():
    """Two exchangeable models: p < 0.05 in about 5 % of simulations; a better model is found."""
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(100):
        y = rng.integers(0, 2, 27)
        a, b = rng.random((2, 3, 27))
        hits += paired_swap_test(y, a, b, seed=int(rng.integers(1 << 30)), n_swaps=199)["roc_auc"] < 0.05
    assert hits <= 12
    y = np.repeat([0, 1], 15)
    good = np.tile(y * 0.6 + rng.random(30) * 0.5, (3, 1))
    assert paired_swap_test(y, good, rng.random((3, 30)), seed=0)["balanced_accuracy"] < 0.01
