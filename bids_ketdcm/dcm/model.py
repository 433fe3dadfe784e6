"""Generative model of spectral DCM: neuronal coupling, balloon hemodynamics, spectra.

Everything is written in PyTorch on batched tensors (leading dimension B = subjects) so
that ``torch.func.jvp`` gives exact Jacobians and the same code runs on CPU or CUDA.
The equations are those of SPM12's ``spm_fx_fmri``/``spm_gx_fmri``/``spm_csd_fmri_mtf``
(DESIGN.md section 7).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .priors import ParamLayout

# Hemodynamic constants (SPM12 spm_fx_fmri / spm_gx_fmri).
KAPPA = 0.64  # rate of signal decay, scaled by exp(decay)
GAMMA = 0.32  # rate of flow-dependent elimination
TAU = 2.0  # transit time, scaled by exp(transit)
GRUBB = 0.32  # Grubb's exponent alpha
E0 = 0.4  # resting oxygen extraction fraction
V0 = 4.0  # resting venous volume (%)
TE = 0.04  # echo time (s)
R0 = 25.0  # intravascular relaxation rate
NU0 = 40.3  # frequency offset at the outer surface of magnetised vessels
INPUT_GAIN = 1.0 / 16.0  # endogenous fluctuations enter every region through I/16
EIG_CEILING = -1.0 / 32.0  # real parts of the system's eigenvalues are clamped below this
MODEL_AR_ORDER = 7  # SPM re-expresses predicted spectra through an AR(p - 1) model


#: Predicted-CSD models. ``spm12``: SPM12's, whose prediction passes through an AR(7)
#: round trip (CSD -> cross-covariance of the 32 band frequencies, zeros elsewhere ->
#: Yule-Walker -> CSD); for 1/f-like spectra that round trip moves power away from the
#: lowest frequencies (at the prior: 4x less at 1/128 Hz, 2x more at 4/128 Hz than the
#: transfer function gives), and the fit compensates with a steep fluctuation exponent.
#: ``direct``: the transfer-function CSD ``S Gu S^H + Gn`` itself (not SPM12).
CSD_MODELS = ("spm12", "direct")


def unpack(theta: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Split a batched flat parameter tensor (B, P) into SPM's named parameters.

    ``A`` comes back as (B, n, n) with rows = targets (the vector holds it column-major);
    the others as (B, size).
    """
    layout = ParamLayout(n)
    out = {name: theta[..., s] for name, s in layout.slices().items()}
    out["A"] = out["A"].reshape(theta.shape[:-1] + (n, n)).transpose(-1, -2)
    return out


def effective_connectivity(A: torch.Tensor) -> torch.Tensor:
    """Coupling in Hz from SPM's A parameters: self-connections become ``-exp(A_ii)/2``."""
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    return A - torch.diag_embed(diag) - torch.diag_embed(torch.exp(diag) / 2.0)


def hemodynamic_transfer(
    sigma: torch.Tensor, transit: torch.Tensor, decay: torch.Tensor, epsilon: torch.Tensor,
    partials: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Transfer function from neuronal activity to BOLD of each region's balloon model.

    The balloon model linearised at rest is a chain (signal -> flow -> volume ->
    deoxyhaemoglobin -> BOLD) whose Laplace transform has this closed form.

    Parameters
    ----------
    sigma
        Complex Laplace variables, (K,) shared by all subjects (e.g. ``i 2 pi f``) or
        (B, K) per subject (e.g. eigenvalues).
    transit
        (B, n) log transit-time scalings.
    decay, epsilon
        (B, 1) log signal-decay scaling and log intra/extravascular ratio.

    partials
        Also return the exact partial derivatives of the response of region i with
        respect to ``transit[i]``, ``decay``, ``epsilon`` and ``sigma`` (each (B, K, n)).

    Returns
    -------
    torch.Tensor or tuple
        (B, K, n) complex: BOLD response of region i to its own neuronal state; with
        ``partials``, the tuple ``(h, dh/dtransit_i, dh/ddecay, dh/depsilon, dh/dsigma)``.
    """
    s = sigma.reshape((-1,) + sigma.shape[-1:] + (1,)) if sigma.dim() == 2 else sigma[None, :, None]
    kappa = (KAPPA * torch.exp(decay))[:, :, None]
    tau = (TAU * torch.exp(transit))[:, None, :]
    eps = torch.exp(epsilon)[:, :, None]
    k1 = 4.3 * NU0 * E0 * TE
    k2 = eps * R0 * E0 * TE
    k3 = 1.0 - eps
    # d(f E(f))/d ln f at rest, divided by E0 (E(f) = 1 - (1 - E0)^(1/f))
    c_flow = (E0 + (1.0 - E0) * math.log(1.0 - E0)) / E0
    ln_f = 1.0 / (s * s + kappa * s + GAMMA)
    ln_v = ln_f / (tau * s + 1.0 / GRUBB)
    ln_q = (c_flow * ln_f - (1.0 / GRUBB - 1.0) * ln_v) / (tau * s + 1.0)
    h = V0 * (-(k1 + k2) * ln_q + (k2 - k3) * ln_v)
    if not partials:
        return h
    # d/d decay: kappa scales with exp(decay); only ln_f depends on it directly
    d_ln_f = -ln_f * ln_f * s * kappa
    d_ln_v = d_ln_f / (tau * s + 1.0 / GRUBB)
    d_decay = V0 * (-(k1 + k2) * (c_flow * d_ln_f - (1.0 / GRUBB - 1.0) * d_ln_v) / (tau * s + 1.0)
                    + (k2 - k3) * d_ln_v)
    # d/d transit_i: tau_i scales with exp(transit_i); ln_v and ln_q of region i move
    d_ln_v = -ln_v * tau * s / (tau * s + 1.0 / GRUBB)
    d_ln_q = (-(1.0 / GRUBB - 1.0) * d_ln_v - ln_q * tau * s) / (tau * s + 1.0)
    d_transit = V0 * (-(k1 + k2) * d_ln_q + (k2 - k3) * d_ln_v)
    # d/d epsilon: k2 scales with eps, k3 = 1 - eps
    d_epsilon = V0 * (-k2 * ln_q + (k2 + eps) * ln_v)
    # d/d s: the slope in the Laplace variable (moves with eigenvalues when clamping)
    ds_ln_f = -ln_f * ln_f * (2.0 * s + kappa)
    ds_ln_v = (ds_ln_f - ln_v * tau) / (tau * s + 1.0 / GRUBB)
    ds_ln_q = (c_flow * ds_ln_f - (1.0 / GRUBB - 1.0) * ds_ln_v - ln_q * tau) / (tau * s + 1.0)
    d_sigma = V0 * (-(k1 + k2) * ds_ln_q + (k2 - k3) * ds_ln_v)
    return h, d_transit, d_decay, d_epsilon, d_sigma


def transfer_function(
    params: dict[str, torch.Tensor], freqs: torch.Tensor, clamp_subjects: torch.Tensor | None = None
) -> torch.Tensor:
    """Transfer function from endogenous fluctuations to BOLD, (B, F, n, n) complex.

    ``S(f) = diag(h(i 2 pi f)) (i 2 pi f I - A_eff)^-1 / 16`` where ``h`` is each
    region's hemodynamic transfer. SPM clamps the real part of every eigenvalue of the
    system's Jacobian at -1/32; the hemodynamic eigenvalues sit far below it, so only
    neuronal modes can be moved. For those the exact correction
    ``sum_k R_k [1/(i w - s~_k) - 1/(i w - s_k)]`` (residue ``R_k`` of mode k) is added,
    computed from an eigendecomposition of ``A_eff`` only for the subjects listed in
    ``clamp_subjects`` (see :func:`clamped_subjects`), so that gradients never pass
    through the eigendecomposition of repeated eigenvalues.
    """
    A = effective_connectivity(params["A"])
    n = A.shape[-1]
    sigma = (2j * math.pi) * freqs.to(A.dtype)
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    system = sigma[None, :, None, None] * eye - A[:, None, :, :].to(sigma.dtype)
    hemo = hemodynamic_transfer(sigma, params["transit"], params["decay"], params["epsilon"])
    assert isinstance(hemo, torch.Tensor)  # without partials: one tensor
    S = (hemo * INPUT_GAIN)[..., :, None] * torch.linalg.inv(system)  # the gain 1/16 scales exactly
    if clamp_subjects is not None and clamp_subjects.numel() > 0:
        S = S.index_add(0, clamp_subjects, _clamp_correction(params, clamp_subjects, sigma))
    return S


def _clamp_correction(
    params: dict[str, torch.Tensor], subjects: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """Change of the transfer function when unstable neuronal modes are clamped."""
    A = effective_connectivity(params["A"][subjects])
    lam, right = torch.linalg.eig(A)
    left = torch.linalg.inv(right)
    lam_clamped = torch.complex(torch.clamp(lam.real, max=EIG_CEILING), lam.imag)
    hemo = hemodynamic_transfer(
        lam, params["transit"][subjects], params["decay"][subjects], params["epsilon"][subjects]
    )  # (b, k, n)
    assert isinstance(hemo, torch.Tensor)  # without partials: one tensor
    residue = hemo.transpose(-1, -2)[:, :, :, None] * right[:, :, :, None] * left[:, None, :, :]
    # residue[b, i, k, j] = h_i(lam_k) right[i, k] left[k, j]
    diff = 1.0 / (sigma[None, :, None] - lam_clamped[:, None, :]) - 1.0 / (sigma[None, :, None] - lam[:, None, :])
    return torch.einsum("bikj,bfk->bfij", residue, diff) * INPUT_GAIN


def clamped_subjects(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Indices of subjects whose coupling has an eigenvalue with real part above -1/32."""
    with torch.no_grad():
        lam = torch.linalg.eigvals(effective_connectivity(params["A"]))
        return torch.nonzero((lam.real > EIG_CEILING).any(dim=-1)).flatten()


def fluctuation_spectra(
    params: dict[str, torch.Tensor], freqs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spectra of neuronal fluctuations (B, F), global noise (B, F) and regional noise (B, F, n).

    Neuronal: ``exp(a1) f^-exp(a2)``, normalised to unit sum over frequencies, identical
    and independent in every region. Noise: the global ``exp(b1) G_b`` in every element of
    the CSD plus ``exp(c_i) G_b`` on the diagonal, ``G_b = f^(-exp(b2)/2)`` normalised.
    """
    f = freqs.to(params["a"].dtype)[None, :]
    ga = f ** (-torch.exp(params["a"][:, 1:2]))
    gu = torch.exp(params["a"][:, 0:1]) * ga / ga.sum(dim=1, keepdim=True)
    gb = f ** (-torch.exp(params["b"][:, 1:2]) / 2.0)
    gb = gb / gb.sum(dim=1, keepdim=True)
    return gu, torch.exp(params["b"][:, 0:1]) * gb, torch.exp(params["c"])[:, None, :] * gb[:, :, None]


@dataclass(frozen=True)
class CcfGrid:
    """Lag grid of SPM's CSD -> cross-covariance transform for a frequency grid.

    Attributes
    ----------
    df
        Frequency spacing (Hz).
    n_lags
        N, the number of positive lags: ``ceil(ns / (2 df))`` with ``ns = 2 f_max``.
    start
        Index of the first frequency in the zero-padded spectrum (``ceil(f1/df) - 1``).
    ns
        The model's sampling rate ``2 f_max`` (Hz).
    """

    df: float
    n_lags: int
    start: int
    ns: float

    @classmethod
    def from_freqs(cls, freqs: torch.Tensor) -> CcfGrid:
        f = np.asarray(freqs.detach().cpu() if isinstance(freqs, torch.Tensor) else freqs, dtype=float)
        df = float(f[1] - f[0])
        ns = 2.0 * float(f[-1])
        return cls(df=df, n_lags=math.ceil(ns / (2.0 * df)), start=math.ceil(float(f[0]) / df) - 1, ns=ns)


def csd_to_autocovariance(csd: torch.Tensor, grid: CcfGrid, max_lag: int) -> torch.Tensor:
    """Cross-covariances at lags 0..max_lag from cross-spectra, as SPM's ``spm_csd2ccf``.

    SPM zero-pads the spectrum to N positive frequencies, mirrors it with its conjugate
    and takes a (2N + 1)-point inverse FFT scaled by ``N df``. Only a few lags are needed
    for Yule-Walker, so the same numbers are computed directly as
    ``c(m) = 2 N df / (2N + 1) Re sum_k csd_k exp(2 pi i (k + start + 1) m / (2N + 1))``.

    Parameters
    ----------
    csd
        (B, F, n, n) complex cross-spectral density.
    grid
        Lag grid of the frequencies (:class:`CcfGrid`).
    max_lag
        Largest lag returned.

    Returns
    -------
    torch.Tensor
        (B, max_lag + 1, n, n) real; ``c[:, m, i, j]`` is the covariance of region i with
        region j at lag m (``c_ji(m) = c_ij(-m)``).
    """
    kernel = autocovariance_kernel(csd.shape[1], grid, max_lag, csd.dtype, csd.device)
    B, F, n, _ = csd.shape
    return (kernel @ csd.reshape(B, F, n * n)).reshape(B, max_lag + 1, n, n).real


@functools.cache
def autocovariance_kernel(n_freqs: int, grid: CcfGrid, max_lag: int, ctype: torch.dtype,
                          device: torch.device | None = None) -> torch.Tensor:
    """(max_lag + 1, F) complex kernel of :func:`csd_to_autocovariance` (real part taken after).

    Cached: every prediction of an inversion uses the same one (read only; a normal tensor,
    also when first made in inference mode, so that autograd may use it).
    """
    length = 2 * grid.n_lags + 1
    real = torch.float64 if ctype == torch.complex128 else torch.float32
    with torch.inference_mode(False):
        lag = torch.arange(max_lag + 1, dtype=real, device=device)
        position = torch.arange(n_freqs, dtype=real, device=device) + grid.start + 1
        kernel = torch.exp((2j * math.pi / length) * (lag[:, None] * position[None, :]).to(ctype))
        return kernel * (2.0 * grid.n_lags * grid.df / length)


def ccf_to_mar(cov: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multivariate AR coefficients by Yule-Walker from cross-covariances (``spm_ccf2mar``).

    Parameters
    ----------
    cov
        (B, L, n, n) cross-covariances at lags 0..L-1, L > order
        (:func:`csd_to_autocovariance`).
    order
        AR order p.

    Returns
    -------
    lags : torch.Tensor
        (B, order, n, n): ``y_t + sum_k lags[k-1] y_{t-k} = e_t``.
    noise_cov : torch.Tensor
        (B, n, n) innovation covariance.
    """
    B, _, n, _ = cov.shape
    p = order
    system, rhs = yule_walker_system(cov, order)
    coef = torch.linalg.solve(system, rhs)
    noise_cov = cov[:, 0] - rhs.transpose(-1, -2) @ coef
    lags = -coef.reshape(B, n, p, n).permute(0, 2, 1, 3)
    return lags, noise_cov


def yule_walker_system(cov: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-Toeplitz Yule-Walker system ``system @ coef = rhs`` (both linear in ``cov``).

    Parameters
    ----------
    cov
        (B, L, n, n) cross-covariances at lags 0..L-1, L > order.
    order
        AR order p.

    Returns
    -------
    system : torch.Tensor
        (B, n p, n p).
    rhs : torch.Tensor
        (B, n p, n); row ``(i, k)`` holds ``c_ij(k + 1)``.
    """
    B, _, n, _ = cov.shape
    p = order
    system = cov.reshape(B, -1).index_select(1, _yule_walker_index(n, p, cov.device)).reshape(B, n * p, n * p)
    rhs = cov[:, 1 : p + 1].permute(0, 2, 1, 3).reshape(B, n * p, n)  # [(i, k), j] = c_ij(k)
    return system, rhs


@functools.cache
def _yule_walker_index(n: int, order: int, device: torch.device) -> torch.Tensor:
    """Where each entry of the Yule-Walker system sits in the flattened (L, n, n) covariances.

    Block (i, j) of the system is Toeplitz: entry (k, m) is ``c_ij(k - m)`` for k >= m and
    ``c_ji(m - k)`` above the diagonal; rows ``(i, k)`` and columns ``(j, m)`` flattened.
    """
    i, k, j, m = torch.meshgrid(*(torch.arange(size) for size in (n, order, n, order)), indexing="ij")
    lower = k >= m
    row, col = torch.where(lower, i, j), torch.where(lower, j, i)
    return ((k - m).abs() * n * n + row * n + col).reshape(-1).to(device)


def mar_to_csd(lags: torch.Tensor, noise_cov: torch.Tensor, freqs: torch.Tensor, ns: float) -> torch.Tensor:
    """Cross-spectral density of a multivariate AR process (``spm_mar2csd``).

    ``2/ns H(f) C H(f)^H`` with ``H(f) = (I + sum_k lags_k exp(-i 2 pi f k / ns))^-1``.

    Parameters
    ----------
    lags
        (B, p, n, n) lag matrices.
    noise_cov
        (B, n, n) innovation covariance.
    freqs
        (F,) frequencies in Hz.
    ns
        Sampling rate in Hz.

    Returns
    -------
    torch.Tensor
        (B, F, n, n) complex.
    """
    B, p, n, _ = lags.shape
    ctype = torch.complex128 if lags.dtype == torch.float64 else torch.complex64
    w = 2.0 * math.pi * freqs.to(lags.dtype) / ns
    k = torch.arange(1, p + 1, dtype=lags.dtype, device=lags.device)
    phase = torch.exp(-1j * (w[:, None] * k[None, :]).to(ctype))  # (F, p)
    F = phase.shape[0]
    polynomial = (phase @ lags.to(ctype).reshape(B, p, n * n)).reshape(B, F, n, n)
    torch.diagonal(polynomial, dim1=-2, dim2=-1).add_(1.0)  # I + sum_k lags_k exp(-i w k)
    transfer = torch.linalg.inv(polynomial)
    # H (2/ns C): one product per subject with its frequencies stacked as rows
    left = (transfer.reshape(B, F * n, n) @ ((2.0 / ns) * noise_cov).to(ctype)).reshape(B, F, n, n)
    return left @ transfer.conj_physical().mT  # a physical conjugate: half the time of .mH in matmul


def predict_csd_tensor(
    theta: torch.Tensor,
    freqs: torch.Tensor,
    n: int,
    clamp_subjects: torch.Tensor | None = None,
    grid: CcfGrid | None = None,
    csd_model: str = "spm12",
) -> torch.Tensor:
    """Predicted CSD (B, F, n, n) for flat parameters theta (B, P), as SPM12.

    ``S Gu S^H + Gn``, with ``csd_model="spm12"`` passed through SPM's round trip CSD ->
    cross-covariance -> AR(7) -> CSD; ``"direct"`` returns it as it is (see
    :data:`CSD_MODELS`). ``grid`` may be precomputed with :meth:`CcfGrid.from_freqs`
    (needed inside ``torch.func`` transforms).
    """
    params = unpack(theta, n)
    return spectral_density(transfer_gain(transfer_function(params, freqs, clamp_subjects)), params, freqs, grid,
                            csd_model)


def transfer_gain(transfer: torch.Tensor) -> torch.Tensor:
    """``S S^H`` (B, F, n, n) of transfer functions S: the CSD of unit white fluctuations."""
    return transfer @ transfer.conj_physical().mT


def spectral_density(
    gain: torch.Tensor,
    params: dict[str, torch.Tensor],
    freqs: torch.Tensor,
    grid: CcfGrid | None = None,
    csd_model: str = "spm12",
) -> torch.Tensor:
    """Predicted CSD (B, F, n, n) from the transfer functions' gains and the spectral parameters.

    The second half of :func:`predict_csd_tensor`; ``gain`` is :func:`transfer_gain` of the
    transfer functions (models that share a transfer function share its gain: SPM's finite
    differences along spectral parameters leave it unchanged).
    """
    gu, global_noise, region_noise = fluctuation_spectra(params, freqs)
    csd = torch.addcmul(global_noise[:, :, None, None], gu[:, :, None, None], gain)
    # the diagonal carries the regional noise as well: gu S S^H + (global + regional)
    diagonal = gu[:, :, None] * torch.diagonal(gain, dim1=-2, dim2=-1) + (global_noise[:, :, None] + region_noise)
    torch.diagonal(csd, dim1=-2, dim2=-1).copy_(diagonal)
    if csd_model == "direct":
        return csd
    grid = grid if grid is not None else CcfGrid.from_freqs(freqs)
    lags, cov = ccf_to_mar(csd_to_autocovariance(csd, grid, MODEL_AR_ORDER), MODEL_AR_ORDER)
    return mar_to_csd(lags, cov, freqs, ns=grid.ns)
