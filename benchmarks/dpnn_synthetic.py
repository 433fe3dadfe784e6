"""The paper's synthetic experiment: DPNN vs baselines; prints one JSON line of figures.

10,000 patients (5 latent prototypes x 2,000), 4 treatments, 20 observed features,
stratified 5-fold CV repeated 4 times (20 fold-repeats). Per method: median and MAD over
fold-repeats of AUC, RPL, MRR (tie-aware and the paper's column-order convention) and RR;
Wilcoxon tests of DPNN's RPL against random and the T-learner; RPL by stratum (where DPNN
wins or loses); run time; the paper's figures for context. DPNN settings:
``bids_ketdcm.testing.dpnn_synthetic.FAST_DPNN`` (its module docstring says why they differ from
the paper's).

Usage: python benchmarks/dpnn_synthetic.py [--repeats 4] [--seed 0] [--paper-batch]
"""

from __future__ import annotations

import argparse
import json
import logging

from bids_ketdcm.group.treatment.dpnn import DPNNSettings
from bids_ketdcm.testing.dpnn_synthetic import FAST_DPNN, SyntheticConfig, run_dpnn_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-prototype", type=int, default=2000)
    parser.add_argument(
        "--paper-batch", action="store_true",
        help="the paper's settings: batch 10, lr 1e-4, constant rate, dropout 0.5, one initialisation (4x slower)",
    )
    parser.add_argument("--threshold-outcome", action="store_true", help="outcome = probability >= 0.5")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dpnn = DPNNSettings() if args.paper_batch else FAST_DPNN
    config = SyntheticConfig(n_per_prototype=args.per_prototype, threshold_outcome=args.threshold_outcome)
    out = run_dpnn_synthetic(
        config, n_splits=5, repeats=args.repeats, seed=args.seed, dpnn=dpnn, outdir=args.output_dir
    )

    def short(x: float) -> float:
        return round(x, 4)

    def sig(p: float) -> float:  # p-values: 3 significant digits, never rounded to 0
        return float(f"{p:.3g}")

    methods = {
        m: {
            metric: {"median": short(v[metric]["median"]), "mad": short(v[metric]["mad"])}
            for metric in ("auc", "rpl", "mrr", "mrr_column", "rr")
        }
        | {"seconds_per_fold": round(v["seconds_per_fold"], 2)}
        for m, v in out["summary"].items()
    }
    tests = out["tests"]["rpl"]
    where = out["where"]
    line = {
        "benchmark": "dpnn_synthetic",
        "n_patients": out["data"]["n"],
        "fold_repeats": out["n_splits"] * out["n_repeats"],
        "data": {k: short(v) if isinstance(v, float) else v for k, v in out["data"].items()},
        "dpnn_settings": {
            k: out["dpnn_settings"][k]
            for k in ("batch_size", "lr", "lr_schedule", "epochs", "dropout", "n_init", "n_prototypes")
        },
        "methods": methods,
        "bar": {k: (sig(v) if k.startswith("p_") else short(v)) if isinstance(v, float) else v for k, v in out["bar"].items()},
        "rpl_friedman_p": sig(tests["friedman"]["p"]) if tests["friedman"] else None,
        "rpl_wilcoxon_bonferroni": {f"{p['a']}-{p['b']}": sig(p["p_bonferroni"]) for p in tests["pairs"]},
        "mrr_wilcoxon_bonferroni": {
            f"{p['a']}-{p['b']}": sig(p["p_bonferroni"]) for p in out["tests"]["mrr"]["pairs"]
        },
        "rpl_by_cluster": {m: [short(x) for x in where["rpl_by_cluster"][m]] for m in ("dpnn", "tlearner", "kmnn", "random")},
        "truth_sd_within_cluster": [short(x) for x in where["truth_sd_within_cluster"]],
        "rpl_by_gap_quartile": {m: [short(x) for x in where["rpl_by_gap_quartile"][m]] for m in ("dpnn", "tlearner", "kmnn", "random")},
        "gap_quartile_edges": [short(x) for x in where["gap_quartile_edges"]],
        "seconds": round(out["seconds"], 1),
        "paper": out["paper"],
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
