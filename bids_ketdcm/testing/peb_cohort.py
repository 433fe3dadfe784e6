"""Synthetic first-level DCM posteriors for PEB experiments, drawn without inverting any DCM.

Each subject gets SPM's prior of an ``n``-region spectral DCM, built from its own time
series (above 8 regions the A prior is projected onto the series' 8 principal modes, so it
differs between subjects and couples the A parameters, as in real cohorts). Its A
parameters are drawn from a group model ``theta_i = mean + effect * x_i + deviation``; a
Gaussian likelihood with a random precision inside the prior's principal subspace then
gives the exact posterior under the prior (posterior covariances of rank 64 at 15 regions,
as the inversions' own). The other parameters keep their prior means and get a shrunken
diagonal posterior. This is the structure PEB, model reduction and leave-one-out see; it
is not a DCM fit (use :func:`bids_ketdcm.dcm.fit` for that).
"""

from __future__ import annotations

import numpy as np

from bids_ketdcm.dcm.peb import SubjectPosteriors, a_parameter_index
from bids_ketdcm.dcm.priors import prior_covariance, prior_mean


def synthetic_posteriors(
    n: int,
    subjects: int,
    seed: int = 0,
    scans: int = 192,
    information: float = 30.0,
    deviation: float = 0.05,
    effect: float = 0.1,
    covariate: np.ndarray | None = None,
) -> tuple[SubjectPosteriors, np.ndarray, np.ndarray]:
    """A cohort of first-level posteriors with a covariate effect on one connection.

    Parameters
    ----------
    n
        Regions.
    subjects
        Subjects.
    seed
        Seed of every draw.
    scans
        Length of the time series the priors are built from (Gaussian series with a random
        subject-specific covariance).
    information
        Mean likelihood precision of an A mode, in units of its prior precision.
    deviation
        Between-subject SD of the A parameters.
    effect
        Effect of the standardised covariate on the first off-diagonal connection
        (``A[1, 0]``: region 1 -> region 2).
    covariate
        (subjects,) the covariate (standardised here); None: drawn from a standard normal.

    Returns
    -------
    posteriors : SubjectPosteriors
    X : numpy.ndarray
        (subjects, 2) design: intercept and the standardised covariate.
    theta : numpy.ndarray
        (subjects, n^2) the true A parameters.
    """
    rng = np.random.default_rng(seed)
    index = a_parameter_index(n)
    pE = prior_mean(n)
    x = rng.standard_normal(subjects) if covariate is None else np.asarray(covariate, dtype=float)
    x = (x - x.mean()) / x.std()
    group = pE[index] + rng.normal(0.0, 0.1, index.size) * (rng.random(index.size) < 0.3)
    Ep, Cp, pC, theta = [], [], [], []
    for xi in x:
        mixing = rng.standard_normal((n, n)) * np.exp(-np.arange(n) / 4.0)[:, None]
        y = rng.standard_normal((scans, n)) @ mixing
        prior = prior_covariance(n, y)
        s, vec = np.linalg.eigh(prior[np.ix_(index, index)])
        support = vec[:, s > 1e-6 * s.max()]
        # a basis fixed by the seed: eigh's is arbitrary inside the repeated eigenvalue 1/64
        # (it changed with the BLAS thread count), and the draws below are made in it
        V = np.linalg.qr(support @ (support.T @ rng.standard_normal((index.size, support.shape[1]))))[0]
        truth = group + deviation * rng.standard_normal(index.size)
        truth[1] += effect * xi
        truth = pE[index] + V @ (V.T @ (truth - pE[index]))  # inside the prior's support
        W = rng.standard_normal((V.shape[1], V.shape[1])) / np.sqrt(V.shape[1])
        lik = information * 64.0 * (W @ W.T + 0.2 * np.eye(V.shape[1]))
        prior_P = np.linalg.inv(V.T @ prior[np.ix_(index, index)] @ V)
        post_C = np.linalg.inv(prior_P + lik)
        data = V.T @ (truth - pE[index]) + np.linalg.cholesky(np.linalg.inv(lik)) @ rng.standard_normal(V.shape[1])
        mean = pE.copy()
        mean[index] += V @ (post_C @ (lik @ data))
        cov = np.diag(np.diag(prior) / 4.0)
        cov[np.ix_(index, index)] = V @ post_C @ V.T
        Ep.append(mean)
        Cp.append(cov)
        pC.append(prior)
        theta.append(truth)
    posteriors = SubjectPosteriors(
        Ep=np.stack(Ep), Cp=np.stack(Cp), pE=np.tile(pE, (subjects, 1)), pC=np.stack(pC),
        F=rng.normal(-1000.0, 50.0, subjects), names=[f"sub-{i:02d}" for i in range(subjects)])
    return posteriors, np.column_stack([np.ones(subjects), x]), np.stack(theta)
