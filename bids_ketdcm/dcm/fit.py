"""The whole spectral DCM pipeline from raw ROI time series, as ``spm_dcm_fmri_csd``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bids_ketdcm.threads import task_threads

from .csd import estimate_csd, scale_timeseries, validate_timeseries
from .invert import MAX_ITERATIONS, Posterior, invert
from .model import clamped_subjects, predict_csd_tensor, unpack
from .priors import MAX_NODES, ParamLayout, projected_A_covariance


@task_threads(1)
def fit(
    y: np.ndarray,
    tr: float,
    *,
    max_iterations: int = MAX_ITERATIONS,
    device: str | torch.device | None = None,
    jacobian: str = "analytic",
    spm_path_check: bool = True,
    csd_model: str = "spm12",
    progress: bool = False,
    on_subject_done: Callable[[int, int, bool], None] | None = None,
    chunk_bytes: int | None = None,
    workers: int = 1,
) -> Posterior:
    """Invert spectral DCM on raw ROI time series: scaling, CSD, priors, inversion.

    Parameters
    ----------
    y
        (T, n) time series of one run, or (B, T, n) for B runs of the same length and
        TR (inverted together as one batch).
    tr
        Repetition time in seconds.
    max_iterations
        Gauss-Newton iteration cap (SPM: 128).
    device
        Torch device (default: CUDA when available, else CPU).
    jacobian
        ``"analytic"`` (exact, fast; default), ``"autograd"`` (exact, ``torch.func``) or
        ``"finite-difference"`` (SPM12's path exactly).
    spm_path_check
        With an exact Jacobian, also run SPM's path and keep the higher free energy
        (:func:`bids_ketdcm.dcm.invert`).
    csd_model
        ``"spm12"`` (default) or ``"direct"`` (no AR round trip of the prediction; not
        SPM12); see :func:`bids_ketdcm.dcm.invert`.
    progress
        Log one line per iteration.
    on_subject_done, chunk_bytes, workers
        Per-subject completion callback, CPU chunk budget and threads running the
        inversion's paths and groups of subjects at once; see :func:`bids_ketdcm.dcm.invert`.
        The data features too are computed on one torch and BLAS thread, whatever the
        process's thread counts: the numbers do not depend on them.

    Returns
    -------
    Posterior
        Batched like ``y``; ``scale`` holds SPM's data scaling of each run.

    Raises
    ------
    ValueError
        NaN or infinite values, a region with zero variance, fewer than 2 regions, more
        regions than scans, or too few scans for the order-8 MAR model.
    """
    arr = np.asarray(y, dtype=float)
    batched = arr.ndim == 3
    runs = arr if batched else arr[None]
    scaled, scales = [], []
    for run in runs:
        s, k = scale_timeseries(validate_timeseries(run))
        scaled.append(s)
        scales.append(k)
    n = runs.shape[-1]
    csd, freqs = estimate_csd(np.stack(scaled), tr)
    prior_cov_A = np.stack([projected_A_covariance(s) for s in scaled]) if n > MAX_NODES else None
    post = invert(csd, freqs, prior_cov_A=prior_cov_A, max_iterations=max_iterations,
                  device=device, jacobian=jacobian, spm_path_check=spm_path_check, csd_model=csd_model,
                  progress=progress, on_subject_done=on_subject_done, chunk_bytes=chunk_bytes, workers=workers)
    post.scale = np.asarray(scales)
    return post if batched else post.subject(0)


def predict_csd(theta: dict[str, np.ndarray], freqs: np.ndarray, csd_model: str = "spm12") -> np.ndarray:
    """The forward model: predicted CSD for SPM-named parameters.

    Parameters
    ----------
    theta
        ``A`` (n, n) raw A parameters (rows = targets, diagonal log-scaled), ``transit``
        (n), ``decay`` (1), ``epsilon`` (1), ``a`` (2), ``b`` (2), ``c`` (n).
    freqs
        (F,) equally spaced frequencies in Hz.
    csd_model
        ``"spm12"`` (after SPM's AR round trip) or ``"direct"`` (without it).

    Returns
    -------
    numpy.ndarray
        (F, n, n) complex predicted cross-spectral density.
    """
    n = np.asarray(theta["A"]).shape[-1]
    flat = torch.from_numpy(ParamLayout(n).pack(theta))[None]
    with torch.no_grad():
        clamp = clamped_subjects(unpack(flat, n))
        out = predict_csd_tensor(flat, torch.as_tensor(np.asarray(freqs, dtype=float)), n, clamp,
                                 csd_model=csd_model)
    return out[0].numpy()
