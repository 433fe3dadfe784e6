"""Family-wise error of the group level on null cohorts; prints one JSON line.

Each null cohort: the real ds005917 MDD labels (27 participants, ketamine and placebo) and
random A matrices (dmn4 shape, independent of every label), run through the whole group level
(``run_group``: every label scheme and continuous target, headline models, k = 5, permutation
tests, the primary analysis). A cohort counts as a false positive when any result is
"significant" at 0.05: raw p-values, Holm, Benjamini-Hochberg (false discovery rate; under a
complete null it is the family-wise error), the max-statistic p of the best model, and the
primary analysis alone (one pre-specified test).

400 permutations per test: with 17 tests Holm's smallest reachable p is 17/401 = 0.042.

Usage: python benchmarks/group_fwer.py [--cohorts 200] [--permutations 400] [--nprocs 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from bids_ketdcm.group import GroupOptions, run_group
from bids_ketdcm.group.features import write_connectivity
from bids_ketdcm.group.labels import build_labels

DS = Path(os.environ.get("DS005917", Path(__file__).resolve().parents[1] / "bids_ketdcm" / "data" / "ds005917"))
REGIONS = ["PCC", "mPFC", "lIPL", "rIPL"]


def null_cohort(root: Path, seed: int, permutations: int) -> dict:
    """Run the group level on one null cohort; return which corrections call something significant."""
    bids, out = root / "bids", root / "out"
    (bids / "phenotype").mkdir(parents=True)
    shutil.copy(DS / "participants.tsv", bids)
    for name in ("phenotype.tsv", "phenotype.json"):
        shutil.copy(DS / "phenotype" / name, bids / "phenotype")
    rng = np.random.default_rng(seed)
    for pid in build_labels(bids, include_group=("MDD",)).table.index:
        write_connectivity(out, pid, "b0", "dmn4", rng.normal(0.0, 0.1, (4, 4)), REGIONS)
    summary = run_group(bids, out, GroupOptions(
        include_group=("MDD",), models=("logistic", "elasticnet"), k_values=(5,), nested_repeats=0,
        n_permutations=permutations, report=False, progress=False, nprocs=1, seed=seed))
    res = pd.read_csv(out / "group" / "results.tsv", sep="\t")
    tested = res[res.p_value.notna()]
    return {
        "tests": int(len(tested)),
        "raw": bool((tested.p_value < 0.05).any()),
        "holm": bool((tested.p_holm < 0.05).any()),
        "bh": bool((tested.p_bh < 0.05).any()),
        "maxstat_best": bool(tested.p_maxstat.min() < 0.05),
        "primary": bool(summary["primary"]["p_value"] < 0.05),
    }


def _one(seed: int, permutations: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return null_cohort(Path(tmp), seed, permutations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", type=int, default=200)
    parser.add_argument("--permutations", type=int, default=400)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--progress", type=Path, help="append each cohort's result to this JSON-lines file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    start = time.perf_counter()
    rows = []
    jobs = Parallel(n_jobs=args.nprocs, return_as="generator")(
        delayed(_one)(1000 + s, args.permutations) for s in range(args.cohorts))
    for row in jobs:
        rows.append(row)
        if args.progress is not None:
            with args.progress.open("a") as f:
                f.write(json.dumps(row) + "\n")
    table = pd.DataFrame(rows)
    n = len(table)
    rate = {k: float(table[k].mean()) for k in ("raw", "holm", "bh", "maxstat_best", "primary")}
    se = {k: round(float(np.sqrt(v * (1 - v) / n)), 4) for k, v in rate.items()}
    print(json.dumps({
        "benchmark": "group_fwer", "null_cohorts": n, "n_permutations": args.permutations,
        "tests_per_cohort": int(table.tests.median()),
        "share_any_significant_uncorrected": round(rate["raw"], 4),
        "share_any_significant_holm": round(rate["holm"], 4),
        "share_any_significant_bh": round(rate["bh"], 4),
        "share_best_model_maxstat_significant": round(rate["maxstat_best"], 4),
        "share_primary_significant": round(rate["primary"], 4),
        "standard_errors": se, "target": "<= 0.05 after correction",
        "wall_s": round(time.perf_counter() - start, 1), "nprocs": args.nprocs,
    }))


if __name__ == "__main__":
    main()
