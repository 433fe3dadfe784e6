"""Does the planted A-response link of the synthetic dataset survive estimation?

Builds the 27-participant synthetic dataset twice (``link="planted"`` and the null
``link="none"``), extracts the ROI series with the participant-level pipeline (layout,
denoising, eigenvariates; first run of each participant), inverts spectral DCM with
:func:`bids_ketdcm.dcm.fit`, and also inverts the simulated ROI signals themselves.
Prints one JSON line of Pearson correlations between each planted connection's true value,
its estimate and the real MADRS ketamine response r (means over the planted connections,
and per connection), plus sizes and timings.

Usage: ``python benchmarks/synth_link_strength.py [--seeds 0 1 2] [--n-scans 192]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def _estimate(root: Path, work: Path) -> dict:
    from bids_ketdcm.bids.layout import find_bold_runs
    from bids_ketdcm.dcm import fit
    from bids_ketdcm.participant.rois import load_network
    from bids_ketdcm.participant.timeseries import extract_timeseries

    truth = json.loads((root / "derivatives/synthetic_truth/truth.json").read_text())
    planted = pd.read_csv(root / "derivatives/synthetic_truth/planted.tsv", sep="\t")
    names = truth["ROIs"]
    links = [(names.index(k["target"]), names.index(k["source"]), f"{k['source']}->{k['target']}")
             for k in truth["PlantedConnections"]]

    runs = [r for r in find_bold_runs(root) if r.run in (None, "01")]
    network = load_network(truth["Network"])
    start = time.perf_counter()
    series = [extract_timeseries(r.bold, r.mask, r.confounds, network, r.tr).data for r in runs]
    extract_s = time.perf_counter() - start
    true_series = [
        pd.read_csv(
            root / "derivatives/synthetic_truth" / f"sub-{r.subject}" / f"ses-{r.session}"
            / "func" / f"{r.prefix}_seg-{truth['Network']}_desc-true_timeseries.tsv",
            sep="\t",
        ).to_numpy()
        for r in runs
    ]
    true_A = np.stack([
        pd.read_csv(
            root / "derivatives/synthetic_truth" / f"sub-{r.subject}" / f"ses-{r.session}"
            / "func" / f"{r.prefix}_seg-{truth['Network']}_desc-true_connectivity.tsv",
            sep="\t",
        )[names].to_numpy()
        for r in runs
    ])
    start = time.perf_counter()
    post = fit(np.stack(series), truth["RepetitionTime"], device="cpu")
    post_true = fit(np.stack(true_series), truth["RepetitionTime"], device="cpu")
    fit_s = time.perf_counter() - start

    def as_numpy(value):
        return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    est = as_numpy(post.A_hz)
    est_true = as_numpy(post_true.A_hz)
    table = planted.set_index("participant_id").loc[[f"sub-{r.subject}" for r in runs]]
    def per_link(estimate: np.ndarray) -> tuple[list[float], list[float]]:
        truth_r = [_pearson(true_A[:, t, s], estimate[:, t, s]) for t, s, _ in links]
        madrs_r = [_pearson(estimate[:, t, s], table["r_ketamine"]) for t, s, _ in links]
        return truth_r, madrs_r

    true_est, est_madrs = per_link(est)
    true_est_sim, est_sim_madrs = per_link(est_true)
    return {
        "n_runs": len(runs),
        "n_volumes_kept": int(series[0].shape[0]),
        "links": [c for _, _, c in links],
        "r_true_link_vs_madrs": _pearson(table[links[0][2]], table["r_ketamine"]),
        "r_true_vs_est_pipeline": float(np.mean(true_est)),
        "r_true_vs_est_simulated": float(np.mean(true_est_sim)),
        "r_est_pipeline_vs_madrs": float(np.mean(est_madrs)),
        "r_est_simulated_vs_madrs": float(np.mean(est_sim_madrs)),
        "r_true_vs_est_pipeline_per_link": [round(x, 3) for x in true_est],
        "r_est_pipeline_vs_madrs_per_link": [round(x, 3) for x in est_madrs],
        "converged_fraction": float(np.mean(as_numpy(post.converged))),
        "extract_s": round(extract_s, 1),
        "fit_s": round(fit_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-scans", type=int, default=192)
    args = parser.parse_args()

    from bids_ketdcm.testing.synth import make_synthetic_dataset

    torch.set_num_threads(1)
    per_seed: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            per_seed[seed] = {}
            for link in ("planted", "none"):
                start = time.perf_counter()
                root = make_synthetic_dataset(tmp / f"{link}{seed}", link=link, seed=seed,
                                              n_scans=args.n_scans)
                elapsed = time.perf_counter() - start
                size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
                result = _estimate(root, tmp / f"work-{link}{seed}")
                result.update(generate_s=round(elapsed, 1), dataset_mb=round(size / 1e6, 2))
                per_seed[seed][link] = result
    summary = {}
    for link in ("planted", "none"):
        for key in ("r_true_vs_est_pipeline", "r_true_vs_est_simulated",
                    "r_est_pipeline_vs_madrs", "r_est_simulated_vs_madrs"):
            values = [per_seed[s][link][key] for s in args.seeds]
            summary[f"{link}_{key}_mean"] = round(float(np.mean(values)), 3)
            summary[f"{link}_{key}_sd"] = round(float(np.std(values)), 3)
    print(json.dumps({"n_scans": args.n_scans, "seeds": args.seeds, "summary": summary,
                      "per_seed": per_seed}))


if __name__ == "__main__":
    main()
