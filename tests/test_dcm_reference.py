"""The spectral DCM engine against SPM12's own numbers (../shared/spm-reference)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import spm_cases

from bids_ketdcm.dcm import estimate_csd, fit, frequency_grid, invert, predict_csd, scale_timeseries
from bids_ketdcm.dcm.priors import (
    ParamLayout,
    canonical_eigenvectors,
    principal_subspace,
    prior_covariance,
    prior_mean,
    projected_A_covariance,
)

CASES = spm_cases()
FORWARD_CASES = [c for c in CASES if c in ("n04_seed1", "n11_seed1", "n15_seed1")]
POSTERIOR_CASES = [c for c in CASES if c in ("n04_seed1", "n04_seed2", "n11_seed1")]


@pytest.mark.parametrize("name", CASES)
def test_features_reproduce_spm_csd(spm_case_factory, name):
    case = spm_case_factory(name)
    scaled, scale = scale_timeseries(case.ts)
    csd, freqs = estimate_csd(scaled, 2.5)
    ref = case.csd()
    np.testing.assert_allclose(freqs.numpy(), case.freqs, rtol=1e-9)
    np.testing.assert_allclose(frequency_grid(2.5, len(case.ts)), case.freqs, rtol=1e-9)
    assert np.abs(csd.numpy() - ref).max() / np.abs(ref).max() < 1e-6
    if case.has("meta.json"):
        assert scale == pytest.approx(case.meta["scale"], rel=1e-9)


@pytest.mark.parametrize("name", FORWARD_CASES)
@pytest.mark.parametrize("which", ["prior", "test"])
def test_forward_model_reproduces_spm(spm_case_factory, name, which):
    case = spm_case_factory(name)
    theta = prior_mean(case.n) if which == "prior" else case.array("fwd_test_params.txt")
    pred = predict_csd(ParamLayout(case.n).unpack(theta), case.freqs)
    ref = case.csd(f"fwd_{which}_csd.txt")
    assert np.abs(pred - ref).max() / np.abs(ref).max() < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_priors_match_spm(spm_case_factory, name):
    case = spm_case_factory(name)
    n = case.n
    cov = prior_covariance(n, case.ts)
    if case.has("pE.txt"):
        np.testing.assert_array_equal(prior_mean(n), case.array("pE.txt"))
    if case.has("pC_diag.txt"):
        np.testing.assert_allclose(np.diag(cov), case.array("pC_diag.txt"), atol=1e-12)
    if case.has("pC_A.txt"):
        np.testing.assert_allclose(projected_A_covariance(case.ts), case.array("pC_A.txt"), atol=1e-10)
    basis, _ = principal_subspace(cov)
    # SPM keeps every parameter for n <= 8; 64 A modes + 2n + 6 others above
    assert basis.shape[1] == (n * n + 2 * n + 6 if n <= 8 else 64 + 2 * n + 6)


def test_own_basis_is_fixed_by_the_prior_alone(spm_case_factory):
    """Above 8 regions the projected prior's variance 1/64 is shared by 79 directions (64 A
    modes and the spectral parameters), where LAPACK's eigenvectors depend on its threads:
    the engine's own basis is the same (to 1e-10) whatever rotation the eigensolver returns
    inside each eigenspace, and keeps the spectral parameters as unit vectors."""
    case = spm_case_factory("n11_seed1")
    n = case.n
    cov = prior_covariance(n, case.ts)
    values, vectors = np.linalg.eigh(cov)
    rng = np.random.default_rng(1)
    rotated = vectors.copy()
    for value in np.unique(values.round(12)):
        space = np.flatnonzero(np.isclose(values, value, rtol=1e-9, atol=0))
        rotated[:, space] = vectors[:, space] @ np.linalg.qr(rng.normal(size=(space.size, space.size)))[0]
    assert np.abs(rotated - vectors).max() > 0.1
    own_values, own = canonical_eigenvectors(values, vectors)
    _, from_rotated = canonical_eigenvectors(values, rotated)
    np.testing.assert_allclose(from_rotated, own, atol=1e-10)
    np.testing.assert_allclose(own.T @ cov @ own, np.diag(own_values), atol=1e-12)
    basis, variances = principal_subspace(cov)
    assert np.count_nonzero(variances == variances.max()) == 64 + 2 + 2 + n  # A modes, a, b, c
    spectral = ParamLayout(n).slices()
    for name in ("a", "b", "c"):
        rows = np.arange(spectral[name].start, spectral[name].stop)
        assert np.allclose(np.abs(basis[rows]).max(axis=1), 1.0)


def _spm_posterior_check(case, post, max_diff):
    ref_A = case.array("spm_Ep_A.txt")
    r = np.corrcoef(post.A.ravel(), ref_A.ravel())[0, 1]
    assert r >= 0.99
    assert np.abs(post.A - ref_A).max() <= max_diff
    assert abs(post.F - case.meta["F"]) <= 0.01 * abs(case.meta["F"])
    assert post.converged


@pytest.mark.parametrize("name", POSTERIOR_CASES)
def test_spm_emulation_reproduces_spm_posterior(spm_case_factory, name):
    """SPM's finite-difference Jacobian reproduces SPM12's path: same iterations, A, F."""
    case = spm_case_factory(name)
    prior_cov_A = case.array("pC_A.txt") if case.n > 8 else None
    post = invert(case.csd(), case.freqs, prior_cov_A=prior_cov_A, device="cpu", jacobian="finite-difference")
    _spm_posterior_check(case, post, 0.02 if case.n <= 8 else 0.05)
    if case.n <= 8:
        np.testing.assert_allclose(post.A, case.array("spm_Ep_A.txt"), atol=1e-4)
        assert post.F == pytest.approx(case.meta["F"], abs=0.1)
        np.testing.assert_allclose(post.A_var, case.array("spm_Vp_A.txt"), rtol=1e-3)


@pytest.mark.parametrize("name", ["n04_seed2", "n11_seed1"])
def test_autograd_inversion_agrees_with_spm(spm_case_factory, name):
    """The exact-Jacobian path alone (the default also runs SPM's: tests/test_dcm_evidence.py)."""
    case = spm_case_factory(name)
    prior_cov_A = case.array("pC_A.txt") if case.n > 8 else None
    post = invert(case.csd(), case.freqs, prior_cov_A=prior_cov_A, device="cpu", spm_path_check=False)
    _spm_posterior_check(case, post, 0.02 if case.n <= 8 else 0.05)
    np.testing.assert_allclose(np.exp(-post.h.ravel()), case.meta["Eh"], rtol=0.05)


@pytest.mark.parametrize("name", ["n04_seed2", "n11_seed1"])
def test_fit_from_raw_timeseries_agrees_with_spm(spm_case_factory, name):
    case = spm_case_factory(name)
    post = fit(case.ts, 2.5, device="cpu", spm_path_check=False)
    r = np.corrcoef(post.A.ravel(), case.array("spm_Ep_A.txt").ravel())[0, 1]
    assert r >= 0.99
    assert post.scale == pytest.approx(case.meta["scale"])
