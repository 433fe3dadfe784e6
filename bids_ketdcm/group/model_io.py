"""Training the saved prediction models (``group --save-model``).

The file format (manifest, checksums, loading) is :mod:`bids_ketdcm.model_store`; this
module fits the final headline classifier of every ketamine label scheme and its
bootstrap refits, and writes them in that format.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import resample
from threadpoolctl import threadpool_limits

from bids_ketdcm.bids.naming import normalise_session
from bids_ketdcm.config import split_key
from bids_ketdcm.group.metrics import CLASSIFICATION_METRICS, classification_metrics
from bids_ketdcm.group.models import MODEL_DESCRIPTIONS, ResultKey, SuiteConfig, make_estimator
from bids_ketdcm.model_store import feature_fingerprint, prior_corrected, save_model, write_index
from bids_ketdcm.seeds import derive_seed

log = logging.getLogger(__name__)

#: Bootstrap resamples saved with each model (per-patient uncertainty).
DEFAULT_BOOTSTRAP = 200


def fit_final(X: np.ndarray, y: np.ndarray, n_classes: int, params: dict, n_bootstrap: int = DEFAULT_BOOTSTRAP,
              seed: int = 0, model: str = "logistic") -> tuple[Any, list]:
    """Fit the final model on every training participant, and its bootstrap refits.

    Parameters
    ----------
    X, y
        Training features and class indices (0..K-1).
    n_classes
        K.
    params
        Hyper-parameters (``C``).
    n_bootstrap
        Stratified bootstrap resamples (class sizes kept).
    seed
        Seed of the resampling.
    model
        Model name of :func:`bids_ketdcm.group.models.make_estimator` (a linear classifier
        with ``predict_proba``).

    Returns
    -------
    estimator
        The pipeline fitted on all rows.
    bootstrap : list
        The pipelines fitted on the resamples.
    """
    config = SuiteConfig()
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator = make_estimator(model, "classification", params, n_classes, config, seed).fit(X, y)
        boots = []
        rows = np.arange(len(y))
        for _ in range(n_bootstrap):
            take = resample(rows, stratify=y, random_state=int(rng.integers(2**31)))
            boots.append(make_estimator(model, "classification", params, n_classes, config, seed).fit(X[take], y[take]))
    return estimator, boots


def save_group_models(directory: str | os.PathLike, tasks: list, suite, labels, options,
                      n_bootstrap: int = DEFAULT_BOOTSTRAP) -> list[Path]:
    """``group --save-model``: save the final headline classifier of every ketamine label scheme.

    For each ketamine classification task (feature set x network x scheme; not ``eb``,
    whose empirical-Bayes features need a PEB of the training cohort at prediction) the logistic
    pipeline of the suite is refitted on every participant, with the C chosen most often
    by the nested CV (the default C without nested CV), plus ``n_bootstrap`` stratified
    bootstrap refits; the manifest records the suite's cross-validated metrics.

    Parameters
    ----------
    directory
        The ``--save-model`` folder.
    tasks
        The suite's tasks (:class:`bids_ketdcm.group.models.Task`).
    suite
        The suite's :class:`~bids_ketdcm.group.suite.SuiteResult`.
    labels
        The :class:`~bids_ketdcm.group.labels.LabelSet`.
    options
        The :class:`~bids_ketdcm.group.run.GroupOptions`.
    n_bootstrap
        Bootstrap refits per model.

    Returns
    -------
    list of Path
        The model folders written.
    """
    config = options.suite_config()
    res = suite.results
    written = []
    for task in tasks:
        feature_set, network = split_key(task.network)
        if task.treatment != "ketamine" or task.kind != "classification" or feature_set == "eb":
            continue
        key = ResultKey.of(task, "logistic", "nested")
        chosen = [p for p in suite.params.get(key, []) if "C" in p]
        C = Counter(float(p["C"]) for p in chosen).most_common(1)[0][0] if chosen else config.C
        seed = derive_seed(options.seed, "|".join(("saved-model", task.network, task.target)))
        estimator, boots = fit_final(task.X, task.y, task.n_classes, {"C": C}, n_bootstrap, seed)
        rows = res[(res.treatment == "ketamine") & (res.network == task.network) & (res.target == task.target)
                   & (res.model == "logistic")] if len(res) else res
        counts = np.bincount(task.y, minlength=task.n_classes)
        apparent, _ = classification_metrics(task.y, estimator.predict(task.X),
                                             prior_corrected(estimator.predict_proba(task.X), counts), task.n_classes)
        cv = {r["protocol"]: {**{m: float(r[m]) for m in CLASSIFICATION_METRICS},
                              "p_value": None if pd.isna(r["p_value"]) else float(r["p_value"])}
              for r in rows.to_dict("records")}
        scheme = labels.schemes[task.target]
        baseline = f"baseline_{labels.score_column}" if options.add_baseline_madrs else None
        written.append(save_model(
            directory, estimator=estimator, bootstrap=boots, feature_names=list(task.feature_names),
            feature_set=feature_set, network=network,
            label={"scheme": scheme.name, "variable": scheme.variable, "edges": list(scheme.edges),
                   "classes": list(scheme.classes), "positive_class": scheme.classes[-1],
                   "score_column": labels.score_column,
                   "baseline_session": normalise_session(options.baseline_session),
                   "post_session": normalise_session(options.post_session),
                   "definition": (f"r = (score_{normalise_session(options.baseline_session)} - score_post) / "
                                  f"score_{normalise_session(options.baseline_session)}; classes "
                                  f"{list(scheme.classes)} split at {scheme.variable} edges {list(scheme.edges)}")},
            model={"name": "logistic", "description": MODEL_DESCRIPTIONS["logistic"], "params": {"C": C},
                   "selection": "C chosen most often by the nested CV's inner search" if chosen
                   else "default C (no nested CV)"},
            training={"n_participants": len(task.participants), "participants": list(task.participants),
                      "feature_fingerprints": {p: feature_fingerprint(x)
                                               for p, x in zip(task.participants, task.X, strict=True)},
                      "class_counts": {c: int((task.y == i).sum()) for i, c in enumerate(task.classes)},
                      "cv_metrics": cv,
                      "apparent_metrics": {k: float(v) for k, v in apparent.items()},
                      "apparent_metrics_note": "the final model on its own training participants "
                                               "(resubstitution: optimistic; cv_metrics are the honest estimate)"},
            feature_spec={"session": normalise_session(options.feature_session or options.baseline_session),
                          "space": options.space, "task": options.task, "run": options.run,
                          "drop_diagonal": options.drop_diagonal, "require_converged": options.require_converged,
                          "baseline_feature": baseline},
            bootstrap_seed=seed,
        ))
        log.info("saved model %s (C=%g, %d bootstrap refits)", written[-1], C, len(boots))
    if written:
        write_index(directory)
    return written
