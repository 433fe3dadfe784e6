"""PEB, Bayesian model reduction and leave-one-out against SPM12's own numbers and the math.

Reference: tests/data/peb-reference, from scripts/spm/peb_cohort.py (16 simulated subjects,
4 regions, inverted by this package) and scripts/spm/peb_reference.m (SPM12 r7771's
spm_dcm_peb, spm_dcm_peb_bmc, spm_dcm_loo under Octave 7.3). Tolerances:

- SPM stops its Fisher scoring when an iteration gains < 1e-4 nats; a gap d in the
  objective puts the group parameters within sqrt(2 d) posterior SD of the optimum, so
  0.02 SD; the precisions and covariances are smooth in them (1e-3 relative).
- SPM centres the complexity of the group parameters on zero instead of their prior mean:
  its F is ours minus ``((b - bE)'bP(b - bE) - b'bP b)/2`` exactly (checked to 1e-3 nats).
- SPM's Bayesian model average is a Monte Carlo mean of 1000 draws: its standard error is
  SD/sqrt(1000), so 4 standard errors (0.13 SD) for means and 4/sqrt(2000) for SDs.
- SPM's one-subject models in spm_dcm_ppd accept steps by that F, which stops them after
  5 iterations: the leave-one-out means are compared with SPM run with the centred term
  (one line changed, see the driver), to 0.05 SD; unpatched SPM is within 1 SD.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from bids_ketdcm.dcm.bmr import compare_models, search_reduced
from bids_ketdcm.dcm.loo import leave_one_out
from bids_ketdcm.dcm.peb import SubjectPosteriors, a_parameter_index, empirical_bayes, fit_peb, reduce_evidence

REF = Path(__file__).parent / "data" / "peb-reference"


@pytest.fixture(scope="module")
def cohort() -> tuple[SubjectPosteriors, np.ndarray]:
    c = scipy.io.loadmat(REF / "cohort.mat")
    N = c["Ep"].shape[0]
    post = SubjectPosteriors(c["Ep"], c["Cp"], np.tile(c["pE"].ravel(), (N, 1)), np.tile(c["pC"], (N, 1, 1)),
                             c["F"].ravel(), [f"sub-{i:02d}" for i in range(N)])
    return post, c["X"]


@pytest.fixture(scope="module")
def spm() -> dict:
    return scipy.io.loadmat(REF / "peb_reference.mat")


@pytest.fixture(scope="module")
def peb(cohort):
    post, X = cohort
    return fit_peb(post, X, a_parameter_index(4))


def _centring(peb) -> float:
    b = peb.Ep.T.ravel()
    bP = np.linalg.inv(peb.pC)
    d = b - peb.pE
    return 0.5 * (d @ bP @ d - b @ bP @ b)


# The direct reduction: Savage-Dickey on S, then the reduction (reduce_evidence) of the
# posterior conditioned on theta_S = 0 from the conditioned prior to the prior marginal of
# the rest, at O(P^3) per model. The reference of the closed form in bids_ketdcm.dcm.bmr.


def _gauss_logpdf_zero(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(0; mean, cov), batched; padded dimensions must be (0 mean, unit variance)."""
    chol = torch.linalg.cholesky(cov)
    z = torch.cholesky_solve(mean[..., None], chol)[..., 0]
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (logdet + (mean * z).sum(-1) + mean.shape[-1] * math.log(2 * math.pi))


def _marginal(E: torch.Tensor, C: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the switched-off set, padded to full size with N(0, 1)."""
    o = off.to(C.dtype)
    return E * o, C * o[..., :, None] * o[..., None, :] + torch.diag_embed(1.0 - o)


def _condition(E: torch.Tensor, C: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian conditioned on theta_S = 0 (S = ``off``); S rows and columns become zero."""
    mS, cSS = _marginal(E, C, off)
    o = off.to(C.dtype)
    cRS = C * (1.0 - o)[..., :, None] * o[..., None, :]
    gain = cRS @ torch.cholesky_inverse(torch.linalg.cholesky(cSS))
    keep = 1.0 - o
    mean = (E - (gain @ mS[..., None])[..., 0]) * keep
    cov = (C - gain @ cRS.transpose(-1, -2)) * keep[..., :, None] * keep[..., None, :]
    return mean, cov


def reduce_off(
    qE: torch.Tensor, qC: torch.Tensor, pE: torch.Tensor, pC: torch.Tensor, off: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log evidence and posterior of reduced models that switch parameters off.

    Parameters
    ----------
    qE, qC, pE, pC
        Full posterior and prior, (P,) and (P, P).
    off
        (M, P) boolean: the parameters each of M models switches off (prior fixed at 0).

    Returns
    -------
    dF : torch.Tensor
        (M,) log evidence relative to the full model.
    sE, sC : torch.Tensor
        (M, P) and (M, P, P) reduced posteriors (zero for switched-off parameters).
    """
    M = off.shape[0]
    qE_b, qC_b = qE.expand(M, -1), qC.expand(M, -1, -1)
    pE_b, pC_b = pE.expand(M, -1), pC.expand(M, -1, -1)
    dF = _gauss_logpdf_zero(*_marginal(qE_b, qC_b, off)) - _gauss_logpdf_zero(*_marginal(pE_b, pC_b, off))
    sE, sC = _condition(qE_b, qC_b, off)
    keep = (~off).to(qC.dtype)
    coupling = pC_b * keep[..., :, None] * (1.0 - keep)[..., None, :]
    if bool(coupling.abs().max() > 0):
        cE, cC = _condition(pE_b, pC_b, off)
        rE = pE_b * keep
        rC = pC_b * keep[..., :, None] * keep[..., None, :]
        basis = torch.diag_embed(keep)
        d2, sE, sC = reduce_evidence(sE, sC, cE, cC, rE, rC, basis, keep)
        dF = dF + d2
    return dF, sE, sC


def test_peb_matches_spm(peb, spm) -> None:
    sd = np.sqrt(np.diag(spm["peb_Cp"])).reshape(2, 16).T
    assert np.max(np.abs(peb.Ep - spm["peb_Ep"]) / sd) < 0.02
    np.testing.assert_allclose(peb.Cp, spm["peb_Cp"], rtol=1e-3, atol=1e-3 * np.abs(spm["peb_Cp"]).max())
    np.testing.assert_allclose(peb.Ce, spm["peb_Ce"], rtol=1e-3, atol=1e-3 * np.abs(spm["peb_Ce"]).max())
    assert abs(peb.Eh[0] - spm["peb_Eh"].item()) < 1e-3
    assert peb.Ch[0, 0] == pytest.approx(spm["peb_Ch"].item(), rel=1e-3)
    assert peb.F + _centring(peb) == pytest.approx(spm["peb_F"].item(), abs=1e-3)
    assert peb.F == pytest.approx(spm["centred_peb_F"].item(), abs=1e-3)
    # the covariate effect planted on A(1,2) and A(4,3) is recovered: the largest effects
    effects = peb.Ep[:, 1].reshape(4, 4).T
    assert {tuple(ix) for ix in np.argwhere(effects > 0.1)} >= {(0, 1), (3, 2)}


def test_empirical_bayes_subjects_match_spm(peb, spm) -> None:
    np.testing.assert_allclose(peb.subject_Ep, spm["eb_Ep"], atol=1e-4)
    np.testing.assert_allclose(peb.subject_Cp, spm["eb_Cp"], atol=1e-4 * np.abs(spm["eb_Cp"]).max())
    # SPM's subject F share the same centring difference, split over the subjects
    diff = peb.subject_F - spm["eb_F"].ravel()
    np.testing.assert_allclose(diff, -_centring(peb) / len(diff), atol=1e-3)


def test_one_precision_per_parameter_matches_spm(cohort, spm) -> None:
    post, X = cohort
    peb = fit_peb(post, X, a_parameter_index(4), precision="all")
    sd_h = np.sqrt(np.diag(peb.Ch))
    assert np.max(np.abs(peb.Eh - spm["peb_all_Eh"].ravel()) / sd_h) < 0.02
    sd = np.sqrt(np.diag(spm["peb_all_Cp"])).reshape(2, 16).T
    assert np.max(np.abs(peb.Ep - spm["peb_all_Ep"]) / sd) < 0.02
    # SPM's Hessian of the log precisions is an approximation (expected curvature): 1 nat
    assert peb.F + _centring(peb) == pytest.approx(spm["peb_all_F"].item(), abs=1.0)


def test_greedy_reduction_matches_spm(peb, spm) -> None:
    bma = search_reduced(peb)
    Pp = bma.Pp.T.ravel()
    np.testing.assert_allclose(Pp, spm["bmr_Pp"].ravel(), atol=1e-3)
    np.testing.assert_allclose(np.sort(bma.F), np.sort(spm["bmr_F"].ravel()), atol=1e-3)
    sd = np.sqrt(np.diag(spm["bmr_Cp"]))
    live = Pp > 0  # SPM switches parameters off with a variance of ~1e-8, we with exactly 0
    mc = 4 / math.sqrt(1000)
    assert np.all(np.abs(bma.Ep.T.ravel() - spm["bmr_Ep"].ravel())[live] < mc * sd[live])
    np.testing.assert_allclose(np.sqrt(bma.Vp.T.ravel())[live], sd[live], rtol=4 / math.sqrt(2000))
    assert np.all(bma.Ep.T.ravel()[~live] == 0) and np.all(sd[~live] < 1e-3)


def test_model_space_comparison_matches_spm(peb, spm) -> None:
    cmp = compare_models(peb, spm["bmc_K"])
    np.testing.assert_allclose(cmp.F, spm["bmc_F"], atol=1e-3)
    np.testing.assert_allclose(cmp.P, spm["bmc_P"], atol=1e-5)
    np.testing.assert_allclose(cmp.Pw, spm["bmc_Pw"].ravel(), atol=1e-5)
    np.testing.assert_allclose(cmp.Px, spm["bmc_Px"].ravel(), atol=1e-5)


def test_leave_one_out_matches_spm(cohort, spm) -> None:
    post, X = cohort
    loo = leave_one_out(post, X, a_parameter_index(4))
    sd = np.sqrt(spm["centred_loo_qC"].ravel())
    assert np.max(np.abs(loo.mean - spm["centred_loo_qE"].ravel()) / sd) < 0.05
    np.testing.assert_allclose(loo.variance, spm["centred_loo_qC"].ravel(), rtol=1e-3)
    np.testing.assert_allclose(loo.probability, spm["centred_loo_Q"], atol=0.02)
    # unpatched SPM stops early but is still close
    assert np.max(np.abs(loo.mean - spm["loo_qE"].ravel()) / sd) < 1.0
    np.testing.assert_allclose(loo.variance, spm["loo_qC"].ravel(), rtol=1e-3)
    assert loo.r > 0.7 and loo.p < 1e-3


def test_reduce_evidence_equals_numerical_integral() -> None:
    """dF = log of the integral of q(x) r(x) / p(x), by quadrature in one dimension."""
    qE, qC, pE, pC, rE, rC = 0.3, 0.04, 0.0, 1.0, 0.1, 0.2
    dF, sE, sC = reduce_evidence(*(torch.tensor([[v]], dtype=torch.float64) if i % 2 else
                                   torch.tensor([v], dtype=torch.float64)
                                   for i, v in enumerate((qE, qC, pE, pC, rE, rC))))
    x = np.linspace(-3, 3, 200001)
    pdf = lambda m, v: np.exp(-0.5 * (x - m) ** 2 / v) / np.sqrt(2 * np.pi * v)  # noqa: E731
    integrand = pdf(qE, qC) * pdf(rE, rC) / pdf(pE, pC)
    Z = np.trapezoid(integrand, x)
    assert float(dF) == pytest.approx(math.log(Z), abs=1e-8)
    assert float(sE[0]) == pytest.approx(np.trapezoid(x * integrand, x) / Z, abs=1e-8)
    assert float(sC[0, 0]) == pytest.approx(np.trapezoid((x - float(sE[0])) ** 2 * integrand, x) / Z, abs=1e-8)


def test_switching_off_with_coupled_prior_equals_direct_reduction() -> None:
    """A correlated prior: switching a parameter off equals reduction to a near-point prior."""
    rng = np.random.default_rng(0)
    L = rng.standard_normal((3, 3))
    pC = L @ L.T + np.eye(3)
    qC = np.linalg.inv(np.linalg.inv(pC) + np.diag([4.0, 9.0, 2.0]))
    pE, qE = np.zeros(3), np.array([0.5, -0.2, 0.3])
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    off = torch.tensor([[False, True, False]])
    dF, sE, _ = reduce_off(t(qE), t(qC), t(pE), t(pC), off)
    eps = 1e-9
    rC = pC.copy()
    rC[1, :] = rC[:, 1] = 0.0
    rC[1, 1] = eps
    direct, sE2, _ = reduce_evidence(t(qE), t(qC), t(pE), t(pC), t(pE), t(rC), torch.eye(3, dtype=torch.float64),
                                     torch.ones(3, dtype=torch.float64))
    assert float(dF[0]) == pytest.approx(float(direct), abs=1e-6)
    np.testing.assert_allclose(sE[0].numpy(), sE2.numpy(), atol=1e-6)


def test_peb_recovers_group_effects_from_its_generative_model() -> None:
    """Subjects drawn from the PEB model with calibrated posteriors: effects and precision
    are recovered, and empirical Bayes brings every subject closer to its true parameters."""
    rng = np.random.default_rng(3)
    N, P = 40, 6
    X = np.column_stack([np.ones(N), rng.standard_normal(N)])
    B = np.column_stack([rng.normal(0, 0.2, P), np.r_[0.15, np.zeros(P - 1)]])
    between = 0.05**2
    theta = X @ B.T + rng.normal(0, math.sqrt(between), (N, P))
    pE, pC = np.zeros(P), np.eye(P) / 16
    noise = 0.1**2
    # a Gaussian likelihood with known noise: exact posterior under N(pE, pC)
    data = theta + rng.normal(0, math.sqrt(noise), (N, P))
    Cp = np.linalg.inv(np.linalg.inv(pC) + np.eye(P) / noise)
    Ep = (Cp @ (data / noise).T).T
    post = SubjectPosteriors(Ep, np.tile(Cp, (N, 1, 1)), np.tile(pE, (N, 1)), np.tile(pC, (N, 1, 1)),
                             np.zeros(N), [str(i) for i in range(N)])
    peb = fit_peb(post, X, np.arange(P))
    sd = np.sqrt(np.diag(peb.Cp)).reshape(2, P).T
    assert np.all(np.abs(peb.Ep - B) < 3.5 * sd)
    between_est = np.mean(np.diag(peb.Ce))
    assert 0.25 * between < between_est < 4 * between
    err_single = np.mean((Ep - theta) ** 2)
    err_eb = np.mean((peb.subject_Ep - theta) ** 2)
    assert err_eb < 0.6 * err_single
    bma = search_reduced(peb)
    assert bma.Pp[0, 1] > 0.95 and np.all(bma.Pp[1:, 1] < 0.5)


def test_leave_one_out_null_covariate_is_not_predicted() -> None:
    """A covariate unrelated to the parameters: the out-of-sample r is not significant."""
    rng = np.random.default_rng(5)
    N, P = 16, 4
    X = np.column_stack([np.ones(N), rng.standard_normal(N)])
    theta = rng.normal(0, 0.2, (N, P))
    Cp = np.eye(P) * 0.01
    post = SubjectPosteriors(theta + rng.normal(0, 0.1, (N, P)), np.tile(Cp, (N, 1, 1)), np.zeros((N, P)),
                             np.tile(np.eye(P) / 16, (N, 1, 1)), np.zeros(N), [str(i) for i in range(N)])
    loo = leave_one_out(post, X, np.arange(P))
    assert loo.p > 0.05


def test_bad_inputs_are_named() -> None:
    P = 3
    with pytest.raises(ValueError, match="Cp has shape"):
        SubjectPosteriors(np.zeros((2, P)), np.zeros((2, P)), np.zeros((2, P)), np.zeros((2, P, P)),
                          np.zeros(2), ["a", "b"])
    post = SubjectPosteriors(np.zeros((3, P)), np.tile(np.eye(P), (3, 1, 1)), np.zeros((3, P)),
                             np.tile(np.eye(P), (3, 1, 1)), np.zeros(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="design has shape"):
        fit_peb(post, np.ones((2, 1)), np.arange(P))
    with pytest.raises(ValueError, match="zero for every subject"):
        fit_peb(post, np.column_stack([np.ones(3), np.zeros(3)]), np.arange(P))


def test_tempering_divides_the_likelihood_precision() -> None:
    """One dimension: prior N(0, 1), likelihood N(y; theta, s2); scale k gives N(y; theta, k s2)."""
    from bids_ketdcm.dcm.peb import temper

    y, s2, k = 0.8, 0.01, 9.0
    qC = 1 / (1 + 1 / s2)
    post = SubjectPosteriors(np.array([[qC * y / s2]]), np.array([[[qC]]]), np.zeros((1, 1)), np.ones((1, 1, 1)),
                             np.zeros(1), ["a"])
    hot = temper(post, k)
    C = 1 / (1 + 1 / (k * s2))
    assert hot.Cp[0, 0, 0] == pytest.approx(C, rel=1e-10)
    assert hot.Ep[0, 0] == pytest.approx(C * y / (k * s2), rel=1e-10)
    assert temper(post, 1.0) is post


def _random_models(rng: np.random.Generator, P: int, removed: np.ndarray) -> np.ndarray:
    """Models switching off supersets of ``removed``: singles, small and large random sets."""
    free = np.flatnonzero(~removed)
    models = [removed.copy()]
    for size in (1, 1, 2, 3, 8, len(free) // 2, len(free) - 1):
        m = removed.copy()
        m[rng.choice(free, size, replace=False)] = True
        models.append(m)
    return np.array(models)


@pytest.mark.parametrize("case", ["reference-4", "coupled-9"])
def test_fast_reduction_equals_exact_reduction(case, cohort) -> None:
    """The rank-|S| reduction of the search equals the direct one (Savage-Dickey + reduction
    of the conditioned posterior at O(P^3) per model), from the full model and from a model
    with parameters already switched off, including under the coupled (projected) prior."""
    from bids_ketdcm.dcm.bmr import _base, _evaluate, _switch_off, _tensors
    from bids_ketdcm.testing.peb_cohort import synthetic_posteriors

    if case == "reference-4":
        post, X = cohort
        peb = fit_peb(post, X, a_parameter_index(4), subject_posteriors=False)
    else:
        post, X, _ = synthetic_posteriors(9, 8, seed=2)
        peb = fit_peb(post, X, a_parameter_index(9), subject_posteriors=False)
        assert np.abs(peb.pC - np.diag(np.diag(peb.pC))).max() > 1e-3 * np.diag(peb.pC).max()  # coupled
    qE, qC, pE, pC = _tensors(peb, "cpu")
    rng = np.random.default_rng(1)
    P = qE.shape[0]
    start = np.zeros(P, dtype=bool)
    start[rng.choice(P, P // 3, replace=False)] = True
    for removed in (np.zeros(P, dtype=bool), start):
        models = _random_models(rng, P, removed)
        base = _switch_off(_base(qE, qC, pE, pC, np.ones(P, dtype=bool)), removed)
        dF, sE, sV = _evaluate(base, models)
        ref_dF, ref_sE, ref_sC = reduce_off(qE, qC, pE, pC, torch.as_tensor(models))
        np.testing.assert_allclose(dF.numpy(), ref_dF.numpy(), atol=1e-6, rtol=1e-9)
        sd = np.sqrt(np.diag(peb.Cp))
        assert np.max(np.abs(sE.numpy() - ref_sE.numpy()) / sd) < 1e-6
        np.testing.assert_allclose(sV.numpy(), torch.diagonal(ref_sC, dim1=-2, dim2=-1).numpy(),
                                   atol=1e-8 * sd.max() ** 2)
        assert np.all(sE.numpy()[models] == 0) and np.all(sV.numpy()[models] == 0)


@pytest.mark.parametrize("case", ["reference-4", "coupled-9"])
def test_single_precision_closed_form_equals_autograd(case, cohort) -> None:
    """The spectral closed form of one precision component (value, optimal group parameters,
    first and second derivatives) equals automatic differentiation of the generic objective,
    at and away from the optimum; both optimisers land on the same fit."""
    from bids_ketdcm.dcm.peb import _objective, _problem, _single_precision, _solve, _spectral
    from bids_ketdcm.testing.peb_cohort import synthetic_posteriors

    if case == "reference-4":
        post, X = cohort
        index = a_parameter_index(4)
    else:
        post, X, _ = synthetic_posteriors(9, 8, seed=2)
        index = a_parameter_index(9)
    prob = _problem(post, X, index, "single", "cpu")
    spec = _spectral(prob)
    f = lambda x: _objective(prob, x)[0]  # noqa: E731
    for value in (-3.0, -0.5, 1.0):
        g = torch.tensor([value], dtype=torch.float64)
        L, b, H, grad, hess, _ = _single_precision(prob, spec, g)
        L_ref, b_ref, H_ref = _objective(prob, g)
        assert float(L) == pytest.approx(float(L_ref), abs=1e-8 * abs(float(L_ref)))
        np.testing.assert_allclose(b.numpy(), b_ref.numpy(), atol=1e-9 * np.abs(b_ref.numpy()).max())
        np.testing.assert_allclose(H.numpy(), H_ref.numpy(), rtol=1e-9, atol=1e-9 * np.abs(H_ref.numpy()).max())
        np.testing.assert_allclose(grad.numpy(), torch.autograd.functional.jacobian(f, g).numpy(), rtol=1e-6)
        np.testing.assert_allclose(hess.numpy(), torch.autograd.functional.hessian(f, g).numpy(), rtol=1e-6)
    g0 = torch.zeros(1, dtype=torch.float64)
    fast, ref = _solve(prob, g0, 64, True), _solve(prob, g0, 64, False)
    assert float(fast[0][0]) == pytest.approx(float(ref[0][0]), abs=1e-4)
    for a, r in zip(fast[2:], ref[2:], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-8)


def test_group_subspace_of_the_subjects_own_subspaces() -> None:
    """Both ways into the second level agree: the subjects' own prior subspaces (kept when the
    group basis spans everything) and their subspaces inside a smaller group basis (as
    ``principal_basis(U' pC U)``): same projectors, same objective."""
    from dataclasses import replace

    from bids_ketdcm.dcm.peb import _group_subspace, _objective, _problem, _subject_space, _terms, principal_basis
    from bids_ketdcm.testing.peb_cohort import synthetic_posteriors

    post, X, _ = synthetic_posteriors(10, 6, seed=4)
    index = a_parameter_index(10)
    sub = _subject_space(post, index)
    # a group basis smaller than the parameter space
    U = torch.linalg.qr(torch.as_tensor(np.random.default_rng(0).standard_normal((100, 70))))[0]
    V, mask = _group_subspace(U, sub["W"], sub["v"])
    ref, ref_mask = principal_basis(U.T @ sub["pC"] @ U)
    assert torch.equal(mask.sum(-1), ref_mask.sum(-1))
    np.testing.assert_allclose((V @ V.transpose(-1, -2)).numpy(), (ref @ ref.transpose(-1, -2)).numpy(), atol=1e-8)
    # the full group basis: the subjects' own subspaces against their images through U
    prob = _problem(post, X, index, "single", "cpu")
    assert prob.U.shape[1] == 100
    V2, mask2 = _group_subspace(prob.U, sub["W"], sub["v"])
    terms = _terms(sub["qE"], sub["qC"], sub["pE"], sub["pC"], sub["F"], prob.U @ V2, mask2)
    other = replace(prob, V=V2, mask=mask2, qP=terms["qP"], pP=terms["pP"], a=terms["a"], const=terms["const"])
    for value in (-1.0, 0.5):
        g = torch.tensor([value], dtype=torch.float64)
        L, b, _ = _objective(prob, g)
        L2, b2, _ = _objective(other, g)
        assert float(L) == pytest.approx(float(L2), abs=1e-8 * abs(float(L)))
        np.testing.assert_allclose(b.numpy(), b2.numpy(), atol=1e-10)


def test_empirical_bayes_of_held_out_subjects_is_the_closed_form(cohort) -> None:
    """A PEB of 12 of the 16 reference subjects: the 4 others' posteriors under its empirical prior
    ``N(X Ep', Ce)`` (first-level priors elsewhere) equal the Gaussian closed form computed here in
    numpy, and a fitted subject gets the same posterior as fit_peb's empirical-Bayes one."""
    post, X = cohort
    index = a_parameter_index(4)
    train, test = np.arange(12), np.arange(12, 16)
    peb = fit_peb(post.take(train), X[train], index)
    Ep, Cp, _ = empirical_bayes(peb, post.take(train), X[train])
    np.testing.assert_allclose(Ep, peb.subject_Ep, rtol=0, atol=1e-8 * np.abs(peb.subject_Ep).max())
    np.testing.assert_allclose(Cp, peb.subject_Cp, rtol=0, atol=1e-8 * np.abs(peb.subject_Cp).max())
    Ep, Cp, _ = empirical_bayes(peb, post.take(test), X[test])
    for k, i in enumerate(test):
        pC, pE = post.pC[i], post.pE[i]
        rC, rE = pC.copy(), pE.copy()
        rC[index, :], rC[:, index] = 0.0, 0.0
        rC[np.ix_(index, index)] = peb.Ce
        rE[index] = peb.Ep @ X[i]
        s, vec = np.linalg.eigh(pC)
        V = vec[:, s > 1e-9 * s.max()]  # the prior's support: elsewhere the prior mean stays
        qP, pP, rP = (np.linalg.inv(V.T @ C @ V) for C in (post.Cp[i], pC, rC))
        sC = np.linalg.inv(qP + rP - pP)
        sE = sC @ (qP @ V.T @ post.Ep[i] + rP @ V.T @ rE - pP @ V.T @ pE)
        np.testing.assert_allclose(Ep[k], V @ sE + rE - V @ (V.T @ rE), rtol=0, atol=1e-8)
        np.testing.assert_allclose(Cp[k], V @ sC @ V.T, rtol=0, atol=1e-8 * np.abs(sC).max())
    assert not np.allclose(Ep[:, index], post.Ep[test][:, index])  # the empirical prior moved them
