"""21-region spectral DCM on simulated subjects: share converged within SPM's 128 iterations.

Each subject's series is simulated from its own sparse coupling matrix
(:func:`bids_ketdcm.testing.fixtures.random_coupling`) and fitted with the default inversion (exact path plus
SPM's path, the higher evidence kept) under the app's default thread policy (one thread
per task, the two paths at once on every CPU of this machine; ``--serial``: one thread). Prints one
JSON line: subjects, share converged (SPM's criterion), iterations, seconds per subject
(wall clock and CPU: on a shared machine the wall clock also counts other jobs' time), the
load average at start and end, and which path was kept.

Usage: python benchmarks/dcm_21.py [--subjects 10] [--regions 21] [--scans 256] [--seed 0] [--serial]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np

from bids_ketdcm.dcm import fit, simulate
from bids_ketdcm.testing.fixtures import random_coupling
from bids_ketdcm.threads import limit_threads, resolve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--regions", type=int, default=21)
    parser.add_argument("--scans", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serial", action="store_true", help="one thread (--nprocs 1)")
    args = parser.parse_args()
    policy = resolve(1, 1) if args.serial else resolve()
    limit_threads(policy.omp_nthreads)
    workers = policy.nprocs
    load_start = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    rows = []
    for s in range(args.subjects):
        y = simulate(random_coupling(args.regions, rng), 2.5, args.scans, seed=args.seed + s)
        start, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = fit(y, 2.5, device="cpu", workers=workers)
        rows.append({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                     "iterations": int(post.iterations),
                     "converged": bool(post.converged), "path": str(post.extra["path"])})
    seconds = np.array([r["seconds"] for r in rows])
    cpu_seconds = np.array([r["cpu_seconds"] for r in rows])
    print(json.dumps({
        "regions": args.regions, "scans": args.scans, "subjects": args.subjects, "workers": workers,
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "share_converged": float(np.mean([r["converged"] for r in rows])),
        "iterations": [r["iterations"] for r in rows],
        "paths_kept": [r["path"] for r in rows],
        "seconds_per_subject_median": round(float(np.median(seconds)), 2),
        "seconds_per_subject_max": round(float(seconds.max()), 2),
        "cpu_seconds_per_subject_median": round(float(np.median(cpu_seconds)), 2),
    }))


if __name__ == "__main__":
    main()
