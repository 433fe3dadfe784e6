"""Prediction suite: the batched engine against scikit-learn, metrics against
sklearn.metrics, leakage, and the hostile corners (tiny classes, few participants)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import ttest_ind
from sklearn import metrics as skm
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import ElasticNet, LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from bids_ketdcm.group.batched import predict_splits
from bids_ketdcm.group.cv import _outer_predictions, _tree_probas, _tune_batched, evaluate, make_splits
from bids_ketdcm.group.metrics import classification_metrics, regression_metrics
from bids_ketdcm.group.models import SuiteConfig, Task
from bids_ketdcm.group.suite import run_task

# binary25 labels of the 27 MDD participants of ds005917 (sorted ids) and their improvement r
R = np.array([11 / 35, 9 / 31, 24 / 41, 2 / 36, 17 / 38, -8 / 33, 7 / 25, 2 / 31, 1.0, 30 / 35, 6 / 37,
              4 / 26, 12 / 34, 28 / 33, -1 / 25, -7 / 30, 3 / 30, -1 / 35, 15 / 24, 12 / 32, 8 / 33,
              9 / 38, -1 / 28, 2 / 34, 18 / 35, 3 / 40, 15 / 37])
Y25 = (R >= 0.25).astype(int)
PIDS = [f"sub-{i:02d}" for i in range(len(R))]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny problems: BLAS threads only add contention on a shared machine."""
    with threadpool_limits(1):
        yield


def _task(X, y, kind="classification", classes=("nonresponse", "response"), baseline=None):
    n = len(y)
    base = np.linspace(20, 40, n) if baseline is None else baseline
    return Task("ketamine", "net", "t", kind, PIDS[:n], X, y, base, classes if kind == "classification" else ())


@pytest.mark.parametrize("p", [6, 40])
@pytest.mark.parametrize("K", [2, 4])
def test_batched_classifiers_match_sklearn(p, K):
    rng = np.random.default_rng(p + K)
    X = rng.normal(size=(27, p))
    y = rng.integers(0, K, 27)
    X[:, 0] += y
    splits = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    refs = {
        "logistic": lambda C: LogisticRegression(C=C, class_weight="balanced", tol=1e-10, max_iter=100000),
        "svm": lambda C: LinearSVC(C=C, class_weight="balanced", tol=1e-8, max_iter=100000),
    }
    if K > 2:
        refs["multinomial"] = refs["logistic"]
    for model, ref in refs.items():
        for C in (0.1, 10.0):
            out = predict_splits(model, [X] * 3, y, splits, [{"C": C}] * 3, K)
            for (tr, te), o in zip(splits, out, strict=True):
                est = ref(C)
                if model == "logistic" and K > 2:
                    est = OneVsRestClassifier(est)
                pipe = make_pipeline(StandardScaler(), est).fit(X[tr], y[tr])
                expected = pipe.predict_proba(X[te]) if model != "svm" else pipe.decision_function(X[te])
                if expected.ndim == 1:
                    expected = np.column_stack([-expected, expected])
                np.testing.assert_allclose(o, expected, atol=1e-6, err_msg=f"{model} C={C}")


def test_batched_elastic_net_matches_sklearn():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(27, 50))
    y = 2 * X[:, 0] + 3 * rng.normal(size=27) + 10
    splits = list(KFold(4, shuffle=True, random_state=0).split(X))
    for alpha, l1 in ((0.5, 0.5), (0.1, 0.2), (1.0, 0.9)):
        out = predict_splits("elasticnet", [X] * 4, y, splits, [{"alpha": alpha, "l1_ratio": l1}] * 4,
                             enet_tol=1e-10)
        for (tr, te), o in zip(splits, out, strict=True):
            net = ElasticNet(alpha=alpha, l1_ratio=l1, tol=1e-12, max_iter=100000)
            pipe = make_pipeline(StandardScaler(), TransformedTargetRegressor(net, transformer=StandardScaler()))
            np.testing.assert_allclose(o, pipe.fit(X[tr], y[tr]).predict(X[te]), atol=1e-4)


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    for K in (2, 3, 5):
        y = rng.integers(0, K, 40)
        scores = rng.dirichlet(np.ones(K), 40)
        pred = scores.argmax(1)
        got, undefined = classification_metrics(y, pred, scores, K)
        assert not undefined
        assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert got["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
        assert got["recall_macro"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
        if K == 2:
            assert got["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
            assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, scores[:, 1]))
            tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
            assert (got["sensitivity"], got["specificity"]) == pytest.approx((tp / (tp + fn), tn / (tn + fp)))
        else:
            assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
            assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, scores, multi_class="ovr"))
    yr = rng.normal(size=30)
    pr = yr + rng.normal(size=30)
    got, _ = regression_metrics(yr, pr)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(yr, pr))
    assert got["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(yr, pr)))
    assert got["r2"] == pytest.approx(skm.r2_score(yr, pr))
    assert got["pearson_r"] == pytest.approx(np.corrcoef(yr, pr)[0, 1])


def test_undefined_metrics_are_filled_and_flagged():
    got, undefined = classification_metrics(np.zeros(4, int), np.array([0, 1, 0, 0]), np.full((4, 2), 0.5), 2)
    assert undefined == {"roc_auc", "sensitivity"}
    assert all(np.isfinite(v) for v in got.values()) and got["roc_auc"] == 0.5
    got, undefined = regression_metrics(np.array([1.0, 2.0, 3.0]), np.full(3, 2.0))
    assert undefined == {"pearson_r"} and got["pearson_r"] == 0.0


def test_engines_agree():
    """Every model and protocol: the batched engine reproduces the scikit-learn pipelines."""
    rng = np.random.default_rng(1)
    X = rng.normal(0, 0.05, (27, 9))
    X[:, 0] += 0.5 * R
    y5 = np.searchsorted([-0.1, 0.1, 0.25, 0.5], np.round(R, 12), side="right")
    config = SuiteConfig(nested_repeats=2, n_permutations=0, k_values=(3, 5), rf_trees=10)
    for task in (_task(X, Y25), _task(X, y5, classes=("w", "s", "m", "st", "r")), _task(X, R, "regression")):
        fast = run_task(task, config)
        slow = run_task(task, replace(config, engine="sklearn"))
        for a, b in zip(fast.results, slow.results, strict=True):
            assert (a["model"], a["protocol"]) == (b["model"], b["protocol"])
            assert a["headline"] == pytest.approx(b["headline"], abs=0.04), (a["model"], a["protocol"])
            assert a["params"] == b["params"]


def test_truncated_forest_predictions():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 5))
    y = (X[:, 0] + rng.normal(size=30) > 0).astype(int)
    forest = RandomForestClassifier(15, random_state=1).fit(X, y)
    (probas,) = _tree_probas(forest, [X], [None, 1])
    np.testing.assert_allclose(probas[None].mean(0), forest.predict_proba(X))
    tree = forest.estimators_[3]
    path = tree.decision_path(X).toarray().astype(bool)
    for i in range(len(X)):
        node = np.flatnonzero(path[i])[1] if path[i].sum() > 1 else 0  # the node at depth 1
        np.testing.assert_allclose(probas[1][3, i], tree.tree_.value[node, 0])


def test_noise_features_stay_at_chance_and_leaky_selection_does_not():
    """Nested CV on pure noise gives chance; selecting features on all data first (a
    leak) gives 'signal' on the same noise, so this test can tell the two apart."""
    config = SuiteConfig(models=("logistic", "svm", "random_forest"), nested_repeats=3, n_permutations=0,
                         rf_trees=20)
    honest, leaky = [], []
    for seed in range(6):
        X = np.random.default_rng(100 + seed).normal(size=(27, 40))
        task = _task(X, Y25)
        honest += [evaluate(task, m, "nested", config)[0]["balanced_accuracy"] for m in config.models]
        top = np.argsort(np.abs(ttest_ind(X[Y25 == 1], X[Y25 == 0]).statistic))[-2:]
        leaky.append(evaluate(_task(X[:, top], Y25), "logistic", "nested", config)[0]["balanced_accuracy"])
    assert np.mean(honest) < 0.55 and max(honest) < 0.75
    assert np.mean(leaky) > 0.7


def test_test_labels_never_reach_training():
    """Changing the labels of an outer test fold leaves its tuning and predictions unchanged."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(27, 12))
    X[:, 0] += R
    config = SuiteConfig(nested_repeats=1, n_permutations=0, rf_trees=10)
    task = _task(X, Y25)
    splits, _ = make_splits(task, "nested", config)
    for model in ("logistic", "svm", "random_forest", "baseline_score"):
        for f, split in enumerate(splits):
            test = split[3]
            flipped = _task(X, np.where(np.isin(np.arange(27), test), 1 - Y25, Y25))
            outs = []
            for t in (task, flipped):
                chosen = (_tune_batched(t, model, [split], config, 7) if model in ("logistic", "svm")
                          else [{"max_depth": "oob"} if model == "random_forest" else {"C": 1.0}])
                outs.append(_outer_predictions(t, model, [split], chosen, config, 7))
            np.testing.assert_array_equal(outs[0][0][0], outs[1][0][0], err_msg=f"{model} fold {f}")
            assert outs[0][1] == outs[1][1]


def test_tiny_classes_and_few_participants_are_handled():
    # a class with one member: some training folds lack it; flagged, never NaN
    y = np.zeros(12, int)
    y[:5] = 1
    y[0] = 2
    X = np.random.default_rng(0).normal(size=(12, 3))
    config = SuiteConfig(nested_repeats=2, n_permutations=20, rf_trees=5)
    res = run_task(_task(X, y, classes=("a", "b", "c")), config)
    for row in res.results:
        assert all(np.isfinite(row[m]) for m in ("balanced_accuracy", "roc_auc", "f1", "specificity"))
    assert any("class missing from training fold" in r["flags"] for r in res.results)
    # fewer participants than folds: k reduced and flagged
    res = run_task(_task(X[:4], np.array([0, 1, 0, 1])), replace(config, models=("logistic",)))
    kfold5 = next(r for r in res.results if r["protocol"] == "kfold5")
    assert kfold5["k_used"] == 2 and "k reduced from 5 to 2" in kfold5["flags"]
    # single-class training folds predict that class
    res = run_task(_task(X[:6], np.array([0, 0, 0, 0, 0, 1])), replace(config, models=("logistic", "svm")))
    assert any("single-class training fold" in r["flags"] for r in res.results)


def test_permutation_p_value_and_determinism():
    rng = np.random.default_rng(2)
    X = rng.normal(0, 0.05, (27, 4))
    X[:, 1] += 0.5 * R
    config = SuiteConfig(models=("logistic",), nested_repeats=0, n_permutations=199, k_values=(5,))
    signal = run_task(_task(X, Y25), config)
    assert signal.results[0]["p_value"] < 0.05 and signal.results[0]["n_permutations"] == 199
    again = run_task(_task(X, Y25), config)
    np.testing.assert_array_equal(next(iter(signal.nulls.values())), next(iter(again.nulls.values())))
    noise = run_task(_task(rng.normal(size=(27, 4)), Y25), config)
    assert noise.results[0]["p_value"] > 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batched engine must not emit numeric warnings
        run_task(_task(X, np.searchsorted([0.1, 0.5], R, side="right"), classes=("a", "b", "c")),
                 replace(config, models=("multinomial", "logistic"), permutation_models=("multinomial",)))
