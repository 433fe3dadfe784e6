"""Group-level tables of what entered the analysis: per-participant QC and the participants x edges matrix.

Both are read from the participant-level derivatives the group level used (one
connectivity file per participant and network, :class:`~bids_ketdcm.bids.features.FeatureSet`):

* ``group/seg-<network>_qc.tsv``: per participant, the DCM's convergence, iterations and
  variance explained (connectivity sidecar) and the run's mean framewise displacement and
  volumes kept (time-series sidecar), as MRIQC's group tables list image-quality metrics.
* ``group/seg-<network>_edges.tsv``: one row per participant, one column per directed edge
  ``source->target`` of A (Hz), the self-connections included: the matrix the suite learns
  from, for a user's own statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm.bids.features import FeatureSet
from bids_ketdcm.bids.naming import RunEntities, parse_name, timeseries_paths
from bids_ketdcm.config import split_key
from bids_ketdcm.io import write_tsv

#: Columns of the QC table after ``participant_id``, with what each holds.
QC_COLUMNS = {
    "converged": "the DCM inversion met its convergence criterion",
    "iterations": "Gauss-Newton iterations of the inversion",
    "variance_explained": "fraction of the cross-spectral density explained by the model",
    "mean_fd_mm": "mean framewise displacement of the run (mm)",
    "volumes_kept": "volumes left after removing non-steady-state and censored volumes",
    "volumes": "volumes of the run",
}


def qc_table(features: FeatureSet) -> pd.DataFrame:
    """Per-participant QC of the runs one network's features come from.

    Parameters
    ----------
    features
        The network's feature set (``participants`` and their connectivity ``files``).

    Returns
    -------
    pandas.DataFrame
        ``participant_id`` then :data:`QC_COLUMNS`; NaN where a sidecar lacks a value.
    """
    rows = []
    for participant, path in zip(features.participants, features.files, strict=True):
        meta = _sidecar(Path(path).with_suffix(".json"))
        qc = _sidecar(_timeseries_sidecar(Path(path))).get("QC") or {}
        rows.append({
            "participant_id": participant if participant.startswith("sub-") else f"sub-{participant}",
            "converged": meta.get("Converged"),
            "iterations": meta.get("Iterations"),
            "variance_explained": meta.get("VarianceExplained"),
            "mean_fd_mm": qc.get("mean_fd"),
            "volumes_kept": qc.get("n_kept"),
            "volumes": qc.get("n_volumes"),
        })
    return pd.DataFrame(rows, columns=["participant_id", *QC_COLUMNS])


def edges_table(features: FeatureSet) -> pd.DataFrame:
    """Participants x directed edges of A (Hz), self-connections included.

    Parameters
    ----------
    features
        The network's feature set.

    Returns
    -------
    pandas.DataFrame
        ``participant_id`` then one column ``source->target`` per entry of A (rows of A
        are targets), in row-major order of A.
    """
    regions = features.regions
    names = [f"{regions[j]}->{regions[i]}" for i in range(len(regions)) for j in range(len(regions))]
    table = pd.DataFrame(np.asarray(features.matrices, dtype=float).reshape(len(features.participants), -1),
                         columns=names)
    table.insert(0, "participant_id", [p if p.startswith("sub-") else f"sub-{p}" for p in features.participants])
    return table


def write_group_tables(group_dir: Path, features: dict[str, FeatureSet]) -> dict[str, pd.DataFrame]:
    """Write ``seg-<network>_qc.tsv`` and ``seg-<network>_edges.tsv`` for every network.

    Parameters
    ----------
    group_dir
        ``OUTPUT_DIR/group``.
    features
        Feature sets by key (:func:`~bids_ketdcm.group.config.feature_key`); only the
        ``dcm`` and ``eb`` ones hold A matrices and connectivity files (one table per network).

    Returns
    -------
    dict
        The QC table of each network (for the report).
    """
    tables = {}
    for key, fs in features.items():
        if split_key(key)[0] not in ("dcm", "eb") or fs.network in tables:  # eb: the same inversions
            continue
        network = fs.network
        tables[network] = qc_table(fs)
        write_tsv(group_dir / f"seg-{network}_qc.tsv", tables[network])
        write_tsv(group_dir / f"seg-{network}_edges.tsv", edges_table(fs))
    return tables


def _timeseries_sidecar(connectivity: Path) -> Path:
    """The time-series sidecar of the same run and network (the same folder)."""
    entities = parse_name(connectivity)
    return connectivity.parent / timeseries_paths(".", RunEntities.from_mapping(entities), entities["seg"])["json"].name


def _sidecar(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
