"""Fixture writers: derivative files as the participant level would leave them (tests, benchmarks).

Never imported by the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm.bids.naming import RunEntities, connectivity_paths, normalise_participant, normalise_session
from bids_ketdcm.io import write_json, write_tsv


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
