"""Where a default spectral DCM inversion's time goes: the cost of each step of an iteration.

For each size (default 4, 15 and 21 regions) the subject of ``benchmarks/dcm_speed.py`` (same
seed, 256 scans) is fitted with the default inversion on one thread (``workers=1``: the
paths run one after the other, so each step's time is its own), with a timer around each
step of the Gauss-Newton loop:

* ``spm_jacobian``: SPM's finite differences (the model at p and at p + step along each of
  the R directions of the reduced parameter space: R + 1 forward models);
* ``exact_jacobian``: the structured forward-mode Jacobian;
* ``element_terms``: the Gram matrix, J^T e and sums of every CSD element;
* ``hyper_loop``: SPM's M-step of the CSD error precisions (up to 8 steps).

Up to 8 regions both paths run as rows of one batch, whose Jacobian steps are timed
together under ``mixed_jacobian``. Prints one JSON line: per size, R, seconds and calls of
each step (a Jacobian's calls are its path's iterations), seconds per forward model of SPM's finite
differences, and the whole fit's seconds (the rest is bookkeeping and the free energy).

``forward_model_ms`` splits one forward model into its stages (milliseconds per model, the
fastest of 7 calls on R + 1 models as SPM's finite differences form them: the fit's posterior
mean, and that mean moved by SPM's step along each of its first R parameters):
``transfer_function`` (32 inverses of n x n complex matrices), ``gain`` (S S^H),
``spectra`` (fluctuations and noise added), ``autocovariance`` (CSD -> 8 lags),
``yule_walker`` (the n p x n p solve) and ``ar_to_csd`` (32 more inverses and two products).

Usage: python benchmarks/dcm_iteration_cost.py [--sizes 4 15 21] [--scans 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from dcm_speed import TR, add_subject_arguments, simulate_subjects

from bids_ketdcm.dcm import fit, model
from bids_ketdcm.dcm.invert import Posterior
from bids_ketdcm.dcm.priors import ParamLayout
from bids_ketdcm.threads import limit_threads

engine = importlib.import_module("bids_ketdcm.dcm.invert")  # the module (the package exports its function)


def _timed(totals: dict, name: Callable[..., str], function: Callable) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            key = name(*args)
            totals[key]["seconds"] += time.perf_counter() - start
            totals[key]["calls"] += 1
    return wrapper


def _jacobian_name(problem, p, idx) -> str:
    spm = problem.spm_rows[idx]
    return "spm_jacobian" if bool(spm.all()) else "exact_jacobian" if not bool(spm.any()) else "mixed_jacobian"


def cost(y: np.ndarray, tr: float) -> dict:
    """Seconds and calls of each step of one default fit of ``y``."""
    totals: dict = defaultdict(lambda: {"seconds": 0.0, "calls": 0})
    originals = {"predict_and_jacobian": engine._Problem.predict_and_jacobian,
                 "_element_terms": engine._element_terms, "_hyper_loop": engine._hyper_loop}
    engine._Problem.predict_and_jacobian = _timed(totals, _jacobian_name, originals["predict_and_jacobian"])
    engine._element_terms = _timed(totals, lambda *a: "element_terms", originals["_element_terms"])
    engine._hyper_loop = _timed(totals, lambda *a: "hyper_loop", originals["_hyper_loop"])
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = fit(y, tr, device="cpu", workers=1)
        seconds = time.perf_counter() - start
    finally:
        engine._Problem.predict_and_jacobian = originals["predict_and_jacobian"]  # type: ignore[method-assign]
        engine._element_terms = originals["_element_terms"]
        engine._hyper_loop = originals["_hyper_loop"]
    steps = {key: {"seconds": round(v["seconds"], 3), "calls": v["calls"]} for key, v in totals.items()}
    R = int(np.linalg.matrix_rank(post.cov))
    out = {"seconds": round(seconds, 3), "R": R, "F_exact": round(float(post.extra["F_exact"]), 4),
           "F_spm": round(float(post.extra["F_spm"]), 4), "path": str(post.extra["path"]), "steps": steps}
    if "spm_jacobian" in totals:
        calls = totals["spm_jacobian"]["calls"]
        out["seconds_per_spm_iteration_jacobian"] = round(totals["spm_jacobian"]["seconds"] / calls, 5)
        out["seconds_per_forward_model"] = round(totals["spm_jacobian"]["seconds"] / calls / (R + 1), 6)
    out["forward_model_ms"] = forward_model_stages(post, R)
    return out


def forward_model_stages(post: Posterior, R: int) -> dict[str, float]:
    """Milliseconds per model of each stage of the forward model, on R + 1 models (see module doc)."""
    n = post.A.shape[-1]
    theta = torch.from_numpy(ParamLayout(n).pack(post.params))
    models = theta.repeat(R + 1, 1)
    models[1:, :R] += math.exp(-8.0) * torch.eye(R, dtype=theta.dtype)
    freqs = torch.from_numpy(post.freqs)
    grid = model.CcfGrid.from_freqs(freqs)
    params = model.unpack(models, n)
    clamp = model.clamped_subjects(params)
    order = model.MODEL_AR_ORDER
    stages: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        stages["transfer_function"] = lambda: model.transfer_function(params, freqs, clamp)
        S = model.transfer_function(params, freqs, clamp)
        stages["gain"] = lambda: model.transfer_gain(S)
        gain = model.transfer_gain(S)
        stages["spectra"] = lambda: model.spectral_density(gain, params, freqs, grid, "direct")
        csd = model.spectral_density(gain, params, freqs, grid, "direct")
        stages["autocovariance"] = lambda: model.csd_to_autocovariance(csd, grid, order)
        cov = model.csd_to_autocovariance(csd, grid, order)
        stages["yule_walker"] = lambda: model.ccf_to_mar(cov, order)
        lags, noise_cov = model.ccf_to_mar(cov, order)
        stages["ar_to_csd"] = lambda: model.mar_to_csd(lags, noise_cov, freqs, grid.ns)
        stages["whole"] = lambda: model.spectral_density(model.transfer_gain(model.transfer_function(
            params, freqs, clamp)), params, freqs, grid, "spm12")
        out = {}
        for name, stage in stages.items():
            stage()
            times = []
            for _ in range(7):
                start = time.perf_counter()
                stage()
                times.append(time.perf_counter() - start)
            out[name] = round(min(times) * 1e3 / (R + 1), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    add_subject_arguments(parser)
    args = parser.parse_args()
    limit_threads(1)
    data = simulate_subjects(args)
    cost(data[args.sizes[0]], TR)  # warm-up: imports, allocator
    print(json.dumps({"scans": args.scans, "sizes": {str(n): cost(y, TR) for n, y in data.items()}}))


if __name__ == "__main__":
    main()
