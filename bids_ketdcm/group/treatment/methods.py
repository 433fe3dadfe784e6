"""Treatment-selection methods: each learns the response probability given (features,
treatment) from the observed assignment only and recommends the treatment of highest
predicted probability.

* ``dpnn``: the prototype network of :mod:`.dpnn` (Kleinerman et al., PLoS ONE 2021);
* ``tlearner``: one logistic regression per treatment;
* ``cbr``: case-based reasoning, the mean outcome of the k most cosine-similar training
  patients who received that treatment (k = round(sqrt(patients with that treatment)) by
  default);
* ``kmnn``: k-means on the training features (as many clusters as DPNN prototypes), then a
  one-hidden-layer network on the squared distances to the centres and the one-hot treatment;
* ``random``: uniform random probabilities, hence a uniformly random recommendation;
* ``oracle``: the true probabilities (only where they exist, e.g. synthetic data; handled by
  :func:`.cv.cross_validate_selection`);
* ``always_<treatment>`` (:data:`FIXED`): the fixed policy giving everyone that treatment,
  the bar a learner must clear (on a cohort where nobody responds to placebo only,
  always-ketamine is already as good as an oracle).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from bids_ketdcm.group.treatment.dpnn import DPNNClassifier, DPNNSettings

log = logging.getLogger(__name__)

METHODS = ("dpnn", "tlearner", "cbr", "kmnn", "random", "oracle")
#: Fixed policies of the crossover: every participant gets the same arm.
FIXED = ("always_ketamine", "always_placebo")


class Model(Protocol):
    """What every method provides."""

    def fit(self, X: np.ndarray, treatment: np.ndarray, outcome: np.ndarray) -> Model: ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...




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
