"""Metrics of DESIGN.md section 5, never NaN, computed from numpy arrays.

Definitions follow scikit-learn (tests compare every value with ``sklearn.metrics``),
without its per-call overhead (the suite computes metrics tens of thousands of times):

* accuracy; balanced accuracy = mean recall over the classes present in ``y_true``;
* macro precision / recall / F1 over the classes present in ``y_true`` or ``y_pred``
  (``zero_division=0``);
* two classes: ``f1``, ``sensitivity`` (recall) and ``specificity`` refer to the positive
  (last) class; ``roc_auc`` ranks the positive-class score;
* more classes: ``f1`` is macro F1, ``sensitivity`` macro recall, ``specificity`` macro
  one-vs-rest specificity, ``roc_auc`` the macro one-vs-rest AUC of the class scores,
  over the classes present in ``y_true``;
* regression: MAE, RMSE, R^2 (1 - SS_res / SS_tot) and Pearson r.

A metric that a fold cannot define (AUC or specificity with one class in the fold,
Pearson r of a constant prediction ...) gets the documented fill value of
:data:`FILL` and its name is returned in the ``undefined`` set, so callers can flag it and
leave it out of means over folds.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

CLASSIFICATION_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "f1",
    "precision_macro",
    "recall_macro",
    "sensitivity",
    "specificity",
    "roc_auc",
)
REGRESSION_METRICS = ("mae", "rmse", "r2", "pearson_r")
#: Value written for a metric the fold cannot define (chance level or zero_division).
FILL = {"sensitivity": 0.0, "specificity": 0.0, "roc_auc": 0.5, "r2": 0.0, "pearson_r": 0.0}


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix (rows = true class, columns = predicted class)."""
    idx = np.asarray(y_true, dtype=int) * n_classes + np.asarray(y_pred, dtype=int)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, n_classes: int
) -> tuple[dict[str, float], set[str]]:
    """Every classification metric of one set of predictions.

    Parameters
    ----------
    y_true, y_pred
        Class indices 0..K-1.
    scores
        (n, K) class scores (probabilities or decision values) for the AUC.
    n_classes
        K.

    Returns
    -------
    metrics : dict
        Name -> value (finite).
    undefined : set of str
        Metrics that this set of predictions cannot define (given :data:`FILL`).
    """
    y_true = np.asarray(y_true, dtype=int)
    cm = confusion(y_true, y_pred, n_classes)
    n = cm.sum()
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    present = support > 0
    labels = present | (predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=(support + predicted) > 0)
    negatives = n - support
    spec = np.divide(negatives - predicted + tp, negatives, out=np.zeros_like(tp), where=negatives > 0)
    out = {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(recall[present].mean()),
        "precision_macro": float(precision[labels].mean()),
        "recall_macro": float(recall[labels].mean()),
    }
    undefined: set[str] = set()
    scores = np.asarray(scores, dtype=float)
    if n_classes == 2:
        out["f1"] = float(f1[1])
        out["sensitivity"] = float(recall[1])
        out["specificity"] = float(recall[0])
        if not present[1]:
            undefined.add("sensitivity")
        if not present[0]:
            undefined.add("specificity")
        if present.all():
            out["roc_auc"] = _auc(y_true == 1, scores[:, 1])
        else:
            undefined.add("roc_auc")
    else:
        out["f1"] = float(f1[labels].mean())
        out["sensitivity"] = out["balanced_accuracy"]
        has_neg = present & (negatives > 0)
        if has_neg.any():
            out["specificity"] = float(spec[has_neg].mean())
        else:
            undefined.add("specificity")
        if present.sum() >= 2:
            out["roc_auc"] = float(
                np.mean([_auc(y_true == k, scores[:, k]) for k in np.flatnonzero(present)])
            )
        else:
            undefined.add("roc_auc")
    for name in undefined:
        out[name] = FILL[name]
    return {m: out[m] for m in CLASSIFICATION_METRICS}, undefined


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[dict[str, float], set[str]]:
    """MAE, RMSE, R^2 and Pearson r of one set of predictions (see module notes)."""
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    err = y_true - y_pred
    ss_res = float((err**2).sum())
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    undefined: set[str] = set()
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:
        r2 = 1.0 if ss_res == 0 else FILL["r2"]
        undefined.add("r2")
    sd_t, sd_p = y_true.std(), y_pred.std()
    if sd_t > 0 and sd_p > 1e-12 * max(1.0, abs(y_pred.mean())):
        r = float(np.corrcoef(y_true, y_pred)[0, 1])
    else:
        r = FILL["pearson_r"]
        undefined.add("pearson_r")
    out = {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt(ss_res / err.size)), "r2": r2, "pearson_r": r}
    return out, undefined


def balanced_accuracy_batch(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced accuracy of many prediction vectors (B, n) against one ``y_true`` (n,)."""
    y_true = np.asarray(y_true, dtype=int)
    recalls = [
        (y_pred[:, y_true == k] == k).mean(axis=1)
        for k in range(n_classes)
        if (y_true == k).any()
    ]
    return np.mean(recalls, axis=0)


def r2_batch(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """R^2 of many prediction vectors (B, n) against one ``y_true`` (n,)."""
    y_true = np.asarray(y_true, dtype=float)
    ss_tot = ((y_true - y_true.mean()) ** 2).sum()
    ss_res = ((y_true[None, :] - y_pred) ** 2).sum(axis=1)
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else np.zeros(len(y_pred))


def summarise(values: list[float], undefined: list[bool]) -> tuple[float, float]:
    """Mean and sample sd over the folds where a metric is defined (0 sd for one fold)."""
    kept = np.asarray([v for v, u in zip(values, undefined, strict=True) if not u], dtype=float)
    if kept.size == 0:
        kept = np.asarray(values, dtype=float)
    sd = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
    return float(kept.mean()), sd
