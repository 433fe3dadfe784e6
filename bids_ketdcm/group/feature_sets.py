"""Feature sets of the group level: ``dcm``, ``gmv`` and ``dcm+gmv``.

* ``dcm``: the A matrix of a network (:func:`bids_ketdcm.bids.features.collect_features`),
  features ``source->target``; keyed by the network name (``dmn4``), as before;
* ``gmv``: regional gray-matter volume over total intracranial volume of a region set
  (network or whole-brain atlas) from the participant level's
  ``*_seg-NET_desc-gmv_morph.tsv``, features ``REGION:gmv``; keyed ``gmv_NET``;
* ``dcm+gmv``: both, for a network that has both; keyed ``dcm+gmv_NET``.

Each is a :class:`~bids_ketdcm.bids.features.FeatureSet` (``pairs`` is None for GMV
columns), so the prediction suite runs them side by side, one "network" row each.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from bids_ketdcm.config import FEATURE_SETS, split_key
from bids_ketdcm.group.models import HEADLINE_METRIC, HEADLINE_MODEL

log = logging.getLogger(__name__)


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
        candidates: dict[str, float] = {}
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
        row["best"] = max(candidates, key=candidates.__getitem__) if candidates else None
        rows.append(row)
    return pd.DataFrame(rows)


