"""The DCM's hierarchical models inside the prediction suite: the ``peb`` model and ``eb`` features.

Both start from each participant's full DCM posterior (mean, covariance, prior; see
:func:`bids_ketdcm.group.peb_analysis.subject_posteriors`) and are refitted in every training
fold of the suite's protocols, on the training participants only:

* the ``peb`` model is SPM's ``spm_dcm_loo`` with the suite's folds: a PEB of the A parameters
  of the training participants with the design ``[1, z]`` (``z`` the target standardised over
  the training participants; for label schemes the class index), then each held-out
  participant's ``z`` from its own posterior (:func:`bids_ketdcm.dcm.loo.predict_held_out`, the
  function :func:`~bids_ketdcm.dcm.loo.leave_one_out` uses). Continuous targets: the posterior
  mean, back in the target's units. Label schemes: SPM's predictive probability of each class
  (the Savage-Dickey ratio at each class's standardised index,
  :func:`~bids_ketdcm.dcm.loo.level_probabilities`) as class scores; the class predicted is the
  most probable one;
* ``eb`` features are the empirical-Bayes A matrices (Hz, as the participant level's tables):
  an intercept-only PEB of the training participants (no label enters) gives their empirical
  prior; the training rows are their empirical-Bayes posterior means (SPM's ``spm_dcm_peb``)
  and each held-out participant's row is its own posterior reduced to that prior
  (:func:`bids_ketdcm.dcm.peb.empirical_bayes`): the held-out participants never enter a fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bids_ketdcm.dcm.loo import level_probabilities, predict_held_out
from bids_ketdcm.dcm.peb import SubjectPosteriors, a_parameter_index, coupling_hz, empirical_bayes, fit_peb


@dataclass
class DcmPosteriors:
    """The DCM posteriors behind a task's features, one participant per row of its ``X``.

    Attributes
    ----------
    subjects
        First-level posteriors, in the task's participant order.
    regions
        Number of regions of the network.
    pairs
        Per column of the task's ``X``: ``(target, source)`` of its A entry, or None for a
        column that is not one (e.g. the baseline score).
    """

    subjects: SubjectPosteriors
    regions: int
    pairs: list[tuple[int, int] | None]
    #: EB feature matrices of the real (unpermuted) folds, by (train, test) rows.
    _folds: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.subjects.prepare(self.index)

    @property
    def index(self) -> np.ndarray:
        """Positions of the A parameters in the flat parameter vector."""
        return a_parameter_index(self.regions)

    def rows(self, order: np.ndarray | None) -> np.ndarray:
        """Participant of each row: ``order`` (a permutation of the rows), or the identity."""
        return np.arange(len(self.subjects.names)) if order is None else np.asarray(order)


def peb_scores(post: DcmPosteriors, y: np.ndarray, kind: str, n_classes: int, train: np.ndarray,
               test: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Out-of-sample output of the ``peb`` model in one fold.

    Parameters
    ----------
    post
        The task's DCM posteriors.
    y
        Targets of the rows (class indices or values); only ``y[train]`` is read.
    kind
        ``"classification"`` or ``"regression"``.
    n_classes
        Number of classes K (classification).
    train, test
        Row indices of the fold.
    order
        Participant of each row (a permutation test shuffles the participants against the
        labels); None: row i is participant i.

    Returns
    -------
    numpy.ndarray
        (m, K) class probabilities, or (m,) predicted values.
    """
    rows = post.rows(order)
    ytr = np.asarray(y, dtype=float)[train]
    mu, sd = float(ytr.mean()), float(ytr.std())
    if sd == 0:  # one class or one value in the training fold: predict it
        if kind == "regression":
            return np.full(len(test), mu)
        scores = np.zeros((len(test), n_classes))
        scores[:, int(ytr[0])] = 1.0
        return scores
    X_train = np.column_stack([np.ones(len(train)), (ytr - mu) / sd])
    X_test = np.column_stack([np.ones(len(test)), np.zeros(len(test))])
    held = predict_held_out(post.subjects.take(rows[train]), X_train, post.subjects.take(rows[test]), X_test,
                            post.index)
    if kind == "regression":
        return held.mean * sd + mu
    return level_probabilities((np.arange(n_classes) - mu) / sd, held).T


def peb_effects(post: DcmPosteriors, y: np.ndarray) -> np.ndarray:
    """Effect of the standardised target on each A entry of the task's columns, all participants.

    The group effects (second column of ``PEB.Ep``) of the PEB with the design ``[1, z]``
    over every participant: Hz per SD of the target between regions, log scaling of the
    self-inhibition per SD for self-connections; NaN for columns that are not A entries.
    """
    y = np.asarray(y, dtype=float)
    X = np.column_stack([np.ones(len(y)), (y - y.mean()) / y.std()])
    effect = fit_peb(post.subjects, X, post.index, subject_posteriors=False).Ep[:, 1]
    n = post.regions
    return np.array([np.nan if p is None else effect[p[1] * n + p[0]] for p in post.pairs])


def eb_features(post: DcmPosteriors, X: np.ndarray, train: np.ndarray, test: np.ndarray,
                order: np.ndarray | None = None) -> np.ndarray:
    """The feature matrix of one fold with its A entries replaced by empirical-Bayes estimates.

    Parameters
    ----------
    post
        The task's DCM posteriors.
    X
        (n, p) the task's features (raw A entries and any other columns).
    train, test
        Row indices of the fold: the PEB is fitted on the training rows' participants.
    order
        Participant of each row (see :func:`peb_scores`); None: row i is participant i.

    Returns
    -------
    numpy.ndarray
        (n, p) ``X`` of the participants in ``order`` whose A columns hold, on the training
        rows, the empirical-Bayes posterior means under the PEB of the training rows and, on
        the test rows, each participant's posterior reduced to that empirical prior (Hz,
        self-connections ``-exp(a)/2``); other rows and columns unchanged. The real folds
        (``order`` None) are computed once and shared by every model.
    """
    key = None if order is not None else (np.asarray(train).tobytes(), np.asarray(test).tobytes())
    if key is not None and key in post._folds:
        return post._folds[key]
    rows = post.rows(order)
    peb = fit_peb(post.subjects.take(rows[train]), np.ones((len(train), 1)), post.index, subject_posteriors=False)
    where = np.concatenate([train, test])
    Ep, _, _ = empirical_bayes(peb, post.subjects.take(rows[where]), np.ones((len(where), 1)))
    A = coupling_hz(Ep[:, post.index], post.regions)
    out = np.array(X, dtype=float)[rows]
    for j, pair in enumerate(post.pairs):
        if pair is not None:
            out[where, j] = A[:, pair[0], pair[1]]
    if key is not None:
        post._folds[key] = out
    return out
