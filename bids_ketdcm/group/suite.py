"""Cross-validated prediction suite: models x protocols x permutation tests (DESIGN.md 5).

One :class:`Task` is one feature matrix (a network) and one target (a label scheme or a
continuous target) of one analysis (ketamine or placebo). :func:`run_task` evaluates
every model under every protocol:

* ``kfold3``, ``kfold4``, ``kfold5``: stratified k-fold CV (plain k-fold for regression)
  with fixed default hyper-parameters, as the DCM study; per-fold tables and pooled
  out-of-fold predictions;
* ``nested``: repeated nested CV (outer ``nested_outer_k``-fold x ``nested_repeats``);
  an inner ``inner_k``-fold CV on each outer training set picks C (logistic,
  multinomial, SVM) or alpha and l1_ratio (elastic net); the random forest picks its
  depth by out-of-bag balanced accuracy on the outer training set.

Every model is a scikit-learn estimator fitted on the training rows only
(``StandardScaler`` inside a ``Pipeline``; :func:`make_estimator`). With
``engine="sklearn"`` each fold is fitted by that pipeline. The default ``"batched"``
engine fits the linear models (and runs every inner search and permutation null) with
:mod:`bids_ketdcm.group.batched`, which reproduces those pipelines to solver tolerance
for thousands of small problems at once (tests compare the two engines); the random
forest and the majority / mean comparators always use scikit-learn.

Headline metric: balanced accuracy of the pooled out-of-fold predictions for label
schemes, out-of-fold R^2 (``1 - SS_res / SS_tot`` over all participants) for
continuous targets. For nested CV, "pooled" is the mean over repeats of each repeat's
pooled value. Permutation test: the feature rows are shuffled relative to the labels
(the folds, stratified on the real labels, stay fixed), the headline model is refitted
under the headline protocol (``kfold{max k}``) and
``p = (1 + #{null >= observed}) / (1 + n_permutations)``. Every task of an analysis
draws the same permutations (joint nulls, for the max-statistic correction of
:mod:`bids_ketdcm.group.inference`). The nested CV of the models in
``nested_permuted`` on the ketamine binary targets gets its own permutation p-value
(``nested_permutations``), the inner search redone in every permutation
(:func:`nested_permutation_null`).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import sklearn
from sklearn.compose import TransformedTargetRegressor
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import ElasticNet, LinearRegression, LogisticRegression
from sklearn.model_selection import KFold, RepeatedKFold, RepeatedStratifiedKFold, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from bids_ketdcm.group import batched
from bids_ketdcm.group.metrics import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    balanced_accuracy_batch,
    classification_metrics,
    r2_batch,
    regression_metrics,
    summarise,
)
from bids_ketdcm.seeds import derive_seed
from bids_ketdcm.threads import ThreadPolicy

log = logging.getLogger(__name__)

CLASSIFIERS = ("logistic", "multinomial", "random_forest", "svm", "majority", "baseline_score")
REGRESSORS = ("elasticnet", "mean", "baseline_score")
ALL_MODELS = ("logistic", "multinomial", "random_forest", "svm", "elasticnet", "majority", "mean", "baseline_score")
#: Comparators every imaging model must beat.
COMPARATORS = ("majority", "mean", "baseline_score")
HEADLINE_MODEL = {"classification": "logistic", "regression": "elasticnet"}
HEADLINE_METRIC = {"classification": "balanced_accuracy", "regression": "r2"}
HEADLINE_DEFINITION = {
    "classification": "balanced accuracy (mean recall over classes) of the pooled out-of-fold "
    "predictions; nested CV: mean over repeats",
    "regression": "R^2 = 1 - SS_res/SS_tot of the pooled out-of-fold predictions; nested CV: "
    "mean over repeats",
}
#: Models the batched engine fits (and so can permute).
BATCHED = ("logistic", "multinomial", "svm", "elasticnet", "baseline_score")
PERMUTABLE = BATCHED
#: Models whose hyper-parameters the nested CV tunes by an inner CV.
TUNED_BATCHED = ("logistic", "multinomial", "svm", "elasticnet")
MODEL_DESCRIPTIONS = {
    "logistic": "L2 logistic regression, class_weight balanced (one-vs-rest for >2 classes)",
    "multinomial": "multinomial L2 logistic regression, class_weight balanced (>2 classes only)",
    "random_forest": "random forest, class_weight balanced",
    "svm": "linear SVM (squared hinge), class_weight balanced (one-vs-rest for >2 classes)",
    "elasticnet": "elastic net on the training-standardised target",
    "majority": "majority class of the training fold (comparator)",
    "mean": "mean of the training fold (comparator)",
    "baseline_score": "the baseline score alone (logistic / linear regression; comparator)",
}


@dataclass(frozen=True)
class SuiteConfig:
    """Models, protocols, hyper-parameters and permutation settings of the suite."""

    models: tuple[str, ...] = ALL_MODELS
    k_values: tuple[int, ...] = (3, 4, 5)
    nested_outer_k: int = 5
    nested_repeats: int = 10
    inner_k: int = 3
    n_permutations: int = 1000
    #: Models given permutation p-values; None = the headline model of each task.
    permutation_models: tuple[str, ...] | None = None
    rf_trees: int = 25
    #: Permutations of the nested CV (inner search redone in each) of the models below, on the
    #: ketamine binary targets (the multi-class and placebo nested rows cost several times more).
    nested_permutations: int = 0
    #: Models whose nested CV is permuted (the elastic net's inner search costs ~10 x more).
    nested_permuted: tuple[str, ...] = ("logistic",)
    C: float = 1.0
    alpha: float = 0.5
    l1_ratio: float = 0.5
    C_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    alpha_grid: tuple[float, ...] = (0.1, 0.3, 1.0)
    l1_grid: tuple[float, ...] = (0.2, 0.8)
    depth_grid: tuple[int | None, ...] = (3, None)
    seed: int = 0
    #: "batched": linear models fitted by :mod:`batched` (fast); "sklearn": every fold by
    #: its scikit-learn pipeline (reference; same results to solver tolerance).
    engine: str = "batched"

    @property
    def protocols(self) -> list[str]:
        """Protocol names in order."""
        return [f"kfold{k}" for k in self.k_values] + (["nested"] if self.nested_repeats > 0 else [])

    @property
    def permutation_protocol(self) -> str:
        """The protocol of the permutation tests (the largest k)."""
        return f"kfold{max(self.k_values)}"

    def models_for(self, kind: str, n_classes: int) -> list[str]:
        """Models run on a task of this kind (multinomial only for >2 classes)."""
        allowed = CLASSIFIERS if kind == "classification" else REGRESSORS
        out = [m for m in self.models if m in allowed]
        return [m for m in out if not (m == "multinomial" and n_classes <= 2)]

    def permuted_models(self, kind: str, n_classes: int) -> list[str]:
        """Models given a permutation p-value on a task of this kind."""
        wanted = self.permutation_models or (HEADLINE_MODEL[kind],)
        return [m for m in self.models_for(kind, n_classes) if m in wanted and m in PERMUTABLE]


@dataclass
class Task:
    """One feature matrix and one target of one analysis."""

    treatment: str
    network: str
    target: str
    kind: str
    participants: list[str]
    X: np.ndarray
    y: np.ndarray
    baseline: np.ndarray
    classes: tuple[str, ...] = ()
    feature_names: list[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return len(self.classes)


@dataclass
class TaskResult:
    """Everything :func:`run_task` computed for one task."""

    results: list[dict]
    folds: list[dict]
    predictions: list[dict]
    nulls: dict[str, np.ndarray]
    params: dict[str, list[dict]]


def _seed(config: SuiteConfig, *names: str) -> int:
    """A stable seed from the configured seed and names (same names -> same seed)."""
    return derive_seed(config.seed, *names)


def effective_k(task: Task, k: int) -> int:
    """Largest usable number of folds <= k: at most the participants, and for labels the
    size of the largest class (scikit-learn's limit for stratification)."""
    n = len(task.y)
    if task.kind == "classification":
        return int(min(k, n, np.bincount(task.y).max()))
    return int(min(k, n))


def make_splits(task: Task, protocol: str, config: SuiteConfig) -> tuple[list[tuple], int]:
    """Outer splits of a protocol: list of (repeat, fold, train, test), and the k used."""
    seed = _seed(config, task.treatment, task.target, protocol)
    if protocol == "nested":
        k, repeats = effective_k(task, config.nested_outer_k), config.nested_repeats
        cls = RepeatedStratifiedKFold if task.kind == "classification" else RepeatedKFold
        splitter = cls(n_splits=k, n_repeats=repeats, random_state=seed)
    else:
        k, repeats = effective_k(task, int(protocol[5:])), 1
        cls = StratifiedKFold if task.kind == "classification" else KFold
        splitter = cls(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = list(splitter.split(task.X, task.y))
    return [(i // k, i % k, tr, te) for i, (tr, te) in enumerate(raw)], k


def _inner_splits(y: np.ndarray, kind: str, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner CV splits of an outer training set; empty when it is too small to split."""
    if kind == "classification":
        k = int(min(k, np.bincount(y).max(), len(y)))
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed) if k >= 2 else None
    else:
        k = min(k, len(y))
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed) if k >= 2 else None
    if splitter is None:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(y)), y))


def default_params(model: str, config: SuiteConfig, kind: str = "classification") -> dict:
    """Hyper-parameters of the k-fold protocols (the baseline-score logistic uses C too)."""
    if model in ("logistic", "multinomial", "svm") or (model == "baseline_score" and kind == "classification"):
        return {"C": config.C}
    if model == "elasticnet":
        return {"alpha": config.alpha, "l1_ratio": config.l1_ratio}
    if model == "random_forest":
        return {"max_depth": None}
    return {}


def _grid(model: str, config: SuiteConfig) -> list[dict]:
    """Candidates of the inner search, strongest regularisation first (wins ties)."""
    if model in ("logistic", "multinomial", "svm"):
        return [{"C": c} for c in sorted(config.C_grid)]
    if model == "elasticnet":
        return [
            {"alpha": a, "l1_ratio": r}
            for a in sorted(config.alpha_grid, reverse=True)
            for r in sorted(config.l1_grid)
        ]
    if model == "random_forest":
        return [{"max_depth": d} for d in sorted(config.depth_grid, key=lambda d: (d is None, d))]
    return [{}]


def make_estimator(model: str, kind: str, params: dict, n_classes: int, config: SuiteConfig, seed: int):
    """The scikit-learn estimator of a model (scaling inside the pipeline)."""
    scale = ("scale", StandardScaler())
    if model == "majority":
        return DummyClassifier(strategy="most_frequent")
    if model == "mean":
        return DummyRegressor(strategy="mean")
    if model == "baseline_score" and kind == "regression":
        return Pipeline([scale, ("model", LinearRegression())])
    if model in ("logistic", "multinomial", "baseline_score"):
        est = LogisticRegression(C=params["C"], class_weight="balanced", max_iter=1000)
        if model != "multinomial" and n_classes > 2:
            est = OneVsRestClassifier(est)
        return Pipeline([scale, ("model", est)])
    if model == "svm":
        return Pipeline([scale, ("model", LinearSVC(C=params["C"], class_weight="balanced", max_iter=10000))])
    if model == "random_forest":
        return RandomForestClassifier(
            n_estimators=config.rf_trees, max_depth=params.get("max_depth"),
            class_weight="balanced", random_state=seed,
        )
    if model == "elasticnet":
        net = ElasticNet(alpha=params["alpha"], l1_ratio=params["l1_ratio"], max_iter=10000)
        return Pipeline([scale, ("model", TransformedTargetRegressor(net, transformer=StandardScaler()))])
    raise ValueError(f"unknown model {model!r}")


def _class_scores(est, X: np.ndarray, n_classes: int) -> np.ndarray:
    """(m, K) scores over all K classes from a fitted classifier.

    Probabilities where the estimator has them (absent classes 0), else decision values
    (absent classes -inf).
    """
    if hasattr(est, "predict_proba"):
        raw, out = est.predict_proba(X), np.zeros((len(X), n_classes))
    else:
        raw = est.decision_function(X)
        raw = np.column_stack([-raw, raw]) if raw.ndim == 1 else raw
        out = np.full((len(X), n_classes), -np.inf)
    out[:, est.classes_] = raw
    return out


def _features(task: Task, model: str) -> np.ndarray:
    return task.baseline[:, None] if model == "baseline_score" else task.X


def fit_predict(task: Task, model: str, params: dict, train: np.ndarray, test: np.ndarray,
                config: SuiteConfig, seed: int) -> np.ndarray:
    """Fit the scikit-learn estimator of ``model`` on ``train`` rows, score ``test`` rows.

    Returns (m, K) class scores, or (m,) predictions for regression. A training set
    holding a single class predicts that class.
    """
    X = _features(task, model)
    ytr = task.y[train]
    if task.kind == "classification" and len(np.unique(ytr)) == 1:
        scores = np.zeros((len(test), task.n_classes))
        scores[:, ytr[0]] = 1.0
        return scores
    est = make_estimator(model, task.kind, params, task.n_classes, config, seed)
    est.fit(X[train], ytr)
    if task.kind == "regression":
        return est.predict(X[test])
    return _class_scores(est, X[test], task.n_classes)


def _batched_spec(task: Task, model: str) -> tuple[str, np.ndarray, dict]:
    """The batched model, features and fixed parameters that reproduce ``model``."""
    if model == "baseline_score":
        if task.kind == "regression":  # least squares on one feature
            return "elasticnet", task.baseline[:, None], {"alpha": 0.0, "l1_ratio": 0.0}
        return "logistic", task.baseline[:, None], {}
    return model, task.X, {}


def _tune_batched(task: Task, model: str, outer: list[tuple], config: SuiteConfig, seed: int) -> list[dict]:
    """Inner-CV choice of hyper-parameters for each outer split (batched fits)."""
    _, X, _ = _batched_spec(task, model)
    return _tune_many(task, model, outer, config, seed, [X])[0]


def _tune_many(task: Task, model: str, outer: list[tuple], config: SuiteConfig, seed: int,
               Xs: list[np.ndarray]) -> list[list[dict]]:
    """Inner-CV choice of hyper-parameters for each outer split, for several feature matrices
    at once (the real one, or row-permuted copies for a nested permutation test)."""
    grid = _grid(model, config)
    name = _batched_spec(task, model)[0]
    problems, params, index = [], [], []
    for o, (_, _, train, _) in enumerate(outer):
        inner = _inner_splits(task.y[train], task.kind, config.inner_k, seed + o)
        for g, cand in enumerate(grid):
            for tr, te in inner:
                problems.append((train[tr], train[te]))
                params.append(cand)
                index.append((o, g))
    default = default_params(model, config, task.kind)  # outer sets too small for an inner CV
    if not problems:
        return [[default] * len(outer) for _ in Xs]
    preds = _predict_chunked(name, [X for X in Xs for _ in problems], task.y, problems * len(Xs),
                             params * len(Xs), task.n_classes)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(index):
        groups.setdefault(key, []).append(i)
    chosen = []
    for x in range(len(Xs)):
        score = np.full((len(outer), len(grid)), -np.inf)
        for (o, g), sel in groups.items():
            rows = np.concatenate([problems[i][1] for i in sel])
            out = np.concatenate([preds[x * len(problems) + i] for i in sel])
            if task.kind == "classification":
                score[o, g] = balanced_accuracy_batch(task.y[rows], out.argmax(1)[None], task.n_classes)[0]
            else:
                score[o, g] = -np.mean((task.y[rows] - out) ** 2)
        chosen.append([grid[int(np.argmax(score[o]))] if np.isfinite(score[o]).any() else default
                       for o in range(len(outer))])
    return chosen


def _predict_chunked(model, Xs, y, splits, params, n_classes, budget: float = 3e7) -> list[np.ndarray]:
    """:func:`batched.predict_splits` in chunks that bound the memory used."""
    size = max(len(s[0]) for s in splits) * Xs[0].shape[1] * max(n_classes, 1)
    step = max(1, int(budget // size))
    out: list[np.ndarray] = []
    for start in range(0, len(splits), step):
        stop = start + step
        out += batched.predict_splits(model, Xs[start:stop], y, splits[start:stop], params[start:stop], n_classes)
    return out


def _tree_probas(forest: RandomForestClassifier, Xs: list[np.ndarray], depths) -> list[dict]:
    """Class fractions of every tree of ``forest`` truncated at each depth (None: full).

    For each array of ``Xs``, a dict depth -> array (trees, rows, classes of the forest).
    A fully grown tree cut at depth d predicts with the node it reaches at depth d: the
    tree a depth-limited builder grows from the same node splits.
    """
    n_trees, n_cls = len(forest.estimators_), len(forest.classes_)
    out = [{d: np.empty((n_trees, len(X), n_cls)) for d in depths} for X in Xs]
    for i, tree in enumerate(forest.estimators_):
        t = tree.tree_
        inner = np.flatnonzero(t.children_left >= 0)
        parent = np.zeros(t.node_count, dtype=int)
        parent[t.children_left[inner]] = inner
        parent[t.children_right[inner]] = inner
        depth = np.zeros(t.node_count, dtype=int)
        for _ in range(t.max_depth):  # children are numbered after their parent
            depth[1:] = depth[parent[1:]] + 1
        # ancestor[d] = the node on each node's path at depth min(d, its depth)
        ancestor = {None: np.arange(t.node_count)}
        for d in sorted((d for d in depths if d is not None), reverse=True):
            node = np.arange(t.node_count)
            for _ in range(t.max_depth):
                node = np.where(depth[node] > d, parent[node], node)
            ancestor[d] = node
        for X, dest in zip(Xs, out, strict=True):
            leaves = tree.apply(X)
            for d in depths:
                value = t.value[ancestor[d][leaves], 0, :]
                dest[d][i] = value / value.sum(axis=1, keepdims=True)  # counts before sklearn 1.4
    return out


def _tuned_forest(task: Task, train: np.ndarray, test: np.ndarray, config: SuiteConfig, seed: int
                  ) -> tuple[np.ndarray, dict]:
    """Random forest whose depth is chosen by out-of-bag balanced accuracy.

    One forest is grown on the training rows; each candidate depth is scored on the
    out-of-bag rows of its truncated trees, and the test rows are scored by the forest
    truncated at the best depth (ties: the shallower).
    """
    forest = make_estimator("random_forest", task.kind, {"max_depth": None}, task.n_classes, config, seed)
    forest.fit(task.X[train], task.y[train])
    depths = [c["max_depth"] for c in _grid("random_forest", config)]
    inbag = np.zeros((len(forest.estimators_), len(train)), dtype=bool)
    for i, rows in enumerate(forest.estimators_samples_):
        inbag[i, rows] = True
    oob = ~inbag
    seen = oob.any(axis=0)
    on_train, on_test = _tree_probas(forest, [task.X[train], task.X[test]], depths)
    best, best_score = depths[0], -np.inf
    for d in depths:
        votes = (on_train[d] * oob[..., None]).sum(axis=0)[seen]
        pred = forest.classes_[votes.argmax(axis=1)]
        score = balanced_accuracy_batch(task.y[train][seen], pred[None], task.n_classes)[0]
        if score > best_score:
            best, best_score = d, score
    scores = np.zeros((len(test), task.n_classes))
    scores[:, forest.classes_] = on_test[best].mean(axis=0)
    return scores, {"max_depth": best}


def _metrics(task: Task, y_true: np.ndarray, out: np.ndarray) -> tuple[dict, set]:
    if task.kind == "classification":
        return classification_metrics(y_true, out.argmax(1), out, task.n_classes)
    return regression_metrics(y_true, out)


def _outer_predictions(task: Task, model: str, splits: list[tuple], chosen: list[dict],
                       config: SuiteConfig, seed: int) -> tuple[list[np.ndarray], list[dict]]:
    """Test-row scores of every outer split, and the hyper-parameters used."""
    if config.engine == "batched" and model in BATCHED:
        name, X, extra = _batched_spec(task, model)
        params = [{**p, **extra} for p in chosen]
        problems = [(tr, te) for _, _, tr, te in splits]
        return _predict_chunked(name, [X] * len(problems), task.y, problems, params, task.n_classes), chosen
    outs, used = [], []
    for (rep, fold, train, test), given in zip(splits, chosen, strict=True):
        if model == "random_forest" and given.get("max_depth") == "oob" and len(np.unique(task.y[train])) > 1:
            out, fitted = _tuned_forest(task, train, test, config, seed + rep * 100 + fold)
        else:
            fitted = {} if given.get("max_depth") == "oob" else given
            out = fit_predict(task, model, fitted, train, test, config, seed + rep * 100 + fold)
        outs.append(out)
        used.append(fitted)
    return outs, used


def evaluate(task: Task, model: str, protocol: str, config: SuiteConfig
             ) -> tuple[dict, list[dict], list[dict], list[dict]]:
    """Run one model under one protocol.

    Returns
    -------
    row : dict
        The results row (pooled metrics, fold means and sds, flags).
    folds : list of dict
        One row per fold.
    predictions : list of dict
        Out-of-fold prediction of every participant in every repeat.
    params : list of dict
        Hyper-parameters used in each fold.
    """
    splits, k = make_splits(task, protocol, config)
    seed = _seed(config, task.treatment, task.target, task.network, model, protocol)
    if protocol == "nested" and model in TUNED_BATCHED:
        chosen = _tune_batched(task, model, splits, config, seed)
    elif protocol == "nested" and model == "random_forest":
        chosen = [{"max_depth": "oob"}] * len(splits)
    else:
        chosen = [default_params(model, config, task.kind)] * len(splits)
    outs, chosen = _outer_predictions(task, model, splits, chosen, config, seed)
    names = CLASSIFICATION_METRICS if task.kind == "classification" else REGRESSION_METRICS
    fold_rows: list[dict] = []
    pred_rows: list[dict] = []
    flags: Counter[str] = Counter()
    n_rep = max(s[0] for s in splits) + 1
    shape = (len(task.y), task.n_classes) if task.kind == "classification" else (len(task.y),)
    oof = [np.zeros(shape) for _ in range(n_rep)]
    for (rep, fold, train, test), params, out in zip(splits, chosen, outs, strict=True):
        oof[rep][test] = out
        values, undefined = _metrics(task, task.y[test], out)
        fold_flags = []
        if task.kind == "classification":
            n_train_classes = len(np.unique(task.y[train]))
            if n_train_classes == 1:
                fold_flags.append("single-class training fold (constant prediction)")
            elif n_train_classes < task.n_classes:
                fold_flags.append("class missing from training fold")
        flags.update(fold_flags)
        flags.update(f"{m} undefined in a fold" for m in undefined)
        fold_rows.append({
            "repeat": rep, "fold": fold, "n_train": len(train), "n_test": len(test),
            "params": _format_params(params), **values,
            "undefined": ";".join(sorted(undefined)), "flags": ";".join(fold_flags),
        })
        pred_rows += [_prediction_row(task, rep, fold, idx, out[i]) for i, idx in enumerate(test)]
    pooled = []
    for rep in range(n_rep):
        values, undefined = _metrics(task, task.y, oof[rep])
        pooled.append(values)
        flags.update(f"pooled {m} undefined" for m in undefined)
    row = {"k_used": k, "n_repeats": n_rep, **{m: float(np.mean([p[m] for p in pooled])) for m in names}}
    for m in names:
        mean, sd = summarise([f[m] for f in fold_rows], [m in f["undefined"].split(";") for f in fold_rows])
        row[f"{m}_fold_mean"], row[f"{m}_fold_sd"] = mean, sd
    headline = HEADLINE_METRIC[task.kind]
    row["headline_repeat_sd"] = float(np.std([p[headline] for p in pooled], ddof=1)) if n_rep > 1 else 0.0
    requested = config.nested_outer_k if protocol == "nested" else int(protocol[5:])
    if k != requested:
        flags[f"k reduced from {requested} to {k}"] += 1
    row["flags"] = "; ".join(f"{f} (x{c})" if c > 1 else f for f, c in sorted(flags.items()))
    row["params"] = _summarise_params(chosen)
    return row, fold_rows, pred_rows, chosen


def _format_params(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def _summarise_params(chosen: list[dict]) -> str:
    counts = Counter(_format_params(p) for p in chosen)
    return "; ".join(f"{p or 'none'} (x{c})" for p, c in counts.most_common())


def _prediction_row(task: Task, rep: int, fold: int, idx: int, out: np.ndarray) -> dict:
    row = {"repeat": rep, "fold": fold, "participant_id": task.participants[idx]}
    if task.kind == "classification":
        row["observed"] = task.classes[task.y[idx]]
        row["predicted"] = task.classes[int(np.argmax(out))]
        for c, s in zip(task.classes, out, strict=True):
            row[f"score_{c}"] = float(s) if np.isfinite(s) else np.nan
    else:
        row["observed"] = float(task.y[idx])
        row["predicted"] = float(out)
    return row


def permutation_null(task: Task, model: str, config: SuiteConfig) -> np.ndarray:
    """Headline metric of ``model`` under the permutation protocol, feature rows shuffled.

    Returns
    -------
    numpy.ndarray
        ``config.n_permutations`` null values.
    """
    splits, _ = make_splits(task, config.permutation_protocol, config)
    splits = [(tr, te) for _, _, tr, te in splits]
    all_perms = _permutations(task, config, "permutation", config.n_permutations)
    name, X, extra = _batched_spec(task, model)
    params = {**default_params(model, config, task.kind), **extra}
    n = len(task.y)
    null = np.empty(config.n_permutations)
    size = max(len(s[0]) for s in splits) * X.shape[1] * max(task.n_classes, 1) * len(splits)
    per_chunk = max(1, int(3e7 // size))
    for start in range(0, config.n_permutations, per_chunk):
        perms = all_perms[start:start + per_chunk]
        Xs = [X[p] for p in perms for _ in splits]
        outs = batched.predict_splits(name, Xs, task.y, splits * len(perms), [params] * len(Xs), task.n_classes)
        if task.kind == "classification":
            pred = np.empty((len(perms), n), dtype=int)
            for i, out in enumerate(outs):
                pred[i // len(splits), splits[i % len(splits)][1]] = out.argmax(1)
            null[start:start + len(perms)] = balanced_accuracy_batch(task.y, pred, task.n_classes)
        else:
            pred = np.empty((len(perms), n))
            for i, out in enumerate(outs):
                pred[i // len(splits), splits[i % len(splits)][1]] = out
            null[start:start + len(perms)] = r2_batch(task.y, pred)
    return null


def _permutations(task: Task, config: SuiteConfig, stream: str, count: int) -> list[np.ndarray]:
    """Row permutations, the same for every task of an analysis with the same participants
    (joint permutations: what the max-statistic correction over the grid needs)."""
    rng = np.random.default_rng(_seed(config, task.treatment, stream))
    return [rng.permutation(len(task.y)) for _ in range(count)]


def nested_permutation_null(task: Task, model: str, config: SuiteConfig) -> np.ndarray:
    """Headline metric of the repeated nested CV of ``model`` with feature rows shuffled.

    Every permutation redoes the whole nested CV: the inner search of the hyper-parameters
    on each outer training set, then the outer fits, so the null includes the optimism of
    the search. ``config.nested_permutations`` values.
    """
    splits, _ = make_splits(task, "nested", config)
    seed = _seed(config, task.treatment, task.target, task.network, model, "nested")
    name, X, extra = _batched_spec(task, model)
    n_rep = max(s[0] for s in splits) + 1
    perms = _permutations(task, config, "nested permutation", config.nested_permutations)
    null = np.empty(len(perms))
    problems = [(tr, te) for _, _, tr, te in splits]
    per_chunk = 8
    for start in range(0, len(perms), per_chunk):
        chunk = perms[start:start + per_chunk]
        Xs = [X[p] for p in chunk]
        chosen = _tune_many(task, model, splits, config, seed, Xs)
        outs = _predict_chunked(name, [x for x in Xs for _ in problems], task.y, problems * len(chunk),
                                [{**c, **extra} for ch in chosen for c in ch], task.n_classes)
        for j in range(len(chunk)):
            values = []
            for rep in range(n_rep):
                sel = [i for i, sp in enumerate(splits) if sp[0] == rep]
                rows = np.concatenate([problems[i][1] for i in sel])
                out = np.concatenate([outs[j * len(problems) + i] for i in sel])
                if task.kind == "classification":
                    values.append(balanced_accuracy_batch(task.y[rows], out.argmax(1)[None], task.n_classes)[0])
                else:
                    values.append(r2_batch(task.y[rows], out[None])[0])
            null[start + j] = np.mean(values)
    return null


def run_task(task: Task, config: SuiteConfig) -> TaskResult:
    """Every model x protocol of one task, and its permutation tests."""
    results, folds, predictions, nulls, params = [], [], [], {}, {}
    headline = HEADLINE_METRIC[task.kind]
    key = {"treatment": task.treatment, "network": task.network, "target": task.target}
    with threadpool_limits(1), warnings.catch_warnings(), sklearn.config_context(
        assume_finite=True, skip_parameter_validation=True
    ):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        permuted = config.permuted_models(task.kind, task.n_classes)
        log.debug("task %s/%s/%s: %d rows x %d features", task.treatment, task.network, task.target,
                  *task.X.shape)
        for model in config.models_for(task.kind, task.n_classes):
            for protocol in config.protocols:
                row, fold_rows, pred_rows, chosen = evaluate(task, model, protocol, config)
                ident = {**key, "model": model, "protocol": protocol}
                row = {
                    **key, "task": task.kind, "model": model, "protocol": protocol,
                    "n_participants": len(task.y), "n_features": _features(task, model).shape[1],
                    "classes": ";".join(f"{c}:{int((task.y == i).sum())}" for i, c in enumerate(task.classes)),
                    "headline_metric": headline, "headline": row[headline],
                    "p_value": np.nan, "n_permutations": 0, **row,
                }
                null, started = None, time.perf_counter()
                if model in permuted and protocol == config.permutation_protocol and config.n_permutations > 0:
                    null = permutation_null(task, model, config)
                elif (model in permuted and protocol == "nested" and config.nested_permutations > 0
                      and model in config.nested_permuted and task.treatment == "ketamine"
                      and task.n_classes == 2):
                    null = nested_permutation_null(task, model, config)
                if null is not None:
                    row["p_value"] = float((1 + np.sum(null >= row["headline"] - 1e-12)) / (1 + len(null)))
                    row["n_permutations"] = len(null)
                    row["permutation_seconds"] = round(time.perf_counter() - started, 3)
                    nulls[f"{task.treatment}|{task.network}|{task.target}|{model}|{protocol}"] = null
                results.append(row)
                folds += [{**ident, **f} for f in fold_rows]
                predictions += [{**ident, **p} for p in pred_rows]
                params[f"{task.treatment}|{task.network}|{task.target}|{model}|{protocol}"] = chosen
    return TaskResult(results, folds, predictions, nulls, params)


def fit_full(task: Task, model: str, params: dict, config: SuiteConfig) -> np.ndarray | None:
    """Weights of ``model`` fitted on every participant, one per feature.

    Linear models: coefficients on the standardised features (for several classes, those
    of the last, best-outcome class); random forest: impurity importances. None for
    comparators.
    """
    if model in COMPARATORS:
        return None
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = make_estimator(model, task.kind, params, task.n_classes, config, _seed(config, "full", model))
        est.fit(task.X, task.y)
    if model == "random_forest":
        return est.feature_importances_
    inner = est.steps[-1][1]
    if isinstance(inner, TransformedTargetRegressor):
        return inner.regressor_.coef_
    if isinstance(inner, OneVsRestClassifier):
        return inner.estimators_[-1].coef_[0]
    coef = np.atleast_2d(inner.coef_)
    return coef[-1]


@dataclass
class SuiteResult:
    """The suite's tables (one row per network x target x model x protocol, per fold,
    per prediction), permutation nulls and hyper-parameters, in task order."""

    results: pd.DataFrame
    folds: pd.DataFrame
    predictions: pd.DataFrame
    nulls: dict[str, np.ndarray]
    params: dict[str, list[dict]]


def _run_indexed(index: int, task: Task, config: SuiteConfig) -> tuple[int, TaskResult]:
    return index, run_task(task, config)


def _cost(task: Task) -> float:
    """Rough relative cost, to start the heaviest tasks first."""
    return (task.n_classes or 1) * (1 + task.X.shape[1] / 100)


def run_suite(tasks: list[Task], config: SuiteConfig, nprocs: int = 1, progress: bool | None = None) -> SuiteResult:
    """Run every task, in parallel over ``nprocs`` processes, with a progress bar.

    Parameters
    ----------
    tasks
        Tasks to run.
    config
        Suite settings.
    nprocs
        Worker processes (1: in this process).
    progress
        Show a progress bar on stderr (None: only when stderr is a terminal).

    Returns
    -------
    SuiteResult
        Independent of ``nprocs`` and of the order in which tasks finish.
    """
    from joblib import Parallel, delayed, parallel_config
    from tqdm import tqdm

    order = sorted(range(len(tasks)), key=lambda i: -_cost(tasks[i]))
    done: dict[int, TaskResult] = {}
    disable = None if progress is None else not progress
    with tqdm(total=len(tasks), desc="group suite", unit="task", disable=disable) as bar:
        # one thread per worker (bids_ketdcm.threads): workers x threads never exceeds nprocs
        workers, threads = ThreadPolicy(nprocs, 1).pool(len(tasks))
        with parallel_config(backend="loky", inner_max_num_threads=threads):
            if nprocs <= 1:
                stream = (_run_indexed(i, tasks[i], config) for i in order)
            else:
                stream = Parallel(n_jobs=workers, return_as="generator_unordered")(
                    delayed(_run_indexed)(i, tasks[i], config) for i in order
                )
            for i, result in stream:
                done[i] = result
                bar.update(1)
                bar.set_postfix_str(f"{tasks[i].treatment}/{tasks[i].network}/{tasks[i].target}", refresh=False)
    parts = [done[i] for i in range(len(tasks))]
    nulls: dict[str, np.ndarray] = {}
    params: dict[str, list[dict]] = {}
    for part in parts:
        nulls.update(part.nulls)
        params.update(part.params)
    return SuiteResult(
        results=_last(pd.DataFrame([r for p in parts for r in p.results]),
                      ["headline_repeat_sd", "permutation_seconds", "params", "flags"]),
        folds=_last(pd.DataFrame([r for p in parts for r in p.folds]), ["undefined", "flags"]),
        predictions=pd.DataFrame([r for p in parts for r in p.predictions]),
        nulls=nulls,
        params=params,
    )


def _last(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Move ``columns`` (those present) to the end, after every metric column."""
    tail = [c for c in columns if c in table]
    return table[[c for c in table.columns if c not in tail] + tail]
