"""Feature tables from the derivatives, for both levels: A matrices, gray-matter volumes, both.

The group level trains on them, the participant level (``--apply-model``) and external
validation give a saved model the same features (:func:`model_features`). The feature sets
(``dcm``, ``gmv``, ``dcm+gmv``, ``eb``) and their keys are :mod:`bids_ketdcm.config`'s vocabulary.

Connectivity: one A matrix per participant and network.

Reads ``sub-X/ses-Y/func/sub-X_ses-Y_task-T[_acq-A][_run-N]_space-S_seg-NET_meas-dcm_relmat.tsv``
(names from :mod:`bids_ketdcm.bids.naming`)
(rows = targets, first column ``target``, then one column per source; Hz) and its JSON
sidecar. For each participant and network the first *valid* run of the chosen session is
used: valid means the sidecar says ``Converged: true`` and every value is finite (both
configurable). Features are the entries ``A[target, source]``, named ``source->target``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_ketdcm.bids.derivatives import read_connectivity_table, read_gmv
from bids_ketdcm.bids.naming import (
    CONNECTIVITY_MEASURE,
    CONNECTIVITY_SUFFIX,
    GMV_SUFFIX,
    normalise_participant,
    normalise_session,
    parse_name,
)
from bids_ketdcm.config import FEATURE_SETS, feature_key, uses_dcm, uses_gmv
from bids_ketdcm.errors import InputError

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
                table, meta = read_connectivity_table(cand.path)
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
        if not kept or regions is None:
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


def find_gmv(deriv_dir: str | Path, session: str | None, space: str | None = None) -> pd.DataFrame:
    """List the GMV tables: columns ``participant_id, network, space, path``."""
    root = Path(deriv_dir)
    pattern = f"sub-*/ses-{normalise_session(session)}/anat/*{GMV_SUFFIX}" if session else f"sub-*/anat/*{GMV_SUFFIX}"
    rows = []
    for path in sorted(root.glob(pattern)):
        ent = parse_entities(path)
        if "seg" not in ent or (space is not None and ent.get("space") != space):
            continue
        rows.append({"participant_id": normalise_participant(ent["sub"]), "network": ent["seg"],
                     "space": ent.get("space", ""), "path": str(path)})
    return pd.DataFrame(rows, columns=["participant_id", "network", "space", "path"])


def collect_gmv(deriv_dir: str | Path, participants: list[str], session: str | None = "b0",
                networks: tuple[str, ...] | None = None, space: str | None = None,
                allow_missing: bool = False) -> tuple[dict[str, FeatureSet], pd.DataFrame]:
    """GMV / TIV of every region, one FeatureSet per region set (keyed by its name).

    Raises
    ------
    InputError
        No GMV table at all, an unknown region set, region names that differ between
        participants, or (without ``allow_missing``) a participant without a table.
    """
    found = find_gmv(deriv_dir, session, space)
    if found.empty:
        raise InputError(f"{deriv_dir}: no sub-*/ses-{normalise_session(session or '')}/anat/*{GMV_SUFFIX} "
                         "files; run the participant level with --features gmv first")
    available = sorted(found["network"].unique())
    chosen = list(networks) if networks else available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise InputError(f"gray-matter volumes of seg-{', seg-'.join(unknown)} not found in {deriv_dir} "
                         f"(found: {', '.join(available)}); run the participant level with --features gmv")
    out, missing = {}, []
    for network in chosen:
        rows = found[found["network"] == network]
        kept, values, regions, files = [], [], None, []
        for pid in participants:
            cand = rows[rows["participant_id"] == pid]
            if cand["space"].nunique() > 1:
                raise InputError(f"{pid} seg-{network}: gray-matter volumes in several spaces; choose one with --space")
            if cand.empty:
                missing.append((pid, network, "no gray-matter volume table"))
                continue
            table = read_gmv(cand["path"].iloc[0])
            names = list(table.index)
            if regions is None:
                regions = names
            elif set(names) != set(regions):
                raise InputError(f"{cand['path'].iloc[0]}: regions differ from the other participants' "
                                 f"in seg-{network}")
            kept.append(pid)
            values.append(table.loc[regions, "gmv_tiv"].to_numpy(float))
            files.append(cand["path"].iloc[0])
        if not kept or regions is None:
            continue
        out[network] = FeatureSet(
            network=network, regions=list(regions), participants=kept, matrices=np.zeros((len(kept), 0, 0)),
            X=np.stack(values), feature_names=[f"{r}:gmv" for r in regions], pairs=[None] * len(regions),
            files=files)
    missing_df = pd.DataFrame(missing, columns=["participant_id", "network", "reason"])
    if len(missing_df) and not allow_missing:
        listing = "; ".join(f"{r.participant_id} seg-{r.network}" for r in missing_df.head(20).itertuples())
        raise InputError(f"{len(missing_df)} participant/region-set pairs have no gray-matter volume table in "
                         f"{deriv_dir}: {listing}. Use --allow-missing to go on without them.")
    return out, missing_df


def combine(dcm: FeatureSet, gmv: FeatureSet) -> FeatureSet:
    """The ``dcm+gmv`` FeatureSet: A entries then GMV columns, common participants."""
    common = [p for p in dcm.participants if p in gmv.participants]
    a, g = dcm.subset(common), gmv.subset(common)
    return FeatureSet(network=dcm.network, regions=a.regions, participants=common, matrices=a.matrices,
                      X=np.column_stack([a.X, g.X]), feature_names=[*a.feature_names, *g.feature_names],
                      pairs=[*a.pairs, *([None] * len(g.feature_names))], files=a.files)


def gather_features(deriv_dir: str | Path, participants: list[str], feature_sets: tuple[str, ...] = ("dcm",),
                    **kw) -> tuple[dict[str, FeatureSet], pd.DataFrame]:
    """Every requested feature set, keyed by :func:`feature_key`.

    Parameters
    ----------
    deriv_dir
        Derivatives root.
    participants
        Participant ids (with ``sub-``).
    feature_sets
        Any of ``dcm``, ``gmv``, ``dcm+gmv``, ``eb`` (the A matrices of ``dcm``, keyed
        ``eb_NET``: the group level replaces them by empirical-Bayes estimates in each fold).
    **kw
        ``session``, ``networks``, ``run``, ``require_converged``, ``space``, ``task``,
        ``drop_diagonal``, ``allow_missing`` (as :func:`collect_features`; ``networks``
        also selects the GMV region sets).

    Returns
    -------
    features : dict of str to FeatureSet
    missing : pandas.DataFrame
        Participants left out (``participant_id, network, reason``).
    """
    bad = [f for f in feature_sets if f not in FEATURE_SETS]
    if bad:
        raise InputError(f"--features: unknown {', '.join(bad)} (choose from {', '.join(FEATURE_SETS)})")
    gmv_kw: dict[str, Any] = {k: kw.get(k) for k in ("session", "networks", "space")}
    gmv_kw["allow_missing"] = kw.get("allow_missing", False)
    out: dict[str, FeatureSet] = {}
    missing = []
    dcm: dict[str, FeatureSet] = {}
    gmv: dict[str, FeatureSet] = {}
    if uses_dcm(feature_sets):
        dcm, miss = collect_features(deriv_dir, participants, **kw)
        missing.append(miss)
    if uses_gmv(feature_sets):
        gmv_networks = kw.get("networks")
        if "gmv" not in feature_sets:  # dcm+gmv only: the networks of the A matrices
            gmv_networks = tuple(dcm)
        gmv, miss = collect_gmv(deriv_dir, participants, **{**gmv_kw, "networks": gmv_networks})
        missing.append(miss)
    if "dcm" in feature_sets:
        out.update(dcm)
    if "eb" in feature_sets:
        out.update({feature_key("eb", n): fs for n, fs in dcm.items()})
    if "gmv" in feature_sets:
        out.update({feature_key("gmv", n): fs for n, fs in gmv.items()})
    if "dcm+gmv" in feature_sets:
        absent = [n for n in dcm if n not in gmv]
        if absent:
            raise InputError(f"--features dcm+gmv: no gray-matter volumes of seg-{', seg-'.join(absent)}; run the "
                             "participant level with --features gmv for the same networks")
        out.update({feature_key("dcm+gmv", n): combine(dcm[n], gmv[n]) for n in dcm})
    table = pd.concat(missing, ignore_index=True) if missing else pd.DataFrame(
        columns=["participant_id", "network", "reason"])
    return out, table


def available_networks(deriv_dir: str | Path, feature_set: str, session: str | None, space: str | None = None,
                       task: str = "rest") -> list[str]:
    """Networks (``seg``) for which ``deriv_dir`` holds features of ``feature_set``.

    ``dcm`` and ``eb``: connectivity files; ``gmv``: gray-matter volume tables; ``dcm+gmv``: both.
    """
    dcm = set(find_connectivity(deriv_dir, session or "b0", task=task, space=space)["network"])
    gmv = set(find_gmv(deriv_dir, session, space)["network"])
    return sorted({"dcm": dcm, "gmv": gmv, "dcm+gmv": dcm & gmv, "eb": dcm}[feature_set])


def model_features(deriv_dir: str | Path, participants: list[str], feature_set: str, network: str,
                   spec: dict, where: str = "saved model") -> FeatureSet | None:
    """The features a saved model needs, for ``participants`` (those without them left out).

    Parameters
    ----------
    deriv_dir
        Derivatives root.
    participants
        Participant ids (with ``sub-``).
    feature_set, network
        The model's (see :class:`~bids_ketdcm.model_store.SavedModel`).
    spec
        The model's ``feature_spec`` (session, space, task, run, drop_diagonal,
        require_converged); a ``session`` given there may be overridden by the caller.
    where
        The model, for messages.

    Returns
    -------
    FeatureSet or None
        None when none of ``participants`` has usable features of this network.

    Raises
    ------
    InputError
        ``deriv_dir`` holds no ``feature_set`` features of ``network`` at all (data of
        another network: the model refuses them), or the files are malformed.
    """
    session, space, task = spec.get("session"), spec.get("space"), spec.get("task", "rest")
    found = available_networks(deriv_dir, feature_set, session, space, task)
    if network not in found:
        held = ", ".join(f"seg-{n}" for n in found) or "none"
        raise InputError(
            f"{where}: trained on {feature_set} features of network seg-{network}, but {deriv_dir} holds "
            f"{feature_set} features of {held} (ses-{normalise_session(session or '')}"
            f"{', space-' + space if space else ''}). A model refuses data of another network: apply a model "
            f"trained on the same network, or run the participant level with --network {network}"
            + (" --features gmv" if feature_set != "dcm" else "") + "."
        )
    kw = {"session": session, "space": space, "run": spec.get("run"), "task": task,
          "drop_diagonal": bool(spec.get("drop_diagonal", False)),
          "require_converged": bool(spec.get("require_converged", True)), "networks": (network,),
          "allow_missing": True}
    try:
        features, _ = gather_features(deriv_dir, participants, (feature_set,), **kw)
    except InputError as err:
        if "no labelled participant has a usable A matrix" not in str(err):
            raise
        log.warning("%s: %s", where, err)
        return None
    return features.get(feature_key(feature_set, network))
