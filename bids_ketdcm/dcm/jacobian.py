"""Predicted CSD and its Jacobian in one forward-mode pass with structured tangents.

``torch.func.vmap(jvp)`` differentiates the forward model generically: every one of the R
directions of the prior subspace becomes a batch of small complex matrix products, and
most of the time goes to dispatch and copies. This module propagates all R tangents
together through the same equations as :func:`bids_ketdcm.dcm.model.predict_csd_tensor`,
using the matrix differentials of each step so that the tangent dimension is folded into
a few large matrix products. Tangents of n x n matrices are held in a "wide" layout (b, F,
n, R, n): for each frequency the rows of all R tangents are stacked (right products) and
their columns sit side by side (left products), so both kinds of product run without copies:

* coupling: ``d(M^-1) = M^-1 dA M^-1`` for ``M = i w I - A``;
* hemodynamics (elementwise in each region): closed-form partial derivatives;
* spectra of fluctuations and noise: closed-form derivatives of the power laws;
* CSD -> cross-covariance: linear; Yule-Walker: ``dX = S^-1 (dr - dS X)`` with one LU;
* AR -> CSD: ``dH = -H dM H`` and the product rule on ``H C H^H``.

Tangents never materialise dS or dH: ``dS S^H`` and ``d(H C H^H)`` are formed directly.

* SPM's eigenvalue clamp: derivatives of eigenvalues ``dl = W dA V`` (diagonal) and
  eigenvectors ``dV = V E``, ``E_kl = (W dA V)_kl / (l_l - l_k)``, ``dW = -E W``.

The result equals the ``torch.func`` Jacobian to rounding (tests compare them) at a
fraction of the cost.
"""

from __future__ import annotations

import math

import torch

from .model import (
    EIG_CEILING,
    INPUT_GAIN,
    MODEL_AR_ORDER,
    CcfGrid,
    autocovariance_kernel,
    effective_connectivity,
    hemodynamic_transfer,
    unpack,
    yule_walker_system,
)


def _right_multiply(wide: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``wide[:, f, :, r] @ right[:, f]`` for every r: (b, F, n, R, m) x (b, F, m, k) -> (b, F, n, R, k).

    In the wide layout the rows of all R tangents of a frequency are stacked, so this is one
    matrix product per frequency, without copies.
    """
    b, F, n, R, m = wide.shape
    out = torch.bmm(wide.reshape(b * F, n * R, m), right.reshape(b * F, m, right.shape[-1]))
    return out.reshape(b, F, n, R, right.shape[-1])


def _left_multiply(left: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """``left[:, f] @ wide[:, f, :, r]`` for every r: (b, F, k, n) x (b, F, n, R, m) -> (b, F, k, R, m).

    In the wide layout the columns of all R tangents of a frequency sit side by side: one
    matrix product per frequency, without copies.
    """
    b, F, n, R, m = wide.shape
    out = torch.bmm(left.reshape(b * F, left.shape[-2], n), wide.reshape(b * F, n, R * m))
    return out.reshape(b, F, left.shape[-2], R, m)


def _hermitian(x: torch.Tensor) -> torch.Tensor:
    """Conjugate transpose, conjugated physically: matrix products with it take half the time
    of those with the lazy ``x.mH`` (same numbers)."""
    return x.conj_physical().transpose(-1, -2)


def _power_law(freqs: torch.Tensor, log_exponent: torch.Tensor, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``f^-e`` (b, F) and its derivative factor w.r.t. ``log e`` (b, F)."""
    exponent = torch.exp(log_exponent)[:, None] / (2.0 if half else 1.0)
    log_f = torch.log(freqs)[None, :]
    g = torch.exp(-exponent * log_f)
    g = g / g.sum(dim=1, keepdim=True)
    mean_log_f = (g * log_f).sum(dim=1, keepdim=True)
    return g, -exponent * (log_f - mean_log_f)


def predict_csd_and_jacobian(
    theta: torch.Tensor, directions: torch.Tensor, freqs: torch.Tensor, n: int, grid: CcfGrid,
    clamp: torch.Tensor | None = None, tangent_dtype: torch.dtype | None = None, csd_model: str = "spm12",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted CSD and its derivatives along given parameter directions.

    Parameters
    ----------
    theta
        (b, P) flat parameters (SPM's order).
    directions
        (b, P, R) directions in parameter space (the prior subspace's basis).
    freqs
        (F,) frequencies in Hz.
    n
        Number of regions.
    grid
        Lag grid of ``freqs`` (:meth:`CcfGrid.from_freqs`).
    clamp
        Indices of subjects whose unstable neuronal modes SPM clamps
        (:func:`~bids_ketdcm.dcm.model.clamped_subjects`); their eigenvalue correction
        and its derivative (through the eigendecomposition) are added.
    tangent_dtype
        Complex dtype of the tangents (default: that of the prediction, complex128).
        ``torch.complex64`` halves memory traffic; the prediction stays in float64.
    csd_model
        ``"spm12"`` (with SPM's AR round trip) or ``"direct"`` (without); see
        :data:`~bids_ketdcm.dcm.model.CSD_MODELS`.

    Returns
    -------
    csd : torch.Tensor
        (b, F, n, n) complex, as :func:`~bids_ketdcm.dcm.model.predict_csd_tensor`.
    jacobian : torch.Tensor
        (b, F, R, n, n) complex: derivative of ``csd`` along each direction.
    """
    b, P, R = directions.shape
    ctype = torch.complex128 if theta.dtype == torch.float64 else torch.complex64
    tt = tangent_dtype or ctype
    rt = torch.float64 if tt == torch.complex128 else torch.float32
    p, dp = unpack(theta, n), unpack(directions.transpose(-1, -2), n)
    F = freqs.shape[0]

    # neuronal transfer N = (i w I - A_eff)^-1 / 16, whose tangents are M^-1 dA N
    A_eff = effective_connectivity(p["A"])
    diag = torch.diagonal(p["A"], dim1=-2, dim2=-1)  # (b, n)
    d_diag = torch.diagonal(dp["A"], dim1=-2, dim2=-1)  # (b, R, n)
    dA = dp["A"] - torch.diag_embed(d_diag * (1.0 + torch.exp(diag)[:, None, :] / 2.0))
    sigma = (2j * math.pi) * freqs.to(ctype)
    eye = torch.eye(n, dtype=ctype, device=theta.device)
    inverse = torch.linalg.inv(sigma[None, :, None, None] * eye - A_eff[:, None].to(ctype))  # (b, F, n, n)
    neuronal = inverse * INPUT_GAIN

    # hemodynamics: h_i depends on transit_i, decay and epsilon (closed-form partials)
    h, dh_transit, dh_decay, dh_epsilon, _ = hemodynamic_transfer(
        sigma, p["transit"], p["decay"], p["epsilon"], partials=True)  # each (b, F, n)
    dh = (dh_transit[:, :, None, :] * dp["transit"][:, None]
          + dh_decay[:, :, None, :] * dp["decay"][:, None]
          + dh_epsilon[:, :, None, :] * dp["epsilon"][:, None]).to(tt)  # (b, F, R, n)
    S = h[..., :, None] * neuronal  # (b, F, n, n)
    correction = d_correction = None
    if clamp is not None and clamp.numel():
        pick = {k: v[clamp] for k, v in p.items()}
        d_pick = {k: v[clamp] for k, v in dp.items()}
        correction, d_correction = _clamp_correction_and_tangents(A_eff[clamp], dA[clamp], pick, d_pick, sigma)
        S = S.index_add(0, clamp, correction)
    S_H = _hermitian(S)
    NS = neuronal @ S_H  # (b, F, n, n)
    # dS S^H = dh * (N S^H) + h * (M^-1 dA (N S^H)) [+ dCorrection S^H when clamped], in the wide
    # layout (b, F, n, R, n); M^-1 [dA_1 ... dA_R] is one product per subject (frequencies as rows)
    NS_t = NS.to(tt)
    dA_wide = dA.to(tt).permute(0, 2, 1, 3).reshape(b, n, R * n)
    inverse_dA = torch.bmm(inverse.to(tt).reshape(b, F * n, n), dA_wide).reshape(b, F, n, R, n)
    cross = _right_multiply(inverse_dA, NS_t)
    cross.mul_(h.to(tt)[:, :, :, None, None]).addcmul_(dh.transpose(-1, -2)[..., None], NS_t[:, :, :, None, :])
    if clamp is not None and d_correction is not None:
        d_correction_wide = d_correction.permute(0, 1, 3, 2, 4).contiguous()
        cross = cross.index_add(0, clamp, _right_multiply(d_correction_wide, S_H[clamp]).to(tt))

    # spectra of endogenous fluctuations (a) and observation noise (b, c)
    ga, la = _power_law(freqs, p["a"][:, 1], half=False)
    gu = torch.exp(p["a"][:, 0:1]) * ga  # (b, F)
    d_gu = gu[:, :, None] * (dp["a"][:, None, :, 0] + la[:, :, None] * dp["a"][:, None, :, 1])  # (b, F, R)
    gb, lb = _power_law(freqs, p["b"][:, 1], half=True)
    global_noise = torch.exp(p["b"][:, 0])[:, None] * gb  # (b, F)
    region_noise = torch.exp(p["c"])[:, None, :] * gb[:, :, None]  # (b, F, n)
    d_gb = gb[:, :, None] * lb[:, :, None] * dp["b"][:, None, :, 1]  # (b, F, R)
    d_global = torch.exp(p["b"][:, 0])[:, None, None] * (gb[:, :, None] * dp["b"][:, None, :, 0] + d_gb)
    d_region = torch.exp(p["c"])[:, None, None, :] * (gb[:, :, None, None] * dp["c"][:, None] + d_gb[..., None])
    ones = torch.ones(n, n, dtype=theta.dtype, device=theta.device)
    noise = global_noise[..., None, None] * ones + torch.diag_embed(region_noise)

    SSH = S @ S_H
    csd = gu[..., None, None] * SSH + noise
    if csd_model == "direct":
        d_noise = d_global[..., None, None] * ones + torch.diag_embed(d_region)  # (b, F, R, n, n)
        twin = (cross + cross.transpose(2, 4).conj()).transpose(2, 3)  # d(S S^H) per tangent
        d_csd = (d_gu.to(rt)[..., None, None] * SSH.to(tt)[:, :, None]
                 + gu.to(rt)[:, :, None, None, None] * twin + d_noise.to(rt))
        return csd, d_csd

    # SPM's round trip: cross-covariance (linear), Yule-Walker AR(p), AR -> CSD
    order = MODEL_AR_ORDER
    kernel = autocovariance_kernel(F, grid, order, ctype, theta.device)  # (L, F)
    cov = torch.einsum("mf,bfij->bmij", kernel, csd).real
    # the tangents of the cross-covariance, Re(kernel @ d_csd), term by term so that the
    # (F, R, n, n) tangent of the CSD is never formed: with X = Gu dS S^H,
    # Re(k X^H)_ij = Re(conj(k) X)_ji; the spectra's terms are small contractions
    # Re(k X) = Re k Re X - Im k Im X and Re(conj(k) X) = Re k Re X + Im k Im X: one real
    # product of the stacked kernel parts with the real view of the wide tangents
    weighted = kernel[None] * gu[:, None, :]  # (b, L, F)
    L = weighted.shape[1]
    parts = torch.cat([weighted.real, weighted.imag], dim=1).to(rt)  # (b, 2L, F)
    products = torch.bmm(parts, torch.view_as_real(cross).reshape(b, F, -1)).reshape(b, 2, L, n, R, n, 2)
    real_real, imag_imag = products[:, 0, ..., 0], products[:, 1, ..., 1]  # (b, L, n, R, n)
    d_cov = ((real_real - imag_imag).permute(0, 3, 1, 2, 4) + (real_real + imag_imag).permute(0, 3, 1, 4, 2))
    d_cov = d_cov + torch.einsum("mf,bfr,bfij->brmij", kernel, d_gu.to(ctype), SSH).real.to(rt)
    d_cov = d_cov + torch.einsum("mf,bfr->brm", kernel, d_global.to(ctype)).real.to(rt)[..., None, None]
    d_cov = d_cov + torch.diag_embed(torch.einsum("mf,bfri->brmi", kernel, d_region.to(ctype)).real.to(rt))
    system, rhs = yule_walker_system(cov, order)
    d_system, d_rhs = yule_walker_system(d_cov.reshape((b * R,) + d_cov.shape[2:]), order)
    lu, pivots = torch.linalg.lu_factor(system)
    coef = torch.linalg.lu_solve(lu, pivots, rhs)  # (b, np, n)
    d_system = d_system.reshape(b, R, n * order, n * order)
    d_rhs = d_rhs.reshape(b, R, n * order, n)
    forcing = d_rhs - d_system @ coef.to(rt)[:, None]  # (b, R, np, n)
    wide = forcing.permute(0, 2, 1, 3).reshape(b, n * order, R * n).to(theta.dtype)
    d_coef = torch.linalg.lu_solve(lu, pivots, wide).to(rt).reshape(b, n * order, R, n).permute(0, 2, 1, 3)
    noise_cov = cov[:, 0] - rhs.transpose(-1, -2) @ coef  # (b, n, n)
    d_noise_cov = (d_cov[:, :, 0] - d_rhs.transpose(-1, -2) @ coef.to(rt)[:, None]
                   - rhs.to(rt).transpose(-1, -2)[:, None] @ d_coef)
    lags = -coef.reshape(b, n, order, n).permute(0, 2, 1, 3)  # (b, p, n, n)
    d_lags = -d_coef.reshape(b, R, n, order, n).permute(0, 1, 3, 2, 4)  # (b, R, p, n, n)

    w = 2.0 * math.pi * freqs / grid.ns
    k = torch.arange(1, order + 1, dtype=theta.dtype, device=theta.device)
    phase = torch.exp(-1j * (w[:, None] * k[None, :]).to(ctype))  # (F, p)
    H = torch.linalg.inv(eye + torch.einsum("fk,bkij->bfij", phase, lags.to(ctype)))  # (b, F, n, n)
    d_lags_wide = d_lags.to(tt).permute(0, 2, 3, 1, 4).reshape(b, order, n * R * n)
    d_M = (phase.to(tt) @ d_lags_wide).reshape(b, F, n, R, n)
    # d(H C H^H) = H Z H^H with Z = -dM H C - (dM H C)^H + dC, since dH = -H dM H
    C = noise_cov.to(ctype)
    HC = H @ C[:, None]  # (b, F, n, n)
    Z = _right_multiply(d_M, (-HC).to(tt))
    Z = Z + Z.transpose(2, 4).conj()
    Z.add_(d_noise_cov.to(tt).transpose(1, 2)[:, None])
    scale = 2.0 / grid.ns
    out = scale * (HC @ _hermitian(H))
    d_out = _left_multiply(H.to(tt), _right_multiply(Z, (scale * _hermitian(H)).to(tt)))
    return out, d_out.transpose(2, 3)


def _clamp_correction_and_tangents(
    A_eff: torch.Tensor, dA: torch.Tensor, p: dict[str, torch.Tensor], dp: dict[str, torch.Tensor],
    sigma: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp correction of the transfer function (as ``model._clamp_correction``) and tangents.

    ``C(s) = sum_k R_k [1/(s - l~_k) - 1/(s - l_k)] / 16`` with residues
    ``R_k[i, j] = h_i(l_k) V[i, k] W[k, j]``, ``W = V^-1``, ``l~`` the clamped eigenvalues.
    Returns (b, F, n, n) and (b, F, R, n, n).
    """
    lam, V = torch.linalg.eig(A_eff)
    W = torch.linalg.inv(V)
    ctype = lam.dtype
    Q = W[:, None] @ dA.to(ctype) @ V[:, None]  # (b, R, n, n)
    d_lam = torch.diagonal(Q, dim1=-2, dim2=-1)  # (b, R, n)
    gap = lam[:, None, :] - lam[:, :, None]  # [k, l] = l_l - l_k
    off = ~torch.eye(lam.shape[-1], dtype=torch.bool, device=lam.device)
    E = torch.where(off, Q / torch.where(off, gap, torch.ones_like(gap))[:, None], torch.zeros_like(Q))
    dV = V[:, None] @ E
    dW = -E @ W[:, None]
    unstable = lam.real > EIG_CEILING
    lam_c = torch.complex(torch.clamp(lam.real, max=EIG_CEILING), lam.imag)
    d_lam_c = torch.where(unstable[:, None], 1j * d_lam.imag, d_lam)
    h, h_transit, h_decay, h_epsilon, h_sigma = hemodynamic_transfer(
        lam, p["transit"], p["decay"], p["epsilon"], partials=True)  # (b, k, i)
    dh = (h_sigma[:, None] * d_lam[..., None] + h_transit[:, None] * dp["transit"][:, :, None, :]
          + h_decay[:, None] * dp["decay"][..., None] + h_epsilon[:, None] * dp["epsilon"][..., None])
    hv = h.transpose(-1, -2) * V  # [b, i, k] = h_i(l_k) V[i, k]
    d_hv = dh.transpose(-1, -2) * V[:, None] + h.transpose(-1, -2)[:, None] * dV
    residue = hv[..., None] * W[:, None]  # (b, i, k, j)
    d_residue = d_hv[..., None] * W[:, None, None] + hv[:, None, :, :, None] * dW[:, :, None]  # (b, R, i, k, j)
    to_c = sigma[None, :, None] - lam_c[:, None, :]  # (b, F, k)
    to_l = sigma[None, :, None] - lam[:, None, :]
    diff = 1.0 / to_c - 1.0 / to_l
    d_diff = d_lam_c[:, None] / (to_c * to_c)[:, :, None] - d_lam[:, None] / (to_l * to_l)[:, :, None]  # (b, F, R, k)
    correction = torch.einsum("bikj,bfk->bfij", residue, diff) * INPUT_GAIN
    d_correction = (torch.einsum("brikj,bfk->bfrij", d_residue, diff)
                    + torch.einsum("bikj,bfrk->bfrij", residue, d_diff)) * INPUT_GAIN
    return correction, d_correction
