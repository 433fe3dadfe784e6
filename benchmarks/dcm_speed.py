"""Spectral DCM speed: seconds per subject (4, 11, 15, 21 nodes) and batched throughput.

Prints one JSON line. Usage: python benchmarks/dcm_speed.py [--sizes 4 11 15 21] [--batch 27]
[--batch-nodes 15] [--device cpu|cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bids_ketdcm.dcm import fit, simulate


def random_coupling(n: int, rng: np.random.Generator) -> np.ndarray:
    """A stable coupling matrix: self-inhibition -0.5 Hz, sparse off-diagonal links."""
    A = rng.normal(0.0, 0.1, (n, n)) * (rng.random((n, n)) < 0.4)
    np.fill_diagonal(A, -0.5)
    return A


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 11, 15, 21])
    parser.add_argument("--batch", type=int, default=27)
    parser.add_argument("--batch-nodes", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    out: dict = {"device": args.device, "threads": args.threads, "torch": torch.__version__, "per_subject": {}}
    for n in args.sizes:
        y = simulate(random_coupling(n, rng), 2.5, 192, seed=args.seed + n)
        start = time.perf_counter()
        post = fit(y, 2.5, device=args.device)
        seconds = time.perf_counter() - start
        out["per_subject"][str(n)] = {"seconds": round(seconds, 2), "iterations": int(post.iterations),
                                      "converged": bool(post.converged),
                                      "seconds_per_iteration": round(seconds / int(post.iterations), 4)}
    if args.batch:
        n = args.batch_nodes
        ys = simulate(np.stack([random_coupling(n, rng) for _ in range(args.batch)]), 2.5, 192, seed=args.seed)
        start = time.perf_counter()
        post = fit(ys, 2.5, device=args.device)
        seconds = time.perf_counter() - start
        out["batched"] = {"subjects": args.batch, "nodes": n, "seconds": round(seconds, 1),
                          "seconds_per_subject": round(seconds / args.batch, 2),
                          "max_iterations": int(post.iterations.max()), "converged": int(post.converged.sum())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
