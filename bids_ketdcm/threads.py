"""One thread policy for the whole app, in fMRIPrep's terms.

``--nprocs`` is the number of CPUs the app may keep busy at once; ``--omp-nthreads`` is the
most threads one task (a model fit, a time-series extraction) may use. The policy sets torch's
intra- and inter-op threads and the BLAS/OpenMP pools (through ``threadpoolctl`` and the
environment, so that child processes inherit it), and a process pool of ``w`` workers gives
each ``min(omp_nthreads, nprocs // w)`` threads: workers x threads never exceeds nprocs.

A DCM inversion is the exception: it runs its independent units (groups of runs, and above 8
regions each run's two paths) on ``nprocs`` threads of one torch and BLAS thread each
(:func:`task_threads`), whatever ``--omp-nthreads`` says, so that its numbers do not depend on
the thread counts (torch's parallel reductions round differently on 2 threads, and at 11
regions that moved the optimum by 1 nat) and its speed does not depend on the machine's load
(15 regions on a busy 2-core machine: 9 s on two single-threaded units, 106-197 s on 2 intra-op
threads; ``benchmarks/dcm_speed.py`` measures the policy).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from threadpoolctl import threadpool_info, threadpool_limits

#: Environment variables read by OpenMP, OpenBLAS, MKL and numexpr when a process starts.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a batch job's allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPolicy:
    """CPUs for the whole app (``nprocs``) and threads per task (``omp_nthreads``)."""

    nprocs: int
    omp_nthreads: int

    def pool(self, tasks: int) -> tuple[int, int]:
        """Workers and threads per worker for ``tasks`` independent tasks.

        Returns
        -------
        tuple of int
            ``(workers, threads)`` with ``workers * threads <= nprocs``.
        """
        workers = max(1, min(self.nprocs, tasks))
        return workers, max(1, min(self.omp_nthreads, self.nprocs // workers))


def resolve(nprocs: int | None = None, omp_nthreads: int | None = None) -> ThreadPolicy:
    """The policy from the command line: defaults are every available CPU and one thread per task.

    Raises
    ------
    ValueError
        When a count is below 1 or ``omp_nthreads`` exceeds ``nprocs``.
    """
    procs = available_cpus() if nprocs is None else nprocs
    omp = 1 if omp_nthreads is None else omp_nthreads
    if procs < 1:
        raise ValueError(f"--nprocs: must be >= 1 (got {procs})")
    if omp < 1:
        raise ValueError(f"--omp-nthreads: must be >= 1 (got {omp})")
    if omp > procs:
        raise ValueError(f"--omp-nthreads {omp} exceeds --nprocs {procs}")
    return ThreadPolicy(procs, omp)


def threads_in_force() -> dict[str, int]:
    """What a sidecar records: the thread counts of torch and of the BLAS in this process."""
    blas = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return {"TorchThreads": torch.get_num_threads(), "TorchInteropThreads": torch.get_num_interop_threads(),
            "BLASThreads": max(blas, default=0)}


def limit_threads(threads: int) -> None:
    """Make this process (and the processes it starts) use at most ``threads`` threads per pool.

    Sets torch's intra-op threads, its inter-op threads (only possible before torch first
    runs inter-op work; later calls keep the value already fixed), the BLAS/OpenMP pools
    already loaded (``threadpoolctl``) and the environment read by new processes.
    """
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # inter-op pool already started: torch allows setting it once
            pass
    threadpool_limits(limits=threads)


@contextmanager
def task_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op threads and the BLAS pools set to ``threads`` inside the block, restored after it.

    For work whose parallelism is its own workers (the group suite's tasks, a DCM inversion's
    units), whatever the process was given: its numbers then do not depend on the process's
    thread counts. Also a decorator.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)
