"""The suite's model registry: which models, their hyper-parameters, one task and its key.

* the model names (classifiers, regressors, comparators, the headline model and metric of
  each task kind, the models the batched engine fits);
* :class:`SuiteConfig`: models, protocols, hyper-parameter grids, permutation settings and
  the seed of the suite;
* :class:`Task`: one feature matrix and one target of one analysis, and :class:`ResultKey`,
  the identity of one of its results (treatment, network, target, model, protocol);
* :func:`make_estimator`: every model is a scikit-learn estimator fitted on the training
  rows only (``StandardScaler`` inside a ``Pipeline``), except ``peb``, the PEB predictor
  refitted in each training fold (:mod:`bids_ketdcm.group.hierarchical`); :func:`batched_spec`
  names the :mod:`bids_ketdcm.group.batched` problem that reproduces a linear model to solver
  tolerance; :func:`fold_features` gives the features of one fold (the ``eb`` feature sets'
  empirical-Bayes estimates are refitted on each training fold); :func:`fit_full` fits a
  model on every participant for its weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import ElasticNet, LinearRegression, LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from bids_ketdcm.group.hierarchical import DcmPosteriors, eb_features, peb_effects, peb_scores
from bids_ketdcm.seeds import derive_seed

CLASSIFIERS = ("logistic", "multinomial", "random_forest", "svm", "majority", "baseline_score", "peb")
REGRESSORS = ("elasticnet", "mean", "baseline_score", "peb")
ALL_MODELS = ("logistic", "multinomial", "random_forest", "svm", "elasticnet", "majority", "mean", "baseline_score",
              "peb")
#: Models run unless asked otherwise: ``peb`` needs the DCM posteriors (``--peb-suite``).
DEFAULT_MODELS = tuple(m for m in ALL_MODELS if m != "peb")
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
#: Models that can get a permutation p-value: the batched ones and the PEB predictor.
PERMUTABLE = (*BATCHED, "peb")
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
    "peb": "PEB of the training participants' DCM posteriors (A), design [1, standardised target], each "
           "held-out participant's target predicted from its own DCM (SPM's spm_dcm_loo); label schemes: the "
           "class index as the covariate, class scores its predictive probabilities",
}


@dataclass(frozen=True)
class SuiteConfig:
    """Models, protocols, hyper-parameters and permutation settings of the suite."""

    models: tuple[str, ...] = DEFAULT_MODELS
    k_values: tuple[int, ...] = (3, 4, 5)
    nested_outer_k: int = 5
    nested_repeats: int = 10
    inner_k: int = 3
    n_permutations: int = 1000
    #: Models given permutation p-values; None = the headline model of each task.
    permutation_models: tuple[str, ...] | None = None
    rf_trees: int = 25
    #: Permutations of the nested CV (inner search redone in each) of the models below, on the
    #: ketamine binary and continuous targets (the multi-class and placebo nested rows cost several
    #: times more and are not permuted).
    nested_permutations: int = 0
    #: Models whose nested CV is permuted (:data:`bids_ketdcm.config.NESTED_PERMUTABLE`; the elastic net's inner search
    #: costs ~10 x the logistic's).
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

    def models_for(self, task: Task) -> list[str]:
        """Models run on a task (multinomial only for >2 classes; peb only where the task
        carries its DCM posteriors and its features are not themselves from a PEB)."""
        allowed = CLASSIFIERS if task.kind == "classification" else REGRESSORS
        out = [m for m in self.models if m in allowed]
        out = [m for m in out if not (m == "multinomial" and task.n_classes <= 2)]
        return [m for m in out if m != "peb" or (task.dcm is not None and not task.empirical_bayes)]

    def permuted_models(self, task: Task) -> list[str]:
        """Models given a permutation p-value on a task: ``permutation_models``, by default the
        headline model and the PEB predictor."""
        wanted = self.permutation_models or (HEADLINE_MODEL[task.kind], "peb")
        return [m for m in self.models_for(task) if m in wanted and m in PERMUTABLE]

    def stream_seed(self, *names: str) -> int:
        """A stable seed from the configured seed and names (same names -> same seed).

        Parameters
        ----------
        *names
            Names of the random stream (task fields, model, protocol).

        Returns
        -------
        int
            :func:`bids_ketdcm.seeds.derive_seed` of ``seed`` and ``names``.
        """
        return derive_seed(self.seed, *names)


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
    #: The DCM posteriors behind ``X`` (the ``peb`` model and ``eb`` features need them).
    dcm: DcmPosteriors | None = None
    #: The A columns of ``X`` are replaced, in each fold, by empirical-Bayes estimates
    #: refitted on its training rows (:func:`fold_features`); ``X`` holds the raw entries.
    empirical_bayes: bool = False

    @property
    def n_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return len(self.classes)


@dataclass(frozen=True)
class ResultKey:
    """Identity of one suite result: a task's model under one protocol.

    The key of the suite's permutation nulls and chosen hyper-parameters; its string form
    ``treatment|network|target|model|protocol`` is the key written to ``results.json``.
    """

    treatment: str
    network: str
    target: str
    model: str
    protocol: str

    @classmethod
    def of(cls, task: Task, model: str, protocol: str) -> ResultKey:
        """The key of ``model`` under ``protocol`` on ``task``.

        Parameters
        ----------
        task
            The task (its treatment, network and target).
        model
            Model name.
        protocol
            Protocol name.

        Returns
        -------
        ResultKey
        """
        return cls(task.treatment, task.network, task.target, model, protocol)

    def __str__(self) -> str:
        return "|".join((self.treatment, self.network, self.target, self.model, self.protocol))


def default_params(model: str, config: SuiteConfig, kind: str = "classification") -> dict:
    """Hyper-parameters of the k-fold protocols (the baseline-score logistic uses C too)."""
    if model in ("logistic", "multinomial", "svm") or (model == "baseline_score" and kind == "classification"):
        return {"C": config.C}
    if model == "elasticnet":
        return {"alpha": config.alpha, "l1_ratio": config.l1_ratio}
    if model == "random_forest":
        return {"max_depth": None}
    return {}


def param_grid(model: str, config: SuiteConfig) -> list[dict]:
    """Candidates of the inner search, strongest regularisation first (wins ties).

    Parameters
    ----------
    model
        Model name.
    config
        The suite's grids (``C_grid``, ``alpha_grid``, ``l1_grid``, ``depth_grid``).

    Returns
    -------
    list of dict
        Hyper-parameter sets; ``[{}]`` for a model without hyper-parameters.
    """
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


def feature_matrix(task: Task, model: str) -> np.ndarray:
    """The features ``model`` is fitted on.

    Parameters
    ----------
    task
        The task.
    model
        Model name.

    Returns
    -------
    numpy.ndarray
        (n, 1) baseline score for ``baseline_score``, else the task's (n, p) ``X``.
    """
    return task.baseline[:, None] if model == "baseline_score" else task.X


def fold_features(task: Task, model: str, train: np.ndarray, test: np.ndarray,
                  order: np.ndarray | None = None) -> np.ndarray:
    """The features ``model`` is fitted on in one fold.

    Parameters
    ----------
    task
        The task.
    model
        Model name.
    train, test
        Row indices of the fold.
    order
        Participant of each row: a permutation of the rows (permutation tests shuffle the
        participants' features against the labels); None: the task's order.

    Returns
    -------
    numpy.ndarray
        :func:`feature_matrix` with its rows in ``order``; for an ``eb`` task its A columns
        hold the empirical-Bayes estimates of :func:`~bids_ketdcm.group.hierarchical.eb_features`
        (PEB of the training rows' participants only).
    """
    X = feature_matrix(task, model)
    if task.empirical_bayes and model != "baseline_score" and task.dcm is not None:
        return eb_features(task.dcm, X, train, test, order)
    return X if order is None else X[order]


def fold_matrices(task: Task, model: str, problems: list[tuple[np.ndarray, np.ndarray]],
                  orders: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    """:func:`fold_features` of every (order, problem) pair, ``orders`` outermost.

    Without a per-fold transform each order's matrix is made once and shared by its problems.
    """
    if task.empirical_bayes:
        return [fold_features(task, model, tr, te, order) for order in orders for tr, te in problems]
    shared = [fold_features(task, model, problems[0][0], problems[0][1], order) for order in orders]
    return [X for X in shared for _ in problems]


def fit_predict(task: Task, model: str, params: dict, train: np.ndarray, test: np.ndarray,
                config: SuiteConfig, seed: int, order: np.ndarray | None = None) -> np.ndarray:
    """Fit ``model`` on ``train`` rows, score ``test`` rows.

    Returns (m, K) class scores, or (m,) predictions for regression. A training set
    holding a single class predicts that class. ``order``: as :func:`fold_features`.
    """
    ytr = task.y[train]
    if task.kind == "classification" and len(np.unique(ytr)) == 1:
        scores = np.zeros((len(test), task.n_classes))
        scores[:, ytr[0]] = 1.0
        return scores
    if model == "peb":
        if task.dcm is None:
            raise ValueError(f"the peb model needs the DCM posteriors of {task.network}")
        return peb_scores(task.dcm, task.y, task.kind, task.n_classes, train, test, order)
    X = fold_features(task, model, train, test, order)
    est = make_estimator(model, task.kind, params, task.n_classes, config, seed)
    est.fit(X[train], ytr)
    if task.kind == "regression":
        return est.predict(X[test])
    return _class_scores(est, X[test], task.n_classes)


def batched_spec(task: Task, model: str) -> tuple[str, dict]:
    """The batched model and fixed parameters that reproduce ``model`` on :func:`feature_matrix`.

    Parameters
    ----------
    task
        The task.
    model
        Model name (one of :data:`BATCHED`).

    Returns
    -------
    name : str
        Model of :func:`bids_ketdcm.group.batched.predict_splits`.
    params : dict
        Parameters fixed for this model (to merge over the chosen ones).
    """
    if model == "baseline_score":
        if task.kind == "regression":  # least squares on one feature
            return "elasticnet", {"alpha": 0.0, "l1_ratio": 0.0}
        return "logistic", {}
    return model, {}


def fit_full(task: Task, model: str, params: dict, config: SuiteConfig) -> np.ndarray | None:
    """Weights of ``model`` fitted on every participant, one per feature.

    Linear models: coefficients on the standardised features (for several classes, those
    of the last, best-outcome class); random forest: impurity importances; ``peb``: the
    group effect of the standardised target on each A entry
    (:func:`~bids_ketdcm.group.hierarchical.peb_effects`). None for comparators. ``eb``
    tasks: fitted on the empirical-Bayes estimates of the PEB of every participant.
    """
    if model in COMPARATORS:
        return None
    if model == "peb":
        if task.dcm is None:
            raise ValueError(f"the peb model needs the DCM posteriors of {task.network}")
        return peb_effects(task.dcm, task.y)
    everyone = np.arange(len(task.y))
    X = fold_features(task, model, everyone, everyone[:0])
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = make_estimator(model, task.kind, params, task.n_classes, config, config.stream_seed("full", model))
        est.fit(X, task.y)
    if model == "random_forest":
        return est.feature_importances_
    inner = est.steps[-1][1]
    if isinstance(inner, TransformedTargetRegressor):
        return inner.regressor_.coef_
    if isinstance(inner, OneVsRestClassifier):
        return inner.estimators_[-1].coef_[0]
    coef = np.atleast_2d(inner.coef_)
    return coef[-1]
