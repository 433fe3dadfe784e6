"""Cross-validation protocols of the suite: one model under one protocol.

* ``kfold3``, ``kfold4``, ``kfold5``: stratified k-fold CV (plain k-fold for regression)
  with fixed default hyper-parameters, as the DCM study; per-fold tables and pooled
  out-of-fold predictions;
* ``nested``: repeated nested CV (outer ``nested_outer_k``-fold x ``nested_repeats``);
  an inner ``inner_k``-fold CV on each outer training set picks C (logistic,
  multinomial, SVM) or alpha and l1_ratio (elastic net); the random forest picks its
  depth by out-of-bag balanced accuracy on the outer training set.

With ``engine="sklearn"`` each fold is fitted by the model's scikit-learn pipeline
(:func:`bids_ketdcm.group.models.make_estimator`). The default ``"batched"`` engine fits
the linear models (and runs every inner search) with :mod:`bids_ketdcm.group.batched`,
which reproduces those pipelines to solver tolerance for thousands of small problems at
once (tests compare the two engines); the random forest and the majority / mean
comparators always use scikit-learn.

Every fold's features are :func:`~bids_ketdcm.group.models.fold_features`: for the ``eb``
feature sets the empirical-Bayes estimates are refitted on the training rows of each outer
and inner fold. The ``peb`` model (a PEB refitted per fold) has no hyper-parameters: its
nested CV is repeated 5-fold CV.

Headline metric: balanced accuracy of the pooled out-of-fold predictions for label
schemes, out-of-fold R^2 (``1 - SS_res / SS_tot`` over all participants) for
continuous targets. For nested CV, "pooled" is the mean over repeats of each repeat's
pooled value.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import KFold, RepeatedKFold, RepeatedStratifiedKFold, StratifiedKFold

from bids_ketdcm.group import batched
from bids_ketdcm.group.metrics import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    balanced_accuracy_batch,
    classification_metrics,
    regression_metrics,
    summarise,
)
from bids_ketdcm.group.models import (
    BATCHED,
    HEADLINE_METRIC,
    TUNED_BATCHED,
    SuiteConfig,
    Task,
    batched_spec,
    default_params,
    fit_predict,
    fold_features,
    fold_matrices,
    make_estimator,
    param_grid,
)


def effective_k(task: Task, k: int) -> int:
    """Largest usable number of folds <= k: at most the participants, and for labels the
    size of the largest class (scikit-learn's limit for stratification)."""
    n = len(task.y)
    if task.kind == "classification":
        return int(min(k, n, np.bincount(task.y).max()))
    return int(min(k, n))


def make_splits(task: Task, protocol: str, config: SuiteConfig) -> tuple[list[tuple], int]:
    """Outer splits of a protocol: list of (repeat, fold, train, test), and the k used."""
    seed = config.stream_seed(task.treatment, task.target, protocol)
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


def _tune_batched(task: Task, model: str, outer: list[tuple], config: SuiteConfig, seed: int) -> list[dict]:
    """Inner-CV choice of hyper-parameters for each outer split (batched fits)."""
    return tune_many(task, model, outer, config, seed, [None])[0]


def tune_many(task: Task, model: str, outer: list[tuple], config: SuiteConfig, seed: int,
              orders: Sequence[np.ndarray | None]) -> list[list[dict]]:
    """Inner-CV choice of hyper-parameters for each outer split, for several row orders of the
    features at once (the real one, or permutations for a nested permutation test).

    Parameters
    ----------
    task
        The task (labels, kind, classes).
    model
        A model of :data:`~bids_ketdcm.group.models.TUNED_BATCHED`.
    outer
        Outer splits ``(repeat, fold, train, test)`` of :func:`make_splits`.
    config
        The suite's grids and ``inner_k``.
    seed
        Seed of the inner splits (outer split ``o`` uses ``seed + o``).
    orders
        Participant of each row of ``task.y`` (None: the task's order), see
        :func:`~bids_ketdcm.group.models.fold_features`: the features of each inner fold
        (the ``eb`` estimates refitted on its training rows).

    Returns
    -------
    list of list of dict
        For each order of ``orders``, the chosen hyper-parameters of each outer split (best
        inner-CV balanced accuracy or mean squared error; ties: the first candidate of
        :func:`~bids_ketdcm.group.models.param_grid`).
    """
    grid = param_grid(model, config)
    name = batched_spec(task, model)[0]
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
        return [[default] * len(outer) for _ in orders]
    preds = predict_chunked(name, fold_matrices(task, model, problems, orders), task.y, problems * len(orders),
                            params * len(orders), task.n_classes)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(index):
        groups.setdefault(key, []).append(i)
    chosen = []
    for x in range(len(orders)):
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


def predict_chunked(model: str, Xs: list[np.ndarray], y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                    params: list[dict], n_classes: int, budget: float = 3e7) -> list[np.ndarray]:
    """:func:`bids_ketdcm.group.batched.predict_splits` in chunks that bound the memory used.

    Parameters
    ----------
    model, Xs, y, splits, params, n_classes
        As :func:`~bids_ketdcm.group.batched.predict_splits` (one matrix, split and
        parameter set per problem).
    budget
        Largest rows x features x classes of the problems of one chunk.

    Returns
    -------
    list of numpy.ndarray
        Test-row outputs of every problem, in order.
    """
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
    X = fold_features(task, "random_forest", train, test)
    forest = make_estimator("random_forest", task.kind, {"max_depth": None}, task.n_classes, config, seed)
    forest.fit(X[train], task.y[train])
    depths = [c["max_depth"] for c in param_grid("random_forest", config)]
    inbag = np.zeros((len(forest.estimators_), len(train)), dtype=bool)
    for i, rows in enumerate(forest.estimators_samples_):
        inbag[i, rows] = True
    oob = ~inbag
    seen = oob.any(axis=0)
    on_train, on_test = _tree_probas(forest, [X[train], X[test]], depths)
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
        name, extra = batched_spec(task, model)
        params = [{**p, **extra} for p in chosen]
        problems = [(tr, te) for _, _, tr, te in splits]
        return predict_chunked(name, fold_matrices(task, model, problems, [None]), task.y, problems, params,
                               task.n_classes), chosen
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
    seed = config.stream_seed(task.treatment, task.target, task.network, model, protocol)
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
