"""PEB on the demo's synthetic cohorts: the planted link and the null.

Builds the demo cohort (:func:`bids_ketdcm.testing.synth.make_synthetic_dataset`, dmn4,
seed 0) with ``link="planted"`` and with ``link="none"``, runs the participant level (CLI),
then the PEB leave-one-out of the percentage improvement
(:func:`bids_ketdcm.group.peb_analysis.peb_loo`) and the suite (``run_group``) on binary25
and the improvement with the ``peb`` model and the ``dcm`` and ``eb`` feature sets
(stratified 5-fold with ``--suite-permutations`` permutations, nested CV 10 x 5-fold).
Prints one JSON line: per cohort, r, parametric and permutation p-values, the planted
connection's effect and posterior probability and its rank among the 16 connections, the
suite's rows (headline metric, r or AUC, p, nested mean) and the seconds.

Usage: python benchmarks/peb_demo.py WORK_DIR [--permutations 99] [--suite-permutations 999]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from bids_ketdcm.bids.features import collect_features
from bids_ketdcm.cli.app import main as app
from bids_ketdcm.group import GroupOptions, run_group
from bids_ketdcm.group.labels import build_labels
from bids_ketdcm.group.peb_analysis import peb_loo, subject_posteriors
from bids_ketdcm.testing.synth import DEFAULT_PLANTED, make_synthetic_dataset


def suite(bids: Path, out: Path, permutations: int) -> dict:
    """The suite's peb row and the headline models on raw (dcm) and empirical-Bayes (eb) A."""
    options = GroupOptions(include_group=("MDD",), placebo_session=None, schemes=("binary25",),
                           targets=("improvement",), models=("logistic", "elasticnet", "majority", "mean"),
                           peb_suite=True, feature_sets=("dcm", "eb"), k_values=(5,), nested_repeats=10,
                           n_permutations=permutations, nested_permutations=0, report=False, progress=False)
    start = time.perf_counter()
    run_group(bids, out, options)
    seconds = time.perf_counter() - start
    res = pd.read_csv(out / "group" / "results.tsv", sep="\t")
    rows = {}
    for (network, target, model), grp in res.groupby(["network", "target", "model"]):
        if model in ("majority", "mean"):
            continue
        k5 = grp[grp.protocol == "kfold5"].iloc[0]
        nested = grp[grp.protocol == "nested"].iloc[0]
        extra = "pearson_r" if k5.task == "regression" else "roc_auc"
        rows[f"{network}|{target}|{model}"] = {
            k5.headline_metric: round(float(k5.headline), 3), extra: round(float(k5[extra]), 3),
            "p": None if pd.isna(k5.p_value) else float(k5.p_value),
            "nested": round(float(nested.headline), 3), f"nested_{extra}": round(float(nested[extra]), 3)}
    return {"rows": rows, "permutations": permutations, "seconds": round(seconds, 1)}


def cohort(root: Path, link: str, permutations: int, suite_permutations: int) -> dict:
    """Synthesise, invert and analyse one cohort."""
    bids = root / "bids"
    out = root / "derivatives"
    if not out.exists():
        make_synthetic_dataset(bids, network="dmn4", link=link, seed=0)
        if app([str(bids), str(out), "participant", "--network", "dmn4", "--skip-bids-validation"]) != 0:
            raise RuntimeError("participant level failed")
    labels = build_labels(bids, include_group=("MDD",))
    target = labels.target("ketamine", "improvement")
    features, _ = collect_features(out, list(target.index), networks=("dmn4",), allow_missing=True)
    fs = features["dmn4"]
    res = peb_loo(subject_posteriors(fs), target.loc[fs.participants].to_numpy(float), permutations, 0, fs.regions)
    planted = {f"{s}->{t}" for s, t in DEFAULT_PLANTED}
    effects = res["effects"].reset_index(drop=True)
    rows = effects[effects.connection.isin(planted)]
    return {
        "participants": res["participants"], "r": round(res["r"], 3),
        "p_parametric": float(f"{res['p_parametric']:.3g}"),
        "p_permutation": res["p_permutation"], "permutations": permutations,
        "planted": [{"connection": r.connection, "effect_per_sd": round(r.effect_per_sd, 4), "z": round(r.z, 2),
                     "probability_present": round(r.probability_present, 3),
                     "rank": int(effects.index[effects.connection == r.connection][0]) + 1}
                    for r in rows.itertuples()],
        "most_probable": effects.head(3)[["connection", "probability_present"]].round(3).to_dict(orient="records"),
        "seconds": res["seconds"],
        "suite": suite(bids, out, suite_permutations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--permutations", type=int, default=99)
    parser.add_argument("--suite-permutations", type=int, default=999)
    args = parser.parse_args()
    out = {link: cohort(args.work / link, link, args.permutations, args.suite_permutations)
           for link in ("planted", "none")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
