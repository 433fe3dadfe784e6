"""Spectral DCM speed under the app's thread policy: seconds per subject, idle and busy machine.

For each size (default 4, 15 and 21 regions) one simulated subject is fitted with the
default inversion (exact path plus SPM's path, the higher evidence kept) under each
configuration, first on an idle machine and then while a second process spins on one core
("busy"):

* ``serial``: one thread (``--nprocs 1``);
* ``app``: the app's default policy on this machine's CPUs (``--nprocs`` = every CPU): the
  inversion's two paths run at once, one thread each.

An inversion never uses torch's intra-op threads, whatever ``--omp-nthreads`` says
(:func:`bids_ketdcm.threads.task_threads`): on this 2-core machine, busy, a 15-region fit on 2
intra-op threads took 106-197 s against 9 s under the app policy.

With ``--batch N`` (N > 1) each size's fit inverts N subjects in one call instead, as the
participant level inverts a dataset's runs of equal length and TR: the benchmark subject and
N - 1 more drawn the same way (seed ``--seed`` + 1000 + regions); ``seconds_per_subject`` is
the call's wall time over N.

Prints one JSON line: the seconds, CPU seconds, iterations and convergence of every fit,
and the ratios ``app / serial`` (idle and busy) and ``busy / idle`` of each configuration.
Results are identical across configurations (the free energies are printed). The load
average when the run started and ended is printed too (on a shared machine the wall clock
also counts other jobs' time).

Usage: python benchmarks/dcm_speed.py [--sizes 4 15 21] [--configs serial app] [--scans 256] [--seed 0]
[--batch 1]
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
from bids_ketdcm.testing.fixtures import random_coupling
from bids_ketdcm.threads import available_cpus, limit_threads, resolve

#: Configuration -> (nprocs, omp_nthreads); None: the app's default (every CPU, one thread per task).
CONFIGS: dict[str, tuple[int, int] | None] = {"serial": (1, 1), "app": None}


#: Repetition time (s) of the benchmark subjects.
TR = 2.5


def add_subject_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the benchmark subjects: ``--sizes``, ``--scans``, ``--seed``."""
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 15, 21])
    parser.add_argument("--scans", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)


def simulate_subjects(args: argparse.Namespace) -> dict[int, np.ndarray]:
    """One simulated subject per size (regions -> (scans, regions) series, TR ``TR``)."""
    rng = np.random.default_rng(args.seed)
    return {n: simulate(random_coupling(n, rng), TR, args.scans, seed=args.seed + n) for n in args.sizes}


def batch_of_subjects(first: np.ndarray, n_subjects: int, scans: int, seed: int) -> np.ndarray:
    """(n_subjects, scans, regions): ``first`` and ``n_subjects - 1`` more drawn like it."""
    n = first.shape[-1]
    rng = np.random.default_rng(seed + 1000 + n)
    more = [simulate(random_coupling(n, rng), TR, scans, seed=seed + 1000 + n + k) for k in range(1, n_subjects)]
    return np.stack([first] + more)


def _spin(stop: mp.synchronize.Event) -> None:
    """Keep one core busy until told to stop (the 'other job' of a shared node)."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _time_fits(data: dict[int, np.ndarray], tr: float, config: str) -> dict[str, dict]:
    counts = CONFIGS[config]
    policy = resolve() if counts is None else resolve(*counts)
    limit_threads(policy.omp_nthreads)
    workers = policy.nprocs
    out = {}
    for n, y in data.items():
        start, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = fit(y, tr, device="cpu", workers=workers)
        seconds = time.perf_counter() - start
        out[str(n)] = {"seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
                       "torch_threads": post.extra["threads"]["TorchThreads"], "workers": int(post.extra["workers"])}
        if y.ndim == 2:
            out[str(n)].update({"iterations": int(post.iterations), "converged": bool(post.converged),
                                "F": round(float(post.F), 4), "path": str(post.extra["path"])})
        else:
            paths, counts = np.unique(post.extra["path"], return_counts=True)
            out[str(n)].update({"subjects": len(y), "seconds_per_subject": round(seconds / len(y), 3),
                                "iterations_max": int(post.iterations.max()), "converged": int(post.converged.sum()),
                                "F_sum": round(float(post.F.sum()), 4),
                                "paths": {str(k): int(v) for k, v in zip(paths, counts, strict=True)}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    add_subject_arguments(parser)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="thread configurations timed (see the module's docstring)")
    parser.add_argument("--batch", type=int, default=1, help="subjects inverted together in each fit")
    args = parser.parse_args()
    load_start = os.getloadavg()
    data = simulate_subjects(args)
    if args.batch > 1:
        data = {n: batch_of_subjects(y, args.batch, args.scans, args.seed) for n, y in data.items()}
    first = data[args.sizes[0]]
    _time_fits({4: first if first.ndim == 2 else first[0]}, TR, "serial")  # warm-up: imports, allocator
    runs = {f"idle_{c}": _time_fits(data, TR, c) for c in args.configs}
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        runs.update({f"busy_{c}": _time_fits(data, TR, c) for c in args.configs})
    finally:
        stop.set()
        spinner.join()
    ratios = {}
    for n in map(str, args.sizes):
        sec = {k: v[n]["seconds"] for k, v in runs.items()}
        ratios[n] = {f"busy_vs_idle_{c}": round(sec[f"busy_{c}"] / sec[f"idle_{c}"], 2) for c in args.configs}
        if "serial" in args.configs:
            ratios[n].update({f"{c}_vs_serial_{load}": round(sec[f"{load}_{c}"] / sec[f"{load}_serial"], 2)
                              for c in args.configs if c != "serial" for load in ("idle", "busy")})
    print(json.dumps({"cpus": available_cpus(), "torch": torch.__version__, "scans": args.scans, "batch": args.batch,
                      "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
                      "runs": runs, "ratios": ratios}))


if __name__ == "__main__":
    main()
