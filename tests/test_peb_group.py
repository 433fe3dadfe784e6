"""The group level's PEB leave-one-out on derivatives written by the participant-level writers.

12 participants of 4 regions are simulated from the DCM with one connection depending on a
covariate, inverted, and written with the participant level's own writers (time series,
connectivity, posterior). The group reads the posteriors back exactly, predicts the
covariate out of sample, and names the planted connection; shuffled, it does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bids_ketdcm.bids.derivatives import RoiTimeseries, read_posterior, write_connectivity, write_timeseries
from bids_ketdcm.bids.features import collect_features
from bids_ketdcm.bids.naming import RunEntities, connectivity_paths
from bids_ketdcm.dcm import fit, simulate
from bids_ketdcm.dcm.peb import posteriors_from_fit
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.peb_analysis import peb_loo, subject_posteriors
from bids_ketdcm.group.report import peb_section

N, REGIONS = 16, ["R1", "R2", "R3", "R4"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    rng = np.random.default_rng(11)
    x = np.linspace(-1.5, 1.5, N)
    rng.shuffle(x)
    group = np.array([[-0.5, 0.1, 0.0, 0.0], [0.2, -0.5, 0.0, 0.0], [0.0, 0.2, -0.5, 0.1], [0.0, 0.0, 0.2, -0.5]])
    truth = np.stack([group + np.where(np.eye(4, dtype=bool), 0, 0.02 * rng.standard_normal((4, 4)))
                      for _ in range(N)])
    truth[:, 3, 0] += 0.4 * x  # R1 -> R4 depends on the covariate
    torch.set_num_threads(1)
    y = simulate(truth, 2.5, 192, seed=11)
    post = fit(y, 2.5, device="cpu")
    out = tmp_path_factory.mktemp("peb-derivatives")
    participants = [f"sub-{i:02d}" for i in range(N)]
    for i, pid in enumerate(participants):
        run = RunEntities.from_mapping({"sub": pid[4:], "ses": "b0", "task": "rest", "space": "MNI152NLin2009cAsym"})
        series = RoiTimeseries(data=y[i], names=REGIONS, coords=np.zeros((4, 3)), tr=2.5,
                               kept_volumes=np.arange(192), qc={}, denoise={"Name": "none"})
        network = pd.DataFrame({"name": REGIONS})
        write_timeseries(out, run, "toy4", network, series, [], {})
        write_connectivity(out, run, "toy4", series, post.subject(i), [], {})
    return {"out": out, "x": x, "post": post, "y": y, "participants": participants}


def test_posteriors_read_back_exactly(cohort) -> None:
    features, _ = collect_features(cohort["out"], cohort["participants"], require_converged=False)
    read = subject_posteriors(features["toy4"])
    direct = posteriors_from_fit(cohort["post"], cohort["y"], cohort["participants"])
    np.testing.assert_allclose(read.Ep, direct.Ep, rtol=1e-12)
    np.testing.assert_allclose(read.Cp, direct.Cp, rtol=1e-12)
    np.testing.assert_allclose(read.pC, direct.pC, rtol=1e-12)
    np.testing.assert_allclose(read.F, direct.F, rtol=1e-12)


def test_peb_loo_finds_the_planted_connection_and_not_a_shuffled_one(cohort) -> None:
    features, _ = collect_features(cohort["out"], cohort["participants"], require_converged=False)
    fs = features["toy4"]
    posts = subject_posteriors(fs)
    res = peb_loo(posts, cohort["x"], 4, 0, fs.regions)
    assert res["r"] > 0.4 and res["p_parametric"] < 0.05
    assert res["p_permutation"] in {k / 5 for k in range(1, 6)}
    between = res["effects"][~res["effects"]["self"]]
    assert between.iloc[0]["connection"] == "R1->R4" and between.iloc[0]["probability_present"] > 0.95
    shuffled = cohort["x"][np.random.default_rng(1).permutation(N)]
    null = peb_loo(posts, shuffled, 0, 0, fs.regions)
    assert null["p_parametric"] > 0.05 and null["p_permutation"] is None
    record = {"target": "improvement", "networks": {"toy4": {
        **{k: res[k] for k in ("r", "p_parametric", "p_permutation", "n_permutations", "participants")},
        "top_effects": res["effects"].head(3).to_dict(orient="records")}}}
    html = peb_section(record)
    assert "R1-&gt;R4" in html or "R1->R4" in html


def test_missing_posterior_is_named(cohort, tmp_path) -> None:
    features, _ = collect_features(cohort["out"], cohort["participants"], require_converged=False)
    fs = features["toy4"]
    tsv = Path(fs.files[0])
    run = RunEntities.from_mapping({"sub": "00", "ses": "b0", "task": "rest", "space": "MNI152NLin2009cAsym"})
    npz = connectivity_paths(cohort["out"], run, "toy4")["npz"]
    moved = tmp_path / "moved.npz"
    npz.rename(moved)
    try:
        with pytest.raises(ValueError, match="posterior.npz"):
            read_posterior(tsv)
        with pytest.raises(InputError, match="--peb: .*posterior.npz"):
            subject_posteriors(fs)
    finally:
        moved.rename(npz)
