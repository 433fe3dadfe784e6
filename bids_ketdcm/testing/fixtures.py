"""Fixtures for tests and benchmarks: derivative files as the participant level would leave
them, and the coupling matrices simulated subjects are drawn with.

Never imported by the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm.bids.naming import (
    RunEntities,
    connectivity_paths,
    normalise_participant,
    normalise_session,
    timeseries_paths,
)
from bids_ketdcm.dcm.peb import coupling_hz
from bids_ketdcm.dcm.priors import ParamLayout
from bids_ketdcm.io import write_json, write_tsv


def random_coupling(n: int, rng: np.random.Generator) -> np.ndarray:
    """A stable coupling matrix (Hz): self-inhibition -0.5 Hz, sparse off-diagonal links.

    Each off-diagonal link is present with probability 0.4, then normal with sd 0.1 Hz.
    """
    A = rng.normal(0.0, 0.1, (n, n)) * (rng.random((n, n)) < 0.4)
    np.fill_diagonal(A, -0.5)
    return A


def write_a_matrix(
    deriv_dir: str | Path,
    participant: str,
    session: str | None,
    network: str,
    A: np.ndarray,
    regions: list[str],
    converged: bool = True,
    run: int | None = None,
    space: str = "MNI152NLin2009cAsym",
    task: str = "rest",
) -> Path:
    """Write one A matrix and a minimal sidecar in the derivative layout (tests, benchmarks).

    Returns
    -------
    Path
        The TSV written.
    """
    sub = normalise_participant(participant)
    ses = None if session is None else normalise_session(session)
    entities = RunEntities.from_mapping({"sub": sub[4:], "ses": ses, "task": task, "run": run, "space": space})
    paths = connectivity_paths(deriv_dir, entities, network)
    table = pd.DataFrame(np.asarray(A, dtype=float), columns=regions)
    table.insert(0, "target", regions)
    write_tsv(paths["tsv"], table)
    write_json(paths["json"], {"Converged": bool(converged), "Network": network, "SPMRelease": "SPM12"})
    return paths["tsv"]


def write_dcm_posterior(
    deriv_dir: str | Path,
    participant: str,
    session: str | None,
    network: str,
    Ep: np.ndarray,
    Cp: np.ndarray,
    F: float,
    timeseries: np.ndarray,
    regions: list[str],
    space: str = "MNI152NLin2009cAsym",
) -> Path:
    """Write one run's full DCM posterior as the participant level would (A table, sidecar, NPZ, series).

    What the group level's PEB models read back (:func:`bids_ketdcm.bids.derivatives.read_posterior`):
    the A matrix in Hz (TSV), the posterior means by name and covariance (NPZ), the regions and
    free energy (JSON sidecar) and the time series the prior is built from.

    Parameters
    ----------
    deriv_dir, participant, session, network, regions, space
        As :func:`write_a_matrix`.
    Ep, Cp
        (P,) posterior mean and (P, P) covariance in SPM's flat order.
    F
        Free energy.
    timeseries
        (T, n) the series inverted.

    Returns
    -------
    Path
        The connectivity TSV written.
    """
    n = len(regions)
    layout = ParamLayout(n)
    tsv = write_a_matrix(deriv_dir, participant, session, network,
                         coupling_hz(np.asarray(Ep)[layout.slices()["A"]], n), regions, space=space)
    sub = normalise_participant(participant)
    ses = None if session is None else normalise_session(session)
    entities = RunEntities.from_mapping({"sub": sub[4:], "ses": ses, "task": "rest", "space": space})
    paths = connectivity_paths(deriv_dir, entities, network)
    params = {f"param_{k}": np.asarray(v, dtype=float) for k, v in layout.unpack(np.asarray(Ep)).items()}
    # numpy's stubs read a **dict of arrays as its allow_pickle keyword
    np.savez_compressed(paths["npz"], cov=np.asarray(Cp, dtype=float), **params)  # type: ignore[arg-type]
    write_json(paths["json"], {"Converged": True, "Network": network, "SPMRelease": "SPM12", "ROIs": list(regions),
                               "FreeEnergy": float(F)})
    write_tsv(timeseries_paths(deriv_dir, entities, network)["tsv"], pd.DataFrame(timeseries, columns=regions))
    return tsv
