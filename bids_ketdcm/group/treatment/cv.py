"""Cross-validation of treatment-selection methods.

Repeated stratified k-fold with fresh splits per repeat; features are standardised with
statistics of the training fold only; every model gets its own seed derived from (seed,
repeat, fold, method). Ties between predicted probabilities are broken by column order (the
DPNN paper's convention) or at random (seeded, ``random_ties``), and a fixed policy's AUC is
undefined (NaN): it predicts no outcome.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from bids_ketdcm.group.treatment.dpnn import DPNNSettings
from bids_ketdcm.group.treatment.methods import FIXED, make_model, single_threaded
from bids_ketdcm.group.treatment.metrics import compare_methods, selection_metrics, wilcoxon_p
from bids_ketdcm.seeds import derive_seed

log = logging.getLogger(__name__)




@dataclass
class SelectionProblem:
    """Data of a treatment-selection problem.

    Attributes
    ----------
    X
        (n, p) features.
    treatment
        (n,) observed treatment index (0 .. T - 1).
    outcome
        (n,) observed binary outcome.
    truth
        (n, T) counterfactual truth (true probabilities or realised outcomes) or None.
    treatment_names
        T names, in index order.
    truth_is_probability
        True when ``truth`` holds probabilities (then an ``oracle`` method is meaningful).
    """

    X: np.ndarray
    treatment: np.ndarray
    outcome: np.ndarray
    truth: np.ndarray | None
    treatment_names: list[str]
    truth_is_probability: bool = False

    @property
    def n_treatments(self) -> int:
        return len(self.treatment_names)


@dataclass
class CVResult:
    """Per fold-repeat metrics and out-of-fold predictions.

    Attributes
    ----------
    folds
        One row per (method, repeat, fold): the metrics of :func:`selection_metrics`,
        ``n_test`` and ``seconds`` (fit + predict).
    oof
        method -> (n_repeats, n, T) out-of-fold predicted probabilities.
    """

    folds: pd.DataFrame
    oof: dict[str, np.ndarray] = field(default_factory=dict)
    #: Ties between predictions broken at random (seeded) instead of by column order.
    random_ties: bool = False


def _strata(problem: SelectionProblem, n_splits: int) -> np.ndarray:
    """Stratify on (treatment, outcome) when every cell can fill each fold, else on treatment."""
    joint = problem.treatment * 2 + problem.outcome.astype(int)
    if np.bincount(joint)[np.unique(joint)].min() >= n_splits:
        return joint
    return problem.treatment


def cross_validate_selection(
    problem: SelectionProblem,
    methods: tuple[str, ...] | list[str],
    n_splits: int = 5,
    n_repeats: int = 4,
    seed: int = 0,
    dpnn: DPNNSettings | None = None,
    knn_k: int | None = None,
    progress: bool = True,
    random_ties: bool = False,
) -> CVResult:
    """Repeated stratified k-fold evaluation of treatment-selection methods.

    Parameters
    ----------
    problem
        The data.
    methods
        Names from :data:`METHODS`; ``oracle`` needs ``problem.truth_is_probability``.
    n_splits, n_repeats
        Folds per repeat and repeats (fresh splits per repeat).
    seed
        Seed of the splits and of every model.
    dpnn
        DPNN settings (their ``n_prototypes`` and ``classifier_width`` also size KMNN).
    knn_k
        Neighbours of the case-based reasoning baseline (None: square-root rule).
    progress
        Show a progress bar on stderr (only when it is a terminal).
    random_ties
        Break ties between predicted probabilities at random (seeded); False: by column
        order (the DPNN paper's convention, which its ``mrr_column`` assumes).

    Returns
    -------
    CVResult
    """
    dpnn = dpnn or DPNNSettings()
    if "oracle" in methods and not problem.truth_is_probability:
        raise ValueError("the oracle needs true response probabilities")
    n, t = len(problem.outcome), problem.n_treatments
    cv = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    oof = {m: np.full((n_repeats, n, t), np.nan) for m in methods}
    rows: list[dict] = []
    splits = cv.split(problem.X, _strata(problem, n_splits))
    bar = tqdm(splits, total=n_splits * n_repeats, desc="treatment CV", disable=None if progress else True)
    with single_threaded():
        for i, (train, test) in enumerate(bar):
            rows.extend(_run_fold(problem, methods, i, train, test, n_splits, seed, dpnn, knn_k, oof,
                                  random_ties))
    return CVResult(pd.DataFrame(rows), oof, random_ties)


def _run_fold(
    problem: SelectionProblem,
    methods: tuple[str, ...] | list[str],
    i: int,
    train: np.ndarray,
    test: np.ndarray,
    n_splits: int,
    seed: int,
    dpnn: DPNNSettings,
    knn_k: int | None,
    oof: dict[str, np.ndarray],
    random_ties: bool = False,
) -> list[dict]:
    """Fit and score every method on one split; fills ``oof`` in place."""
    rows = []
    t = problem.n_treatments
    repeat, fold = divmod(i, n_splits)
    scaler = StandardScaler().fit(problem.X[train])
    x_train, x_test = scaler.transform(problem.X[train]), scaler.transform(problem.X[test])
    for j, method in enumerate(methods):
        start = time.perf_counter()
        if method == "oracle":
            assert problem.truth is not None  # checked by cross_validate_selection
            pred = problem.truth[test]
        elif method in FIXED:
            pred = np.zeros((len(test), t))
            pred[:, problem.treatment_names.index(method[len("always_"):])] = 1.0
        else:
            model = make_model(method, t, derive_seed(seed, repeat, fold, j), dpnn, knn_k)
            model.fit(x_train, problem.treatment[train], problem.outcome[train])
            pred = model.predict_proba(x_test)
        seconds = time.perf_counter() - start
        oof[method][repeat, test] = pred
        truth = None if problem.truth is None else problem.truth[test]
        metrics = _named(selection_metrics(pred, problem.treatment[test], problem.outcome[test], truth,
                                           seed=derive_seed(seed, repeat, fold, j, 1) if random_ties else None),
                         problem, method)
        rows.append(
            {"method": method, "repeat": repeat, "fold": fold, "n_test": len(test), **metrics, "seconds": seconds}
        )
    return rows


def pooled_metrics(problem: SelectionProblem, result: CVResult) -> pd.DataFrame:
    """Metrics of the out-of-fold predictions pooled over the folds of each repeat."""
    rows = []
    for j, (method, preds) in enumerate(result.oof.items()):
        for repeat, pred in enumerate(preds):
            metrics = selection_metrics(pred, problem.treatment, problem.outcome, problem.truth,
                                        seed=derive_seed(repeat, j, 2) if result.random_ties else None)
            rows.append({"method": method, "repeat": repeat, **_named(metrics, problem, method)})
    return pd.DataFrame(rows)


def _named(metrics: dict, problem: SelectionProblem, method: str) -> dict:
    """Per-arm AUC keys named after the treatments; a fixed policy has no AUC."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("auc_arm"):
            key = f"auc_{problem.treatment_names[int(key[7:])]}"
        out[key] = float("nan") if method in FIXED and key.startswith("auc") else value
    return out


def method_tests(folds: pd.DataFrame, metric: str = "rpl", reference: str = "random") -> dict:
    """Friedman + Bonferroni Wilcoxon over fold-repeats, and each method against a reference.

    Parameters
    ----------
    folds
        ``CVResult.folds``.
    metric
        Metric compared (lower is better for ``rpl``, higher for the others).
    reference
        Method each other method is tested against, one-sided in the direction of "better".

    Returns
    -------
    dict
        :func:`compare_methods` output (without the oracle) plus ``versus_reference``:
        method -> one-sided p-value that it is better than the reference.
    """
    wide = folds.pivot_table(index=["repeat", "fold"], columns="method", values=metric)
    methods = [m for m in folds["method"].unique() if m != "oracle"]
    out = compare_methods(wide[methods])
    better = "less" if metric == "rpl" else "greater"
    if reference in wide:
        out["versus_reference"] = {
            m: wilcoxon_p(wide[m], wide[reference], better) for m in methods if m != reference
        }
    out["metric"] = metric
    return out
