"""Spectral (cross-spectral density) DCM for resting-state fMRI in PyTorch, as SPM12.

Public API (DESIGN.md section 7)::

    from bids_ketdcm.dcm import estimate_csd, fit, invert, predict_csd, simulate
"""

from .csd import estimate_csd, frequency_grid, scale_timeseries
from .fit import fit, predict_csd
from .invert import ConvergenceWarning, Posterior, invert
from .simulate import simulate

SPM_RELEASE = "SPM12"

__all__ = [
    "ConvergenceWarning",
    "Posterior",
    "SPM_RELEASE",
    "estimate_csd",
    "fit",
    "frequency_grid",
    "invert",
    "predict_csd",
    "scale_timeseries",
    "simulate",
]
