"""Inference on out-of-fold predictions: intervals, paired tests, multiplicity, calibration.

* :func:`bootstrap_binary`: participant bootstrap (percentile 95 % intervals) of balanced
  accuracy and AUC of repeated-CV out-of-fold predictions, and of paired differences
  between two models scored on the same folds;
* :func:`paired_swap_test`: a paired permutation test of two models on shared folds (each
  participant's two predictions are exchangeable under "equal performance");
* :func:`holm`, :func:`benjamini_hochberg`: adjusted p-values of a family of tests;
  :func:`max_statistic_p`: the single-step max-statistic (Westfall-Young) adjusted
  p-values from joint permutation nulls;
* :func:`calibration`: calibration intercept and slope, Brier score, decision curve.

All functions are vectorised over resamples; none draws random numbers without a seed.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import expit, logit
from scipy.stats import rankdata

#: Resamples of the participant bootstrap and of the paired swap test.
N_BOOTSTRAP = 2000


def balanced_accuracy_rows(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Binary balanced accuracy of each row of ``pred`` against the same row of ``y``.

    Parameters
    ----------
    y, pred
        (B, n) 0/1 labels and predicted classes.

    Returns
    -------
    numpy.ndarray
        (B,) balanced accuracies; NaN for a row holding one class only.
    """
    pos = y.sum(axis=1)
    neg = y.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (pred * y).sum(axis=1) / pos
        spec = ((1 - pred) * (1 - y)).sum(axis=1) / neg
    return np.where((pos > 0) & (neg > 0), (sens + spec) / 2, np.nan)


def auc_rows(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney, mid-ranks) of each row; NaN for a row holding one class."""
    ranks = rankdata(score, axis=1)
    pos = y.sum(axis=1)
    neg = y.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def repeat_metrics(y: np.ndarray, prob: np.ndarray, index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Balanced accuracy and AUC averaged over CV repeats, for resampled participant sets.

    Parameters
    ----------
    y
        (n,) 0/1 labels.
    prob
        (R, n) out-of-fold probability of class 1 in each of R repeats (class 1 is
        predicted at >= 0.5).
    index
        (B, n) resampled participant indices (None: the participants as they are).

    Returns
    -------
    dict
        ``balanced_accuracy`` and ``roc_auc``, each (B,) (or (1,)).
    """
    index = np.arange(len(y))[None] if index is None else index
    yb = y[index]
    with warnings.catch_warnings():  # a resample holding one class: NaN, left out of intervals
        warnings.simplefilter("ignore", RuntimeWarning)
        ba = np.nanmean([balanced_accuracy_rows(yb, (p >= 0.5)[index].astype(int)) for p in prob], axis=0)
        auc = np.nanmean([auc_rows(yb, p[index]) for p in prob], axis=0)
    return {"balanced_accuracy": ba, "roc_auc": auc}


def _interval(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def bootstrap_indices(n: int, seed: int, n_boot: int = N_BOOTSTRAP) -> np.ndarray:
    """(n_boot, n) participant indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_binary(y: np.ndarray, prob: np.ndarray, index: np.ndarray,
                     reference: np.ndarray | None = None) -> dict[str, dict]:
    """Point estimates and 95 % percentile intervals of balanced accuracy and AUC.

    Parameters
    ----------
    y
        (n,) 0/1 labels.
    prob
        (R, n) out-of-fold probabilities of the model.
    index
        (B, n) bootstrap indices (:func:`bootstrap_indices`); the same indices for every
        model make the differences paired.
    reference
        (R, n) a comparator's probabilities on the same folds: the intervals are then those
        of model minus comparator.

    Returns
    -------
    dict
        metric -> {``estimate``, ``ci95``}.
    """
    point = repeat_metrics(y, prob)
    boot = repeat_metrics(y, prob, index)
    if reference is not None:
        ref_point, ref_boot = repeat_metrics(y, reference), repeat_metrics(y, reference, index)
        point = {m: point[m] - ref_point[m] for m in point}
        boot = {m: boot[m] - ref_boot[m] for m in boot}
    return {m: {"estimate": float(point[m][0]), "ci95": _interval(boot[m])} for m in point}


def paired_swap_test(y: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, seed: int,
                     n_swaps: int = N_BOOTSTRAP) -> dict[str, float]:
    """Two-sided paired permutation test of model A against model B on the same folds.

    Under the null hypothesis that both models perform equally, each participant's two
    out-of-fold predictions are exchangeable: the test swaps them at random (the same swap
    in every repeat) and compares the observed difference of each metric with the
    differences after swapping: ``p = (1 + #{|null| >= |observed|}) / (1 + n_swaps)``.

    Parameters
    ----------
    y
        (n,) 0/1 labels.
    prob_a, prob_b
        (R, n) out-of-fold probabilities of the two models.
    seed
        Seed of the swaps.
    n_swaps
        Random swaps.

    Returns
    -------
    dict
        ``balanced_accuracy`` and ``roc_auc`` two-sided p-values.
    """
    observed = {m: repeat_metrics(y, prob_a)[m][0] - repeat_metrics(y, prob_b)[m][0]
                for m in ("balanced_accuracy", "roc_auc")}
    swap = np.random.default_rng(seed).random((n_swaps, len(y))) < 0.5
    null = {m: np.zeros(n_swaps) for m in observed}
    for a, b in zip(prob_a, prob_b, strict=True):
        pa, pb = np.where(swap, b, a), np.where(swap, a, b)
        yb = np.broadcast_to(y, pa.shape)
        null["balanced_accuracy"] += (balanced_accuracy_rows(yb, (pa >= 0.5).astype(int))
                                      - balanced_accuracy_rows(yb, (pb >= 0.5).astype(int))) / len(prob_a)
        null["roc_auc"] += (auc_rows(yb, pa) - auc_rows(yb, pb)) / len(prob_a)
    return {m: float((1 + np.sum(np.abs(null[m]) >= abs(observed[m]) - 1e-12)) / (1 + n_swaps)) for m in observed}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN, not counted)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate; NaN stays NaN)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    scaled = p[order] * m / np.arange(1, m + 1)
    out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return out


def max_statistic_p(observed: np.ndarray, nulls: np.ndarray) -> np.ndarray:
    """Single-step max-statistic adjusted p-values (Westfall and Young).

    Parameters
    ----------
    observed
        (m,) statistics of the m tests of a grid (larger = stronger evidence).
    nulls
        (m, B) their values under the same B joint permutations (permutation b of every
        test shuffles the participants the same way).

    Returns
    -------
    numpy.ndarray
        ``(1 + #{max_j null[j, b] >= observed[i]}) / (1 + B)`` for each test i: the
        p-value of the best of the grid accounts for the choice among all m.
    """
    top = np.max(nulls, axis=0)
    return np.array([(1 + np.sum(top >= o - 1e-12)) / (1 + nulls.shape[1]) for o in observed])


def prior_corrected(prob: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray) -> np.ndarray:
    """Undo class reweighting: ``logit p + log(n_pos / n_neg)`` of the training fold.

    A logistic model fitted with ``class_weight="balanced"`` estimates the log-odds of a
    population where both classes are equally frequent; adding the log of the training
    fold's odds returns probabilities on the scale of the data (King and Zeng's prior
    correction), computed inside each training fold.
    """
    p = np.clip(prob, 1e-12, 1 - 1e-12)
    return expit(logit(p) + np.log(n_pos / n_neg))


def _logistic_fit(x: np.ndarray, y: np.ndarray, offset: np.ndarray, slope: bool) -> np.ndarray:
    """Unpenalised logistic regression of y on [1, x] (or 1 with an offset) by Newton."""
    X = np.column_stack([np.ones_like(x), x]) if slope else np.ones((len(x), 1))
    beta = np.zeros(X.shape[1])
    for _ in range(100):
        p = expit(X @ beta + offset)
        grad = X.T @ (y - p)
        hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


#: Risk thresholds of the decision curve.
THRESHOLDS = np.round(np.arange(0.1, 0.71, 0.1), 2)


def calibration(y: np.ndarray, prob: np.ndarray, prevalence_prob: np.ndarray,
                thresholds: np.ndarray = THRESHOLDS) -> dict:
    """Calibration of out-of-fold probabilities.

    Parameters
    ----------
    y
        (n,) 0/1 outcomes.
    prob
        (n,) out-of-fold probabilities (the mean over CV repeats).
    prevalence_prob
        (n,) the prevalence-only model's out-of-fold probabilities (the training folds'
        prevalence): the Brier score a model must beat.
    thresholds
        Risk thresholds of the decision curve.

    Returns
    -------
    dict
        ``intercept`` (calibration in the large: logistic intercept with logit(prob) as
        offset; 0 is ideal), ``slope`` (logistic slope on logit(prob); 1 is ideal),
        ``brier``, ``brier_prevalence``, ``mean_probability``, ``prevalence`` and
        ``decision_curve`` (net benefit of the model, treat-all and treat-none at each
        threshold t: ``TP/n - FP/n * t / (1 - t)``).
    """
    lp = logit(np.clip(prob, 1e-6, 1 - 1e-6))
    y = y.astype(float)
    intercept = _logistic_fit(lp, y, lp, slope=False)[0]
    slope = _logistic_fit(lp, y, np.zeros_like(lp), slope=True)[1]
    n, prev = len(y), float(y.mean())
    curve = []
    for t in thresholds:
        treat = prob >= t
        odds = t / (1 - t)
        curve.append({
            "threshold": round(float(t), 3),
            "model": float(((treat & (y == 1)).sum() - (treat & (y == 0)).sum() * odds) / n),
            "treat_all": float(prev - (1 - prev) * odds),
            "treat_none": 0.0,
        })
    return {
        "intercept": float(intercept), "slope": float(slope),
        "brier": float(np.mean((prob - y) ** 2)),
        "brier_prevalence": float(np.mean((prevalence_prob - y) ** 2)),
        "mean_probability": float(prob.mean()), "prevalence": prev,
        "decision_curve": curve,
    }


def adjust_grid(p_values: np.ndarray, gains: np.ndarray, nulls: list[np.ndarray | None]) -> dict[str, np.ndarray]:
    """Multiplicity adjustments of an exploratory grid of permutation tests.

    Parameters
    ----------
    p_values
        (m,) raw permutation p-values (NaN: row not tested).
    gains
        (m,) observed statistic of each row on a common scale (headline minus chance).
    nulls
        Per row, the null values of that statistic under the joint permutations, or None
        when the row is outside the max-statistic family (for example placebo rows, or
        nulls of another length).

    Returns
    -------
    dict
        ``p_holm`` and ``p_bh`` over every tested row; ``p_maxstat`` over the rows with
        nulls (NaN elsewhere).
    """
    out = {"p_holm": holm(p_values), "p_bh": benjamini_hochberg(p_values),
           "p_maxstat": np.full(len(p_values), np.nan)}
    family = [i for i, null in enumerate(nulls) if null is not None]
    arrays = [null for null in nulls if null is not None]
    if arrays and len({len(a) for a in arrays}) == 1:
        stacked = np.vstack(arrays)
        out["p_maxstat"][family] = max_statistic_p(gains[family], stacked)
    return out


def headline_rows(y: np.ndarray, pred: np.ndarray, kind: str, n_classes: int) -> np.ndarray:
    """Headline metric of each resample: balanced accuracy (classes present) or R^2.

    Parameters
    ----------
    y, pred
        (B, n) observed and predicted class indices (classification) or values (regression).
    kind
        ``"classification"`` or ``"regression"``.
    n_classes
        Number of classes K.

    Returns
    -------
    numpy.ndarray
        (B,) values; NaN where undefined (a single class, or a constant target).
    """
    if kind == "regression":
        total = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, 1 - ((y - pred) ** 2).sum(axis=1) / total, np.nan)
    recalls = []
    for c in range(n_classes):
        size = (y == c).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(size > 0, ((y == c) & (pred == c)).sum(axis=1) / size, np.nan))
    stacked = np.array(recalls)
    present = np.isfinite(stacked).sum(axis=0)
    return np.where(present > 1, np.nansum(stacked, axis=0) / np.maximum(present, 1), np.nan)


def bootstrap_headline(y: np.ndarray, preds: np.ndarray, kind: str, n_classes: int, index: np.ndarray,
                       reference: np.ndarray | None = None) -> list[float]:
    """95 % participant-bootstrap interval of the headline metric (mean over CV repeats).

    Parameters
    ----------
    y
        (n,) observed classes or values.
    preds
        (R, n) out-of-fold predictions of R repeats.
    kind, n_classes
        As :func:`headline_rows`.
    index
        (B, n) bootstrap indices.
    reference
        (R', n) a comparator's predictions on the same participants: the interval is then
        that of the difference.

    Returns
    -------
    list of float
        ``[low, high]``.
    """
    def value(p: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean([headline_rows(y[index], r[index], kind, n_classes) for r in p], axis=0)

    boot = value(preds) if reference is None else value(preds) - value(reference)
    return _interval(boot)
