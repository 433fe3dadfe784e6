"""Simulate BOLD from the spectral DCM generative model.

Neuronal states driven by power-law endogenous fluctuations, the nonlinear balloon
model per region (SPM12's ``spm_fx_fmri``), the BOLD observation equation
(``spm_gx_fmri``) and power-law observation noise, sampled every TR.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .model import E0, GAMMA, GRUBB, INPUT_GAIN, KAPPA, NU0, R0, TAU, TE, V0, effective_connectivity


def state_derivative(x: torch.Tensor, u: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Nonlinear state equations ``dx/dt`` of the neuronal and balloon model.

    Parameters
    ----------
    x
        (B, 5, n) states: neuronal, vasodilatory signal, log flow, log volume, log dHb.
    u
        (B, n) endogenous fluctuations.
    params
        SPM's named parameters, batched (see :func:`bids_ketdcm.dcm.model.unpack`).

    Returns
    -------
    torch.Tensor
        (B, 5, n).
    """
    A = effective_connectivity(params["A"])
    neural, sig, ln_f, ln_v, ln_q = x.unbind(dim=1)
    flow, vol, dhb = torch.exp(ln_f), torch.exp(ln_v), torch.exp(ln_q)
    kappa = KAPPA * torch.exp(params["decay"])
    tau = TAU * torch.exp(params["transit"])
    extraction = 1.0 - (1.0 - E0) ** (1.0 / flow)
    outflow = vol ** (1.0 / GRUBB)
    d_neural = (A @ neural[..., None])[..., 0] + INPUT_GAIN * u
    d_sig = neural - kappa * sig - GAMMA * (flow - 1.0)
    d_flow = sig / flow
    d_vol = (flow - outflow) / (tau * vol)
    d_dhb = (flow * extraction / E0 - outflow * dhb / vol) / (tau * dhb)
    return torch.stack([d_neural, d_sig, d_flow, d_vol, d_dhb], dim=1)


def bold_signal(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """BOLD observation equation, (B, 5, n) states -> (B, n) signal (percent)."""
    vol, dhb = torch.exp(x[:, 3]), torch.exp(x[:, 4])
    eps = torch.exp(params["epsilon"])
    k1 = 4.3 * NU0 * E0 * TE
    k2 = eps * R0 * E0 * TE
    k3 = 1.0 - eps
    return V0 * (k1 * (1.0 - dhb) + k2 * (1.0 - dhb / vol) + k3 * (1.0 - vol))


def power_law_noise(
    rng: np.random.Generator, n_samples: int, n_series: int, dt: float, exponent: float
) -> np.ndarray:
    """Gaussian noise with spectrum proportional to f^-exponent, unit variance per series."""
    white = rng.standard_normal((n_samples, n_series))
    spectrum = np.fft.rfft(white, axis=0)
    f = np.fft.rfftfreq(n_samples, dt)
    f[0] = f[1]
    spectrum *= (f ** (-exponent / 2.0))[:, None]
    out = np.fft.irfft(spectrum, n=n_samples, axis=0)
    return out / out.std(axis=0, keepdims=True)


def integrate(
    params: dict[str, torch.Tensor], u: np.ndarray, dt: float, sample_every: int, skip: int = 0
) -> np.ndarray:
    """Integrate the nonlinear model (RK4, input held within a step) and sample BOLD.

    Parameters
    ----------
    params
        SPM's named parameters, batched (B, ...).
    u
        (steps, B, n) endogenous fluctuations.
    dt
        Step (s).
    sample_every
        BOLD is sampled every this many steps.
    skip
        Steps discarded before sampling starts (burn-in).

    Returns
    -------
    numpy.ndarray
        (B, samples, n) BOLD.
    """
    steps, B, n = u.shape
    inputs = torch.from_numpy(u)
    x = torch.zeros(B, 5, n, dtype=torch.float64)
    samples = []
    for step in range(steps):
        ut = inputs[step]
        k1 = state_derivative(x, ut, params)
        k2 = state_derivative(x + dt / 2 * k1, ut, params)
        k3 = state_derivative(x + dt / 2 * k2, ut, params)
        k4 = state_derivative(x + dt * k3, ut, params)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if step >= skip and (step - skip) % sample_every == sample_every - 1:
            samples.append(bold_signal(x, params))
    if not torch.isfinite(x).all():
        raise FloatingPointError("the simulated states diverged: reduce fluctuation_sd")
    return torch.stack(samples, dim=1).numpy()


def simulate(
    A_hz: np.ndarray,
    tr: float,
    n_scans: int,
    seed: int,
    *,
    transit: np.ndarray | None = None,
    decay: float = 0.0,
    epsilon: float = 0.0,
    a: tuple[float, float] = (0.0, 0.0),
    noise_sd: float = 0.05,
    noise_exponent: float = 1.0,
    fluctuation_sd: float = 0.1,
    dt: float = 0.1,
    burn_in: float = 128.0,
) -> np.ndarray:
    """Simulate resting-state BOLD from the spectral DCM generative model.

    Endogenous fluctuations with spectrum ``f^-exp(a2)`` drive the neuronal states
    (coupling ``A_hz``); the nonlinear balloon model is integrated with a fourth-order
    Runge-Kutta scheme at step ``dt``; BOLD is sampled every ``tr`` after a burn-in, and
    observation noise with spectrum ``f^-noise_exponent`` is added.

    Parameters
    ----------
    A_hz
        (n, n) effective connectivity in Hz, rows = targets, or (B, n, n) for B subjects
        simulated together. Self-connections must be negative.
    tr
        Repetition time (s).
    n_scans
        Number of volumes.
    seed
        Random seed: the same arguments and seed give the same series.
    transit
        (n,) or (B, n) log transit-time scalings (default 0).
    decay, epsilon
        Log signal-decay scaling and log intra/extravascular ratio.
    a
        (log amplitude, log exponent) of the neuronal fluctuations.
    noise_sd
        Standard deviation of the observation noise relative to the BOLD signal's.
    noise_exponent
        Power-law exponent of the observation noise spectrum.
    fluctuation_sd
        Standard deviation of the fluctuations (times ``exp(a1)``); the default keeps
        flow within about 20 % of rest, where the balloon model is close to linear.
    dt
        Integration step (s); must divide ``tr``.
    burn_in
        Seconds simulated and discarded before the first scan.

    Returns
    -------
    numpy.ndarray
        (n_scans, n) BOLD time series, or (B, n_scans, n).
    """
    A_hz = np.asarray(A_hz, dtype=float)
    batched = A_hz.ndim == 3
    A_b = A_hz if batched else A_hz[None]
    B, n, m = A_b.shape
    if n != m:
        raise ValueError(f"A_hz must be square, got shape {A_hz.shape}")
    diag = np.diagonal(A_b, axis1=1, axis2=2)
    if np.any(diag >= 0):
        raise ValueError("self-connections of A_hz must be negative (inhibitory)")
    steps_per_scan = int(round(tr / dt))
    if not math.isclose(steps_per_scan * dt, tr):
        raise ValueError(f"dt={dt} must divide tr={tr}")
    rng = np.random.default_rng(seed)
    raw_A = A_b.copy()
    idx = np.arange(n)
    raw_A[:, idx, idx] = np.log(-2.0 * diag)
    transit_b = np.zeros((B, n)) if transit is None else np.broadcast_to(np.asarray(transit, float), (B, n))
    params = {
        "A": torch.from_numpy(raw_A),
        "transit": torch.from_numpy(np.ascontiguousarray(transit_b)),
        "decay": torch.full((B, 1), float(decay), dtype=torch.float64),
        "epsilon": torch.full((B, 1), float(epsilon), dtype=torch.float64),
    }
    n_burn = int(round(burn_in / dt))
    n_steps = n_burn + n_scans * steps_per_scan
    u = power_law_noise(rng, n_steps, B * n, dt, math.exp(a[1])).reshape(n_steps, B, n)
    u = u * fluctuation_sd * math.exp(a[0])
    bold = integrate(params, u, dt, steps_per_scan, skip=n_burn)
    noise = power_law_noise(rng, n_scans, B * n, tr, noise_exponent).reshape(n_scans, B, n).transpose(1, 0, 2)
    out = bold + noise_sd * bold.std(axis=1, keepdims=True) * noise
    return out if batched else out[0]
