"""Feature tables from the DCM derivatives: one A matrix per participant and network.

Reads ``sub-X/ses-Y/func/sub-X_ses-Y_task-T[_acq-A][_run-N]_space-S_seg-NET_meas-dcm_relmat.tsv``
(names from :mod:`bids_ketdcm.bids.naming`)
(rows = targets, first column ``target``, then one column per source; Hz) and its JSON
sidecar. For each participant and network the first *valid* run of the chosen session is
used: valid means the sidecar says ``Converged: true`` and every value is finite (both
configurable). Features are the entries ``A[target, source]``, named ``source->target``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm.bids.naming import (
    CONNECTIVITY_MEASURE,
    CONNECTIVITY_SUFFIX,
    RunEntities,
    connectivity_paths,
    parse_name,
)
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.labels import normalise_participant, normalise_session

log = logging.getLogger(__name__)

SUFFIX = f"_meas-{CONNECTIVITY_MEASURE}_{CONNECTIVITY_SUFFIX}.tsv"


@dataclass
class FeatureSet:
    """The feature matrix of one network.

    Attributes
    ----------
    network
        Network name (the ``seg`` entity).
    regions
        Region names, in matrix order.
    participants
        Participant ids (with ``sub-``), one per row of ``X``.
    matrices
        A matrices, shape (participants, regions, regions), rows = targets.
    X
        Feature matrix (participants, features).
    feature_names
        ``source->target`` per column of ``X``.
    pairs
        ``(target_index, source_index)`` of each column of ``X`` (``None`` for extra
        columns such as baseline scores).
    files
        Connectivity file used for each participant.
    """

    network: str
    regions: list[str]
    participants: list[str]
    matrices: np.ndarray
    X: np.ndarray
    feature_names: list[str]
    pairs: list[tuple[int, int] | None]
    files: list[str]

    def with_column(self, name: str, values: np.ndarray) -> FeatureSet:
        """A copy with one extra feature column (e.g. the baseline score)."""
        return FeatureSet(
            network=self.network,
            regions=self.regions,
            participants=self.participants,
            matrices=self.matrices,
            X=np.column_stack([self.X, np.asarray(values, dtype=float)]),
            feature_names=[*self.feature_names, name],
            pairs=[*self.pairs, None],
            files=self.files,
        )

    def subset(self, participants: list[str]) -> FeatureSet:
        """A copy restricted to (and ordered as) ``participants``."""
        rows = [self.participants.index(p) for p in participants]
        return FeatureSet(
            network=self.network,
            regions=self.regions,
            participants=list(participants),
            matrices=self.matrices[rows],
            X=self.X[rows],
            feature_names=self.feature_names,
            pairs=self.pairs,
            files=[self.files[i] for i in rows],
        )


def parse_entities(path: str | Path) -> dict[str, str]:
    """BIDS entities of a file name (``sub``, ``ses``, ``run``, ``seg`` ...)."""
    return {k: v for k, v in parse_name(path).items() if k not in ("suffix", "extension")}


def find_connectivity(
    deriv_dir: str | Path, session: str, task: str = "rest", space: str | None = None
) -> pd.DataFrame:
    """List the connectivity files of one session (of the whole dataset when it has no sessions).

    Parameters
    ----------
    deriv_dir
        Derivatives root (the BIDS-App output directory).
    session
        Session label, with or without ``ses-``.
    task
        Task entity to match.
    space
        Space entity to match; None accepts any.

    Returns
    -------
    pandas.DataFrame
        Columns ``participant_id``, ``network``, ``run`` (int, 0 when no run entity),
        ``space``, ``path``; sorted by participant, network, run.
    """
    session = normalise_session(session)
    paths = sorted(Path(deriv_dir).glob(f"sub-*/ses-{session}/func/*{SUFFIX}"))
    wanted: str | None = session
    if not paths:  # a dataset without sessions: its runs stand for the baseline
        paths = sorted(Path(deriv_dir).glob(f"sub-*/func/*{SUFFIX}"))
        wanted = None
        if paths:
            log.info("%s: no ses-%s folders; using the runs of the dataset without sessions", deriv_dir, session)
    rows = []
    for path in paths:
        ent = parse_entities(path)
        if ent.get("ses") != wanted or ent.get("task") != task or "seg" not in ent:
            continue
        if space is not None and ent.get("space") != space:
            continue
        run = int(ent["run"]) if ent.get("run", "").isdigit() else 0
        rows.append(
            {
                "participant_id": normalise_participant(ent["sub"]),
                "network": ent["seg"],
                "run": run,
                "space": ent.get("space", ""),
                "path": str(path),
            }
        )
    table = pd.DataFrame(rows, columns=["participant_id", "network", "run", "space", "path"])
    return table.sort_values(["participant_id", "network", "run"], kind="stable").reset_index(drop=True)


def read_connectivity(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read one A matrix (DataFrame indexed by target, columns = sources) and its sidecar.

    Raises
    ------
    InputError
        The table is not square with matching target and source names, or a value is
        not a number.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: cannot be read as a TSV table ({exc})") from None
    if table.columns[0] != "target":
        raise InputError(f"{path}: the first column must be 'target' (found {table.columns[0]!r})")
    table = table.set_index("target")
    table.index = table.index.astype(str)
    if list(table.index) != list(table.columns):
        raise InputError(
            f"{path}: target rows {list(table.index)} do not match source columns {list(table.columns)}"
        )
    try:
        table = table.astype(float)
    except ValueError:
        raise InputError(f"{path}: holds values that are not numbers") from None
    sidecar = path.with_name(path.name[: -len(".tsv")] + ".json")
    meta: dict = {}
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{sidecar}: invalid JSON ({exc})") from None
    else:
        meta = {"_missing_sidecar": str(sidecar)}
    return table, meta


def _validity(table: pd.DataFrame, meta: dict, require_converged: bool) -> str | None:
    """Why a run is not usable, or None when it is."""
    if not np.isfinite(table.to_numpy()).all():
        return "non-finite values in A"
    if require_converged:
        if "_missing_sidecar" in meta:
            return "no JSON sidecar (Converged unknown)"
        if meta.get("Converged") is not True:
            return f"Converged is {meta.get('Converged')!r} in the sidecar"
    return None


def collect_features(
    deriv_dir: str | Path,
    participants: list[str],
    session: str = "b0",
    networks: tuple[str, ...] | None = None,
    run: int | None = None,
    require_converged: bool = True,
    space: str | None = None,
    task: str = "rest",
    drop_diagonal: bool = False,
    allow_missing: bool = False,
) -> tuple[dict[str, FeatureSet], pd.DataFrame]:
    """Collect one A matrix per participant and network.

    Parameters
    ----------
    deriv_dir
        Derivatives root.
    participants
        Participants with labels (ids with ``sub-``): each must have a valid A matrix.
    session
        Session whose A matrices are the features (``--baseline-session`` by default).
    networks
        Networks to use; None uses every network found.
    run
        Use only this run number; None takes the first valid run (by run number).
    require_converged
        A run is valid only if its sidecar says ``Converged: true``.
    space, task
        Entities the files must have (space None: any, but one per participant).
    drop_diagonal
        Leave out the self-connections ``A[i, i]``.
    allow_missing
        Go on without participants that have no valid A matrix (logged) instead of
        raising.

    Returns
    -------
    features : dict of str to FeatureSet
        By network, participants in the order given (those with a matrix).
    missing : pandas.DataFrame
        Columns ``participant_id``, ``network``, ``reason``.

    Raises
    ------
    InputError
        No connectivity file at all, an unknown network, several spaces without
        ``space``, region names that differ between participants, or (without
        ``allow_missing``) a labelled participant with no valid A matrix.
    """
    found = find_connectivity(deriv_dir, session, task=task, space=space)
    session = normalise_session(session)
    if found.empty:
        raise InputError(
            f"{deriv_dir}: no sub-*/ses-{session}/func/*_task-{task}"
            f"{'_space-' + space if space else ''}*_seg-*{SUFFIX} files; run the "
            "participant level first (or check --baseline-session / the output directory)"
        )
    available = sorted(found["network"].unique())
    if networks:
        unknown = [n for n in networks if n not in available]
        if unknown:
            raise InputError(
                f"networks {', '.join(unknown)} not found in {deriv_dir} for ses-{session} "
                f"(networks found: {', '.join(available)})"
            )
        chosen = list(networks)
    else:
        chosen = available
    if run is not None:
        found = found[found["run"] == run]
    features: dict[str, FeatureSet] = {}
    missing: list[tuple[str, str, str]] = []
    empty: list[str] = []
    for network in chosen:
        rows = found[found["network"] == network]
        regions: list[str] | None = None
        kept, mats, files = [], [], []
        for pid in participants:
            candidates = rows[rows["participant_id"] == pid]
            if candidates["space"].nunique() > 1:
                raise InputError(
                    f"{pid} seg-{network}: connectivity in several spaces "
                    f"({', '.join(sorted(candidates['space'].unique()))}); choose one with --space"
                )
            if candidates.empty:
                what = f"run-{run}" if run is not None else "any run"
                missing.append((pid, network, f"no connectivity file for ses-{session} ({what})"))
                continue
            reasons, chosen_table = [], None
            for cand in candidates.itertuples():
                table, meta = read_connectivity(cand.path)
                why = _validity(table, meta, require_converged)
                if why is None:
                    chosen_table, chosen_path = table, cand.path
                    break
                reasons.append(f"{Path(cand.path).name}: {why}")
            if chosen_table is None:
                missing.append((pid, network, "no valid run (" + "; ".join(reasons) + ")"))
                continue
            names = list(chosen_table.index)
            if regions is None:
                regions = names
            elif set(names) != set(regions):
                raise InputError(
                    f"{chosen_path}: regions {names} differ from those of the other "
                    f"participants in seg-{network} ({regions})"
                )
            mats.append(chosen_table.loc[regions, regions].to_numpy())
            kept.append(pid)
            files.append(chosen_path)
        if not kept:
            empty.append(network)
            continue
        features[network] = _design(network, regions, kept, np.stack(mats), files, drop_diagonal)
    missing_df = pd.DataFrame(missing, columns=["participant_id", "network", "reason"])
    if len(missing_df):
        listing = "; ".join(
            f"{r.participant_id} seg-{r.network}: {r.reason}" for r in missing_df.head(20).itertuples()
        )
        more = f" (and {len(missing_df) - 20} more)" if len(missing_df) > 20 else ""
        if not allow_missing:
            raise InputError(
                f"{len(missing_df)} labelled participant/network pairs have no usable A matrix "
                f"in {deriv_dir}: {listing}{more}. Use --allow-missing to go on without them."
            )
        log.warning("--allow-missing: going on without %s%s", listing, more)
    if empty:
        raise InputError(
            f"no labelled participant has a usable A matrix for seg-{', seg-'.join(empty)} in {deriv_dir}"
        )
    return features, missing_df


def _design(
    network: str,
    regions: list[str],
    participants: list[str],
    matrices: np.ndarray,
    files: list[str],
    drop_diagonal: bool,
) -> FeatureSet:
    n = len(regions)
    pairs = [(t, s) for t in range(n) for s in range(n) if not (drop_diagonal and t == s)]
    X = np.stack([matrices[:, t, s] for t, s in pairs], axis=1)
    names = [f"{regions[s]}->{regions[t]}" for t, s in pairs]
    return FeatureSet(
        network=network,
        regions=list(regions),
        participants=list(participants),
        matrices=matrices,
        X=X,
        feature_names=names,
        pairs=list(pairs),
        files=files,
    )


def write_connectivity(
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
    """Write one A matrix and a minimal sidecar in the derivative layout (tests, demos).

    Returns
    -------
    Path
        The TSV written.
    """
    from bids_ketdcm.io import write_json, write_tsv

    sub = normalise_participant(participant)
    ses = None if session is None else normalise_session(session)
    entities = RunEntities.from_mapping({"sub": sub[4:], "ses": ses, "task": task, "run": run, "space": space})
    paths = connectivity_paths(deriv_dir, entities, network)
    table = pd.DataFrame(np.asarray(A, dtype=float), columns=regions)
    table.insert(0, "target", regions)
    write_tsv(paths["tsv"], table)
    write_json(paths["json"], {"Converged": bool(converged), "Network": network, "SPMRelease": "SPM12"})
    return paths["tsv"]
