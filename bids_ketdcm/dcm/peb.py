"""Parametric empirical Bayes (PEB) over subjects' DCM posteriors, as SPM12's ``spm_dcm_peb``.

The second level is a general linear model of the subjects' parameters,
``theta_i = (x_i kron I) b + e_i``, ``e_i ~ N(0, rC)``, with the group parameters ``b``
(one column of effects per covariate of the design ``X``) and a between-subject precision
``rP = exp(-8) pQ + sum_j exp(g_j) Q_j`` built from precision components ``Q_j``. The
first-level likelihood of a subject enters only through its posterior and prior (Gaussian
Bayesian model reduction, :func:`reduce_evidence`): no DCM is re-inverted. Everything is
batched over subjects in torch (CPU or GPU, float64).

The numbers are those of SPM12 r7771 and its defaults (DESIGN.md section 7):

- the parameters are projected onto the principal subspace ``U`` of the subjects' mean
  prior covariance ``PC`` (eigenvalues ``s`` kept where ``s^2 k / sum(s^2) > 1e-6``);
- with several subjects each posterior precision is increased by a sixteenth of the prior
  precision (SPM12's ``qC = inv(inv(qC) + inv(pC)/16)``);
- group prior: the intercept's effects have mean ``PC``-projected prior mean and every
  column covariance ``PC * n / sum(x^2)``; the precision components are scaled from
  ``pQ = inv(PC / 16)``: one component (``"single"``, SPM's default) or one per parameter
  (``"all"``); log precisions have prior ``N(0, 1/16)``.

The optimum (b, g) is found exactly rather than by SPM's damped Fisher scoring: for fixed
``g`` the objective is quadratic in ``b``, so ``b`` is solved in closed form and ``g`` by
Newton's method on the profile objective, with exact derivatives: in closed form for one
precision component (SPM's default; each subject's terms diagonalise in one basis, see
:func:`_single_precision`), by autograd for one per parameter. Each subject's posterior and
prior are projected once onto its own prior subspace and reused by every fit of the same
cohort (leave-one-out folds). The free energy
is the Laplace approximation ``L(b, g) + logdet(prior precision)/2 - logdet(-Hessian)/2``
with the joint Hessian of ``(b, g)``; SPM12's own value differs from it by
``(b'bP b - (b - bE)'bP (b - bE))/2`` (SPM centres that term on zero, not on the prior mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .csd import scale_timeseries, validate_timeseries
from .invert import Posterior
from .priors import ParamLayout, prior_covariance, prior_mean

#: SPM's threshold of the principal subspace in ``spm_svd`` (relative eigenvalue energy).
SUBSPACE_TOLERANCE = 1e-6
#: Ratio of the group prior covariance of the effects to the mean subject prior (SPM: alpha 1).
GROUP_PRIOR_SCALE = 1.0
#: Between-subject prior covariance = mean subject prior / this (SPM: beta 16).
BETWEEN_SUBJECT_RATIO = 16.0
#: Prior variance of the log precisions (SPM: 1/16).
LOG_PRECISION_VARIANCE = 1.0 / 16.0
#: Floor of the between-subject precision, times ``pQ`` (SPM: exp(-8)).
PRECISION_FLOOR = math.exp(-8.0)
#: Fraction of the prior precision SPM12 adds to each subject's posterior precision.
POSTERIOR_PRECISION_BOOST = 1.0 / 16.0
#: The log precisions are converged when a Newton step gains less than this (nats).
CONVERGENCE_GAIN = 1e-7
PRECISION_MODELS = ("single", "all")


@dataclass
class SubjectPosteriors:
    """First-level DCM posteriors of a cohort, in SPM's flat parameter order.

    Attributes
    ----------
    Ep, Cp
        Posterior means (N, P) and covariances (N, P, P).
    pE, pC
        Prior means (N, P) and covariances (N, P, P) (each subject may have its own prior,
        e.g. SPM's data-dependent projection above 8 regions).
    F
        Free energies (N,).
    names
        Subject labels.
    """

    Ep: np.ndarray
    Cp: np.ndarray
    pE: np.ndarray
    pC: np.ndarray
    F: np.ndarray
    names: list[str]
    #: Per parameter subset: each subject's terms in its own prior subspace
    #: (:func:`_subject_space`), computed once and shared by the subsets :meth:`take` makes
    #: (leave-one-out folds).
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        N, P = np.shape(self.Ep)
        for label, arr, shape in (("Cp", self.Cp, (N, P, P)), ("pE", self.pE, (N, P)),
                                  ("pC", self.pC, (N, P, P)), ("F", self.F, (N,))):
            if np.shape(arr) != shape:
                raise ValueError(f"{label} has shape {np.shape(arr)}, expected {shape}")
        if len(self.names) != N:
            raise ValueError(f"{len(self.names)} names for {N} subjects")
        if not all(np.all(np.isfinite(a)) for a in (self.Ep, self.Cp, self.pE, self.pC, self.F)):
            raise ValueError("subject posteriors contain NaN or infinite values")

    def take(self, rows: np.ndarray) -> SubjectPosteriors:
        """The posteriors of a subset of subjects (``rows`` indexes or a boolean mask)."""
        idx = np.arange(len(self.names))[rows]
        out = SubjectPosteriors(self.Ep[idx], self.Cp[idx], self.pE[idx], self.pC[idx],
                                self.F[idx], [self.names[i] for i in idx])
        rows_t = torch.as_tensor(idx)
        out._cache.update({key: {name: value[rows_t] for name, value in terms.items()}
                           for key, terms in self._cache.items()})
        return out

    def prepare(self, index: np.ndarray) -> SubjectPosteriors:
        """Compute each subject's terms over the parameters ``index`` now, once for every
        subset :meth:`take` makes afterwards (cross-validation folds); returns ``self``."""
        _subject_space(self, index)
        _prior_basis(self)
        return self


@dataclass
class PEBResult:
    """A fitted second-level model (SPM's ``PEB`` structure).

    Attributes
    ----------
    Ep
        Group parameters (Np, Nx): one column of effects per covariate, rows = the selected
        first-level parameters (original space).
    Cp
        Posterior covariance of ``vec(Ep)`` (Np Nx, Np Nx), conditional on the precisions.
    Ce
        Between-subject covariance of the parameters (Np, Np).
    Eh, Ch
        Posterior mean (Ng,) and covariance (Ng, Ng) of the log precisions.
    F
        Free energy of the whole hierarchical model (subjects' included).
    pE, pC
        Prior mean and covariance of ``vec(Ep)`` (what model reduction compares against).
    index
        Positions of the selected parameters in the flat first-level vector.
    X
        The design (N, Nx).
    basis
        ``U`` (Np, K): the principal subspace the model was fitted in.
    subject_Ep, subject_Cp, subject_F
        Empirical-Bayes subject posteriors over the whole first-level vector (N, P),
        (N, P, P) and their free energies (N,): each subject's posterior under the group
        prior ``N(x_i Ep', Ce)`` instead of its first-level prior.
    iterations
        Newton iterations of the log precisions.
    """

    Ep: np.ndarray
    Cp: np.ndarray
    Ce: np.ndarray
    Eh: np.ndarray
    Ch: np.ndarray
    F: float
    pE: np.ndarray
    pC: np.ndarray
    index: np.ndarray
    X: np.ndarray
    basis: np.ndarray
    subject_Ep: np.ndarray
    subject_Cp: np.ndarray
    subject_F: np.ndarray
    iterations: int


def a_parameter_index(n: int) -> np.ndarray:
    """Positions of the n x n A parameters in the flat parameter vector (SPM's order)."""
    return np.arange(ParamLayout(n).slices()["A"].start, ParamLayout(n).slices()["A"].stop)


def posteriors_from_fit(post: Posterior, y: np.ndarray, names: list[str]) -> SubjectPosteriors:
    """The first-level posteriors of a batched :func:`bids_ketdcm.dcm.fit` and their priors.

    Parameters
    ----------
    post
        Batched posterior of B runs.
    y
        (B, T, n) the time series the runs were inverted from (the prior of models with more
        than 8 regions depends on them, as in SPM).
    names
        Subject labels.

    Returns
    -------
    SubjectPosteriors
    """
    y = np.asarray(y, dtype=float)
    n = y.shape[-1]
    pC = np.stack([prior_covariance(n, scale_timeseries(validate_timeseries(run))[0]) for run in y])
    pE = np.tile(prior_mean(n), (y.shape[0], 1))
    return SubjectPosteriors(Ep=ParamLayout(n).pack(post.params), Cp=np.asarray(post.cov, float), pE=pE,
                             pC=pC, F=np.asarray(post.F, float), names=list(names))


def temper(posteriors: SubjectPosteriors, scale: float) -> SubjectPosteriors:
    """The posteriors under each subject's likelihood raised to the power ``1/scale``.

    The Gaussian likelihood implied by a posterior and its prior has precision
    ``qP - pP`` and information ``qP qE - pP pE``; both are divided by ``scale`` and the
    posterior is recomputed under the same prior. ``scale`` > 1 widens overconfident
    posteriors: spectral DCM at 192 scans gives posterior SDs of A several times smaller
    than its errors (SPM12's own too: errors 6-9 posterior SDs on the reference cases), a
    calibration PEB cannot see (its between-subject variance absorbs the error, and the
    empirical prior becomes wider than the first-level one). Measure ``scale`` as the
    variance of the errors in posterior SDs on simulated data of the same acquisition.

    Parameters
    ----------
    posteriors
        First-level posteriors.
    scale
        Likelihood temperature (1: unchanged, SPM).

    Returns
    -------
    SubjectPosteriors
        Free energies unchanged.
    """
    if not scale > 0:
        raise ValueError(f"the likelihood scale must be positive (got {scale})")
    if scale == 1:
        return posteriors
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=float))  # noqa: E731
    pC = t(posteriors.pC)
    V, mask = principal_basis(pC)
    Vt = V.transpose(-1, -2)
    qP, pP = _inv(_project(t(posteriors.Cp), V, mask)), _inv(_project(pC, V, mask))
    q_e = (Vt @ t(posteriors.Ep)[..., None])[..., 0]
    p_e = (Vt @ t(posteriors.pE)[..., None])[..., 0]
    sP = pP + (qP - pP) / scale
    sC = _inv(sP)
    s_e = (sC @ (pP @ p_e[..., None] + (qP @ q_e[..., None] - pP @ p_e[..., None]) / scale))[..., 0]
    pE = t(posteriors.pE)
    Ep = (V @ s_e[..., None])[..., 0] + pE - (V @ (Vt @ pE[..., None]))[..., 0]
    Cp = V @ (sC * mask[..., None, :] * mask[..., :, None]) @ Vt
    return SubjectPosteriors(Ep=Ep.numpy(), Cp=Cp.numpy(), pE=posteriors.pE, pC=posteriors.pC,
                             F=posteriors.F, names=list(posteriors.names))


def principal_basis(cov: torch.Tensor, tol: float = SUBSPACE_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal subspace of covariance matrices, batched, as SPM's ``spm_svd(C, tol)``.

    Parameters
    ----------
    cov
        (..., P, P) symmetric positive semi-definite.
    tol
        Eigenvalue ``s`` kept where ``s^2 P / sum(s^2) > tol``.

    Returns
    -------
    basis : torch.Tensor
        (..., P, R) orthonormal columns, zero-padded to the largest rank R of the batch,
        sorted by decreasing eigenvalue.
    mask : torch.Tensor
        (..., R) 1.0 for real columns, 0.0 for padding.
    """
    s, vec = torch.linalg.eigh((cov + cov.transpose(-1, -2)) / 2)
    s, order = torch.sort(s, dim=-1, descending=True)
    vec = torch.gather(vec, -1, order.unsqueeze(-2).expand_as(vec))
    energy = s.clamp(min=0) ** 2
    keep = energy * s.shape[-1] / energy.sum(-1, keepdim=True).clamp(min=1e-300) > tol
    rank = int(keep.sum(-1).max())
    return vec[..., :rank] * keep[..., None, :rank], keep[..., :rank].to(cov.dtype)


def _project(matrix: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``V' M V`` with identity on the padded columns of ``V``."""
    return basis.transpose(-1, -2) @ matrix @ basis + torch.diag_embed(1.0 - mask)


def _inv(matrix: torch.Tensor) -> torch.Tensor:
    sym = (matrix + matrix.transpose(-1, -2)) / 2
    return torch.cholesky_inverse(torch.linalg.cholesky(sym))


def _logdet(matrix: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.log(torch.diagonal(torch.linalg.cholesky((matrix + matrix.transpose(-1, -2)) / 2),
                                          dim1=-2, dim2=-1)).sum(-1)


def _quad(vec: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return (vec[..., None, :] @ matrix @ vec[..., :, None])[..., 0, 0]


def reduce_evidence(
    qE: torch.Tensor, qC: torch.Tensor, pE: torch.Tensor, pC: torch.Tensor,
    rE: torch.Tensor, rC: torch.Tensor, basis: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian Bayesian model reduction, batched (SPM's ``spm_log_evidence_reduce``).

    Given the posterior ``N(qE, qC)`` under the prior ``N(pE, pC)``, the posterior and the
    change in log evidence under the reduced prior ``N(rE, rC)``, exactly (Gaussian
    likelihood implied by the two Gaussians):
    ``sP = qP + rP - pP``, ``sE = sC (qP qE + rP rE - pP pE)``,
    ``dF = [logdet(rP qP sC pC) - (qE'qP qE + rE'rP rE - pE'pP pE - sE'sP sE)] / 2``.
    Computed in the principal subspace of ``pC`` (directions with zero prior variance
    keep their prior mean).

    Parameters
    ----------
    qE, qC, pE, pC, rE, rC
        (..., P) means and (..., P, P) covariances.
    basis, mask
        Optional principal subspace of ``pC`` from :func:`principal_basis`.

    Returns
    -------
    dF : torch.Tensor
        (...,) log evidence of the reduced model minus that of the full model.
    sE, sC : torch.Tensor
        (..., P) and (..., P, P) reduced posterior.
    """
    if basis is None or mask is None:
        basis, mask = principal_basis(pC)
    Vt = basis.transpose(-1, -2)
    q_e, p_e, r_e = ((Vt @ x[..., None])[..., 0] for x in (qE, pE, rE))
    qP, pP, rP = (_inv(_project(c, basis, mask)) for c in (qC, pC, rC))
    sP = qP + rP - pP
    sC = _inv(sP)
    h = (qP @ q_e[..., None] + rP @ r_e[..., None] - pP @ p_e[..., None])[..., 0]
    s_e = (sC @ h[..., None])[..., 0]
    dF = 0.5 * (_logdet(rP) + _logdet(qP) + _logdet(sC) - _logdet(pP)
                - (_quad(q_e, qP) + _quad(r_e, rP) - _quad(p_e, pP) - _quad(h, sC)))
    sE = (basis @ s_e[..., None])[..., 0] + rE - (basis @ (Vt @ rE[..., None]))[..., 0]
    return dF, sE, basis @ sC @ Vt


def _terms(qE: torch.Tensor, qC: torch.Tensor, pE: torch.Tensor, pC: torch.Tensor, F: torch.Tensor,
           basis: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each subject's posterior and prior in a basis of its subspace: the precisions (the
    posterior's increased by SPM12's sixteenth of the prior's), ``a = qP qE - pP pE`` and
    the part of its evidence that does not depend on the group model."""
    qP = _inv(_project(qC, basis, mask))
    pP = _inv(_project(pC, basis, mask))
    qP = qP + POSTERIOR_PRECISION_BOOST * pP  # SPM12's shrinkage of the subject posteriors
    q_e = (basis.transpose(-1, -2) @ qE[..., None])[..., 0]
    p_e = (basis.transpose(-1, -2) @ pE[..., None])[..., 0]
    a = (qP @ q_e[..., None] - pP @ p_e[..., None])[..., 0]
    const = 0.5 * (_logdet(qP) - _logdet(pP) - _quad(q_e, qP) + _quad(p_e, pP)) + F
    return {"qP": qP, "pP": pP, "a": a, "const": const}


def _subject_space(posteriors: SubjectPosteriors, index: np.ndarray) -> dict[str, torch.Tensor]:
    """The subjects' posteriors and priors over ``index`` and their terms (:func:`_terms`) in
    the principal subspace ``W`` (variances ``v``) of each subject's own prior; cached."""
    key = np.asarray(index, dtype=int).tobytes()
    if key not in posteriors._cache:
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=float))  # noqa: E731
        qE, qC, pE, pC = (t(a)[..., index] if a.ndim == 2 else t(a)[:, index][:, :, index]
                          for a in (posteriors.Ep, posteriors.Cp, posteriors.pE, posteriors.pC))
        W, mask = principal_basis(pC)
        v = torch.diagonal(W.transpose(-1, -2) @ pC @ W, dim1=-2, dim2=-1) * mask
        posteriors._cache[key] = {"qE": qE, "qC": qC, "pE": pE, "pC": pC, "F": t(posteriors.F), "W": W,
                                  "v": v, "mask": mask, **_terms(qE, qC, pE, pC, t(posteriors.F), W, mask)}
    return posteriors._cache[key]


def _prior_basis(posteriors: SubjectPosteriors) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal subspace of each subject's whole prior covariance (:func:`principal_basis`); cached."""
    if "prior basis" not in posteriors._cache:
        basis, mask = principal_basis(torch.as_tensor(np.asarray(posteriors.pC, dtype=float)))
        posteriors._cache["prior basis"] = {"basis": basis, "mask": mask}
    terms = posteriors._cache["prior basis"]
    return terms["basis"], terms["mask"]


def _design_prior(X: torch.Tensor) -> torch.Tensor:
    """SPM's ``Xc``: prior variance scaling of each covariate's effects, n / sum(x^2)."""
    return X.shape[0] / (X**2).sum(0)


@dataclass
class _Problem:
    """A PEB problem in the subjects' own principal subspaces (see :func:`fit_peb`)."""

    X: torch.Tensor       # (N, Nx) design: subject i's prior mean is B x_i, b = vec(B)
    V: torch.Tensor       # (N, K, R): subject subspace inside U
    mask: torch.Tensor    # (N, R)
    qP: torch.Tensor      # (N, R, R)
    pP: torch.Tensor
    a: torch.Tensor       # (N, R): qP qE - pP pE
    const: torch.Tensor   # (N,): qE'qP qE - pE'pP pE and log dets independent of (b, g)
    Q: torch.Tensor       # (Ng, K, K) precision components
    pQ: torch.Tensor      # (K, K)
    bE: torch.Tensor
    bP: torch.Tensor
    gP: torch.Tensor
    U: torch.Tensor       # (Np, K) principal subspace of the mean prior PC
    PE: torch.Tensor      # (Np,) mean prior mean
    PC: torch.Tensor      # (Np, Np) mean prior covariance
    Xc: torch.Tensor      # (Nx,) prior variance scaling of each covariate's effects


def _subject_terms(prob: _Problem, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For log precisions g: each subject's rP, sC and G = rP - rP sC rP (subject space)."""
    rP_U = PRECISION_FLOOR * prob.pQ + torch.einsum("j,jkl->kl", torch.exp(g), prob.Q)
    rC_U = _inv(rP_U)
    rP = _inv(_project(rC_U.expand(prob.V.shape[0], -1, -1), prob.V, prob.mask))
    sC = _inv(prob.qP + rP - prob.pP)
    return rP, sC, rP - rP @ sC @ rP


def _per_subject(prob: _Problem, rP: torch.Tensor, sC: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over subjects of F_i + dF_i: first-level evidence plus the reduction to N(B x_i, rC)."""
    Nx = prob.X.shape[1]
    B = b.reshape(Nx, -1).T
    r = (prob.V.transpose(-1, -2) @ (prob.X @ B.T)[..., None])  # (N, R, 1)
    h = prob.a[..., None] + rP @ r
    per_subject = 0.5 * (_logdet(rP) + _logdet(sC) - (r.transpose(-1, -2) @ rP @ r)[..., 0, 0]
                         + (h.transpose(-1, -2) @ sC @ h)[..., 0, 0]) + prob.const
    return per_subject.sum()


def _objective(prob: _Problem, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Profile objective L(b*(g), g), the optimal b and the Hessian in b (negative).

    With ``r_i = V_i' (x_i' kron I) b`` the objective is quadratic in b, with curvature
    ``bP + sum_i (x_i x_i') kron (V_i G_i V_i')``: assembled from K x K blocks, never from
    the (R, K Nx) maps themselves.
    """
    rP, sC, G = _subject_terms(prob, g)
    c = (rP @ sC @ prob.a[..., None])[..., 0]
    V = prob.V
    M = V @ G @ V.transpose(-1, -2)
    K, Nx = M.shape[-1], prob.X.shape[1]
    H = prob.bP + torch.einsum("na,nb,nkl->akbl", prob.X, prob.X, M).reshape(Nx * K, Nx * K)
    rhs = prob.bP @ prob.bE + torch.einsum("na,nk->ak", prob.X, (V @ c[..., None])[..., 0]).reshape(-1)
    b = torch.linalg.solve(H, rhs)
    d = b - prob.bE
    L = _per_subject(prob, rP, sC, b) - 0.5 * d @ prob.bP @ d - 0.5 * g @ prob.gP @ g
    return L, b, H


Value = Callable[[torch.Tensor], torch.Tensor]
Derivatives = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _autograd_derivatives(objective: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> tuple[Value, Derivatives]:
    """Value and (gradient, Hessian) functions of a scalar objective of the log precisions."""
    value = lambda g: objective(g)[0]  # noqa: E731
    return value, lambda g: (torch.autograd.functional.jacobian(value, g),
                             torch.autograd.functional.hessian(value, g, vectorize=True))


@dataclass
class _Spectral:
    """The single-precision problem diagonalised per subject (see :func:`_single_precision`).

    With one precision component ``pQ`` the between-subject precision is ``k pQ``,
    ``k = exp(-8) + exp(g)``, so each subject's reduced prior precision is ``k P0_i``. In the
    basis ``T_i`` with ``T' P0 T = I`` and ``T' (qP - pP) T = diag(d)`` every subject term
    is a sum of scalar functions of ``k``.
    """

    Y: torch.Tensor       # (N, K, R): V_i T_i^-T, the subject coordinates of group directions
    d: torch.Tensor       # (N, R): likelihood precision relative to P0
    alpha: torch.Tensor   # (N, R): T' a


def _spectral(prob: _Problem) -> _Spectral:
    N = prob.V.shape[0]
    P0 = _inv(_project(_inv(prob.pQ).expand(N, -1, -1), prob.V, prob.mask))
    L = torch.linalg.cholesky(P0)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    omega = Linv @ (prob.qP - prob.pP) @ Linv.transpose(-1, -2)
    d, E = torch.linalg.eigh((omega + omega.transpose(-1, -2)) / 2)
    alpha = (E.transpose(-1, -2) @ Linv @ prob.a[..., None])[..., 0]
    return _Spectral(Y=prob.V @ L @ E, d=d, alpha=alpha)


def _single_precision(prob: _Problem, spec: _Spectral, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Profile objective of one precision component with exact first and second derivatives.

    Per subject and direction ``k``, with ``D = d + k``: the evidence term
    ``(-log(1 + d/k) + alpha^2/D)/2``, and the group parameters enter through
    ``u = Y' B x`` as ``v u - w u^2/2`` with ``v = k alpha/D``, ``w = k d/D``. The optimal
    ``b`` solves ``H b = rhs``; derivatives in ``k`` follow by the envelope theorem, the
    second adding ``gamma' H^-1 gamma`` with ``gamma`` the derivative of the gradient in b.

    Returns
    -------
    tuple of torch.Tensor
        L, b, H (as :func:`_objective`), then dL/dg (1,), d2L/dg2 (1, 1) and the second
        derivative at fixed b (1, 1).
    """
    eg = torch.exp(g[0])
    k = PRECISION_FLOOR + eg
    d, al, Y, X = spec.d, spec.alpha, spec.Y, prob.X
    D = d + k
    w, v = k * d / D, k * al / D
    w1, v1 = (d / D) ** 2, al * d / D**2
    w2, v2 = -2 * d**2 / D**3, -2 * al * d / D**3
    Mw = (Y * w[:, None, :]) @ Y.transpose(-1, -2)
    Kd, Nx = Y.shape[1], X.shape[1]
    H = prob.bP + torch.einsum("na,nb,nkl->akbl", X, X, Mw).reshape(Nx * Kd, Nx * Kd)
    rhs = prob.bP @ prob.bE + torch.einsum("na,nk->ak", X, (Y @ v[..., None])[..., 0]).reshape(-1)
    chol = torch.linalg.cholesky(H)
    b = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
    u = (Y.transpose(-1, -2) @ (X @ b.reshape(Nx, Kd))[..., None])[..., 0]
    gamma = torch.einsum("na,nk->ak", X, (Y @ (v1 - w1 * u)[..., None])[..., 0]).reshape(-1)
    evidence = 0.5 * (al**2 / D - torch.log1p(d / k)).sum()
    d1 = 0.5 * (1 / k - 1 / D - al**2 / D**2).sum() + (v1 * u - 0.5 * w1 * u**2).sum()
    d2_fixed = 0.5 * (1 / D**2 - 1 / k**2 + 2 * al**2 / D**3).sum() + (v2 * u - 0.5 * w2 * u**2).sum()
    d2 = d2_fixed + gamma @ torch.cholesky_solve(gamma[:, None], chol)[:, 0]
    gP = prob.gP[0, 0]
    L = (evidence + prob.const.sum() + 0.5 * b @ rhs - 0.5 * prob.bE @ prob.bP @ prob.bE
         - 0.5 * gP * g[0] ** 2)
    grad = (d1 * eg - gP * g[0]).reshape(1)
    hess = (d2 * eg**2 + d1 * eg - gP).reshape(1, 1)
    hess_fixed = (d2_fixed * eg**2 + d1 * eg - gP).reshape(1, 1)
    return L, b, H, grad, hess, hess_fixed


def _newton(value: Value, derivatives: Derivatives, g0: torch.Tensor, max_iterations: int) -> tuple[torch.Tensor, int]:
    """Maximise the profile objective over the log precisions.

    Saddle-free Newton steps (the Hessian's eigenvalues taken in absolute value, floored),
    scaled so no coordinate moves by more than 1 (as SPM's ``tanh``), halved until the objective rises;
    stops when a step gains, or the quadratic model promises, less than ``CONVERGENCE_GAIN``.
    ``value(g)`` is the objective, ``derivatives(g)`` its gradient and Hessian.
    """
    g = g0.clone()
    current = value(g)
    for it in range(1, max_iterations + 1):
        grad, hess = derivatives(g)
        evals, evecs = torch.linalg.eigh((hess + hess.T) / 2)
        scale = evals.abs().clamp(min=1e-3 * float(evals.abs().max()) + 1e-9)
        step = evecs @ ((evecs.T @ grad) / scale)
        if 0.5 * float(grad @ step) < CONVERGENCE_GAIN:  # the quadratic model promises no gain
            return g, it
        step = step / max(1.0, float(step.abs().max()))
        for _ in range(40):
            new = value(g + step)
            if new > current:
                break
            step = step / 2
        else:
            return g, it
        gain = float(new - current)
        g, current = g + step, new
        if gain < CONVERGENCE_GAIN or float(step.abs().max()) < 1e-10:
            return g, it
    return g, max_iterations


def _group_subspace(U: torch.Tensor, W: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal subspace of each ``U' pC_i U`` from the subject's own ``pC_i = W diag(v) W'``.

    The nonzero eigenvalues of ``B B'`` (``B = U' W diag(v)^1/2``, K x r) are those of
    ``B' B`` (r x r): the same subspace and threshold as :func:`principal_basis` of the
    K x K matrix, at O(K r^2) per subject.
    """
    B = (U.T @ W) * torch.sqrt(v.clamp(min=0))[..., None, :]
    lam, E = torch.linalg.eigh(B.transpose(-1, -2) @ B)
    lam, order = torch.sort(lam, dim=-1, descending=True)
    E = torch.gather(E, -1, order.unsqueeze(-2).expand_as(E))
    energy = lam.clamp(min=0) ** 2
    keep = energy * U.shape[1] / energy.sum(-1, keepdim=True).clamp(min=1e-300) > SUBSPACE_TOLERANCE
    rank = int(keep.sum(-1).max())
    scale = torch.where(keep, 1.0 / torch.sqrt(lam.clamp(min=1e-300)), torch.zeros_like(lam))
    return (B @ E * scale[..., None, :])[..., :rank], keep[..., :rank].to(U.dtype)


def _problem(posteriors: SubjectPosteriors, X: np.ndarray, index: np.ndarray, precision: str,
             device: str | torch.device) -> _Problem:
    """The second-level model of :func:`fit_peb` in the subjects' subspaces, SPM's priors included."""
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=float), device=device)  # noqa: E731
    sub = {name: value.to(device) for name, value in _subject_space(posteriors, index).items()}
    PC = sub["pC"].mean(0)
    PE = sub["pE"].mean(0)
    U, _ = principal_basis(PC)
    K = U.shape[1]
    Ut = U.T
    if K == len(index):  # U rotates the whole space: the subjects' own subspaces are kept
        V, mask, terms = Ut @ sub["W"], sub["mask"], sub
    else:
        V, mask = _group_subspace(U, sub["W"], sub["v"])
        terms = _terms(sub["qE"], sub["qC"], sub["pE"], sub["pC"], sub["F"], U @ V, mask)
    qP, pP, a, const = terms["qP"], terms["pP"], terms["a"], terms["const"]
    Xt = t(X)
    Nx = X.shape[1]
    M_pC = PC / BETWEEN_SUBJECT_RATIO
    pq = _inv(Ut @ M_pC @ U)
    if precision == "single":
        Q = pq[None]
    else:
        pq_full = torch.linalg.pinv(M_pC)
        comps = [Ut @ torch.diag_embed(torch.nn.functional.one_hot(torch.tensor(j), len(index)).to(U) *
                                       pq_full[j, j]) @ U for j in range(len(index))]
        Q = torch.stack([c for c in comps if bool(c.abs().sum() > 0)])
    Xc = _design_prior(Xt)
    bP = _inv(torch.kron(torch.diag(Xc), Ut @ (PC / GROUP_PRIOR_SCALE) @ U))
    bE = torch.cat([Ut @ PE, torch.zeros((Nx - 1) * K, dtype=U.dtype, device=U.device)])
    gP = torch.eye(Q.shape[0], dtype=U.dtype, device=U.device) / LOG_PRECISION_VARIANCE
    return _Problem(X=Xt, V=V, mask=mask, qP=qP, pP=pP, a=a, const=const, Q=Q, pQ=pq, bE=bE,
                    bP=bP, gP=gP, U=U, PE=PE, PC=PC, Xc=Xc)


def _solve(prob: _Problem, g0: torch.Tensor, max_iterations: int, analytic: bool) -> tuple:
    """Optimal log precisions and, there: iterations, L, b, the Hessian in b, the profile
    Hessian in g and the Hessian in g at fixed b. ``analytic``: the closed-form derivatives
    of a single precision component (:func:`_single_precision`); otherwise autograd."""
    if analytic:
        spec = _spectral(prob)
        last: dict[tuple, tuple[torch.Tensor, ...]] = {}

        def evaluate(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            key = tuple(x.tolist())  # Newton asks for the derivatives where it just evaluated
            if key not in last:
                last.clear()
                last[key] = _single_precision(prob, spec, x)
            return last[key]

        g, iterations = _newton(lambda x: evaluate(x)[0], lambda x: (evaluate(x)[3], evaluate(x)[4]), g0,
                                max_iterations)
        L, b, Hbb, _, H_profile, H_fixed = evaluate(g)
    else:
        g, iterations = _newton(*_autograd_derivatives(lambda x: _objective(prob, x)), g0, max_iterations)
        L, b, Hbb = _objective(prob, g)
        H_profile = torch.autograd.functional.hessian(lambda x: _objective(prob, x)[0], g)
        H_fixed = torch.autograd.functional.hessian(lambda x: _fixed_b_objective(prob, x, b), g)
    return g, iterations, L, b, Hbb, H_profile, H_fixed


def fit_peb(
    posteriors: SubjectPosteriors,
    X: np.ndarray,
    index: np.ndarray,
    *,
    precision: str = "single",
    max_iterations: int = 64,
    device: str | torch.device = "cpu",
    subject_posteriors: bool = True,
    start: np.ndarray | None = None,
) -> PEBResult:
    """Fit the second-level model (SPM's ``spm_dcm_peb(P, M, field)``).

    Parameters
    ----------
    posteriors
        The subjects' first-level posteriors.
    X
        (N, Nx) design; the first column is the intercept (ones) whose effects get the
        subjects' prior mean as their prior mean.
    index
        Positions of the parameters modelled at the second level (e.g. the A block).
    precision
        ``"single"`` (one between-subject precision, SPM's default) or ``"all"`` (one per
        parameter).
    max_iterations
        Newton iterations over the log precisions.
    device
        Torch device.
    subject_posteriors
        Also compute the empirical-Bayes subject posteriors (``PEBResult.subject_*``).
    start
        Starting log precisions (default 0, SPM's prior mean); e.g. those of a similar fit.

    Returns
    -------
    PEBResult
    """
    if precision not in PRECISION_MODELS:
        raise ValueError(f"precision must be one of {PRECISION_MODELS}, got {precision!r}")
    X = np.asarray(X, dtype=float)
    N = len(posteriors.names)
    if X.ndim != 2 or X.shape[0] != N:
        raise ValueError(f"design has shape {X.shape}, expected ({N}, covariates)")
    if N < 2:
        raise ValueError("PEB needs at least 2 subjects")
    if np.any((X**2).sum(0) == 0):
        raise ValueError("a covariate of the design is zero for every subject")
    index = np.asarray(index, dtype=int)
    prob = _problem(posteriors, X, index, precision, device)
    U, PC, PE, Xc, bP, bE, gP, Q = prob.U, prob.PC, prob.PE, prob.Xc, prob.bP, prob.bE, prob.gP, prob.Q
    K, Nx, Ut = U.shape[1], X.shape[1], U.T
    g0 = torch.zeros(Q.shape[0], dtype=U.dtype, device=U.device)
    if start is not None:
        g0 = torch.as_tensor(np.asarray(start, dtype=float), device=device)
    g, iterations, L, b, Hbb, H_profile, H_fixed = _solve(prob, g0, max_iterations, precision == "single")
    Cb = _inv(Hbb)
    F = L + 0.5 * (_logdet(bP) + _logdet(gP) - _logdet(Hbb) - _logdet(-H_profile))
    d = b - bE
    complexity = float(L + 0.5 * d @ bP @ d + 0.5 * g @ gP @ g - F)
    Ch = _inv(-H_fixed)
    rP_U = PRECISION_FLOOR * prob.pQ + torch.einsum("j,jkl->kl", torch.exp(g), Q)
    rC_U = _inv(rP_U)
    B = b.reshape(Nx, K).T
    Ub = torch.kron(torch.eye(Nx, dtype=U.dtype, device=U.device), U)
    result = PEBResult(
        Ep=(U @ B).cpu().numpy(), Cp=(Ub @ Cb @ Ub.T).cpu().numpy(), Ce=(U @ rC_U @ Ut).cpu().numpy(),
        Eh=g.detach().cpu().numpy(), Ch=Ch.detach().cpu().numpy(), F=float(F),
        pE=torch.cat([PE, torch.zeros((Nx - 1) * len(index), dtype=U.dtype, device=U.device)]).cpu().numpy(),
        pC=torch.kron(torch.diag(Xc), PC / GROUP_PRIOR_SCALE).cpu().numpy(),
        index=index, X=X, basis=U.cpu().numpy(),
        subject_Ep=np.empty((0,)), subject_Cp=np.empty((0,)), subject_F=np.empty((0,)),
        iterations=iterations,
    )
    if subject_posteriors:
        _empirical_bayes(result, posteriors, complexity, device)
    return result


def _fixed_b_objective(prob: _Problem, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The objective at fixed group parameters (SPM's conditional covariance of g)."""
    rP, sC, _ = _subject_terms(prob, g)
    return _per_subject(prob, rP, sC, b) - 0.5 * g @ prob.gP @ g


def empirical_bayes(peb: PEBResult, posteriors: SubjectPosteriors, X: np.ndarray,
                    device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subjects' posteriors under a fitted PEB's empirical prior, over the whole parameter vector.

    The prior of the modelled parameters ``peb.index`` becomes ``N(Ep x_i, Ce)`` (``x_i`` the
    subject's row of ``X``); every other parameter keeps its first-level prior. Each
    posterior follows from the subject's own first-level posterior and prior by Bayesian
    model reduction (:func:`reduce_evidence`): nothing is refitted, so a subject the PEB was
    not fitted on (held out) gets its posterior under the group prior of the others. For a
    subject the PEB was fitted on it is the empirical-Bayes posterior of
    :func:`fit_peb` (``PEBResult.subject_Ep``, ``subject_Cp``), as SPM's ``spm_dcm_peb``.

    Parameters
    ----------
    peb
        A fitted second-level model.
    posteriors
        First-level posteriors of the subjects (any subjects, with the parameter layout of
        those the PEB was fitted on).
    X
        (N, Nx) their rows of the design (e.g. ones for an intercept-only PEB).
    device
        Torch device.

    Returns
    -------
    Ep : numpy.ndarray
        (N, P) posterior means.
    Cp : numpy.ndarray
        (N, P, P) posterior covariances.
    dF : numpy.ndarray
        (N,) log evidence of the empirical prior minus that of the first-level prior.
    """
    X = np.asarray(X, dtype=float)
    N = len(posteriors.names)
    if X.shape != (N, peb.X.shape[1]):
        raise ValueError(f"design has shape {X.shape}, expected ({N}, {peb.X.shape[1]})")
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=float), device=device)  # noqa: E731
    idx = peb.index
    qE, qC, pE, pC = (t(a) for a in (posteriors.Ep, posteriors.Cp, posteriors.pE, posteriors.pC))
    rE = pE.clone()
    rE[:, idx] = t(X @ peb.Ep.T)
    rC = pC.clone()
    rC[:, idx, :] = 0.0
    rC[:, :, idx] = 0.0
    rC[:, idx[:, None], idx[None, :]] = t(peb.Ce)
    basis, mask = (a.to(device) for a in _prior_basis(posteriors))
    dF, sE, sC = reduce_evidence(qE, qC, pE, pC, rE, rC, basis, mask)
    return sE.cpu().numpy(), sC.cpu().numpy(), dF.cpu().numpy()


def _empirical_bayes(result: PEBResult, posteriors: SubjectPosteriors, complexity: float,
                     device: str | torch.device) -> None:
    """The fitted subjects' empirical-Bayes posteriors (:func:`empirical_bayes`) and free energies.

    The subject's free energy is its reduced evidence plus its first-level free energy
    minus its share of the group complexity ``complexity`` (the Laplace complexity of
    (b, g)), as SPM's ``DCM.F = Fi + iF(i) - Fc/Ns``.
    """
    result.subject_Ep, result.subject_Cp, dF = empirical_bayes(result, posteriors, result.X, device)
    result.subject_F = dF + np.asarray(posteriors.F, dtype=float) - complexity / len(posteriors.names)


def coupling_hz(flat_A: np.ndarray, n: int) -> np.ndarray:
    """Column-major A parameters (..., n^2) as coupling in Hz (..., n, n), rows = targets.

    Between regions the parameter is the coupling; a self-connection ``a`` is SPM's log
    scaling, ``-exp(a)/2`` Hz (as the participant level's connectivity tables).
    """
    flat_A = np.asarray(flat_A, dtype=float)
    A = np.swapaxes(flat_A.reshape(flat_A.shape[:-1] + (n, n)), -1, -2)
    return np.where(np.eye(n, dtype=bool), -np.exp(A) / 2, A)
