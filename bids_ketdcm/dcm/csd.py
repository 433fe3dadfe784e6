"""Data features of spectral DCM: SPM's scaling, VB multivariate AR model, cross-spectra.

Reproduces ``spm_dcm_fmri_csd_data``: the cross-spectral density of the ROI time series
estimated through an order-8 multivariate autoregressive model fitted by SPM's
variational Bayes (``spm_mar``), on 32 frequencies from 1/min(128, T TR) to
1/max(8, 2 TR) Hz.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .model import mar_to_csd

DATA_AR_ORDER = 8
N_FREQS = 32
_GAMMA_SCALE = 1000.0  # Gamma hyperprior of the weight precision: scale 1000, shape 0.001
_GAMMA_SHAPE = 0.001
_MAX_VB_ITERATIONS = 32
_VB_TOLERANCE = 1e-4


log = logging.getLogger(__name__)


def frequency_grid(tr: float, n_scans: int, n_freqs: int = N_FREQS) -> np.ndarray:
    """SPM's frequency grid: ``n_freqs`` points from 1/min(128, T TR) to 1/max(8, 2 TR) Hz."""
    return np.linspace(1.0 / min(128.0, n_scans * tr), 1.0 / max(8.0, 2.0 * tr), n_freqs)


def scale_timeseries(y: np.ndarray) -> tuple[np.ndarray, float]:
    """Remove each region's mean and scale all data by ``1 / (4 std(all values))``.

    Returns
    -------
    scaled : numpy.ndarray
        Same shape as ``y``.
    scale : float
        The factor applied (SPM's ``DCM.Y.scale``).
    """
    y = np.asarray(y, dtype=float)
    centred = y - y.mean(axis=0)
    scale = 1.0 / (4.0 * centred.std(ddof=1))
    return centred * scale, float(scale)


def validate_timeseries(y: np.ndarray, order: int = DATA_AR_ORDER) -> np.ndarray:
    """Check a (T, n) time series can be modelled; raise ``ValueError`` naming the problem."""
    y = np.asarray(y, dtype=float)
    if y.ndim != 2:
        raise ValueError(f"time series must be 2-D (scans x regions), got shape {y.shape}")
    T, n = y.shape
    if n < 2:
        raise ValueError(f"spectral DCM needs at least 2 regions, got {n}")
    if not np.all(np.isfinite(y)):
        bad = sorted({int(j) for j in np.nonzero(~np.isfinite(y))[1]})
        raise ValueError(f"time series contain NaN or infinite values (region columns {bad})")
    flat = np.nonzero(np.ptp(y, axis=0) == 0)[0]
    if flat.size:
        raise ValueError(f"time series have zero variance in region columns {flat.tolist()}")
    if n > T:
        raise ValueError(f"more regions ({n}) than scans ({T}): transpose the input?")
    # the MAR design has T - order rows and order * n columns
    if T - order < order * n + 1:
        raise ValueError(
            f"too few scans for an order-{order} MAR model of {n} regions: "
            f"{T} scans, need at least {order * n + order + 1}"
        )
    if T - order < order * n + n:
        log.warning("%d scans for %d regions: the order-%d MAR residuals have rank below %d (full rank needs "
                    "%d scans); the data's cross-spectra are partly determined by the MAR prior",
                    T, n, order, n, order * (n + 1) + n)
    return y


def vb_mar(y: np.ndarray, order: int = DATA_AR_ORDER) -> tuple[np.ndarray, np.ndarray]:
    """Fit a multivariate AR model by SPM's variational Bayes (``spm_mar``).

    One global shrinkage precision on all ``k = order n^2`` weights (Gamma hyperprior)
    and a full residual precision; the noise covariance used for spectra is the ML one,
    ``e_ml^T e_ml / T``. The posterior weight covariance ``inv(kron(Lambda, X^T X) +
    alpha I)`` is handled through the eigenvectors of ``Lambda`` and ``X^T X``, so no
    (k x k) matrix is ever formed.

    Parameters
    ----------
    y
        (T, n) time series (scaled).
    order
        Model order p.

    Returns
    -------
    lags : numpy.ndarray
        (p, n, n): ``y_t + sum_k lags[k-1] y_{t-k} = e_t``.
    noise_cov : numpy.ndarray
        (n, n) ML innovation covariance.
    """
    T, n = y.shape
    p = order
    X = np.hstack([y[p - k : T - k] for k in range(1, p + 1)])  # (T - p, p n), lag-major
    Y = y[p:]
    k = p * n * n
    xtx = X.T @ X
    w_ml = np.linalg.pinv(X) @ Y  # (p n, n)
    e_ml = Y - X @ w_ml
    sigma = e_ml.T @ e_ml / T
    d_x, u_x = np.linalg.eigh(xtx)
    # current posterior covariance: (U_L kron U_X) diag(cov_eig) (U_L kron U_X)^T
    d_s, u_l = np.linalg.eigh(sigma)
    cov_eig = d_s[None, :] / d_x[:, None]  # (p n, n): eigenvalues of kron(Sigma, inv(X^T X))
    w = w_ml.copy()
    w_prev = w
    for iteration in range(1, _MAX_VB_ITERATIONS + 1):
        # weight precision alpha
        inv_scale = 0.5 * np.sum(w * w) + 0.5 * np.sum(cov_eig) + 1.0 / _GAMMA_SCALE
        alpha = (k / 2.0 + _GAMMA_SHAPE) / inv_scale
        # residual precision Lambda = T inv(e^T e + Omega)
        e = Y - X @ w
        omega = u_l @ np.diag(np.sum(d_x[:, None] * cov_eig, axis=0)) @ u_l.T
        # pinv: with fewer than p (n + 1) + n scans the ML residuals have rank < n at first
        lam = T * np.linalg.pinv(e.T @ e + omega, hermitian=True)
        if iteration > 2 and np.linalg.norm(w - w_prev) / k < _VB_TOLERANCE:
            break
        w_prev = w
        d_l, u_l = np.linalg.eigh((lam + lam.T) / 2)
        prec_eig = d_x[:, None] * d_l[None, :]
        cov_eig = 1.0 / (prec_eig + alpha)
        # w = cov kron(Lambda, X^T X) vec(w_ml), evaluated in the joint eigenbasis
        rotated = u_x.T @ w_ml @ u_l
        w = u_x @ (rotated * prec_eig * cov_eig) @ u_l.T
    lags = -w.reshape(p, n, n).transpose(0, 2, 1)
    return lags, sigma


def estimate_csd(
    y: np.ndarray | torch.Tensor, tr: float, order: int = DATA_AR_ORDER, n_freqs: int = N_FREQS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-spectral density of (already scaled) time series through a VB MAR model.

    Parameters
    ----------
    y
        (T, n) or (B, T, n) time series, scaled as SPM does (:func:`scale_timeseries`).
    tr
        Repetition time in seconds.
    order
        MAR order (SPM: 8).
    n_freqs
        Number of frequencies (SPM: 32).

    Returns
    -------
    csd : torch.Tensor
        (F, n, n) or (B, F, n, n) complex128.
    freqs : torch.Tensor
        (F,) float64, Hz.
    """
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, dtype=float)
    batched = arr.ndim == 3
    series = arr if batched else arr[None]
    freqs = torch.from_numpy(frequency_grid(tr, series.shape[1], n_freqs))
    out = []
    for ts in series:
        lags, sigma = vb_mar(validate_timeseries(ts, order), order)
        out.append(mar_to_csd(torch.from_numpy(lags)[None], torch.from_numpy(sigma)[None], freqs, 1.0 / tr)[0])
    csd = torch.stack(out)
    return (csd if batched else csd[0]), freqs
