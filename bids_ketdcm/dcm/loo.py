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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .peb import SubjectPosteriors, _inv, _project, fit_peb, principal_basis

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
) -> tuple[float, float, float, float]:
    """Posterior of one subject's covariate ``y[column]`` given its DCM and a group model.

    Parameters
    ----------
    test
        The subject's first-level posterior (one subject).
    W, Ce
        Group effects (Np, Nx) and between-subject covariance (Np, Np) of the modelled
        parameters ``index``.
    y
        (Nx,) the subject's covariates (the predicted one's value is ignored).
    column
        Which covariate is predicted.
    prior_variance
        Extra prior variance of the predicted covariate (SPM: 4 var(x) over the others).

    Returns
    -------
    tuple of float
        Posterior mean and variance of the covariate, and the prior mean and variance of
        the last pass.
    """
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=float))  # noqa: E731
    qE, pE = t(test.Ep[0, index]), t(test.pE[0, index])
    qC, pC = t(test.Cp[0][np.ix_(index, index)]), t(test.pC[0][np.ix_(index, index)])
    V, mask = principal_basis(pC)
    Vt = V.T
    qP, pP = _inv(_project(qC, V, mask)), _inv(_project(pC, V, mask))
    rP = _inv(_project(t(Ce), V, mask))
    sC = _inv(qP + rP - pP)
    G = rP - rP @ sC @ rP
    c = rP @ sC @ (qP @ (Vt @ qE) - pP @ (Vt @ pE))
    Wv = Vt @ t(W)
    precision_lik = Wv.T @ G @ Wv
    info_lik = Wv.T @ c
    Nx = W.shape[1]
    bE = t(y).clone()
    bE[column] = 0.0
    extra = torch.zeros(Nx, dtype=bE.dtype)
    extra[column] = prior_variance
    for k in range(PREDICTIVE_PASSES):
        bC = torch.diag(extra + math.exp(-k))
        bP = _inv(bC)
        post_C = _inv(bP + precision_lik)
        post_E = post_C @ (bP @ bE + info_lik)
        prior_mean, prior_var = float(bE[column]), float(bC[column, column])
        bE[column] = post_E[column]
    return float(post_E[column]), float(post_C[column, column]), prior_mean, prior_var


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
    for i in range(N):
        train = np.arange(N) != i
        peb = fit_peb(posteriors.take(train), X[train], index, precision=precision, device=device,
                      subject_posteriors=False, start=start)
        start = peb.Eh  # the next fold's optimum is close: fewer Newton steps
        mean[i], var[i], pm, pv = predict_covariate(
            posteriors.take(np.array([i])), peb.Ep, peb.Ce, index, X[i], column,
            4.0 * float(np.var(X[train, column], ddof=1)))
        logp = stats.norm.logpdf(levels, mean[i], math.sqrt(var[i])) - stats.norm.logpdf(levels, pm, math.sqrt(pv))
        w = np.exp(logp - logp.max())
        prob[:, i] = w / w.sum()
    truth = X[:, column]
    r = float(np.corrcoef(mean, truth)[0, 1]) if np.std(mean) > 0 else 0.0
    df = N - 2
    tval = r * math.sqrt(df / max(1e-300, 1.0 - r**2))
    return LeaveOneOut(mean=mean, variance=var, levels=levels, probability=prob, truth=truth,
                       r=r, p=float(stats.t.sf(tval, df)))
