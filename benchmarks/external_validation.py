"""External validation on synthetic cohorts; prints one JSON line.

Three ds005917-shaped synthetic datasets (27 participants, real MADRS): a training cohort
and a test cohort with the planted A-response link (different seeds), and a null cohort
(``link="none"``). A model is trained on the first (``group --save-model``: logistic
regression, C from nested CV) and applied, frozen, to the other two
(``group --apply-model``: balanced accuracy, AUC, permutation p-values, placebo labels).

Two feature sources:

* ``pipeline``: the real participant level (fMRIPrep-shaped images -> denoised ROI series ->
  spectral DCM) on every dataset;
* ``true+noise``: the generator's true A matrices plus Gaussian noise of the given sd on
  every connection (what tests/test_external.py does, at 0.15 Hz).

Usage: python benchmarks/external_validation.py [--seeds 1 2 3] [--n-scans 192]
       [--noise 0.15 0.43] [--skip-pipeline]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SCHEMES = ("binary25", "binary50")


def _options(**extra):
    from bids_ketdcm.group import GroupOptions

    return GroupOptions(include_group=("MDD",), schemes=SCHEMES, targets=(), models=("logistic", "majority"),
                        report=False, progress=False, allow_missing=True, **extra)


def _true_matrices(root: Path) -> dict[str, pd.DataFrame]:
    """First run's true A (DataFrame, rows = targets) of every participant."""
    truth = root / "derivatives" / "synthetic_truth"
    out = {}
    for sub in sorted(p.name for p in truth.glob("sub-*")):
        path = sorted((truth / sub).rglob("*_desc-true_connectivity.tsv"))[0]
        out[sub] = pd.read_csv(path, sep="\t").set_index("target")
    return out


def _write_noisy(root: Path, out: Path, noise: float, seed: int) -> None:
    from bids_ketdcm.testing.fixtures import write_a_matrix

    rng = np.random.default_rng(seed)
    for sub, table in _true_matrices(root).items():
        A = table.to_numpy() + rng.normal(0.0, noise, table.shape)
        write_a_matrix(out, sub, "b0", "dmn4", A, list(table.columns))


def _link_correlation(root: Path, out: Path) -> float:
    """r(estimated planted connection mPFC -> PCC, MADRS ketamine improvement)."""
    from bids_ketdcm.bids.features import collect_features

    planted = pd.read_csv(root / "derivatives" / "synthetic_truth" / "planted.tsv", sep="\t")
    fs, _ = collect_features(out, list(planted.participant_id), allow_missing=True, require_converged=False)
    A = fs["dmn4"]
    col = A.feature_names.index("DMN_mPFC->DMN_PCC")
    r = planted.set_index("participant_id").loc[A.participants, "r_ketamine"]
    return float(np.corrcoef(A.X[:, col], r)[0, 1])


def _train_and_apply(cohorts: dict[str, tuple[Path, Path]], models: Path, permutations: int) -> dict:
    from bids_ketdcm.group import run_group

    run_group(*cohorts["train"], _options(n_permutations=0, save_model=models))
    index = pd.read_csv(models / "models.tsv", sep="\t").set_index("target")
    out = {s: {"train_nested_cv_balanced_accuracy": round(float(index.loc[s, "cv_balanced_accuracy"]), 3)}
           for s in SCHEMES}
    for name in ("planted", "null"):
        applied = run_group(*cohorts[name], _options(n_permutations=permutations, apply_model=models))
        result = pd.DataFrame(applied["results"])
        for row in result.itertuples():
            key = name if row.treatment == "ketamine" else f"{name}_placebo"
            out[row.target][key] = {"balanced_accuracy": round(row.balanced_accuracy, 3),
                                    "p": round(row.p_balanced_accuracy, 4), "roc_auc": round(row.roc_auc, 3),
                                    "p_auc": round(row.p_roc_auc, 4), "n": row.n_participants}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=3, default=[1, 2, 3], help="train, planted test, null seeds")
    parser.add_argument("--n-scans", type=int, default=192)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.15, 0.43])
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from bids_ketdcm.cli.app import main as cli
    from bids_ketdcm.testing.synth import make_synthetic_dataset

    torch.set_num_threads(2)
    seconds: dict[str, float] = {}
    report: dict = {"seeds": dict(zip(("train", "planted", "null"), args.seeds, strict=True)), "n_scans": args.n_scans}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        roots = {}
        start = time.perf_counter()
        for name, seed in zip(("train", "planted", "null"), args.seeds, strict=True):
            roots[name] = make_synthetic_dataset(tmp / name, link="none" if name == "null" else "planted", seed=seed,
                                                 n_scans=args.n_scans)
        seconds["generate"] = time.perf_counter() - start
        for noise in args.noise:
            cohorts = {}
            for k, (name, root) in enumerate(roots.items()):
                out = tmp / f"noise{noise}-{name}"
                _write_noisy(root, out, noise, 1000 + k)
                cohorts[name] = (root, out)
            report[f"true+noise{noise}"] = _train_and_apply(cohorts, tmp / f"models-noise{noise}", args.permutations)
        if not args.skip_pipeline:
            start = time.perf_counter()
            cohorts, link = {}, {}
            for name, root in roots.items():
                out = tmp / f"pipeline-{name}"
                code = cli([str(root), str(out), "participant", "--skip-bids-validation", "--device", "cpu",
                            "--nprocs", "2"])
                if code != 0:
                    raise SystemExit(f"participant level failed on {name} (exit {code})")
                cohorts[name] = (root, out)
                link[name] = round(_link_correlation(root, out), 3)
            seconds["participant_level"] = time.perf_counter() - start
            report["pipeline"] = {"r_estimated_link_vs_madrs": link,
                                  **_train_and_apply(cohorts, tmp / "models-pipeline", args.permutations)}
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
