"""The app's one thread policy (bids_ketdcm.threads): counts, pools, what is in force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from bids_ketdcm.dcm import fit, simulate
from bids_ketdcm.testing.fixtures import random_coupling
from bids_ketdcm.threads import ThreadPolicy, available_cpus, resolve, threads_in_force


@pytest.mark.parametrize("nprocs", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("omp", [1, 2, 4])
@pytest.mark.parametrize("tasks", [1, 2, 5, 100])
def test_pool_never_multiplies_threads(nprocs, omp, tasks):
    policy = ThreadPolicy(nprocs, min(omp, nprocs))
    workers, threads = policy.pool(tasks)
    assert 1 <= workers <= min(nprocs, tasks)
    assert 1 <= threads <= min(omp, nprocs)
    assert workers * threads <= nprocs


def test_defaults_and_bad_counts():
    policy = resolve()
    assert policy == ThreadPolicy(available_cpus(), 1)
    with pytest.raises(ValueError, match="--omp-nthreads 3 exceeds --nprocs 2"):
        resolve(2, 3)
    with pytest.raises(ValueError, match="--nprocs: must be >= 1"):
        resolve(0, 1)


def test_limit_threads_sets_torch_blas_and_children():
    """In a fresh interpreter (torch's inter-op pool can be set once): torch, BLAS, environment."""
    code = (
        "import os, json, numpy; from bids_ketdcm.threads import limit_threads, threads_in_force;"
        "limit_threads(1); numpy.ones((50, 50)) @ numpy.ones((50, 50));"
        "print(json.dumps([threads_in_force(), os.environ['OMP_NUM_THREADS'], os.environ['OPENBLAS_NUM_THREADS']]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    in_force, omp, blas = json.loads(done.stdout)
    assert in_force == {"TorchThreads": 1, "TorchInteropThreads": 1, "BLASThreads": 1}
    assert omp == blas == "1"


def test_threads_in_force_reads_torch():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert threads_in_force()["TorchThreads"] == 1
    finally:
        torch.set_num_threads(previous)


def test_cli_refuses_more_threads_per_task_than_cpus(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bids_ketdcm.cli.app", str(tmp_path / "bids"), str(tmp_path / "out"),
                           "participant", "--nprocs", "1", "--omp-nthreads", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--omp-nthreads 2 exceeds --nprocs 1" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_inversion_ignores_the_process_thread_counts():
    """A DCM inversion runs on one torch and BLAS thread per unit whatever the process was
    given: an 11-region fit under 2 torch and 2 BLAS threads (one unit at a time) is
    bit-identical to one under 1 thread with its two paths on 2 units (without that, torch's
    2-thread reductions round differently and the fit ended 1 nat away), the sidecar's thread
    record says what the inversion used, and the process's counts are restored after it."""
    y = simulate(random_coupling(11, np.random.default_rng(1)), 2.5, 192, seed=1)
    previous = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.set_num_threads(2)
            with threadpool_limits(limits=2):
                crowded = fit(y, 2.5, max_iterations=24, workers=1)
                assert torch.get_num_threads() == 2
            torch.set_num_threads(1)
            with threadpool_limits(limits=1):
                lanes = fit(y, 2.5, max_iterations=24, workers=2)
    finally:
        torch.set_num_threads(previous)
    for name in ("A", "cov", "F", "h", "predicted_csd"):
        np.testing.assert_array_equal(getattr(crowded, name), getattr(lanes, name))
    assert (crowded.extra["workers"], lanes.extra["workers"]) == (1, 2)
    for post in (crowded, lanes):
        assert post.extra["threads"]["TorchThreads"] == 1
        assert post.extra["threads"]["BLASThreads"] in (0, 1)  # 0: no BLAS pool visible to threadpoolctl


def test_large_runs_do_not_depend_on_their_batch():
    """Above 8 regions each run is a unit of its own on the CPU: in a batch with another run
    (one thread or two) an 11-region run's numbers are bit-identical to its fit alone (batched
    together, they differed by 1.7e-11 after 16 iterations, and the exact path carries such
    rounding to ~0.1 nat)."""
    rng = np.random.default_rng(1)
    ys = simulate(np.stack([random_coupling(11, rng), random_coupling(11, rng)]), 2.5, 192, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = fit(ys[1], 2.5, max_iterations=16)
        for workers in (1, 2):
            batch = fit(ys, 2.5, max_iterations=16, workers=workers)
            for name in ("A", "cov", "F", "h", "predicted_csd"):
                np.testing.assert_array_equal(getattr(batch.subject(1), name), getattr(alone, name))
