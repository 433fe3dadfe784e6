"""Feature sets of the group level: ``dcm``, ``gmv`` and ``dcm+gmv``.

* ``dcm``: the A matrix of a network (:func:`bids_ketdcm.group.features.collect_features`),
  features ``source->target``; keyed by the network name (``dmn4``), as before;
* ``gmv``: regional gray-matter volume over total intracranial volume of a region set
  (network or whole-brain atlas) from the participant level's
  ``*_seg-NET_desc-gmv_morph.tsv``, features ``REGION:gmv``; keyed ``gmv_NET``;
* ``dcm+gmv``: both, for a network that has both; keyed ``dcm+gmv_NET``.

Each is a :class:`~bids_ketdcm.group.features.FeatureSet` (``pairs`` is None for GMV
columns), so the prediction suite runs them side by side, one "network" row each.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm.bids.naming import GMV_SUFFIX
from bids_ketdcm.config import FEATURE_SETS, uses_dcm, uses_gmv
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.features import (
    FeatureSet,
    collect_features,
    find_connectivity,
    parse_entities,
)
from bids_ketdcm.group.labels import normalise_participant, normalise_session
from bids_ketdcm.participant.structural import read_gmv

log = logging.getLogger(__name__)


def feature_key(feature_set: str, network: str) -> str:
    """Key (the suite's "network" column) of a feature set of a network."""
    return network if feature_set == "dcm" else f"{feature_set}_{network}"


def split_key(key: str) -> tuple[str, str]:
    """``(feature_set, network)`` of a key made by :func:`feature_key`."""
    for fs in ("dcm+gmv", "gmv"):
        if key.startswith(fs + "_"):
            return fs, key[len(fs) + 1:]
    return "dcm", key


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
        if not kept:
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


def compare_feature_sets(results: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The feature sets side by side, with the baseline-score-only and chance comparators.

    One row per network x target of the ketamine analysis: the headline metric of the
    headline model (logistic regression for label schemes, elastic net for continuous
    targets) under ``protocol`` and its permutation p-value for each feature set
    (``dcm``, ``gmv``, ``dcm+gmv``: columns ``<set>`` and ``<set>_p``), the nested-CV mean
    (``<set>_nested``) when nested CV ran, the baseline-score-only model
    (``baseline_score_only``) and the majority / mean model (``chance_model``), both under
    ``protocol`` on the participants of the first feature set present, and ``best``: the
    feature set (or ``baseline_score_only``) with the highest headline value.

    Parameters
    ----------
    results
        The suite's results table (``network`` holds :func:`feature_key` keys).
    protocol
        The headline protocol (e.g. ``kfold5``).

    Returns
    -------
    pandas.DataFrame
        Empty when there is no ketamine result.
    """
    from bids_ketdcm.group.suite import HEADLINE_METRIC, HEADLINE_MODEL

    if results.empty:
        return pd.DataFrame()
    ket = results[results.treatment == "ketamine"]
    if ket.empty:
        return pd.DataFrame()
    split = ket.network.map(split_key)
    ket = ket.assign(feature_set=split.str[0], base_network=split.str[1])
    present = [f for f in FEATURE_SETS if f in set(ket.feature_set)]

    def value(frame: pd.DataFrame, model: str, proto: str, column: str = "headline") -> float:
        sel = frame[(frame.model == model) & (frame.protocol == proto)]
        return float(sel[column].iloc[0]) if len(sel) and pd.notna(sel[column].iloc[0]) else float("nan")

    rows = []
    for (network, target), grp in ket.groupby(["base_network", "target"], sort=False):
        kind = grp.task.iloc[0]
        model = HEADLINE_MODEL[kind]
        row = {"network": network, "target": target, "model": model, "metric": HEADLINE_METRIC[kind]}
        candidates = {}
        for fs in present:
            sub = grp[grp.feature_set == fs]
            row[fs] = value(sub, model, protocol)
            row[f"{fs}_p"] = value(sub, model, protocol, "p_value")
            if (grp.protocol == "nested").any():
                row[f"{fs}_nested"] = value(sub, model, "nested")
            if np.isfinite(row[fs]):
                candidates[fs] = row[fs]
        first = grp[grp.feature_set == next(f for f in present if (grp.feature_set == f).any())]
        row["baseline_score_only"] = value(first, "baseline_score", protocol)
        row["chance_model"] = value(first, "majority" if kind == "classification" else "mean", protocol)
        if np.isfinite(row["baseline_score_only"]):
            candidates["baseline_score_only"] = row["baseline_score_only"]
        row["best"] = max(candidates, key=candidates.get) if candidates else None
        rows.append(row)
    return pd.DataFrame(rows)


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
        Any of ``dcm``, ``gmv``, ``dcm+gmv``.
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
    gmv_kw = {k: kw.get(k) for k in ("session", "networks", "space")}
    gmv_kw["allow_missing"] = kw.get("allow_missing", False)
    out: dict[str, FeatureSet] = {}
    missing = []
    dcm = gmv = {}
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

    ``dcm``: connectivity files; ``gmv``: gray-matter volume tables; ``dcm+gmv``: both.
    """
    dcm = set(find_connectivity(deriv_dir, session or "b0", task=task, space=space)["network"])
    gmv = set(find_gmv(deriv_dir, session, space)["network"])
    return sorted({"dcm": dcm, "gmv": gmv, "dcm+gmv": dcm & gmv}[feature_set])


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
        The model's (see :class:`~bids_ketdcm.group.model_io.SavedModel`).
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
