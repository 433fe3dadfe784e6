"""Metrics of treatment selection and the tests that compare methods.

Notation: ``pred`` and ``truth`` are (n, T) arrays holding, for each patient and treatment,
the predicted and the true response probability (where only realised outcomes are known, as
in a crossover trial, ``truth`` holds the binary outcomes under each treatment). A method
recommends the treatment of highest predicted probability (the first column among equals, or
a seeded random choice among them when a seed is given).

* RPL (response probability loss, the paper's "regret"): ``truth[best] - truth[recommended]``.
* MRR: mean reciprocal rank of the recommended treatment in the true ordering (best = 1).
  Ties in ``truth`` are frequent (two treatments with binary outcomes tie for every patient
  who responds to both or to neither). ``ties="average"`` gives tied treatments their average
  rank (a recommendation tied with one other for best scores 1/1.5); ``ties="column"`` breaks
  ties by column order (the first column ranks higher), the convention of the paper's code,
  under which a uniformly random recommendation among T treatments always scores
  ``mean(1/k, k = 1..T)`` (0.52 for T = 4), whatever the ties.
* RR: response rate among patients whose observed treatment equals the recommendation,
  compared with the base rate (response rate of all observed outcomes).
* AUC: ROC AUC of the predicted probability of the observed treatment against the observed
  outcome.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score


def recommend(pred: np.ndarray, seed: int | None = None) -> np.ndarray:
    """Index of the recommended treatment per patient: the highest prediction.

    Ties go to the first column, or, with ``seed``, to a uniformly random one of the tied
    columns (so a method predicting equal probabilities is not credited with a policy).
    """
    pred = np.asarray(pred, dtype=float)
    if seed is None:
        return np.argmax(pred, axis=1)
    tied = pred >= pred.max(axis=1, keepdims=True)
    keys = np.random.default_rng(seed).random(pred.shape)
    return np.argmax(np.where(tied, keys, -1.0), axis=1)


def regret(truth: np.ndarray, recommended: np.ndarray) -> np.ndarray:
    """Per-patient response probability loss ``max_k truth[i, k] - truth[i, recommended[i]]``."""
    truth = np.asarray(truth, dtype=float)
    rows = np.arange(truth.shape[0])
    return truth.max(axis=1) - truth[rows, np.asarray(recommended)]


def reciprocal_rank(
    truth: np.ndarray, recommended: np.ndarray, ties: Literal["average", "column"] = "average"
) -> np.ndarray:
    """Per-patient reciprocal rank of the recommended treatment in the true ordering.

    Parameters
    ----------
    truth
        (n, T) true response probabilities or outcomes.
    recommended
        (n,) recommended treatment indices.
    ties
        ``"average"``: tied treatments share their average rank; ``"column"``: ties are
        broken by column order (lower column index ranks higher).

    Returns
    -------
    numpy.ndarray
        (n,) values in (0, 1].
    """
    truth = np.asarray(truth, dtype=float)
    recommended = np.asarray(recommended)
    rows = np.arange(truth.shape[0])
    chosen = truth[rows, recommended][:, None]
    better = (truth > chosen).sum(axis=1)
    equal = truth == chosen
    if ties == "average":
        rank = 1.0 + better + (equal.sum(axis=1) - 1) / 2.0
    elif ties == "column":
        before = np.arange(truth.shape[1])[None, :] < recommended[:, None]
        rank = 1.0 + better + (equal & before).sum(axis=1)
    else:
        raise ValueError(f"ties must be 'average' or 'column', not {ties!r}")
    return 1.0 / rank


def response_rate(
    recommended: np.ndarray, observed: np.ndarray, outcome: np.ndarray
) -> tuple[float, int]:
    """Response rate among patients whose observed treatment equals the recommendation.

    Returns
    -------
    tuple
        (rate, number of such patients); the rate is NaN when there are none.
    """
    match = np.asarray(recommended) == np.asarray(observed)
    n = int(match.sum())
    rate = float(np.asarray(outcome, dtype=float)[match].mean()) if n else float("nan")
    return rate, n


def outcome_auc(pred: np.ndarray, observed: np.ndarray, outcome: np.ndarray) -> float:
    """ROC AUC of the prediction for the observed treatment; NaN when one class is absent."""
    outcome = np.asarray(outcome)
    if np.unique(outcome).size < 2:
        return float("nan")
    scores = np.asarray(pred, dtype=float)[np.arange(len(outcome)), np.asarray(observed)]
    return float(roc_auc_score(outcome, scores))


def selection_metrics(
    pred: np.ndarray,
    observed: np.ndarray,
    outcome: np.ndarray,
    truth: np.ndarray | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """All metrics of one set of predictions.

    Parameters
    ----------
    pred
        (n, T) predicted response probabilities.
    observed, outcome
        (n,) observed treatment indices and binary outcomes.
    truth
        (n, T) counterfactual truth; without it RPL and MRR are NaN.
    seed
        Seed of the random tie-breaking of :func:`recommend` (None: first column).

    Returns
    -------
    dict
        ``auc``, ``rpl``, ``mrr`` (tie-aware), ``mrr_column`` (paper convention), ``rr``,
        ``rr_n`` (patients behind RR) and ``base_rate``.
    """
    rec = recommend(pred, seed)
    rr, rr_n = response_rate(rec, observed, outcome)
    out = {
        "auc": outcome_auc(pred, observed, outcome),
        "rpl": float("nan"),
        "mrr": float("nan"),
        "mrr_column": float("nan"),
        "rr": rr,
        "rr_n": float(rr_n),
        "base_rate": float(np.mean(outcome)),
    }
    for k in range(np.asarray(pred).shape[1]):  # AUC among the patients observed on each arm
        arm = np.asarray(observed) == k
        out[f"auc_arm{k}"] = outcome_auc(np.asarray(pred)[arm], np.asarray(observed)[arm], np.asarray(outcome)[arm])
    if truth is not None:
        out["rpl"] = float(regret(truth, rec).mean())
        out["mrr"] = float(reciprocal_rank(truth, rec, "average").mean())
        out["mrr_column"] = float(reciprocal_rank(truth, rec, "column").mean())
    return out


def wilcoxon_p(a: np.ndarray, b: np.ndarray, alternative: str = "two-sided") -> float:
    """Wilcoxon signed-rank p-value of paired samples ``a - b`` (1.0 when all differences are 0)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0 or np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, alternative=alternative).pvalue)


def compare_methods(values: pd.DataFrame) -> dict:
    """Friedman test across methods and pairwise Wilcoxon post-hoc tests (Bonferroni).

    Parameters
    ----------
    values
        One row per fold-repeat (the blocks), one column per method, one metric.
        Rows with a missing value in any column are dropped.

    Returns
    -------
    dict
        ``n_blocks``; ``friedman`` (``statistic``, ``p``; None with fewer than 3 methods);
        ``pairs``: list of {``a``, ``b``, ``median_difference`` (a - b), ``p``,
        ``p_bonferroni``} over all method pairs (two-sided).
    """
    values = values.dropna()
    methods = list(values.columns)
    friedman = None
    if len(methods) >= 3 and len(values) >= 2:
        res = stats.friedmanchisquare(*(values[m].to_numpy() for m in methods))
        friedman = {"statistic": float(res.statistic), "p": float(res.pvalue)}
    pairs = list(itertools.combinations(methods, 2))
    rows = []
    for a, b in pairs:
        p = wilcoxon_p(values[a].to_numpy(), values[b].to_numpy())
        rows.append(
            {
                "a": a,
                "b": b,
                "median_difference": float(np.median(values[a] - values[b])),
                "p": p,
                "p_bonferroni": min(1.0, p * len(pairs)),
            }
        )
    return {"n_blocks": int(len(values)), "friedman": friedman, "pairs": rows}
