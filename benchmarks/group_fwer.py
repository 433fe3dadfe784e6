"""Family-wise error of the group level's exploratory grid on null cohorts; one JSON line.

Each null cohort: the real ds005917 MDD labels (27 participants, ketamine and placebo
analyses) and random features of the dmn4 shape (16 A entries, independent of every label),
run through the group level's suite in memory (the same task building, suite and
multiplicity adjustment as ``run_group``: every label scheme and continuous target, the
headline models, k = 5, permutation tests). A cohort counts as a false positive when any
result is "significant" at 0.05: raw p-values, Holm, Benjamini-Hochberg (false discovery
rate; under a complete null it is the family-wise error), and the max-statistic p of the
best model. The first ``--primary-cohorts`` cohorts also run the primary analysis (one
pre-specified test), whose false-positive rate is reported beside.

400 permutations per test: with 17 tests Holm's smallest reachable p is 17/401 = 0.042.

Usage: python benchmarks/group_fwer.py [--cohorts 200] [--permutations 400] [--nprocs 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from bids_ketdcm.group import GroupOptions
from bids_ketdcm.group.features import FeatureSet
from bids_ketdcm.group.labels import LabelSet, build_labels, read_participants
from bids_ketdcm.group.primary import AnalysisPlan, PrimaryInputs, run_primary
from bids_ketdcm.group.run import _adjust, _tasks
from bids_ketdcm.group.suite import run_suite

DS = Path(os.environ.get("DS005917", Path(__file__).resolve().parents[1] / "bids_ketdcm" / "data" / "ds005917"))
REGIONS = ["PCC", "mPFC", "lIPL", "rIPL"]


def null_cohort(labels: LabelSet, participants: pd.DataFrame, seed: int, permutations: int, primary: bool) -> dict:
    """Run the suite (and optionally the primary analysis) on one null cohort."""
    rng = np.random.default_rng(seed)
    ids = list(labels.table.index)
    A = rng.normal(0.0, 0.1, (len(ids), 4, 4))
    names = [f"{s}->{t}" for t in REGIONS for s in REGIONS]
    features = {"dmn4": FeatureSet(network="dmn4", regions=REGIONS, participants=ids, matrices=A,
                                   X=A.reshape(len(ids), -1), feature_names=names,
                                   pairs=[(t, s) for t in range(4) for s in range(4)], files=[""] * len(ids))}
    options = GroupOptions(include_group=("MDD",), models=("logistic", "elasticnet"), k_values=(5,),
                           nested_repeats=0, n_permutations=permutations, report=False, progress=False,
                           seed=seed)
    tasks, _ = _tasks(labels, features, options, ["ketamine", "placebo"])
    config = options.suite_config()
    suite = run_suite(tasks, config)
    _adjust(suite, tasks, config)
    tested = suite.results[suite.results.p_value.notna()]
    out = {
        "seed": seed, "tests": int(len(tested)),
        "raw": bool((tested.p_value < 0.05).any()),
        "holm": bool((tested.p_holm < 0.05).any()),
        "bh": bool((tested.p_bh < 0.05).any()),
        "maxstat_best": bool(tested.p_maxstat.min() < 0.05),
    }
    if primary:
        result = run_primary(AnalysisPlan(), PrimaryInputs(labels, features, participants, None, permutations, seed))
        out["primary"] = bool(result["p_value"] < 0.05)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", type=int, default=200)
    parser.add_argument("--permutations", type=int, default=400)
    parser.add_argument("--primary-cohorts", type=int, default=50)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--progress", type=Path, help="append each cohort's result to this JSON-lines file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    labels = build_labels(DS, include_group=("MDD",))
    participants = read_participants(DS)
    start = time.perf_counter()
    rows = []
    jobs = Parallel(n_jobs=args.nprocs, return_as="generator")(
        delayed(null_cohort)(labels, participants, 1000 + s, args.permutations, s < args.primary_cohorts)
        for s in range(args.cohorts))
    for row in jobs:
        rows.append(row)
        if args.progress is not None:
            with args.progress.open("a") as f:
                f.write(json.dumps(row) + "\n")
    table = pd.DataFrame(rows)
    n = len(table)
    rate = {k: float(table[k].mean()) for k in ("raw", "holm", "bh", "maxstat_best")}
    primary = table["primary"].dropna() if "primary" in table else pd.Series(dtype=float)
    print(json.dumps({
        "benchmark": "group_fwer", "null_cohorts": n, "n_permutations": args.permutations,
        "tests_per_cohort": int(table.tests.median()),
        "share_any_significant_uncorrected": round(rate["raw"], 4),
        "share_any_significant_holm": round(rate["holm"], 4),
        "share_any_significant_bh": round(rate["bh"], 4),
        "share_best_model_maxstat_significant": round(rate["maxstat_best"], 4),
        "standard_errors": {k: round(float(np.sqrt(v * (1 - v) / n)), 4) for k, v in rate.items()},
        "primary_cohorts": int(len(primary)),
        "share_primary_significant": round(float(primary.astype(float).mean()), 4) if len(primary) else None,
        "target": "<= 0.05 after correction",
        "wall_s": round(time.perf_counter() - start, 1), "nprocs": args.nprocs,
    }))


if __name__ == "__main__":
    main()
