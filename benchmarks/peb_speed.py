"""Speed of PEB, model reduction (greedy search + model average) and leave-one-out.

The cohort (default 27 subjects x 15 regions) is synthetic first-level posteriors
(:func:`bids_ketdcm.testing.peb_cohort.synthetic_posteriors`): each subject's SPM prior
built from its own time series (projected onto 8 modes above 8 regions, so coupled and
different per subject), and an exact Gaussian posterior inside the prior's support; no DCM
is inverted (the PEB stages see only posteriors and priors). Prints one JSON line: wall and
process-CPU seconds of each stage (PEB with empirical-Bayes subject posteriors; greedy
model reduction; leave-one-out of the covariate), their total, the threads, and the load
average before and after. On a loaded machine use ``--threads 1``: torch's OpenMP threads
spin when the cores are oversubscribed (at load 10 on 2 cores, 2 threads took 15 times the
CPU time of 1).

Usage: python benchmarks/peb_speed.py [--regions 15] [--subjects 27] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from bids_ketdcm.dcm.bmr import search_reduced
from bids_ketdcm.dcm.loo import leave_one_out
from bids_ketdcm.dcm.peb import a_parameter_index, fit_peb
from bids_ketdcm.testing.peb_cohort import synthetic_posteriors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=15)
    parser.add_argument("--subjects", type=int, default=27)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    post, X, _ = synthetic_posteriors(args.regions, args.subjects, seed=args.seed)
    index = a_parameter_index(args.regions)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def stage(name: str, func):
        wall, proc = time.perf_counter(), time.process_time()
        out = func()
        seconds[name] = round(time.perf_counter() - wall, 2)
        cpu[name] = round(time.process_time() - proc, 2)
        return out

    peb = stage("peb", lambda: fit_peb(post, X, index))
    bma = stage("bmr", lambda: search_reduced(peb))
    loo = stage("loo", lambda: leave_one_out(post, X, index))
    results = {"peb_iterations": peb.iterations, "log_precision": round(float(peb.Eh[0]), 3),
               "bmr_parameters_kept": int(np.sum(bma.Pp > 0.5)), "bmr_models_last_step": int(len(bma.F)),
               "loo_r": round(loo.r, 3), "loo_p": float(f"{loo.p:.3g}")}
    print(json.dumps({
        "regions": args.regions, "subjects": args.subjects, "parameters": int(index.size),
        "threads": args.threads, "seconds": {**seconds, "total": round(sum(seconds.values()), 2)},
        "cpu_seconds": {**cpu, "total": round(sum(cpu.values()), 2)},
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2), **results,
    }))


if __name__ == "__main__":
    main()
