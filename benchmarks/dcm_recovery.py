"""Parameter recovery of spectral DCM: true vs estimated off-diagonal A on simulated BOLD.

For each network size and scan count, simulates ``--seeds`` subjects from the model
(:func:`bids_ketdcm.dcm.simulate`, TR 2.5 s) with a sparse random coupling matrix per
seed, drawn like the SPM reference cases (self-connections -0.5 Hz; each off-diagonal
connection present with probability 0.4 and then uniform in +-[0.05, 0.4] Hz; redrawn until
stable), inverts them batched with :func:`bids_ketdcm.dcm.fit` under each predicted-CSD
model (``spm12``: SPM12's, with its AR(7) round trip; ``direct``: without it), and prints
one JSON line: per model and (n, scans) the Pearson r between true and estimated
off-diagonal A of each seed, its mean and sd, the pooled r over seeds, the RMSE (Hz), the
variance explained, iterations, convergence and seconds.

Usage: python benchmarks/dcm_recovery.py [--sizes 4 11 15] [--scans 192 512 2000]
[--seeds 5] [--threads 2] [--csd-models spm12 direct]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bids_ketdcm.dcm import fit, simulate


def sparse_coupling(n: int, rng: np.random.Generator, density: float = 0.4) -> np.ndarray:
    """A stable sparse coupling matrix (Hz) like the SPM reference cases."""
    for _ in range(1000):
        magnitude = rng.uniform(0.05, 0.4, (n, n)) * rng.choice([-1.0, 1.0], (n, n))
        A = np.where(rng.random((n, n)) < density, magnitude, 0.0)
        np.fill_diagonal(A, -0.5)
        if np.linalg.eigvals(A).real.max() < -0.05:
            return A
    raise RuntimeError(f"no stable {n}-region coupling matrix drawn")


def recovery(n: int, n_scans: int, seeds: int, rng: np.random.Generator, seed: int,
             csd_models: list[str]) -> dict:
    """Simulate ``seeds`` subjects of ``n`` regions and ``n_scans`` scans; invert; score."""
    truth = np.stack([sparse_coupling(n, rng) for _ in range(seeds)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny integration steps: one thread is fastest
    try:
        y = simulate(truth, 2.5, n_scans, seed=seed)
    finally:
        torch.set_num_threads(threads)
    off = ~np.eye(n, dtype=bool)
    out = {}
    for csd_model in csd_models:
        start = time.perf_counter()
        post = fit(y, 2.5, device="cpu", csd_model=csd_model)
        seconds = time.perf_counter() - start
        est = np.asarray(post.A_hz)
        r = [float(np.corrcoef(truth[k][off], est[k][off])[0, 1]) for k in range(seeds)]
        out[csd_model] = {
            "r_per_seed": [round(x, 3) for x in r],
            "r_mean": round(float(np.mean(r)), 3),
            "r_sd": round(float(np.std(r, ddof=1)), 3),
            "r_pooled": round(float(np.corrcoef(truth[:, off].ravel(), est[:, off].ravel())[0, 1]), 3),
            "rmse_hz": round(float(np.sqrt(np.mean((truth[:, off] - est[:, off]) ** 2))), 3),
            "variance_explained_median": round(float(np.median(post.variance_explained)), 3),
            "iterations": [int(i) for i in np.atleast_1d(post.iterations)],
            "converged": int(np.sum(post.converged)),
            "fit_seconds": round(seconds, 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 11, 15])
    parser.add_argument("--scans", type=int, nargs="+", default=[192, 512, 2000])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csd-models", nargs="+", default=["spm12", "direct"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    out: dict = {"tr": 2.5, "seeds": args.seeds, "results": {}}
    for n in args.sizes:
        for n_scans in args.scans:
            out["results"][f"n{n}_T{n_scans}"] = recovery(n, n_scans, args.seeds, rng, args.seed + 1000 * n + n_scans,
                                                          args.csd_models)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
