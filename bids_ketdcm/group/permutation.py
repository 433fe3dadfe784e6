"""Permutation nulls of the suite.

The feature rows are shuffled relative to the labels (the folds, stratified on the real
labels, stay fixed), the model is refitted under the permutation protocol
(``kfold{max k}``) and ``p = (1 + #{null >= observed}) / (1 + n_permutations)``. Every
task of an analysis draws the same permutations (joint nulls, for the max-statistic
correction of :mod:`bids_ketdcm.group.inference`). Whatever is fitted per fold is refitted in
every permutation: the PEB of the ``peb`` model and of the ``eb`` features on the shuffled
participants of each training fold. :func:`nested_permutation_null` redoes the whole nested
CV, inner search included, in every permutation.
"""

from __future__ import annotations

import numpy as np

from bids_ketdcm.group import batched
from bids_ketdcm.group.cv import make_splits, predict_chunked, tune_many
from bids_ketdcm.group.metrics import balanced_accuracy_batch, r2_batch
from bids_ketdcm.group.models import (
    BATCHED,
    SuiteConfig,
    Task,
    batched_spec,
    default_params,
    feature_matrix,
    fit_predict,
    fold_matrices,
)


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
    params = default_params(model, config, task.kind)
    n = len(task.y)
    null = np.empty(config.n_permutations)
    size = max(len(s[0]) for s in splits) * feature_matrix(task, model).shape[1] * max(task.n_classes, 1) * len(splits)
    per_chunk = max(1, int(3e7 // size))
    for start in range(0, config.n_permutations, per_chunk):
        perms = all_perms[start:start + per_chunk]
        if model in BATCHED:
            name, extra = batched_spec(task, model)
            Xs = fold_matrices(task, model, splits, list(perms))
            outs = batched.predict_splits(name, Xs, task.y, splits * len(perms), [{**params, **extra}] * len(Xs),
                                          task.n_classes)
        else:  # refitted fold by fold (the peb model)
            outs = [fit_predict(task, model, params, tr, te, config, 0, order=p) for p in perms for tr, te in splits]
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
    rng = np.random.default_rng(config.stream_seed(task.treatment, stream))
    return [rng.permutation(len(task.y)) for _ in range(count)]


def nested_permutation_null(task: Task, model: str, config: SuiteConfig) -> np.ndarray:
    """Headline metric of the repeated nested CV of ``model`` with feature rows shuffled.

    Every permutation redoes the whole nested CV: the inner search of the hyper-parameters
    on each outer training set, then the outer fits, so the null includes the optimism of
    the search. ``config.nested_permutations`` values.
    """
    splits, _ = make_splits(task, "nested", config)
    seed = config.stream_seed(task.treatment, task.target, task.network, model, "nested")
    name, extra = batched_spec(task, model)
    n_rep = max(s[0] for s in splits) + 1
    perms = _permutations(task, config, "nested permutation", config.nested_permutations)
    null = np.empty(len(perms))
    problems = [(tr, te) for _, _, tr, te in splits]
    per_chunk = 8
    for start in range(0, len(perms), per_chunk):
        chunk = list(perms[start:start + per_chunk])
        chosen = tune_many(task, model, splits, config, seed, chunk)
        outs = predict_chunked(name, fold_matrices(task, model, problems, chunk), task.y, problems * len(chunk),
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

