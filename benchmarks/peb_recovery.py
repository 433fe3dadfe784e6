"""Recovery of subject connectivity with and without empirical Bayes (PEB), and PEB speed.

For each network size, simulates a cohort (default 27 subjects, TR 2.5 s, 192 scans) whose
coupling matrices share a sparse group matrix (drawn as in ``dcm_recovery.py``) plus
subject deviations (sd ``--deviation`` Hz on every off-diagonal connection present in the
group, and a covariate effect ``--effect`` Hz times a standardised covariate on one
connection), inverts every subject with :func:`bids_ketdcm.dcm.fit`, fits PEB on the A
parameters (design: intercept and covariate) and prints one JSON line: per size, the Pearson
r between true and estimated off-diagonal A (each subject's, mean over subjects, and pooled)
for the single-subject posteriors and the empirical-Bayes ones; the same for the subject
deviations from the cohort mean; the covariate effect's posterior probability after model
reduction; the leave-one-out r (p) of the covariate; and the seconds of PEB, model reduction
and leave-one-out (one process, ``--threads`` torch threads). Diagnostics: the r of the group
model's prediction ``X Ep'`` alone, and the share of the true A (departure from the prior
mean) inside each subject's prior subspace (below 1 above 8 regions, where SPM projects the
A prior onto 8 data modes: the rest a single-subject inversion cannot see, and empirical
Bayes fills it with the group prediction).

Empirical Bayes is run as SPM does (``eb_spm``) and on tempered posteriors (``eb_tempered``,
:func:`bids_ketdcm.dcm.peb.temper`), the likelihood scale calibrated on an independent
simulated cohort (``--calibration-subjects``, another seed) as the variance of the errors of
its off-diagonal A in posterior SDs.

Usage: python benchmarks/peb_recovery.py [--sizes 4 15] [--subjects 27] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from dcm_recovery import sparse_coupling

from bids_ketdcm.dcm import fit, simulate
from bids_ketdcm.dcm.bmr import search_reduced
from bids_ketdcm.dcm.loo import leave_one_out
from bids_ketdcm.dcm.peb import (
    SubjectPosteriors,
    a_parameter_index,
    coupling_hz,
    fit_peb,
    posteriors_from_fit,
    principal_basis,
    temper,
)


def cohort(n: int, subjects: int, deviation: float, effect: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Subject coupling matrices (Hz) around a shared sparse group matrix, and the covariate."""
    group = sparse_coupling(n, rng)
    links = np.argwhere((group != 0) & ~np.eye(n, dtype=bool))
    target = tuple(int(v) for v in links[rng.integers(len(links))])
    x = rng.standard_normal(subjects)
    x = (x - x.mean()) / x.std()
    out = np.empty((subjects, n, n))
    for s in range(subjects):
        for _ in range(1000):
            A = group + np.where(group != 0, deviation * rng.standard_normal((n, n)), 0.0)
            A[target] += effect * x[s]
            np.fill_diagonal(A, -0.5)
            if np.linalg.eigvals(A).real.max() < -0.05:
                out[s] = A
                break
        else:
            raise RuntimeError("no stable subject matrix drawn")
    return out, x, target


def _r(truth: np.ndarray, est: np.ndarray) -> dict:
    off = ~np.eye(truth.shape[-1], dtype=bool)
    per = [float(np.corrcoef(t[off], e[off])[0, 1]) for t, e in zip(truth, est, strict=True)]
    dev_t = truth - truth.mean(0)
    dev_e = est - est.mean(0)
    return {
        "r_mean": round(float(np.mean(per)), 3),
        "r_sd": round(float(np.std(per, ddof=1)), 3),
        "r_pooled": round(float(np.corrcoef(truth[:, off].ravel(), est[:, off].ravel())[0, 1]), 3),
        "r_deviation": round(float(np.corrcoef(dev_t[:, off].ravel(), dev_e[:, off].ravel())[0, 1]), 3),
        "rmse_hz": round(float(np.sqrt(np.mean((truth[:, off] - est[:, off]) ** 2))), 4),
    }


def _simulate_and_fit(truth: np.ndarray, scans: int, seed: int, cache: Path | None = None):
    """Simulated time series and their inversions; reused from ``cache`` (a pickle) when given."""
    if cache is not None and cache.exists():
        with cache.open("rb") as fh:
            stored_truth, y, post = pickle.load(fh)
        if np.array_equal(stored_truth, truth):
            return y, post
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny integration steps: one thread is fastest
    try:
        y = simulate(truth, 2.5, scans, seed=seed)
    finally:
        torch.set_num_threads(threads)
    post = fit(y, 2.5, device="cpu")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("wb") as fh:
            pickle.dump((truth, y, post), fh)
    return y, post


def _cache(args: argparse.Namespace, name: str) -> Path | None:
    if args.cache is None:
        return None
    return args.cache / f"{name}-s{args.subjects}-t{args.scans}-seed{args.seed}.pkl"


def calibrate(n: int, args: argparse.Namespace, rng: np.random.Generator) -> float:
    """Likelihood scale: variance of the A errors in posterior SDs on an independent cohort."""
    truth, _, _ = cohort(n, args.calibration_subjects, args.deviation, args.effect, rng)
    _, post = _simulate_and_fit(truth, args.scans, args.seed + 7919 + n, _cache(args, f"calibration-n{n}"))
    off = ~np.eye(n, dtype=bool)
    z = (np.asarray(post.A_hz) - truth)[:, off] / np.sqrt(np.asarray(post.A_var)[:, off])
    return float(np.mean(z**2))


def support_fraction(truth: np.ndarray, subjects: SubjectPosteriors, index: np.ndarray) -> float:
    """Mean share of the true A's departure from the prior mean (SPM's raw parameters) that lies
    in the subject's prior subspace: the rest is invisible to its single-subject inversion
    (1 up to 8 regions; above, SPM projects the A prior onto 8 data modes)."""
    n = truth.shape[-1]
    raw = np.where(np.eye(n, dtype=bool), np.log(np.clip(-2 * truth, 1e-12, None)), truth)
    dev = np.swapaxes(raw, 1, 2).reshape(len(truth), -1) - subjects.pE[:, index]
    W, _ = principal_basis(torch.as_tensor(subjects.pC[:, index][:, :, index]))
    inside = (W @ (W.transpose(-1, -2) @ torch.as_tensor(dev)[..., None]))[..., 0].numpy()
    return float(np.mean(np.sum(inside**2, 1) / np.sum(dev**2, 1)))


def run(n: int, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """One cohort of ``n`` regions: simulate, invert, PEB, model reduction, leave-one-out."""
    scale = calibrate(n, args, rng)
    truth, x, target = cohort(n, args.subjects, args.deviation, args.effect, rng)
    start = time.perf_counter()
    cache = _cache(args, f"cohort-n{n}")
    cached = cache is not None and cache.exists()
    y, post = _simulate_and_fit(truth, args.scans, args.seed + n, cache)
    fit_seconds = time.perf_counter() - start
    subjects = posteriors_from_fit(post, y, [f"sub-{i:02d}" for i in range(args.subjects)])
    X = np.column_stack([np.ones(args.subjects), x])
    index = a_parameter_index(n)
    start = time.perf_counter()
    peb = fit_peb(subjects, X, index)
    peb_seconds = time.perf_counter() - start
    hot = temper(subjects, scale)
    peb_hot = fit_peb(hot, X, index)
    col = target[1] * n + target[0]
    out = {
        "target_link": list(target),
        "converged": int(np.sum(post.converged)),
        "likelihood_scale": round(scale, 1),
        "single_subject": _r(truth, np.asarray(post.A_hz)),
        "eb_spm": _r(truth, coupling_hz(peb.subject_Ep[:, index], n)),
        "single_subject_tempered": _r(truth, coupling_hz(hot.Ep[:, index], n)),
        "eb_tempered": _r(truth, coupling_hz(peb_hot.subject_Ep[:, index], n)),
        "group_prediction": _r(truth, coupling_hz(X @ peb.Ep.T, n)),
        "prior_support_fraction": round(support_fraction(truth, subjects, index), 3),
        "effect_estimate_hz": round(float(peb.Ep[col, 1]), 4),
        "effect_true_hz": args.effect,
        "log_precision": [round(float(v), 3) for v in peb.Eh],
        "fit_seconds": round(fit_seconds, 1),
        "inversions_from_cache": cached,
        "peb_seconds": round(peb_seconds, 2),
    }
    start = time.perf_counter()
    bma = search_reduced(peb)
    bmr_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loo = leave_one_out(subjects, X, index)
    loo_seconds = time.perf_counter() - start
    loo_hot = leave_one_out(hot, X, index)
    return {
        **out,
        "tempered_effect_Pp": round(float(search_reduced(peb_hot).Pp[col, 1]), 3),
        "tempered_loo_r": round(loo_hot.r, 3),
        "tempered_loo_p": float(f"{loo_hot.p:.3g}"),
        "effect_Pp": round(float(bma.Pp[col, 1]), 3),
        "effects_Pp_gt_095": int(np.sum(bma.Pp[:, 1] > 0.95)),
        "loo_r": round(loo.r, 3),
        "loo_p": float(f"{loo.p:.3g}"),
        "bmr_seconds": round(bmr_seconds, 2),
        "loo_seconds": round(loo_seconds, 2),
        "peb_bmr_loo_seconds": round(peb_seconds + bmr_seconds + loo_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 15])
    parser.add_argument("--subjects", type=int, default=27)
    parser.add_argument("--scans", type=int, default=192)
    parser.add_argument("--deviation", type=float, default=0.05)
    parser.add_argument("--effect", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-subjects", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder keeping the simulated cohorts' inversions (reused when the truth matches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    out: dict = {"subjects": args.subjects, "scans": args.scans, "tr": 2.5, "deviation_hz": args.deviation,
                 "threads": args.threads, "results": {}}
    for n in args.sizes:
        out["results"][f"n{n}"] = run(n, args, rng)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
