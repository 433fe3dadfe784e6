"""Simulate the PEB reference cohort and write it for SPM12 (``peb_reference.m``).

16 subjects, 4 regions, TR 2.5 s, 192 scans. Subject coupling = group coupling + a
covariate effect on two connections + between-subject noise; each subject is inverted
with :func:`bids_ketdcm.dcm.fit` and its posterior (Ep, Cp, pE, pC, F) is written to
``cohort.mat`` in the format SPM's ``spm_dcm_peb`` reads (one DCM struct per subject is
built by the Octave driver), together with the design matrix X = [1, covariate].

Usage: python scripts/spm/peb_cohort.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.io
import torch

from bids_ketdcm.dcm import fit, simulate
from bids_ketdcm.dcm.priors import ParamLayout, prior_covariance, prior_mean

N_SUBJECTS = 16
N_REGIONS = 4
SEED = 15


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    group = np.array([[-0.5, 0.0, 0.2, 0.0],
                      [0.3, -0.5, 0.0, 0.0],
                      [0.0, 0.25, -0.5, -0.2],
                      [0.0, 0.0, 0.3, -0.5]])
    covariate = rng.standard_normal(N_SUBJECTS)
    covariate = (covariate - covariate.mean()) / covariate.std()
    truth = np.empty((N_SUBJECTS, N_REGIONS, N_REGIONS))
    for s in range(N_SUBJECTS):
        A = group + 0.05 * rng.standard_normal((N_REGIONS, N_REGIONS))
        A[3, 2] += 0.15 * covariate[s]
        A[0, 1] += 0.15 * covariate[s]
        np.fill_diagonal(A, -0.5)
        truth[s] = A
    torch.set_num_threads(1)
    y = simulate(truth, 2.5, 192, seed=SEED)
    post = fit(y, 2.5, device="cpu")
    Ep = ParamLayout(N_REGIONS).pack(post.params)
    scipy.io.savemat(out / "cohort.mat", {
        "Ep": Ep, "Cp": post.cov, "pE": prior_mean(N_REGIONS), "pC": prior_covariance(N_REGIONS),
        "F": np.asarray(post.F, float), "X": np.column_stack([np.ones(N_SUBJECTS), covariate]),
        "truth": truth, "converged": np.asarray(post.converged, float),
    })
    print(f"wrote {out / 'cohort.mat'}; converged {int(np.sum(post.converged))}/{N_SUBJECTS}")


if __name__ == "__main__":
    main()
