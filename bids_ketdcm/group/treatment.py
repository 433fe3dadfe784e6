"""Treatment selection (ketamine vs placebo): DPNN, baselines, cross-validation, cohort run.

Every method learns the response probability given (features, treatment) from the observed
assignment only and recommends the treatment with the highest predicted probability:

* ``dpnn``: the prototype network of :mod:`.dpnn` (Kleinerman et al., PLoS ONE 2021);
* ``tlearner``: one logistic regression per treatment;
* ``cbr``: case-based reasoning, the mean outcome of the k most cosine-similar training
  patients who received that treatment (k = round(sqrt(patients with that treatment)) by
  default);
* ``kmnn``: k-means on the training features (as many clusters as DPNN prototypes), then a
  one-hidden-layer network on the squared distances to the centres and the one-hot treatment;
* ``random``: uniform random probabilities, hence a uniformly random recommendation;
* ``oracle``: the true probabilities (only where they exist, e.g. synthetic data);
* ``always_<treatment>`` (:data:`FIXED`): the fixed policy giving everyone that treatment,
  the bar a learner must clear (on a cohort where nobody responds to placebo only,
  always-ketamine is already as good as an oracle).

Ties between predicted probabilities are broken at random (seeded), and a fixed policy's
AUC is undefined (NaN): it predicts no outcome.

Cross-validation (:func:`cross_validate_selection`) is repeated stratified k-fold with fresh
splits per repeat; features are standardised with statistics of the training fold only; every
model gets its own seed derived from (seed, repeat, fold, method).

On ds005917 (:func:`run_treatment_selection`) the randomised crossover gives each
participant an outcome under both infusions: the first infusion (``participants.tsv:
infusion_1``) is the observed assignment used for training, and the second period supplies
the counterfactual, so RPL and MRR can be scored against realised outcomes. Caveat: the
second-period outcome follows the first infusion (carry-over and period effects are
ignored).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold
from sklearn.neighbors import NearestNeighbors
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ..errors import InputError
from ..io import atomic_path, write_json, write_tsv
from .dpnn import DPNNClassifier, DPNNSettings
from .treatment_metrics import compare_methods, recommend, selection_metrics, wilcoxon_p

log = logging.getLogger(__name__)

METHODS = ("dpnn", "tlearner", "cbr", "kmnn", "random", "oracle")
#: Fixed policies of the crossover: every participant gets the same arm.
FIXED = ("always_ketamine", "always_placebo")


class Model(Protocol):
    """What every method provides."""

    def fit(self, X: np.ndarray, treatment: np.ndarray, outcome: np.ndarray) -> Model: ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------- baselines


def _constant(outcome: np.ndarray, fallback: float) -> float:
    return float(np.mean(outcome)) if len(outcome) else fallback


class TLearner:
    """One logistic regression per treatment (a constant where an arm has one class)."""

    def __init__(self, n_treatments: int, seed: int = 0) -> None:
        self.n_treatments = n_treatments
        self.seed = seed
        self.models: list[LogisticRegression | float] = []

    def fit(self, X: np.ndarray, treatment: np.ndarray, outcome: np.ndarray) -> TLearner:
        """Fit one model per treatment on the patients who received it."""
        base = float(np.mean(outcome))
        self.models = []
        for k in range(self.n_treatments):
            mask = treatment == k
            if np.unique(outcome[mask]).size < 2:
                self.models.append(_constant(outcome[mask], base))
            else:
                self.models.append(
                    LogisticRegression(max_iter=1000, random_state=self.seed).fit(X[mask], outcome[mask])
                )
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, T) response probabilities."""
        cols = [
            np.full(len(X), m) if isinstance(m, float) else m.predict_proba(X)[:, 1] for m in self.models
        ]
        return np.column_stack(cols)


class CaseBasedKNN:
    """k-NN case-based reasoning per treatment with cosine similarity.

    Parameters
    ----------
    k
        Neighbours per treatment; None: ``round(sqrt(n_k))`` for an arm of ``n_k`` patients.
    """

    def __init__(self, n_treatments: int, k: int | None = None) -> None:
        self.n_treatments = n_treatments
        self.k = k
        self.arms: list[tuple[NearestNeighbors, np.ndarray] | float] = []

    def fit(self, X: np.ndarray, treatment: np.ndarray, outcome: np.ndarray) -> CaseBasedKNN:
        """Index the training patients of each treatment."""
        base = float(np.mean(outcome))
        self.arms = []
        for k in range(self.n_treatments):
            mask = treatment == k
            n_k = int(mask.sum())
            if n_k == 0:
                self.arms.append(base)
                continue
            k_nn = self.k if self.k is not None else max(1, round(math.sqrt(n_k)))
            nn_index = NearestNeighbors(n_neighbors=min(k_nn, n_k), metric="cosine", algorithm="brute")
            self.arms.append((nn_index.fit(X[mask]), outcome[mask].astype(float)))
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, T): mean outcome of the nearest patients given each treatment."""
        cols = []
        for arm in self.arms:
            if isinstance(arm, float):
                cols.append(np.full(len(X), arm))
            else:
                index, y = arm
                cols.append(y[index.kneighbors(X, return_distance=False)].mean(axis=1))
        return np.column_stack(cols)


class KMeansNN:
    """k-means clusters (training features only) + a one-hidden-layer classifier (KMNN).

    The classifier's inputs are the standardised squared distances to the cluster centres
    and the one-hot treatment, mirroring the DPNN's classifier in the input space.
    """

    def __init__(self, n_treatments: int, n_clusters: int = 5, hidden: int = 16, seed: int = 0) -> None:
        self.n_treatments = n_treatments
        self.n_clusters = n_clusters
        self.hidden = hidden
        self.seed = seed

    def _inputs(self, X: np.ndarray, treatment: np.ndarray) -> np.ndarray:
        dist = self.scaler.transform(self.kmeans.transform(X) ** 2)
        return np.hstack([dist, np.eye(self.n_treatments)[treatment]])

    def fit(self, X: np.ndarray, treatment: np.ndarray, outcome: np.ndarray) -> KMeansNN:
        """Cluster the training features, then fit the classifier."""
        n_clusters = min(self.n_clusters, len(X))
        self.kmeans = KMeans(n_clusters=n_clusters, n_init=10, random_state=self.seed).fit(X)
        self.scaler = StandardScaler().fit(self.kmeans.transform(X) ** 2)
        self.constant: float | None = None
        if np.unique(outcome).size < 2:
            self.constant = float(outcome[0])
            return self
        # scikit-learn's advice: L-BFGS for small data sets, Adam (early stopping on the
        # training loss) for large ones, where L-BFGS is many times slower.
        solver = "lbfgs" if len(X) < 1000 else "adam"
        self.mlp = MLPClassifier(
            hidden_layer_sizes=(self.hidden,), solver=solver, max_iter=200, random_state=self.seed
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.mlp.fit(self._inputs(X, treatment), outcome)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, T) response probabilities."""
        if self.constant is not None:
            return np.full((len(X), self.n_treatments), self.constant)
        cols = [
            self.mlp.predict_proba(self._inputs(X, np.full(len(X), k)))[:, 1] for k in range(self.n_treatments)
        ]
        return np.column_stack(cols)


class RandomRecommender:
    """Uniform random probabilities: a uniformly random recommendation, chance AUC."""

    def __init__(self, n_treatments: int, seed: int = 0) -> None:
        self.n_treatments = n_treatments
        self.rng = np.random.default_rng(seed)

    def fit(self, X: np.ndarray, treatment: np.ndarray, outcome: np.ndarray) -> RandomRecommender:
        """Nothing to learn."""
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, T) uniform random numbers."""
        return self.rng.random((len(X), self.n_treatments))


# --------------------------------------------------------------------------- cross-validation


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


def make_model(
    method: str, n_treatments: int, seed: int, dpnn: DPNNSettings, knn_k: int | None = None
) -> Model:
    """Instantiate one method (``oracle`` is handled by :func:`cross_validate_selection`)."""
    if method == "dpnn":
        return DPNNClassifier(n_treatments, dpnn, seed)
    if method == "tlearner":
        return TLearner(n_treatments, seed)
    if method == "cbr":
        return CaseBasedKNN(n_treatments, knn_k)
    if method == "kmnn":
        return KMeansNN(n_treatments, dpnn.n_prototypes, dpnn.classifier_width, seed)
    if method == "random":
        return RandomRecommender(n_treatments, seed)
    raise ValueError(f"unknown treatment-selection method {method!r}; known: {', '.join(METHODS)}")


def _strata(problem: SelectionProblem, n_splits: int) -> np.ndarray:
    """Stratify on (treatment, outcome) when every cell can fill each fold, else on treatment."""
    joint = problem.treatment * 2 + problem.outcome.astype(int)
    if np.bincount(joint)[np.unique(joint)].min() >= n_splits:
        return joint
    return problem.treatment


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run BLAS, OpenMP and torch on one thread, restoring the settings afterwards.

    Every model here is small: parallel BLAS/torch only adds synchronisation overhead
    (measured on a loaded 2-core machine: a 150-patient MLP fit 35 times slower, a DPNN
    step 5 times slower with 2 threads than with 1).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


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
            pred = problem.truth[test]
        elif method in FIXED:
            pred = np.zeros((len(test), t))
            pred[:, problem.treatment_names.index(method[len("always_"):])] = 1.0
        else:
            model = make_model(method, t, _seed(seed, repeat, fold, j), dpnn, knn_k)
            model.fit(x_train, problem.treatment[train], problem.outcome[train])
            pred = model.predict_proba(x_test)
        seconds = time.perf_counter() - start
        oof[method][repeat, test] = pred
        truth = None if problem.truth is None else problem.truth[test]
        metrics = _named(selection_metrics(pred, problem.treatment[test], problem.outcome[test], truth,
                                           seed=_seed(seed, repeat, fold, j, 1) if random_ties else None),
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
                                        seed=_seed(repeat, j, 2) if result.random_ties else None)
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


# --------------------------------------------------------------------------- cohort


TREATMENT_CODES = {"d": "ketamine", "p": "placebo"}
TREATMENTS = ("ketamine", "placebo")


@dataclass(frozen=True)
class TreatmentOptions:
    """Options of the cohort's treatment selection.

    Attributes
    ----------
    methods
        Methods to compare (no ``oracle``: realised outcomes are not probabilities).
    n_splits, n_repeats, seed
        Repeated stratified k-fold settings. ``n_splits`` is lowered (with a warning) when a
        first-period arm has fewer participants.
    response_threshold
        Response = percentage MADRS improvement ``(b0 - post) / b0`` at least this.
    score_column, baseline_session, ketamine_session, placebo_session
        Phenotype column and sessions (with or without the ``ses-`` prefix).
    groups
        Values of ``participants.tsv: group`` to include (None: everyone).
    dpnn
        DPNN settings. The defaults differ from the paper's (lr 1e-4, 100 epochs, for
        thousands of patients): with about 20 training participants and batch 10 that would
        be 200 tiny updates, so lr 1e-3, 300 epochs and 3 prototypes are used.
    knn_k
        Neighbours of the case-based reasoning baseline (None: square-root rule).
    target
        ``"response"`` (per-arm response, the methods above) or also ``"difference"``: a
        ridge regression of the within-subject difference (ketamine minus placebo
        improvement), recommending ketamine where the predicted difference is positive.
    """

    methods: tuple[str, ...] = ("dpnn", "tlearner", "cbr", "kmnn", "random", *FIXED)
    n_splits: int = 5
    n_repeats: int = 10
    seed: int = 0
    response_threshold: float = 0.5
    score_column: str = "MADRS_Total"
    baseline_session: str = "b0"
    ketamine_session: str = "d2"
    placebo_session: str = "p2"
    groups: tuple[str, ...] | None = ("MDD",)
    dpnn: DPNNSettings = DPNNSettings(n_prototypes=3, lr=1e-3, epochs=300)
    knn_k: int | None = None
    target: str = "response"

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid option."""
        unknown = [m for m in self.methods if m not in (*METHODS, *FIXED) or m == "oracle"]
        if unknown or not self.methods:
            raise InputError(
                f"treatment-selection option 'methods': {unknown or 'none given'} not among "
                f"{', '.join(m for m in (*METHODS, *FIXED) if m != 'oracle')}"
            )
        if self.target not in ("response", "difference"):
            raise InputError(f"--treatment-target: 'response' or 'difference' (got {self.target!r})")
        if self.n_splits < 2:
            raise InputError(f"treatment-selection option 'n_splits' must be at least 2, got {self.n_splits}")
        if self.n_repeats < 1:
            raise InputError(f"treatment-selection option 'n_repeats' must be at least 1, got {self.n_repeats}")
        if not 0 < self.response_threshold <= 1:
            raise InputError(
                "treatment-selection option 'response_threshold' must be in (0, 1], "
                f"got {self.response_threshold}"
            )
        if self.knn_k is not None and self.knn_k < 1:
            raise InputError(f"treatment-selection option 'knn_k' must be at least 1, got {self.knn_k}")


class CohortSkip(Exception):
    """The cohort cannot support treatment selection; the message says why."""


def _subject(label: object) -> str:
    text = str(label)
    return text if text.startswith("sub-") else f"sub-{text}"


def _session(label: object) -> str:
    text = str(label)
    return text[4:] if text.startswith("ses-") else text


def build_crossover_cohort(
    participants: pd.DataFrame, phenotype: pd.DataFrame, options: TreatmentOptions
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Participants with a first-period infusion and outcomes under both infusions.

    Parameters
    ----------
    participants
        ``participants.tsv`` (``participant_id``, ``infusion_1`` with ``d``/``p``, optional
        ``group``).
    phenotype
        Long phenotype table (``participant_id``, ``session_id``, the score column).
    options
        Sessions, score column, groups and response threshold.

    Returns
    -------
    tuple
        (cohort indexed by ``participant_id`` with columns ``first_treatment``,
        ``score_baseline``, ``score_ketamine``, ``score_placebo``, ``improvement_ketamine``,
        ``improvement_placebo``, ``response_ketamine``, ``response_placebo``;
        excluded participant -> reason).

    Raises
    ------
    CohortSkip
        When a needed column is missing.
    """
    for table, name, cols in (
        (participants, "participants.tsv", ("participant_id", "infusion_1")),
        (phenotype, "phenotype", ("participant_id", "session_id", options.score_column)),
    ):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise CohortSkip(f"{name} lacks column(s) {', '.join(missing)}")
    excluded: dict[str, str] = {}
    part = participants.assign(participant_id=participants["participant_id"].map(_subject))
    part = part.drop_duplicates("participant_id").set_index("participant_id")
    if options.groups is not None and "group" in part.columns:
        for pid in part.index[~part["group"].isin(options.groups)]:
            excluded[pid] = f"group {part.at[pid, 'group']!r} not in {list(options.groups)}"
        part = part[part["group"].isin(options.groups)]
    code = part["infusion_1"].astype("string").str.strip().str.lower()
    for pid in part.index[~code.isin(list(TREATMENT_CODES))]:
        excluded[pid] = f"infusion_1 is {part.at[pid, 'infusion_1']!r}, not d (ketamine) or p (placebo)"
    part = part[code.isin(list(TREATMENT_CODES))]

    pheno = phenotype.assign(
        participant_id=phenotype["participant_id"].map(_subject),
        session=phenotype["session_id"].map(_session),
    )
    duplicated = pheno.duplicated(["participant_id", "session"])
    if duplicated.any():
        log.warning("phenotype: %d duplicated participant/session rows; the first is used", duplicated.sum())
    scores = pheno[~duplicated].pivot(index="participant_id", columns="session", values=options.score_column)
    sessions = {
        "score_baseline": options.baseline_session,
        "score_ketamine": options.ketamine_session,
        "score_placebo": options.placebo_session,
    }
    cohort = pd.DataFrame(index=part.index)
    cohort["first_treatment"] = code[part.index].map(TREATMENT_CODES).astype(str)
    for col, ses in sessions.items():
        values = scores[_session(ses)] if _session(ses) in scores.columns else pd.Series(dtype=float)
        cohort[col] = pd.to_numeric(values.reindex(cohort.index), errors="coerce")
    for pid, row in cohort.iterrows():
        lacking = [sessions[c] for c in sessions if pd.isna(row[c])]
        if lacking:
            excluded[pid] = f"no {options.score_column} at session(s) {', '.join(lacking)}"
        elif row["score_baseline"] <= 0:
            excluded[pid] = f"baseline {options.score_column} is {row['score_baseline']}, not positive"
    cohort = cohort.drop(index=[p for p in cohort.index if p in excluded])
    for arm in TREATMENTS:
        improvement = (cohort["score_baseline"] - cohort[f"score_{arm}"]) / cohort["score_baseline"]
        cohort[f"improvement_{arm}"] = improvement
        cohort[f"response_{arm}"] = (improvement >= options.response_threshold).astype(int)
    return cohort, excluded


def _feature_matrix(features: pd.DataFrame, cohort: pd.DataFrame, excluded: dict[str, str]) -> pd.DataFrame:
    table = features.set_index("participant_id") if "participant_id" in features.columns else features
    table = table.rename(index=_subject).select_dtypes("number")
    if table.shape[1] == 0:
        raise CohortSkip("the feature table has no numeric feature columns")
    for pid in cohort.index.difference(table.index):
        excluded[pid] = "no features"
    table = table.reindex(cohort.index.intersection(table.index))
    for pid in table.index[table.isna().any(axis=1)]:
        excluded[pid] = "missing feature values"
    return table.dropna()


def run_treatment_selection(
    features: pd.DataFrame,
    participants: pd.DataFrame,
    phenotype: pd.DataFrame,
    output_dir: str | Path,
    options: TreatmentOptions | None = None,
) -> dict:
    """Ketamine-vs-placebo treatment selection on a crossover cohort.

    Parameters
    ----------
    features
        One row per participant (index or ``participant_id`` column, labels with or without
        ``sub-``); every numeric column is a feature.
    participants, phenotype
        ``participants.tsv`` and the long phenotype table of the raw dataset.
    output_dir
        Derivatives root; results go to ``output_dir/group/``:
        ``treatment_selection.tsv`` (one row per method), ``treatment_selection_participants.tsv``
        (out-of-fold predictions and recommendations), ``treatment_selection.json`` (tests,
        exclusions, options) and ``treatment_selection.png``.
    options
        See :class:`TreatmentOptions`; invalid options raise :class:`InputError`.

    Returns
    -------
    dict
        ``skipped`` (None, or the reason when the cohort cannot support the analysis; then
        nothing is written and the rest of the group level can go on), ``n_participants``,
        ``excluded``, ``summary`` (list of per-method rows: mean and sd over repeats of the
        pooled out-of-fold metrics), ``tests``, ``files``, ``notes``.
    """
    options = options or TreatmentOptions()
    options.validate()
    try:
        cohort, excluded = build_crossover_cohort(participants, phenotype, options)
        X = _feature_matrix(features, cohort, excluded)
        cohort = cohort.loc[X.index]
        if cohort.empty:
            common = Counter(excluded.values()).most_common(3)
            raise CohortSkip(
                "no participant has a first-period infusion, features and "
                f"{options.score_column} at sessions {options.baseline_session}, "
                f"{options.ketamine_session} and {options.placebo_session} (most common reasons: "
                + "; ".join(f"{reason} ({n})" for reason, n in common)
                + ")"
            )
        counts = cohort["first_treatment"].value_counts()
        if len(counts) < 2:
            raise CohortSkip(
                f"fewer than two first-period treatments among {len(cohort)} usable participants "
                f"({', '.join(f'{k}: {v}' for k, v in counts.items()) or 'none'})"
            )
        if counts.min() < 2:
            raise CohortSkip(f"a first-period arm has fewer than 2 usable participants ({counts.to_dict()})")
    except CohortSkip as skip:
        log.warning("treatment selection skipped: %s", skip)
        return {"skipped": str(skip)}
    for pid, reason in excluded.items():
        log.info("treatment selection: %s excluded: %s", pid, reason)
    n_splits = min(options.n_splits, int(counts.min()))
    notes = [
        "Trained on first-period outcomes; the second period gives the counterfactual "
        "(carry-over and period effects ignored).",
        "Fold-repeats share participants: the p-values are descriptive.",
    ]
    if n_splits < options.n_splits:
        notes.append(f"n_splits lowered from {options.n_splits} to {n_splits} (smallest first-period arm)")
        log.warning(notes[-1])

    t_index = {name: i for i, name in enumerate(TREATMENTS)}
    observed = cohort["first_treatment"].map(t_index).to_numpy()
    truth = cohort[[f"response_{a}" for a in TREATMENTS]].to_numpy(dtype=float)
    problem = SelectionProblem(
        X=X.to_numpy(dtype=float),
        treatment=observed,
        outcome=truth[np.arange(len(observed)), observed].astype(int),
        truth=truth,
        treatment_names=list(TREATMENTS),
    )
    result = cross_validate_selection(
        problem, options.methods, n_splits, options.n_repeats, options.seed, options.dpnn, options.knn_k,
        random_ties=True,
    )
    pooled = pooled_metrics(problem, result)
    summary = _summary_table(pooled, len(cohort), options.methods)
    informative = informative_counts(cohort)
    fixed = [m for m in options.methods if m in FIXED]
    reference = min(fixed, key=lambda m: pooled.loc[pooled.method == m, "rpl"].mean()) if fixed else "random"
    tests: dict | None = None
    if informative["informative"] == 0:
        notes.append("No informative participant (response under one arm only): every policy has the same "
                     "RPL, so no p-values are computed.")
    else:
        tests = {m: method_tests(result.folds, m, reference=reference) for m in ("rpl", "mrr")}
    if informative["placebo_only"] == 0:
        notes.append("No participant responds to placebo but not to ketamine: always-ketamine scores RPL 0 like "
                     "an oracle, so no method can beat it on these data.")
    difference = _difference_policy(X.to_numpy(dtype=float), cohort, n_splits, options) \
        if options.target == "difference" else None
    per_participant = _participant_table(cohort, result)

    group_dir = Path(output_dir) / "group"
    files = {
        "summary": group_dir / "treatment_selection.tsv",
        "participants": group_dir / "treatment_selection_participants.tsv",
        "json": group_dir / "treatment_selection.json",
        "figure": group_dir / "treatment_selection.png",
    }
    out = {
        "skipped": None,
        "n_participants": int(len(cohort)),
        "first_treatment_counts": {k: int(v) for k, v in counts.items()},
        "response_rates": {a: float(cohort[f"response_{a}"].mean()) for a in TREATMENTS},
        "excluded": excluded,
        "n_splits": n_splits,
        "n_repeats": options.n_repeats,
        "informative": informative,
        "reference_policy": reference,
        "summary": summary.to_dict(orient="records"),
        "tests": tests,
        "difference": difference,
        "notes": notes,
        "options": asdict(options),
        "files": {k: str(v) for k, v in files.items()},
    }
    write_tsv(files["summary"], summary)
    write_tsv(files["participants"], per_participant.reset_index())
    write_json(files["json"], out)
    _figure(files["figure"], summary, per_participant, options)
    return out


def informative_counts(cohort: pd.DataFrame) -> dict[str, int]:
    """Participants whose two outcomes differ: the only ones a policy can get right or wrong.

    Returns
    -------
    dict
        ``informative`` (response under one arm only), ``ketamine_only``, ``placebo_only``,
        ``both`` and ``neither``.
    """
    k, p = cohort["response_ketamine"] == 1, cohort["response_placebo"] == 1
    return {"informative": int((k != p).sum()), "ketamine_only": int((k & ~p).sum()),
            "placebo_only": int((p & ~k).sum()), "both": int((k & p).sum()), "neither": int((~k & ~p).sum())}


def _difference_policy(X: np.ndarray, cohort: pd.DataFrame, n_splits: int, options: TreatmentOptions) -> dict:
    """Ridge regression of the within-subject difference (ketamine minus placebo improvement).

    Out-of-fold predictions (repeated k-fold, scaler and model fitted on the training rows)
    recommend ketamine where the predicted difference is positive. The policy is scored by
    the improvement it loses against the better arm of each participant, beside the fixed
    policies; a paired sign-flip test compares it with the better fixed policy.
    """
    diff = (cohort["improvement_ketamine"] - cohort["improvement_placebo"]).to_numpy(float)
    improvement = cohort[["improvement_ketamine", "improvement_placebo"]].to_numpy(float)
    cv = RepeatedKFold(n_splits=n_splits, n_repeats=options.n_repeats, random_state=options.seed)
    pred = np.zeros((options.n_repeats, len(diff)))
    with single_threaded():
        for i, (train, test) in enumerate(cv.split(X)):
            model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(X[train], diff[train])
            pred[i // n_splits, test] = model.predict(X[test])
    mean = pred.mean(axis=0)
    best = improvement.max(axis=1)
    losses = {
        "model": best - np.where(mean > 0, improvement[:, 0], improvement[:, 1]),
        "always_ketamine": best - improvement[:, 0],
        "always_placebo": best - improvement[:, 1],
    }
    reference = min(("always_ketamine", "always_placebo"), key=lambda m: losses[m].mean())
    d = losses["model"] - losses[reference]
    flips = np.random.default_rng(options.seed).choice([-1.0, 1.0], size=(2000, len(d)))
    null = (flips * d).mean(axis=1)
    total = np.sum((diff - diff.mean()) ** 2)
    r2 = float(np.mean([1 - np.sum((diff - p) ** 2) / total for p in pred])) if total > 0 else float("nan")
    return {
        "target": "improvement_ketamine - improvement_placebo", "model": "ridge (alpha 1, standardised features)",
        "r2": r2, "mean_difference": float(diff.mean()),
        "recommended_ketamine": int((mean > 0).sum()),
        "improvement_loss": {m: float(v.mean()) for m, v in losses.items()},
        "reference_policy": reference,
        "p_versus_reference": float((1 + np.sum(null <= d.mean() + 1e-12)) / (1 + len(null))),
        "note": "one-sided paired sign-flip test that the model loses less improvement than the better fixed policy",
    }


def _summary_table(pooled: pd.DataFrame, n: int, methods: tuple[str, ...]) -> pd.DataFrame:
    metrics = [c for c in pooled.columns if c not in ("method", "repeat")]
    stats = pooled.groupby("method")[metrics].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat.replace('std', 'sd')}" for metric, stat in stats.columns]
    stats = stats.reindex(list(methods))
    stats.insert(0, "n_participants", n)
    return stats.drop(columns=["base_rate_sd"]).rename(columns={"base_rate_mean": "base_rate"}).reset_index()


def _participant_table(cohort: pd.DataFrame, result: CVResult) -> pd.DataFrame:
    table = cohort[
        ["first_treatment"]
        + [f"{k}_{a}" for k in ("improvement", "response") for a in TREATMENTS]
    ].copy()
    for method, preds in result.oof.items():
        mean = preds.mean(axis=0)  # average over repeats
        for i, arm in enumerate(TREATMENTS):
            table[f"{method}_p_{arm}"] = mean[:, i]
        table[f"{method}_recommended"] = [TREATMENTS[i] for i in recommend(mean, seed=0)]
    return table


def _figure(path: Path, summary: pd.DataFrame, per_participant: pd.DataFrame, options: TreatmentOptions) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    x = np.arange(len(summary))
    panels = (
        ("rpl", "RPL (lower is better)"),
        ("mrr", "MRR, tie-aware"),
        ("rr", "response rate if recommended = received"),
    )
    for ax, (metric, title) in zip(axes[:3], panels):
        ax.errorbar(x, summary[f"{metric}_mean"], yerr=summary[f"{metric}_sd"], fmt="o", capsize=3)
        ax.set_xticks(x, summary["method"], rotation=30)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[2].axhline(summary["base_rate"].iloc[0], ls="--", color="grey", label="base rate")
    axes[2].legend(fontsize=8)
    ax = axes[3]
    method = "dpnn" if "dpnn_recommended" in per_participant else options.methods[0]
    for arm, colour in zip(TREATMENTS, ("tab:red", "tab:blue")):
        for first, marker in zip(TREATMENTS, ("o", "s")):
            rows = per_participant[
                (per_participant[f"{method}_recommended"] == arm) & (per_participant["first_treatment"] == first)
            ]
            if rows.empty:
                continue
            ax.scatter(
                rows["improvement_placebo"], rows["improvement_ketamine"], c=colour, marker=marker,
                label=f"rec. {arm}, first {first}", s=25,
            )
    thr = options.response_threshold
    ax.axhline(thr, ls=":", color="grey")
    ax.axvline(thr, ls=":", color="grey")
    lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lims, lims, color="grey", lw=0.8)
    ax.set_xlabel("improvement under placebo")
    ax.set_ylabel("improvement under ketamine")
    ax.set_title(f"{method} recommendation per participant", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
