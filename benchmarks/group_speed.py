"""Speed of the whole group level on a ds005917-sized cohort; prints one JSON line.

27 MDD participants (the real ds005917 phenotype), three networks of 4, 11 and 15
regions with synthetic A matrices (estimation noise sd 0.05 Hz; one connection carries
0.5 Hz x the real ketamine improvement), and the default suite: 6 label schemes and 3
continuous targets, every model, k = 3, 4, 5 and nested CV (5 x 10), 1000 permutations
of the headline model, 100 nested-CV permutations (inner search redone) of the logistic
model on the ketamine binary targets, the primary analysis (1000 permutations), ketamine
and placebo, report included. Target: <= 180 s on 2 cores. ``stage_seconds`` holds the
stages' wall times and ``nested_permutations_cpu`` the seconds the nested nulls took in the
workers, summed (what they cost).

Usage: python benchmarks/group_speed.py [--nprocs 2] [--permutations 1000]
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

from bids_ketdcm.group import GroupOptions, run_group
from bids_ketdcm.group.labels import build_labels
from bids_ketdcm.testing.fixtures import write_a_matrix

#: The real ds005917 metadata (CC0), as bundled with the package (override: $DS005917).
DS = Path(os.environ.get("DS005917", Path(__file__).resolve().parents[1] / "bids_ketdcm" / "data" / "ds005917"))
NETWORKS = {"dmn4": 4, "dmn11": 11, "dmn15": 15}


def make_cohort(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """BIDS folder with the real phenotype and a derivatives folder of A matrices."""
    bids, out = root / "bids", root / "out"
    (bids / "phenotype").mkdir(parents=True)
    shutil.copy(DS / "participants.tsv", bids)
    for name in ("phenotype.tsv", "phenotype.json"):
        shutil.copy(DS / "phenotype" / name, bids / "phenotype")
    labels = build_labels(bids, include_group=("MDD",))
    r = labels.table["improvement"]
    rng = np.random.default_rng(seed)
    for network, n in NETWORKS.items():
        regions = [f"{network}_r{i}" for i in range(n)]
        base = rng.normal(0.05, 0.1, (n, n))
        np.fill_diagonal(base, -0.5)
        for pid in labels.table.index:
            A = base + rng.normal(0, 0.05, (n, n))
            A[1, 0] += 0.5 * (r[pid] if pd.notna(r[pid]) else r.mean())
            write_a_matrix(out, pid, "b0", network, A, regions)
    return bids, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--permutations", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bids, out = make_cohort(Path(tmp))
        start = time.perf_counter()
        summary = run_group(bids, out, GroupOptions(include_group=("MDD",), nprocs=args.nprocs,
                                                    n_permutations=args.permutations, progress=False))
        wall = time.perf_counter() - start
        res = pd.read_csv(out / "group" / "results.tsv", sep="\t")
        info = json.loads((out / "group" / "results.json").read_text())
    head = res[(res.treatment == "ketamine") & (res.target == "binary25") & (res.model == "logistic")
               & (res.protocol == "kfold5")]
    print(json.dumps({
        "benchmark": "group_speed",
        "subjects": summary["participants"]["ketamine"],
        "networks": len(NETWORKS),
        "tasks": summary["n_tasks"],
        "results_rows": len(res),
        "n_permutations": args.permutations,
        "nprocs": args.nprocs,
        "wall_s": round(wall, 1),
        "target_s": 180,
        "cpu_count": os.cpu_count(),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "binary25_bacc_kfold5_by_network": dict(zip(head.network, head.headline.round(3), strict=True)),
        "binary25_p_by_network": dict(zip(head.network, head.p_value.round(4), strict=True)),
        "suite_seconds_in_results_json": info["seconds"],
        "stage_seconds": summary["timings"],
        "nested_permutations": int(res[res.protocol == "nested"].n_permutations.max()),
        "primary": {"balanced_accuracy": round(summary["primary"]["models"]["imaging"]["balanced_accuracy"]
                                               ["estimate"], 3), "p": summary["primary"]["p_value"]},
    }))


if __name__ == "__main__":
    main()
