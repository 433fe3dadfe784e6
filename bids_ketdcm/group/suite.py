"""Cross-validated prediction suite: models x protocols x permutation tests (DESIGN.md 5).

One :class:`~bids_ketdcm.group.models.Task` is one feature matrix (a network) and one
target (a label scheme or a continuous target) of one analysis (ketamine or placebo).
:func:`run_task` evaluates every model of :mod:`bids_ketdcm.group.models` under every
protocol of :mod:`bids_ketdcm.group.cv` and adds the permutation tests of
:mod:`bids_ketdcm.group.permutation`: the headline model is permuted under the headline
protocol (``kfold{max k}``), and so is the PEB predictor ``peb`` where it runs; the nested CV of
the models in ``nested_permuted`` on the ketamine binary and continuous targets gets its own
permutation p-value (``nested_permutations``), except on the ``eb`` feature sets (each
permutation would refit a PEB for each of the 200 inner and outer folds).
:func:`run_suite` runs every task in parallel and gathers the tables.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import sklearn
from sklearn.exceptions import ConvergenceWarning

from bids_ketdcm.group.cv import evaluate
from bids_ketdcm.group.models import HEADLINE_METRIC, ResultKey, SuiteConfig, Task, feature_matrix
from bids_ketdcm.group.permutation import nested_permutation_null, permutation_null
from bids_ketdcm.threads import ThreadPolicy, task_threads

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """Everything :func:`run_task` computed for one task."""

    results: list[dict]
    folds: list[dict]
    predictions: list[dict]
    nulls: dict[ResultKey, np.ndarray]
    params: dict[ResultKey, list[dict]]


def run_task(task: Task, config: SuiteConfig) -> TaskResult:
    """Every model x protocol of one task, and its permutation tests."""
    results, folds, predictions, nulls, params = [], [], [], {}, {}
    headline = HEADLINE_METRIC[task.kind]
    with task_threads(1), warnings.catch_warnings(), sklearn.config_context(
        assume_finite=True, skip_parameter_validation=True
    ):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        permuted = config.permuted_models(task)
        log.debug("task %s/%s/%s: %d rows x %d features", task.treatment, task.network, task.target,
                  *task.X.shape)
        for model in config.models_for(task):
            for protocol in config.protocols:
                row, fold_rows, pred_rows, chosen = evaluate(task, model, protocol, config)
                key = ResultKey.of(task, model, protocol)
                ident = asdict(key)
                row = {
                    "treatment": task.treatment, "network": task.network, "target": task.target,
                    "task": task.kind, "model": model, "protocol": protocol,
                    "n_participants": len(task.y), "n_features": feature_matrix(task, model).shape[1],
                    "classes": ";".join(f"{c}:{int((task.y == i).sum())}" for i, c in enumerate(task.classes)),
                    "headline_metric": headline, "headline": row[headline],
                    "p_value": np.nan, "n_permutations": 0, **row,
                }
                null, started = None, time.perf_counter()
                if model in permuted and protocol == config.permutation_protocol and config.n_permutations > 0:
                    null = permutation_null(task, model, config)
                elif (protocol == "nested" and config.nested_permutations > 0 and not task.empirical_bayes
                      and model in config.nested_permuted and task.treatment == "ketamine"
                      and (task.kind == "regression" or task.n_classes == 2)):
                    null = nested_permutation_null(task, model, config)
                if null is not None:
                    row["p_value"] = float((1 + np.sum(null >= row["headline"] - 1e-12)) / (1 + len(null)))
                    row["n_permutations"] = len(null)
                    row["permutation_seconds"] = round(time.perf_counter() - started, 3)
                    nulls[key] = null
                results.append(row)
                folds += [{**ident, **f} for f in fold_rows]
                predictions += [{**ident, **p} for p in pred_rows]
                params[key] = chosen
    return TaskResult(results, folds, predictions, nulls, params)


@dataclass
class SuiteResult:
    """The suite's tables (one row per network x target x model x protocol, per fold,
    per prediction), permutation nulls and hyper-parameters, in task order."""

    results: pd.DataFrame
    folds: pd.DataFrame
    predictions: pd.DataFrame
    nulls: dict[ResultKey, np.ndarray]
    params: dict[ResultKey, list[dict]]


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
    nulls: dict[ResultKey, np.ndarray] = {}
    params: dict[ResultKey, list[dict]] = {}
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
