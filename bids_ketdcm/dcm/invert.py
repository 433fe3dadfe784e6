"""Variational Laplace inversion of spectral DCM, as SPM12's ``spm_nlsi_GN``.

Gauss-Newton ascent on the free energy with SPM's Levenberg-Marquardt-like step control,
one log-precision hyperparameter per CSD element (i, j), batched over subjects. The
Jacobian of the predicted CSD is exact, not finite differences: by default from a
structured forward-mode pass (:mod:`bids_ketdcm.dcm.jacobian`, all directions of the
prior's principal subspace at once), or from ``torch.func.jvp`` vectorised with
``torch.func.vmap``; both agree to rounding. DESIGN.md section 7 states every rule
reproduced here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.func import jvp, vmap

from bids_ketdcm.threads import task_threads, threads_in_force

from .jacobian import predict_csd_and_jacobian
from .model import (
    CSD_MODELS,
    CcfGrid,
    clamped_subjects,
    effective_connectivity,
    predict_csd_tensor,
    spectral_density,
    transfer_function,
    transfer_gain,
    unpack,
)
from .priors import (
    HYPER_MEAN,
    HYPER_PRECISION,
    ParamLayout,
    basis_variances,
    principal_subspace,
    prior_mean,
    prior_variance,
)

log = logging.getLogger(__name__)

MAX_ITERATIONS = 128
JACOBIANS = ("analytic", "autograd", "finite-difference")
#: Above this many regions the analytic Jacobian carries its tangents in complex64: 2.3x
#: faster at 21 regions, relative error ~1e-6 (SPM's finite differences: ~1e-3).
SINGLE_PRECISION_TANGENTS_ABOVE = 8
_HYPER_STEPS = 8
_HYPER_FLOOR = math.exp(-32.0)
_LOG_STEP_START = -4.0
_CONVERGENCE_GAIN = 1e-1
_CONVERGENCE_RUN = 4
#: Above this many regions SPM's finite-difference models and every path's CSD-element
#: terms are computed in PIECES pieces, on the inversion's worker threads when it has several
#: (:func:`invert`'s ``workers``); the pieces are the same for any thread count.
SPLIT_MODELS_ABOVE = 8
PIECES = 4
#: The exact-Jacobian paths go on past SPM's stop until 4 successive predicted gains are
#: below this: on n11_seed1 this lifts the exact path's free energy by 0.22 nats.
POLISH_GAIN = 1e-3
#: ... but for at most this many iterations past SPM's stop (slow 21-region fits otherwise
#: polish up to the cap).
POLISH_ITERATIONS = 16


class ConvergenceWarning(UserWarning):
    """An inversion reached its iteration cap before SPM's convergence criterion."""


@dataclass
class Posterior:
    """Result of a spectral DCM inversion (batched when several subjects were inverted).

    Attributes
    ----------
    A
        SPM's raw A parameters (..., n, n), rows = targets; diagonal log-scaled.
    A_hz
        Effective coupling in Hz (..., n, n): diagonal ``-exp(A_ii)/2``.
    params
        Every posterior mean by SPM's names (``A``, ``transit``, ``decay``, ``epsilon``,
        ``a``, ``b``, ``c``).
    cov
        Posterior covariance of the flat parameter vector (..., P, P), SPM's order.
    F
        Free energy (log evidence bound) of the kept state.
    h
        Log precisions of the CSD error, (..., n, n).
    iterations
        Gauss-Newton iterations performed.
    converged
        Whether SPM's criterion (4 consecutive small gains) was met.
    predicted_csd, observed_csd
        (..., F, n, n) complex.
    freqs
        (F,) frequencies in Hz.
    F_history
        Free energy of every iteration (NaN where the step was rejected), per subject.
    variance_explained
        ``PSS / (PSS + RSS)`` of the CSD, as SPM's ``spm_dcm_fmri_check``.
    """

    A: np.ndarray
    A_hz: np.ndarray
    params: dict[str, np.ndarray]
    cov: np.ndarray
    F: np.ndarray
    h: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    predicted_csd: np.ndarray
    observed_csd: np.ndarray
    freqs: np.ndarray
    F_history: list[list[float]]
    variance_explained: np.ndarray
    seconds: float = 0.0
    device: str = "cpu"
    scale: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def A_var(self) -> np.ndarray:
        """Posterior variances of the A parameters (..., n, n), rows = targets."""
        n = self.A.shape[-1]
        var = np.diagonal(self.cov, axis1=-2, axis2=-1)[..., : n * n]
        return np.swapaxes(var.reshape(var.shape[:-1] + (n, n)), -1, -2)

    def subject(self, b: int) -> Posterior:
        """The posterior of subject ``b`` of a batched result, unbatched."""
        pick = lambda x: None if x is None else x[b]  # noqa: E731
        return Posterior(
            A=self.A[b], A_hz=self.A_hz[b], params={k: v[b] for k, v in self.params.items()},
            cov=self.cov[b], F=self.F[b], h=self.h[b], iterations=self.iterations[b],
            converged=self.converged[b], predicted_csd=self.predicted_csd[b],
            observed_csd=self.observed_csd[b], freqs=self.freqs, F_history=[self.F_history[b]],
            variance_explained=self.variance_explained[b], seconds=self.seconds,
            device=self.device, scale=pick(self.scale),
            extra={k: v[b] if isinstance(v, np.ndarray) else v for k, v in self.extra.items()},
        )


def _local_step(hessian: torch.Tensor, grad: torch.Tensor, log_time: torch.Tensor) -> torch.Tensor:
    """SPM's ``spm_dx``: ``(expm(t H) - I) H^-1 g`` with ``t = exp(v - logdet(H)/N)``.

    H is symmetric negative definite, so the matrix exponential is taken through its
    eigendecomposition (the same number as the first column of ``expm([[0, 0], [t g,
    t H]])``); above ``t = exp(16)`` SPM takes the plain Newton step ``-pinv(H) g``.
    """
    eigval, eigvec = torch.linalg.eigh(hessian)
    logdet = torch.log(eigval.abs()).sum(-1)  # log |det H|: H is symmetric
    t = torch.exp(log_time - logdet / hessian.shape[-1])
    proj = (eigvec.transpose(-1, -2) @ grad[..., None])[..., 0]
    scaled = torch.expm1(t[:, None] * eigval) / eigval * proj
    newton = -proj / eigval
    coef = torch.where((t > math.exp(16.0))[:, None], newton, scaled)
    return (eigvec @ coef[..., None])[..., 0]


class _Problem:
    """Model, data and priors of one batch of subjects, in the reduced parameter space."""

    def __init__(self, csd: torch.Tensor, freqs: torch.Tensor, mean: torch.Tensor,
                 basis: torch.Tensor, variances: torch.Tensor, jacobian: str = "analytic",
                 csd_model: str = "spm12", spm_rows: torch.Tensor | None = None):
        self.y = csd
        self.freqs = freqs
        self.mean = mean  # (B, P)
        self.basis = basis  # (B, P, R)
        self.ipc = 1.0 / variances  # (B, R)
        self.n = csd.shape[-1]
        self.grid = CcfGrid.from_freqs(freqs)
        self.jacobian = jacobian
        #: (B,) rows that follow SPM's path (finite differences); the others use ``jacobian``
        self.spm_rows = (torch.full((csd.shape[0],), jacobian == "finite-difference", device=csd.device)
                         if spm_rows is None else spm_rows)
        self.csd_model = csd_model
        # directions that move A or the hemodynamics (the first parameters of SPM's order)
        # change the transfer function; the others (spectral parameters) leave it as it is
        transfer_rows = ParamLayout(self.n).slices()["epsilon"].stop
        self.moves_transfer = basis[:, :transfer_rows].ne(0).any(dim=1)  # (B, R)
        #: pieces of the finite-difference models and of the CSD elements (:meth:`in_pieces`)
        #: and the threads that compute them with the calling one
        self.pieces = PIECES if self.n > SPLIT_MODELS_ABOVE else 1
        self.helpers: ThreadPoolExecutor | None = None
        #: flat indices of the CSD elements i <= j, the last axis of the prediction and Jacobian
        self.upper = hermitian_components(self.n, csd.device)[0]
        self._upper_rows, self._upper_cols = self.upper // self.n, self.upper % self.n
        self.y_upper = self.upper_elements(csd)

    def upper_elements(self, x: torch.Tensor) -> torch.Tensor:
        """The CSD elements i <= j (flat indices ``self.upper``) of (..., n, n) spectra or
        their tangents, as (..., Ku): the last axis of the prediction and Jacobian."""
        return x[..., self._upper_rows, self._upper_cols]

    def in_pieces(self, compute: Callable[[slice], tuple[torch.Tensor, ...]], rows: int,
                  dim: int = 0) -> tuple[torch.Tensor, ...]:
        """``compute(slice(0, rows))`` as ``self.pieces`` pieces of rows, concatenated along ``dim``.

        Rows are independent models or CSD elements. The pieces do not depend on the threads,
        so neither do the numbers (batched products round by batch shape): the calling thread
        computes the first piece, the helper threads (``self.helpers``, if any) the others,
        and the calling thread takes back any piece no helper has started.
        """
        if self.pieces == 1:
            return compute(slice(0, rows))
        bounds = np.linspace(0, rows, self.pieces + 1).round().astype(int)
        pieces = [slice(int(a), int(z)) for a, z in zip(bounds[:-1], bounds[1:], strict=True) if z > a]
        if self.helpers is None:
            results = [compute(piece) for piece in pieces]
        else:
            inference = torch.is_inference_mode_enabled()  # thread-local: carried to the helpers

            def on_helper(piece: slice) -> tuple[torch.Tensor, ...]:
                with torch.inference_mode(inference):
                    return compute(piece)

            futures = [self.helpers.submit(on_helper, piece) for piece in pieces[1:]]
            first = compute(pieces[0])
            rest = {i: compute(pieces[i + 1]) for i in reversed(range(len(futures))) if futures[i].cancel()}
            results = [first] + [rest[i] if i in rest else futures[i].result() for i in range(len(futures))]
        return tuple(torch.cat(parts, dim) for parts in zip(*results, strict=True))

    def theta(self, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.mean[idx] + (self.basis[idx] @ p[..., None])[..., 0]

    def predict(self, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        theta = self.theta(p, idx)
        clamp = clamped_subjects(unpack(theta, self.n))
        return predict_csd_tensor(theta, self.freqs, self.n, clamp, self.grid, self.csd_model)

    def predict_and_jacobian(self, p: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction (b, F, Ku) and Jacobian (b, F, R, Ku) w.r.t. reduced parameters.

        Both hold the CSD elements i <= j (flat indices ``self.upper``; the others are their
        conjugates). Rows of ``spm_rows`` take SPM's finite differences, the
        others ``jacobian``:

        ``analytic``: structured forward mode (:mod:`bids_ketdcm.dcm.jacobian`); exact,
        with single-precision tangents above ``SINGLE_PRECISION_TANGENTS_ABOVE`` regions.
        ``autograd``: exact, forward-mode ``jvp`` vectorised over the R basis directions.
        ``finite-difference``: SPM's ``spm_diff`` (forward differences, step exp(-8)),
        all R perturbed models evaluated as one batch; reproduces SPM12's path exactly.
        """
        spm = self.spm_rows[idx]
        if bool(spm.all()):
            return self._finite_differences(p, idx)
        if not bool(spm.any()):
            return self._exact(p, idx)
        parts = self._exact(p[~spm], idx[~spm]), self._finite_differences(p[spm], idx[spm])
        pred, jac = (parts[1][k].new_empty((idx.numel(),) + parts[1][k].shape[1:]) for k in range(2))
        for rows, (pred_rows, jac_rows) in zip((~spm, spm), parts, strict=True):
            pred[rows], jac[rows] = pred_rows, jac_rows
        return pred, jac

    def _exact(self, p: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, basis = self.mean[idx], self.basis[idx]
        theta = mean + (basis @ p[..., None])[..., 0]
        b, R = p.shape
        clamp = clamped_subjects(unpack(theta, self.n))
        if self.jacobian != "autograd":
            single = torch.complex64 if self.n > SINGLE_PRECISION_TANGENTS_ABOVE else None
            pred, jac = predict_csd_and_jacobian(theta, basis, self.freqs, self.n, self.grid, clamp, single,
                                                 self.csd_model)
        else:
            def forward(q: torch.Tensor) -> torch.Tensor:
                return predict_csd_tensor(mean + (basis @ q[..., None])[..., 0], self.freqs, self.n, clamp,
                                          self.grid, self.csd_model)

            tangents = torch.eye(R, dtype=p.dtype, device=p.device)[:, None, :].expand(R, b, R)
            pred, jac = vmap(lambda t: jvp(forward, (p,), (t,)), out_dims=(None, 2))(tangents)  # type: ignore[arg-type,misc]
        return self.upper_elements(pred), self.upper_elements(jac)

    def _finite_differences(self, p: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, basis = self.mean[idx], self.basis[idx]
        theta = mean + (basis @ p[..., None])[..., 0]
        b, R = p.shape
        n, nf = self.n, self.freqs.shape[0]
        # as SPM's spm_diff: the model at p, and at p + step along each basis direction; the
        # directions along spectral parameters share the transfer function (and its gain) of p
        step = math.exp(-8.0)
        models = torch.cat([theta[:, None], theta[:, None] + step * basis.transpose(-1, -2)], dim=1)
        models = models.reshape(b * (R + 1), -1)
        moves = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=p.device), self.moves_transfer[idx]], dim=1)
        moves = moves.flatten()  # (b (R + 1),): the models whose transfer function is not their expansion point's
        row = torch.arange(b, device=p.device).repeat_interleave(R + 1)

        def elements(rows: slice) -> tuple[torch.Tensor]:
            # the transfer gains of the piece's expansion points, then of its models that move them
            first, last = rows.start // (R + 1), (rows.stop - 1) // (R + 1)
            own = moves[rows]
            computed = unpack(torch.cat([theta[first:last + 1], models[rows][own]]), n)
            gain = transfer_gain(transfer_function(computed, self.freqs, clamped_subjects(computed)))
            source = torch.where(own, last - first + torch.cumsum(own, 0), row[rows] - first)
            csd = spectral_density(gain[source], unpack(models[rows], n), self.freqs, self.grid, self.csd_model)
            return (self.upper_elements(csd),)

        (pred,) = self.in_pieces(elements, b * (R + 1))  # (b (R + 1), F, Ku), models in pieces
        pred = pred.reshape(b, R + 1, nf, -1)
        jac = (pred[:, 1:] - pred[:, :1]).div_(step)
        return pred[:, 0], jac.transpose(1, 2)


@task_threads(1)
def invert(
    csd: torch.Tensor | np.ndarray,
    freqs: torch.Tensor | np.ndarray,
    *,
    prior_cov_A: np.ndarray | torch.Tensor | None = None,
    basis: np.ndarray | None = None,
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
    """Invert spectral DCM on given cross-spectral features (SPM12's ``spm_nlsi_GN``).

    Parameters
    ----------
    csd
        (F, n, n) or (B, F, n, n) complex cross-spectra of scaled data
        (:func:`bids_ketdcm.dcm.estimate_csd`).
    freqs
        (F,) frequencies in Hz, equally spaced.
    prior_cov_A
        (n^2, n^2) or (B, n^2, n^2) prior covariance of vec(A) replacing the default
        (needed to reproduce SPM when n > 8; :func:`bids_ketdcm.dcm.fit` builds it).
    basis
        (P, R) or (B, P, R) orthonormal eigenbasis of the prior covariance spanning the
        reduced parameter space, e.g. the ``spm_svd(pC, 0)`` that one SPM run used
        (``scripts/spm/run_spm_csd.m`` records it). Default: :func:`principal_subspace`.
        Above 8 regions the finite-difference path depends on it (DESIGN.md section 7).
    max_iterations
        Iteration cap (SPM: 128).
    device
        Torch device; default CUDA when available, else CPU.
    jacobian
        ``"analytic"`` (exact structured forward mode, default), ``"autograd"`` (exact,
        ``torch.func`` over every direction; slower) or ``"finite-difference"`` (SPM12's
        forward differences with step exp(-8), to reproduce SPM's optimisation path exactly).
    spm_path_check
        With an exact Jacobian, also run SPM's path (finite differences) and keep, per
        subject, the one with the higher free energy: the result is never below SPM's
        optimum. ``extra["path"]`` says which path each subject kept (``"exact"`` or
        ``"spm"``), ``extra["F_exact"]`` and ``extra["F_spm"]`` give both free energies.
    csd_model
        ``"spm12"`` (default: SPM12's prediction with its AR(7) round trip) or ``"direct"``
        (the transfer-function CSD without it; fits 1/f-like data better, not SPM12); see
        :data:`bids_ketdcm.dcm.model.CSD_MODELS`.
    progress
        Log one line per iteration at INFO level.
    on_subject_done
        Called as ``on_subject_done(b, iterations, converged)`` when subject ``b`` of the
        batch has converged, and for the others when the iteration cap is reached (a
        progress bar can advance per subject inside a batch).
    chunk_bytes
        Memory budget of one chunk of subjects on the CPU (default
        :data:`CPU_CHUNK_BYTES`); the numbers depend on it only through rounding.
    workers
        Threads that run the inversion's independent units at once on the CPU: each of
        ``min(B, workers)`` groups of subjects is one unit, and above ``SPLIT_MODELS_ABOVE``
        regions each path (exact, SPM's) of each subject is (up to there a group's two paths are
        rows of one batch in one Gauss-Newton loop: such fits are bound by per-operation overhead). The
        inversion runs on one torch and BLAS thread per unit whatever the process's thread
        counts (:func:`bids_ketdcm.threads.task_threads`), so it uses ``workers`` CPUs and its
        numbers do not depend on those counts; ``extra["workers"]`` records the threads used.
        One subject's numbers do not depend on ``workers`` either, nor above
        ``SPLIT_MODELS_ABOVE`` regions on the other subjects of the batch; up to there a batch's
        are the same to rounding (its groups are batched differently). On a GPU: one unit at a
        time, the whole batch.

    Returns
    -------
    Posterior
        Batched when ``csd`` was (B, F, n, n).
    """
    start = time.perf_counter()
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    if csd_model not in CSD_MODELS:
        raise ValueError(f"csd_model must be one of {CSD_MODELS}, got {csd_model!r}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    y = torch.as_tensor(csd).to(device=dev, dtype=torch.complex128)
    batched = y.dim() == 4
    if not batched:
        y = y[None]
    B, nf, n, _ = y.shape
    f = torch.as_tensor(freqs).to(device=dev, dtype=torch.float64)
    layout = ParamLayout(n)
    pca = None if prior_cov_A is None else np.asarray(torch.as_tensor(prior_cov_A).cpu(), dtype=float)
    if pca is None and n > 8:
        raise ValueError(f"a {n}-region model needs prior_cov_A (SPM's projected prior); use fit()")
    given = None if basis is None else np.asarray(basis, dtype=float)
    bases, variances = [], []
    for b in range(B):
        cov = np.diag(prior_variance(n))
        if pca is not None:
            cov[: n * n, : n * n] = pca[b] if pca.ndim == 3 else pca
        if given is None:
            vec, var = principal_subspace(cov)
        else:
            vec = given[b] if given.ndim == 3 else given
            var = basis_variances(cov, vec)
        bases.append(vec)
        variances.append(var)
    if len({v.size for v in variances}) > 1:
        raise ValueError("subjects of one batch have prior subspaces of different sizes; invert them separately")
    mean = torch.as_tensor(prior_mean(n), device=dev)[None].expand(B, layout.size)
    basis_t = torch.as_tensor(np.stack(bases), device=dev)
    variances_t = torch.as_tensor(np.stack(variances), device=dev)
    problem = _Problem(y, f, mean, basis_t, variances_t, jacobian, csd_model)
    check = spm_path_check and jacobian != "finite-difference"
    paths = ("exact", "spm") if check else ("spm" if jacobian == "finite-difference" else "exact",)
    lanes = max(1, workers) if dev.type == "cpu" else 1
    # above SPLIT_MODELS_ABOVE regions on the CPU every run is a group of its own: its numbers
    # then depend neither on the threads nor on the other runs of the batch (the exact path
    # carries a batch's rounding to 0.1 nat there), at no cost: such fits are not overhead-bound
    alone = dev.type == "cpu" and n > SPLIT_MODELS_ABOVE
    groups = [g for g in torch.arange(B, device=dev).tensor_split(B if alone else min(B, lanes)) if g.numel()]

    # above SPLIT_MODELS_ABOVE regions the pieces of SPM's R + 1 models and of the CSD elements
    # run on `lanes` threads: a path that ends first leaves its thread to the other. Up to there
    # the fit is bound by per-operation overhead: both paths go as rows of one batch instead
    split = lanes > 1 and n > SPLIT_MODELS_ABOVE
    helpers = ThreadPoolExecutor(lanes - 1, thread_name_prefix="dcm-pieces") if split else None
    together = n <= SPLIT_MODELS_ABOVE

    def unit(unit_paths: tuple[str, ...], rows: torch.Tensor) -> dict[str, dict]:
        picked = rows.repeat(len(unit_paths))
        spm_rows = torch.tensor([path == "spm" for path in unit_paths], device=dev).repeat_interleave(rows.numel())
        sub = _Problem(y[picked], f, mean[picked], basis_t[picked], variances_t[picked], jacobian, csd_model,
                       spm_rows)
        sub.helpers = helpers
        labels = [(path, subject) for path in unit_paths for subject in rows.tolist()]
        report = None if on_subject_done is None else tracker.reporter(labels)
        stop_gain = torch.where(spm_rows, _CONVERGENCE_GAIN, POLISH_GAIN).to(torch.float64)
        # no autograd bookkeeping (10% of a 4-region fit's per-operation overhead), except for
        # torch.func's forward-mode Jacobian
        with torch.inference_mode(jacobian != "autograd"):
            state = _gauss_newton(sub, max_iterations, progress, stop_gain, report,
                                  chunk_bytes or CPU_CHUNK_BYTES, "+".join(unit_paths))
        return {path: _select_rows(state, slice(i * rows.numel(), (i + 1) * rows.numel()))
                for i, path in enumerate(unit_paths)}

    tracker = _DoneTracker(paths, on_subject_done)
    jobs = [(paths, rows) for rows in groups] if together else [((path,), rows) for rows in groups for path in paths]
    try:
        if lanes > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=min(lanes, len(jobs)), thread_name_prefix="dcm") as pool:
                results = list(pool.map(lambda job: unit(*job), jobs))
        else:
            results = [unit(*job) for job in jobs]
    finally:
        if helpers is not None:
            helpers.shutdown()
    states = {path: _merge_states([(rows, result[path]) for (_, rows), result in zip(jobs, results, strict=True)
                                   if path in result], B) for path in paths}
    state = states[paths[0]]
    path = np.full(B, paths[0])
    F_exact = F_spm = None
    if check:
        F_exact, F_spm = states["exact"]["best"]["F"].cpu().numpy(), states["spm"]["best"]["F"].cpu().numpy()
        state = _keep_higher_evidence(states["exact"], states["spm"])
        path = np.where(F_spm > F_exact, "spm", "exact")
    post = _posterior(problem, state, nf)
    post.seconds = time.perf_counter() - start
    post.device = str(dev)
    post.extra["path"] = path
    if F_exact is not None:
        post.extra["F_exact"], post.extra["F_spm"] = F_exact, F_spm
    post.extra["jacobian"] = jacobian
    post.extra["workers"] = min(lanes, len(jobs))
    post.extra["threads"] = threads_in_force()
    post.extra["csd_model"] = csd_model
    if not batched:
        post = post.subject(0)
    return post


class _DoneTracker:
    """Reports each subject once, when every path has stopped for it, with the path kept.

    The units of :func:`invert` call :meth:`reporter`'s callbacks from their threads; the
    kept path is the one with the higher free energy (the first path on ties), as in
    :func:`_keep_higher_evidence`.
    """

    def __init__(self, paths: tuple[str, ...], on_subject_done: Callable[[int, int, bool], None] | None):
        self.paths = paths
        self.on_subject_done = on_subject_done
        self.lock = threading.Lock()
        self.stopped: dict[int, dict[str, tuple[int, bool, float]]] = {}

    def reporter(self, labels: list[tuple[str, int]]) -> Callable[[int, int, bool, float], None]:
        """The callback of one unit whose row b is the path and subject ``labels[b]``:
        ``(row, iterations, converged, F)``."""
        def report(b: int, k: int, converged: bool, F: float) -> None:
            path, subject = labels[b]
            with self.lock:
                ends = self.stopped.setdefault(subject, {})
                ends[path] = (k, converged, F)
                if len(ends) == len(self.paths) and self.on_subject_done is not None:
                    kept = max(self.paths, key=lambda name: ends[name][2])
                    self.on_subject_done(subject, ends[kept][0], ends[kept][1])
        return report


def _select_rows(state: dict, rows: slice) -> dict:
    """The state (of :func:`_gauss_newton`) of some of its rows."""
    return {"best": {key: value[rows] for key, value in state["best"].items()},
            "iterations": state["iterations"][rows], "converged": state["converged"][rows],
            "history": state["history"][rows]}


def _merge_states(parts: list[tuple[torch.Tensor, dict]], B: int) -> dict:
    """One state of :func:`_gauss_newton` for all B subjects from those of groups of them."""
    first = parts[0][1]
    merged: dict = {
        "best": {key: value.new_empty((B,) + value.shape[1:]) for key, value in first["best"].items()},
        "iterations": first["iterations"].new_empty(B),
        "converged": first["converged"].new_empty(B),
        "history": [[] for _ in range(B)],
    }
    for rows, state in parts:
        for key, value in state["best"].items():
            merged["best"][key][rows] = value
        merged["iterations"][rows] = state["iterations"]
        merged["converged"][rows] = state["converged"]
        for b, trace in zip(rows.tolist(), state["history"], strict=True):
            merged["history"][b] = trace
    return merged


def _keep_higher_evidence(exact: dict, spm: dict) -> dict:
    """Per subject, the state (of :func:`_gauss_newton`) whose free energy is higher."""
    take = spm["best"]["F"] > exact["best"]["F"]
    best = {key: torch.where(_expand(take, value), spm["best"][key], value) for key, value in exact["best"].items()}
    pick = take.tolist()
    return {
        "best": best,
        "iterations": torch.where(take, spm["iterations"], exact["iterations"]),
        "converged": torch.where(take, spm["converged"], exact["converged"]),
        "history": [s if t else e for e, s, t in zip(exact["history"], spm["history"], pick, strict=True)],
    }


def _gauss_newton(problem: _Problem, max_iterations: int, progress: bool, stop_gain: torch.Tensor,
                  on_subject_done: Callable[[int, int, bool, float], None] | None = None,
                  chunk_bytes: int | None = None, name: str = "") -> dict:
    """Run SPM's variational Laplace loop for every row (a subject on one path) until each has converged.

    ``converged`` is SPM's criterion (4 successive predicted gains below 0.1); row b stops
    once 4 successive gains are below ``stop_gain[b]`` (SPM's path: the same 0.1) or
    ``POLISH_ITERATIONS`` after SPM's criterion was met, or at the cap.

    Each iteration updates the active subjects in chunks (:func:`_chunk_size`); subjects
    are independent, so chunking changes numbers only through rounding (batched products).
    ``name`` (the path) labels the progress lines.
    """
    y, dev = problem.y, problem.y.device
    B, nf, n, _ = y.shape
    K = n * n
    R = problem.ipc.shape[-1]
    ipc = problem.ipc
    upper, weight = problem.upper, hermitian_components(n, dev)[2]
    pairs = torch.triu_indices(R, R, device=dev)
    mirror = hermitian_components(R, dev)[1]  # an R x R symmetric matrix from its entries `pairs`
    p = torch.zeros(B, R, dtype=torch.float64, device=dev)
    h = torch.full((B, upper.numel()), HYPER_MEAN, dtype=torch.float64, device=dev)
    v = torch.full((B,), _LOG_STEP_START, dtype=torch.float64, device=dev)
    best = {
        "p": p.clone(), "h": h.clone(), "F": torch.full((B,), -math.inf, dtype=torch.float64, device=dev),
        "Cp": torch.zeros(B, R, R, dtype=torch.float64, device=dev),
        "g": torch.zeros(B, R, dtype=torch.float64, device=dev),
        "H": torch.zeros(B, R, R, dtype=torch.float64, device=dev),
    }
    run = torch.zeros(B, dtype=torch.long, device=dev)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    polish_run = torch.zeros(B, dtype=torch.long, device=dev)
    converged_at = torch.full((B,), max_iterations + POLISH_ITERATIONS, dtype=torch.long, device=dev)
    history: list[list[float]] = [[] for _ in range(B)]
    n_data = nf * K
    chunk = _chunk_size(problem, chunk_bytes or CPU_CHUNK_BYTES)
    for k in range(1, max_iterations + 1):
        active = torch.nonzero(~stopped).flatten()
        if active.numel() == 0:
            break
        iterations[active] = k
        for idx in active.split(chunk):
            # CSD, prediction and Jacobian are Hermitian: element (j, i) is the conjugate of
            # (i, j), with the same Gram matrix, residual norm and hyperparameter; only the
            # elements i <= j are formed, and sums over elements weigh the others twice
            pred, jac = problem.predict_and_jacobian(p[idx], idx)  # (b, F, Ku), (b, F, R, Ku)
            err = problem.y_upper[idx] - pred
            er = torch.view_as_real(err).permute(0, 2, 1, 3).reshape(-1, upper.numel(), 2 * nf)
            # (b, Ku, R (R + 1) / 2), (b, Ku, R), (b, Ku): on the helper threads above 8 regions
            gram, jte, j_sum = problem.in_pieces(partial(_element_terms, jac, er, pairs), upper.numel(), dim=1)
            finite = torch.isfinite(er.sum(dim=(1, 2))) & torch.isfinite(j_sum.sum(dim=1))
            if not bool(finite.all()):  # a non-finite prediction or Jacobian: no data terms, rejected below
                er = torch.where(finite[:, None, None], er, torch.zeros_like(er))
                gram = torch.where(finite[:, None, None], gram, torch.zeros_like(gram))
                jte = torch.where(finite[:, None, None], jte, torch.zeros_like(jte))
            err2 = (er * er).sum(-1)  # (b, Ku)
            pk, hk, ipck = p[idx], h[idx].clone(), ipc[idx]
            saved = _hyper_loop(hk, gram, pairs, mirror, err2, ipck, nf, weight)
            hk = saved["h_new"]
            # free energy with the quantities of the start of the last inner step
            prec, cp, h_used, curv = saved["prec"], saved["Cp"], saved["h"], saved["curv"]
            L1 = (nf * (weight * torch.log(prec)).sum(-1) / 2 - (weight * prec * err2).sum(-1) / 2
                  - n_data * math.log(2 * math.pi) / 2)
            L2 = (torch.log(ipck).sum(-1) + torch.linalg.slogdet(cp)[1]) / 2 - (pk * pk * ipck).sum(-1) / 2
            d = h_used - HYPER_MEAN
            L3 = ((weight * torch.log(HYPER_PRECISION / (-curv))).sum(-1) / 2
                  - HYPER_PRECISION * (weight * d * d).sum(-1) / 2)
            F = L1 + L2 + L3
            F = torch.where(finite, F, torch.full_like(F, -math.inf))
            accept = (F > best["F"][idx]) | (k < 3)
            accept &= finite
            a_idx, r_idx = idx[accept], idx[~accept]
            if a_idx.numel():
                am = accept
                best["p"][a_idx] = pk[am]
                best["h"][a_idx] = hk[am]
                best["F"][a_idx] = F[am]
                best["Cp"][a_idx] = cp[am]
                best["g"][a_idx] = torch.einsum("bk,bkr->br", weight * prec[am], jte[am]) - ipck[am] * pk[am]
                best["H"][a_idx] = -(saved["Pp"][am] + torch.diag_embed(ipck[am]))
                v[a_idx] = torch.clamp(v[a_idx] + 0.5, max=4.0)
                h[a_idx] = hk[am]
            if r_idx.numel():
                h[r_idx] = best["h"][r_idx]
                v[r_idx] = torch.clamp(v[r_idx] - 2.0, max=-4.0)
            for b, value, taken in zip(idx.tolist(), F.tolist(), accept.tolist(), strict=True):
                history[b].append(value if taken else float("nan"))
            dp = _local_step(best["H"][idx], best["g"][idx], v[idx])
            p[idx] = best["p"][idx] + dp
            gain = (best["g"][idx] * dp).sum(-1)
            run[idx] = torch.where(gain < _CONVERGENCE_GAIN, run[idx] + 1, torch.zeros_like(run[idx]))
            converged[idx] |= run[idx] >= _CONVERGENCE_RUN
            converged_at[idx] = torch.where(converged[idx], torch.clamp(converged_at[idx], max=k), converged_at[idx])
            polish_run[idx] = torch.where(gain < stop_gain[idx], polish_run[idx] + 1, torch.zeros_like(run[idx]))
            stopped[idx] = (polish_run[idx] >= _CONVERGENCE_RUN) | (k >= converged_at[idx] + POLISH_ITERATIONS)
            if on_subject_done is not None:  # the chunk's subjects were active: those stopped now are done
                for b in idx[stopped[idx]].tolist():
                    on_subject_done(b, k, bool(converged[b]), float(best["F"][b]))
            if progress:
                log.info("%siteration %d: %d active, F = %s", f"{name} path, " if name else "", k, idx.numel(),
                         np.array2string(best["F"][idx].cpu().numpy(), precision=2))
    if on_subject_done is not None:  # stopped by the iteration cap
        for b in torch.nonzero(~stopped).flatten().tolist():
            on_subject_done(b, int(iterations[b]), bool(converged[b]), float(best["F"][b]))
    return {"best": best, "iterations": iterations, "converged": converged, "history": history}


#: Budget (bytes) of one chunk of subjects on the CPU, counted as n^2 R x R float64
#: matrices per subject (the Gram matrices of every CSD element; the Hermitian halving and
#: the Jacobian's own tangents are left out of the count, keeping it conservative). Bigger
#: temporaries cost page faults at every allocation: on 2 cores, 8 subjects of 15 regions
#: in one chunk took twice as long per subject as 1, 2 or 4.
CPU_CHUNK_BYTES = 64 * 2**20


def _chunk_size(problem: _Problem, chunk_bytes: int = CPU_CHUNK_BYTES) -> int:
    """Subjects per chunk: all of them on a GPU; on the CPU as many as fit ``chunk_bytes``."""
    B, _, n, _ = problem.y.shape
    if problem.y.device.type != "cpu":
        return B
    R = problem.ipc.shape[-1]
    return max(1, min(B, chunk_bytes // (n * n * R * R * 8)))


def _element_terms(jac: torch.Tensor, er: torch.Tensor, pairs: torch.Tensor,
                   elements: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data terms of some CSD elements i <= j (``elements`` of the Jacobian's last axis).

    Each element's Jacobian in real form (rows: real and imaginary parts of the frequencies)
    gives its Gram matrix (symmetric: the upper triangle, entries ``pairs``), ``J^T e`` with
    its error ``er`` (b, Ku, 2F), and its sum (to find non-finite Jacobians). ``jac`` is
    (b, F, R, Ku). Returns (b, k, R (R + 1) / 2), (b, k, R) and (b, k) for the k elements.
    """
    b, nf, R, _ = jac.shape
    jr = torch.view_as_real(jac[..., elements]).permute(0, 3, 1, 4, 2)
    jr = jr.to(torch.float64, memory_format=torch.contiguous_format).reshape(b, -1, 2 * nf, R)
    jt = jr.transpose(-1, -2)
    return (jt @ jr)[..., pairs[0], pairs[1]], (jt @ er[:, elements, :, None])[..., 0], jr.sum(dim=(2, 3))


def _hyper_loop(h: torch.Tensor, gram: torch.Tensor, pairs: torch.Tensor, mirror: torch.Tensor, err2: torch.Tensor,
                ipc: torch.Tensor, nf: int, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Up to 8 Newton-like updates of the CSD error log-precisions (SPM's M-step).

    ``h``, ``gram`` and ``err2`` hold the CSD elements i <= j; ``weight`` (1 on the
    diagonal, 2 above) counts each with its conjugate twin in sums over elements.
    ``gram`` holds the upper triangles (entries ``pairs``, from ``torch.triu_indices``)
    of the symmetric Gram matrices: half the memory read at each step; ``mirror`` (R^2,)
    gives the position in ``pairs`` of every entry of an R x R matrix or of its transpose.
    Returns the quantities of the start of each subject's last inner step (used for the
    free energy and the E-step) and the updated hyperparameters ``h_new``.
    """
    rows, cols = pairs
    # halves of SPM's terms, formed from halved factors (the same numbers: halving is exact):
    # tr(C G) / 2 = sum over i <= j of C_ij G_ij, halved on the diagonal
    half_once = torch.where(rows == cols, 0.5, 1.0).to(gram.dtype)
    half_err2, half_nf = err2 / 2, nf / 2
    prior = torch.diag_embed(ipc)
    active = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    every = True  # whether every subject steps in the next inner step
    start = h
    for _ in range(_HYPER_STEPS):
        stepped_all = every
        eh, prec, Pp, cp = _precisions(h, gram, mirror, prior, weight)
        ratio = eh / prec
        half_trace = (gram @ (cp[:, rows, cols] * half_once)[..., None])[..., 0]
        dFdh = half_nf * ratio - eh * half_err2 - half_trace * eh - HYPER_PRECISION * (h - HYPER_MEAN)
        curv = -half_nf * ratio * ratio - HYPER_PRECISION
        step = torch.expm1(math.exp(4.0) * curv) / curv * dFdh
        step = torch.clamp(step, -1.0, 1.0)
        stepping = active
        if every:
            start, h = h, h + step
        else:
            start = torch.where(stepping[:, None], h, start)
            h = torch.where(stepping[:, None], h + step, h)
        gain = (weight * dFdh * step).sum(-1)
        active = stepping & (gain >= 1e-2)
        still = int(active.sum())
        if still == 0:
            break
        every = still == active.numel()
    if not stepped_all:  # some subjects took their last step earlier: their quantities again
        eh, prec, Pp, cp = _precisions(start, gram, mirror, prior, weight)
        ratio = eh / prec
        curv = -half_nf * ratio * ratio - HYPER_PRECISION
    return {"prec": prec, "Cp": cp, "Pp": Pp, "h": start, "curv": curv, "h_new": h}


def _precisions(h: torch.Tensor, gram: torch.Tensor, mirror: torch.Tensor, prior: torch.Tensor,
                weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``exp(h)``, the CSD error precisions, the data's precision of the parameters ``Pp`` and
    the posterior covariance ``Cp = (Pp + prior)^-1`` (symmetrised) for log-precisions ``h``."""
    eh = torch.exp(h)
    prec = _HYPER_FLOOR + eh
    upper = ((weight * prec)[:, None] @ gram)[:, 0]
    Pp = upper.index_select(1, mirror).view(prior.shape)
    cp = torch.linalg.inv_ex(Pp + prior).inverse  # Pp + prior is positive definite
    return eh, prec, Pp, (cp + cp.transpose(-1, -2)) / 2


def hermitian_components(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSD elements i <= j of an n x n Hermitian matrix, flattened row-major.

    Returns
    -------
    upper : torch.Tensor
        (n (n + 1) / 2,) flat indices ``i n + j`` with i <= j.
    mirror : torch.Tensor
        (n^2,) for every flat index, the position in ``upper`` of it or of its transpose.
    weight : torch.Tensor
        (n (n + 1) / 2,) 1.0 on the diagonal, 2.0 above it.
    """
    i, j = torch.triu_indices(n, n, device=device)
    upper = i * n + j
    position = torch.empty(n, n, dtype=torch.long, device=device)
    position[i, j] = torch.arange(upper.numel(), device=device)
    position[j, i] = position[i, j]
    weight = torch.where(i == j, 1.0, 2.0).to(torch.float64)
    return upper, position.reshape(-1), weight


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


def _subject_posterior(problem: _Problem, best: dict, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parameters (1, P), predicted CSD (1, F, n, n) and posterior covariance (1, P, P) of subject b."""
    idx = torch.tensor([b], device=problem.y.device)
    p, basis = best["p"][idx], problem.basis[idx]
    with torch.no_grad():
        pred = problem.predict(p, idx)
    return problem.theta(p, idx), pred, basis @ best["Cp"][idx] @ basis.transpose(-1, -2)


def _posterior(problem: _Problem, state: dict, nf: int) -> Posterior:
    """Assemble the posterior of the kept state in SPM's full parameter space."""
    best = state["best"]
    B = problem.y.shape[0]
    n = problem.n
    # one subject at a time, on copies: a batched product rounds a matrix by its place in the
    # batch (its memory alignment), and a run's numbers must not depend on its batch
    theta, pred, cov = (torch.cat(parts) for parts in zip(*(_subject_posterior(problem, best, b) for b in range(B)),
                                                          strict=True))
    params = {k: v.cpu().numpy() for k, v in unpack(theta, n).items()}
    resid = (problem.y - pred).abs().pow(2).sum(dim=(1, 2, 3))
    pss = pred.abs().pow(2).sum(dim=(1, 2, 3))
    converged = state["converged"].cpu().numpy()
    if not converged.all():
        warnings.warn(
            f"{int((~converged).sum())} of {B} DCM inversions reached the iteration cap "
            "without converging (converged=False)", ConvergenceWarning, stacklevel=3,
        )
    return Posterior(
        A=params["A"],
        A_hz=effective_connectivity(unpack(theta, n)["A"]).cpu().numpy(),
        params=params,
        cov=cov.cpu().numpy(),
        F=best["F"].cpu().numpy(),
        h=best["h"][:, hermitian_components(n, problem.y.device)[1]].reshape(B, n, n).cpu().numpy(),
        iterations=state["iterations"].cpu().numpy(),
        converged=converged,
        predicted_csd=pred.cpu().numpy(),
        observed_csd=problem.y.cpu().numpy(),
        freqs=problem.freqs.cpu().numpy(),
        F_history=state["history"],
        variance_explained=(pss / (pss + resid)).cpu().numpy(),
    )
