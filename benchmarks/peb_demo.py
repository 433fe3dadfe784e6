"""PEB leave-one-out on the demo's synthetic cohorts: the planted link and the null.

Builds the demo cohort (:func:`bids_ketdcm.testing.synth.make_synthetic_dataset`, dmn4,
seed 0) with ``link="planted"`` and with ``link="none"``, runs the participant level (CLI),
then the PEB leave-one-out of the percentage improvement
(:func:`bids_ketdcm.group.peb_analysis.peb_loo`) and prints one JSON line: per cohort, r,
parametric and permutation p-values, the planted connection's effect and posterior
probability and its rank among the 16 connections, and the seconds.

Usage: python benchmarks/peb_demo.py WORK_DIR [--permutations 99]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bids_ketdcm.cli.app import main as app
from bids_ketdcm.group.features import collect_features
from bids_ketdcm.group.labels import build_labels
from bids_ketdcm.group.peb_analysis import peb_loo, subject_posteriors
from bids_ketdcm.testing.synth import DEFAULT_PLANTED, make_synthetic_dataset


def cohort(root: Path, link: str, permutations: int) -> dict:
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--permutations", type=int, default=99)
    args = parser.parse_args()
    out = {link: cohort(args.work / link, link, args.permutations) for link in ("planted", "none")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
