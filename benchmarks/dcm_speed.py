"""Spectral DCM speed under the app's thread policy: seconds per subject, 1 vs 2 threads, busy machine.

For each size (default 4, 15 and 21 regions) one simulated subject is fitted with the
default inversion (exact path plus SPM's path, the higher evidence kept) with 1 and with
2 threads (:func:`bids_ketdcm.threads.limit_threads`), first on an idle machine and then
while a second process spins on one core ("busy"). Prints one JSON line: the seconds,
iterations and convergence of every fit, and the ratios ``2 threads / 1 thread`` (idle and
busy) and ``busy / idle`` (1 and 2 threads). Results are identical across thread counts
(checked: the free energies are printed).

``--threads 1`` times only the app's policy (one thread per task); the 2-thread fits of 15
and 21 regions take minutes on a shared 2-core machine. The load average when the run
started and ended is printed with the seconds, and every fit's CPU seconds next to its
wall-clock seconds (on a shared machine the wall clock also counts other jobs' time).

Usage: python benchmarks/dcm_speed.py [--sizes 4 15 21] [--threads 1 2] [--scans 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import warnings

import numpy as np
import torch

from bids_ketdcm.dcm import fit, simulate
from bids_ketdcm.threads import available_cpus, limit_threads


def random_coupling(n: int, rng: np.random.Generator) -> np.ndarray:
    """A stable coupling matrix: self-inhibition -0.5 Hz, sparse off-diagonal links."""
    A = rng.normal(0.0, 0.1, (n, n)) * (rng.random((n, n)) < 0.4)
    np.fill_diagonal(A, -0.5)
    return A


def _spin(stop: mp.synchronize.Event) -> None:
    """Keep one core busy until told to stop (the 'other job' of a shared node)."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _time_fits(data: dict[int, np.ndarray], tr: float, threads: int) -> dict[str, dict]:
    limit_threads(threads)
    out = {}
    for n, y in data.items():
        start, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = fit(y, tr, device="cpu")
        out[str(n)] = {"seconds": round(time.perf_counter() - start, 3),
                       "cpu_seconds": round(time.process_time() - cpu, 3), "iterations": int(post.iterations),
                       "converged": bool(post.converged), "F": round(float(post.F), 4),
                       "path": str(post.extra["path"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 15, 21])
    parser.add_argument("--scans", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts timed")
    args = parser.parse_args()
    load_start = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    tr = 2.5
    data = {n: simulate(random_coupling(n, rng), tr, args.scans, seed=args.seed + n) for n in args.sizes}
    _time_fits({4: data[args.sizes[0]]}, tr, 1)  # warm-up: imports, allocator
    runs = {f"idle_{t}": _time_fits(data, tr, t) for t in args.threads}
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        runs.update({f"busy_{t}": _time_fits(data, tr, t) for t in args.threads})
    finally:
        stop.set()
        spinner.join()
    ratios = {}
    for n in map(str, args.sizes):
        sec = {k: v[n]["seconds"] for k, v in runs.items()}
        ratios[n] = {f"busy_vs_idle_{t}": round(sec[f"busy_{t}"] / sec[f"idle_{t}"], 2) for t in args.threads}
        if {1, 2} <= set(args.threads):
            ratios[n].update({"2_vs_1_idle": round(sec["idle_2"] / sec["idle_1"], 2),
                              "2_vs_1_busy": round(sec["busy_2"] / sec["busy_1"], 2)})
    print(json.dumps({"cpus": available_cpus(), "torch": torch.__version__, "scans": args.scans,
                      "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
                      "runs": runs, "ratios": ratios}))


if __name__ == "__main__":
    main()
