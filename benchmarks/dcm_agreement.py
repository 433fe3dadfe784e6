"""Agreement with SPM12 on every reference case: the README's agreement table, regenerated.

For each case of tests/data/spm-reference with SPM12's full inversion (simulated, and real
resting-state data; see its README):

* the default inversion (exact path + SPM's path, the higher evidence kept): its free energy
  minus SPM's, the path kept, and its posterior A's largest distance from SPM's;
* SPM's path (``jacobian="finite-difference"``) with SPM's recorded basis of the reduced
  parameter space (the identity up to 8 regions; the engine's own where SPM's was not
  recorded): iterations (SPM's), A distance and free-energy difference;
* the same path from SPM's own data features (``csd_data.txt``), where the case has them.

Every inversion runs on one thread, as the app's. Prints one JSON line (a row per case) and
the markdown table on stderr.

Usage: python benchmarks/dcm_agreement.py [--cases n04_seed1 hcp102816_n15 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import SpmCase, inverted_spm_cases  # noqa: E402

from bids_ketdcm.dcm import estimate_csd, invert, scale_timeseries  # noqa: E402
from bids_ketdcm.dcm.priors import MAX_NODES, projected_A_covariance  # noqa: E402
from bids_ketdcm.threads import limit_threads  # noqa: E402


def agreement(name: str) -> dict:
    """The table's figures for one reference case."""
    case = SpmCase(name)
    scaled, _ = scale_timeseries(case.ts)
    csd, freqs = estimate_csd(scaled, case.tr)
    prior_cov_A = projected_A_covariance(scaled) if case.n > MAX_NODES else None
    spm_A, spm_F = case.array("spm_Ep_A.txt"), float(case.meta["F"])
    row: dict = {"case": name, "n": case.n, "real": case.has("source.txt"), "spm_iterations": case.spm_iterations}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = invert(csd, freqs, prior_cov_A=prior_cov_A, device="cpu")
        row.update(default_dF=float(default.F) - spm_F, kept=str(default.extra["path"]),
                   default_dA=float(np.abs(default.A - spm_A).max()))
        basis = case.spm_basis
        row["spm_basis"] = basis is not None or case.n <= MAX_NODES
        spm = invert(csd, freqs, prior_cov_A=prior_cov_A, basis=basis, device="cpu", jacobian="finite-difference")
        row.update(spm_path_iterations=int(spm.iterations), spm_path_dA=float(np.abs(spm.A - spm_A).max()),
                   spm_path_dF=float(spm.F) - spm_F)
        if case.has("csd_data.txt"):
            own = invert(case.csd(), case.freqs, prior_cov_A=prior_cov_A, basis=basis, device="cpu",
                         jacobian="finite-difference")
            row.update(features_dA=float(np.abs(own.A - spm_A).max()), features_dF=float(own.F) - spm_F,
                       features_iterations=int(own.iterations))
    return row


def markdown(rows: list[dict]) -> str:
    """The README's table."""
    lines = ["| case | n | default F - F_SPM | kept | default max abs dA | SPM path iterations (SPM) | "
             "SPM path max abs dA | SPM path F - F_SPM | from SPM's features: dA, F - F_SPM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        basis = "" if r["spm_basis"] else ", own basis"
        features = "-"
        if "features_dA" in r and r["spm_basis"]:  # SPM's features carry 12 digits in the simulated cases
            features = f"{r['features_dA']:.1e}, {r['features_dF']:+.3f}" + ("" if r["real"] else " (12 digits)")
        lines.append(f"| {r['case']} | {r['n']} | {r['default_dF']:+.3f} | {r['kept']} | {r['default_dA']:.3g} | "
                     f"{r['spm_path_iterations']} ({r['spm_iterations']}){basis} | {r['spm_path_dA']:.1e} | "
                     f"{r['spm_path_dF']:+.3f} | {features} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=inverted_spm_cases())
    args = parser.parse_args()
    limit_threads(1)
    rows = []
    for name in sorted(args.cases, key=lambda c: (SpmCase(c).n, SpmCase(c).has("source.txt"), c)):
        rows.append(agreement(name))
        print(f"{name}: default F - F_SPM {rows[-1]['default_dF']:+.3f} ({rows[-1]['kept']})", file=sys.stderr)
    print(json.dumps({"cases": rows}))
    print(markdown(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
