"""Batched spectral DCM on a GPU: seconds per subject and agreement with the CPU.

Simulates ``--subjects`` subjects of ``--regions`` regions, fits them as one batch on
``--device`` (default: CUDA when available, else CPU), and refits the first ``--check``
subjects one at a time on the CPU: prints one JSON line with seconds per subject on the
device and the largest CPU/device differences of A and of the free energy. The issue's
run is ``--subjects 100 --regions 15`` on a GPU; on a CPU only machine use small sizes
(``--subjects 4 --regions 4``), which checks that the script runs.

Usage: python benchmarks/dcm_gpu.py [--subjects 100] [--regions 15] [--check 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

from bids_ketdcm.dcm import fit, simulate
from bids_ketdcm.testing.fixtures import random_coupling
from bids_ketdcm.threads import limit_threads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--regions", type=int, default=15)
    parser.add_argument("--scans", type=int, default=256)
    parser.add_argument("--check", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    limit_threads(1)
    rng = np.random.default_rng(args.seed)
    A = np.stack([random_coupling(args.regions, rng) for _ in range(args.subjects)])
    y = simulate(A, 2.5, args.scans, seed=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        post = fit(y, 2.5, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        dA, dF = [], []
        for b in range(min(args.check, args.subjects)):
            ref = fit(y[b], 2.5, device="cpu")
            dA.append(float(np.abs(ref.A - post.A[b]).max()))
            dF.append(float(abs(ref.F - post.F[b])))
    print(json.dumps({
        "device": args.device, "name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "subjects": args.subjects, "regions": args.regions, "scans": args.scans,
        "seconds": round(seconds, 2), "seconds_per_subject": round(seconds / args.subjects, 3),
        "converged": int(post.converged.sum()), "max_iterations": int(post.iterations.max()),
        "checked": len(dA), "max_abs_dA_vs_cpu": max(dA, default=None), "max_abs_dF_vs_cpu": max(dF, default=None),
    }))


if __name__ == "__main__":
    main()
