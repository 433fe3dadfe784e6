"""Leave-one-out prediction of a between-subject variable from DCMs, as SPM12's ``spm_dcm_loo``.

For each left-out subject a PEB model is fitted to the others (:func:`fit_peb`, same design);
the left-out subject's covariates ``x`` then become the unknowns of a one-subject model:
its parameters are ``N(W x, Ce)`` with ``W`` the group effects and ``Ce`` the between-subject
covariance, its own posterior and prior enter by Bayesian model reduction, and ``x`` has a
Gaussian prior. This posterior is exact (the model is linear-Gaussian in ``x``). As SPM's
``spm_dcm_ppd``: the known covariates get prior mean their value and the predicted one 0;
prior variances are ``1`` plus, for the predicted covariate, ``4 var(x)``; four passes move
the predicted covariate's prior mean to its posterior mean and the extra variance to
``exp(-k)`` (k = 1, 2, 3). The predictive probability of each observed level of the
covariate is the Savage-Dickey ratio of its posterior and prior densities, normalised.

One fold, a PEB of training subjects predicting held-out ones, is :func:`predict_held_out`:
:func:`leave_one_out` calls it once per subject, the group suite's ``peb`` model once per
fold of its own protocols.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .peb import PEBResult, SubjectPosteriors, _inv, _project, fit_peb, principal_basis

#: Passes of SPM's ``spm_dcm_ppd`` (prior of the predicted covariate refined each time).
PREDICTIVE_PASSES = 4


@dataclass
class LeaveOneOut:
    """Out-of-sample predictions of one covariate.

    Attributes
    ----------
    mean, variance
        (N,) posterior mean and variance of each left-out subject's covariate.
    levels
        (L,) the distinct observed values of the covariate.
    probability
        (L, N) predictive probability of each level for each subject.
    truth
        (N,) the observed covariate.
    r, p
        Pearson correlation of ``mean`` with ``truth`` and its one-sided p-value
        (t-test of the regression slope, df N - 2, as SPM).
    """

    mean: np.ndarray
    variance: np.ndarray
    levels: np.ndarray
    probability: np.ndarray
    truth: np.ndarray
    r: float
    p: float


def predict_covariate(
    test: SubjectPosteriors,
    W: np.ndarray,
    Ce: np.ndarray,
    index: np.ndarray,
    y: np.ndarray,
    column: int,
    prior_variance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Posterior of subjects' covariate ``y[:, column]`` given their DCMs and a group model.

    Parameters
    ----------
    test
        The subjects' first-level posteriors (m subjects, each predicted on its own).
    W, Ce
        Group effects (Np, Nx) and between-subject covariance (Np, Np) of the modelled
        parameters ``index``.
    y
        (m, Nx) the subjects' covariates (the predicted one's values are ignored).
    column
        Which covariate is predicted.
    prior_variance
        Extra prior variance of the predicted covariate (SPM: 4 var(x) over the others).

    Returns
    -------
    tuple of numpy.ndarray
        (m,) posterior means and variances of the covariate, and the prior means and
        variances of the last pass.
    """
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=float))  # noqa: E731
    m = len(test.names)
    qE, pE = t(test.Ep[:, index]), t(test.pE[:, index])
    qC, pC = t(test.Cp[:, index][:, :, index]), t(test.pC[:, index][:, :, index])
    V, mask = principal_basis(pC)
    Vt = V.transpose(-1, -2)
    qP, pP = _inv(_project(qC, V, mask)), _inv(_project(pC, V, mask))
    rP = _inv(_project(t(Ce).expand(m, -1, -1), V, mask))
    sC = _inv(qP + rP - pP)
    G = rP - rP @ sC @ rP
    c = rP @ sC @ (qP @ (Vt @ qE[..., None]) - pP @ (Vt @ pE[..., None]))
    Wv = Vt @ t(W)
    precision_lik = Wv.transpose(-1, -2) @ G @ Wv
    info_lik = Wv.transpose(-1, -2) @ c
    Nx = W.shape[1]
    bE = t(y).reshape(m, Nx).clone()
    bE[:, column] = 0.0
    extra = torch.zeros(Nx, dtype=bE.dtype)
    extra[column] = prior_variance
    for k in range(PREDICTIVE_PASSES):
        bC = torch.diag(extra + math.exp(-k))
        bP = _inv(bC)
        post_C = _inv(bP + precision_lik)
        post_E = (post_C @ (bP @ bE[..., None] + info_lik))[..., 0]
        prior_mean, prior_var = bE[:, column].clone(), float(bC[column, column])
        bE[:, column] = post_E[:, column]
    return (post_E[:, column].numpy(), post_C[:, column, column].numpy(), prior_mean.numpy(),
            np.full(m, prior_var))


@dataclass
class HeldOut:
    """Out-of-sample posteriors of held-out subjects' covariate (:func:`predict_held_out`).

    Attributes
    ----------
    mean, variance
        (m,) posterior mean and variance of each held-out subject's covariate.
    prior_mean, prior_variance
        (m,) its prior of the last of SPM's passes (for :func:`level_probabilities`).
    peb
        The PEB of the training subjects.
    """

    mean: np.ndarray
    variance: np.ndarray
    prior_mean: np.ndarray
    prior_variance: np.ndarray
    peb: PEBResult


def predict_held_out(
    train: SubjectPosteriors,
    X_train: np.ndarray,
    test: SubjectPosteriors,
    X_test: np.ndarray,
    index: np.ndarray,
    column: int = 1,
    *,
    precision: str = "single",
    device: str | torch.device = "cpu",
    start: np.ndarray | None = None,
) -> HeldOut:
    """Predict held-out subjects' covariate from their DCMs and a PEB of the training subjects.

    One step of SPM's ``spm_dcm_loo``: a PEB (:func:`fit_peb`, design ``X_train``) of the
    training subjects only, then each held-out subject's covariate ``column`` from its own
    posterior (:func:`predict_covariate`, prior variance ``4 var(x)`` over the training
    subjects). The held-out subjects' value of that covariate is never read.

    Parameters
    ----------
    train, X_train
        Training subjects' first-level posteriors and design (intercept first).
    test, X_test
        Held-out subjects' posteriors and design rows (the predicted column is ignored).
    index
        Positions of the modelled parameters.
    column
        The covariate predicted.
    precision, device, start
        As :func:`fit_peb`.

    Returns
    -------
    HeldOut
    """
    peb = fit_peb(train, X_train, index, precision=precision, device=device, subject_posteriors=False,
                  start=start)
    mean, var, pm, pv = predict_covariate(test, peb.Ep, peb.Ce, index, X_test, column,
                                          4.0 * float(np.var(np.asarray(X_train)[:, column], ddof=1)))
    return HeldOut(mean=mean, variance=var, prior_mean=pm, prior_variance=pv, peb=peb)


def level_probabilities(levels: np.ndarray, held: HeldOut) -> np.ndarray:
    """Predictive probability of each level of the covariate (SPM's ``spm_dcm_loo``).

    The Savage-Dickey ratio of the posterior and prior densities of the covariate at each
    level, normalised over the levels.

    Parameters
    ----------
    levels
        (L,) values the covariate can take.
    held
        Held-out predictions of m subjects.

    Returns
    -------
    numpy.ndarray
        (L, m) probabilities, each column summing to 1.
    """
    levels = np.asarray(levels, dtype=float)[:, None]
    logp = (stats.norm.logpdf(levels, held.mean, np.sqrt(held.variance))
            - stats.norm.logpdf(levels, held.prior_mean, np.sqrt(held.prior_variance)))
    w = np.exp(logp - logp.max(axis=0))
    return w / w.sum(axis=0)


def leave_one_out(
    posteriors: SubjectPosteriors,
    X: np.ndarray,
    index: np.ndarray,
    column: int = 1,
    *,
    precision: str = "single",
    device: str | torch.device = "cpu",
) -> LeaveOneOut:
    """Leave-one-out posterior predictive of a covariate (SPM's ``spm_dcm_loo``).

    Each subject in turn is predicted by :func:`predict_held_out` from the PEB of the others.

    Parameters
    ----------
    posteriors
        The subjects' first-level posteriors.
    X
        (N, Nx) design, intercept first.
    index
        Positions of the modelled parameters.
    column
        The covariate predicted (SPM: the second column).
    precision
        Precision components of the PEB models (see :func:`fit_peb`).
    device
        Torch device of the PEB fits.

    Returns
    -------
    LeaveOneOut
    """
    X = np.asarray(X, dtype=float)
    N = X.shape[0]
    if N < 4:
        raise ValueError("leave-one-out needs at least 4 subjects")
    levels = np.unique(X[:, column])
    mean, var = np.empty(N), np.empty(N)
    prob = np.empty((levels.size, N))
    start = None
    posteriors.prepare(index)
    for i in range(N):
        train = np.arange(N) != i
        held = predict_held_out(posteriors.take(train), X[train], posteriors.take(np.array([i])), X[i:i + 1],
                                index, column, precision=precision, device=device, start=start)
        start = held.peb.Eh  # the next fold's optimum is close: fewer Newton steps
        mean[i], var[i] = held.mean[0], held.variance[0]
        prob[:, i] = level_probabilities(levels, held)[:, 0]
    truth = X[:, column]
    r = float(np.corrcoef(mean, truth)[0, 1]) if np.std(mean) > 0 else 0.0
    df = N - 2
    tval = r * math.sqrt(df / max(1e-300, 1.0 - r**2))
    return LeaveOneOut(mean=mean, variance=var, levels=levels, probability=prob, truth=truth,
                       r=r, p=float(stats.t.sf(tval, df)))
