"""A-matrix features from derivative connectivity files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bids_ketdcm.bids.features import collect_features, find_connectivity
from bids_ketdcm.errors import InputError
from bids_ketdcm.testing.fixtures import write_a_matrix

REGIONS = ["PCC", "mPFC", "lIPL"]


def _matrix(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.2, (3, 3))


@pytest.fixture
def deriv(tmp_path):
    out = tmp_path / "out"
    for i, pid in enumerate(["sub-01", "sub-02", "sub-03"]):
        write_a_matrix(out, pid, "b0", "dmn3", _matrix(i), REGIONS)
    # sub-04: run-1 did not converge, run-2 did; the first valid run is run-2
    write_a_matrix(out, "sub-04", "b0", "dmn3", _matrix(40), REGIONS, converged=False, run=1)
    write_a_matrix(out, "sub-04", "b0", "dmn3", _matrix(41), REGIONS, run=2)
    # another session and another network
    write_a_matrix(out, "sub-01", "d2", "dmn3", _matrix(99), REGIONS)
    write_a_matrix(out, "sub-01", "b0", "net2", np.eye(2), ["a", "b"])
    return out


def test_feature_layout_and_first_valid_run(deriv):
    feats, missing = collect_features(deriv, ["sub-01", "sub-02", "sub-03", "sub-04"], networks=("dmn3",))
    fs = feats["dmn3"]
    assert missing.empty and fs.participants == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert fs.X.shape == (4, 9)
    # column "src->tgt" holds A[tgt, src] (rows of the TSV are targets)
    col = fs.feature_names.index("PCC->mPFC")
    assert fs.X[0, col] == pytest.approx(_matrix(0)[1, 0])
    assert fs.files[3].endswith("_run-2_space-MNI152NLin2009cAsym_seg-dmn3_meas-dcm_relmat.tsv")
    np.testing.assert_allclose(fs.matrices[3], _matrix(41))
    # an explicit run, and drop_diagonal
    feats, _ = collect_features(deriv, ["sub-04"], networks=("dmn3",), run=2, drop_diagonal=True)
    assert feats["dmn3"].X.shape == (1, 6) and "PCC->PCC" not in feats["dmn3"].feature_names
    # accepting unconverged runs takes run-1
    feats, _ = collect_features(deriv, ["sub-04"], networks=("dmn3",), require_converged=False)
    np.testing.assert_allclose(feats["dmn3"].matrices[0], _matrix(40))


def test_find_connectivity_lists_runs_and_networks(deriv):
    found = find_connectivity(deriv, "ses-b0")
    assert sorted(found.network.unique()) == ["dmn3", "net2"]
    assert list(found[found.participant_id == "sub-04"].run) == [1, 2]


def test_a_dataset_without_sessions_gives_its_runs(tmp_path):
    out = tmp_path / "out"
    for i, pid in enumerate(["sub-01", "sub-02"]):
        write_a_matrix(out, pid, None, "dmn3", _matrix(i), REGIONS)
    assert not list(out.glob("sub-*/ses-*"))
    feats, missing = collect_features(out, ["sub-01", "sub-02"], networks=("dmn3",), session="b0")
    assert missing.empty and feats["dmn3"].participants == ["sub-01", "sub-02"]
    np.testing.assert_allclose(feats["dmn3"].matrices[1], _matrix(1))


def test_missing_participant_is_an_error_unless_allowed(deriv):
    with pytest.raises(InputError, match=r"sub-05 seg-dmn3: no connectivity file.*--allow-missing"):
        collect_features(deriv, ["sub-01", "sub-05"], networks=("dmn3",))
    feats, missing = collect_features(deriv, ["sub-01", "sub-05"], networks=("dmn3",), allow_missing=True)
    assert feats["dmn3"].participants == ["sub-01"]
    assert list(missing.participant_id) == ["sub-05"]


def test_invalid_runs_are_listed(deriv):
    write_a_matrix(deriv, "sub-06", "b0", "dmn3", np.full((3, 3), np.nan), REGIONS)
    write_a_matrix(deriv, "sub-07", "b0", "dmn3", _matrix(7), REGIONS, converged=False)
    with pytest.raises(InputError) as err:
        collect_features(deriv, ["sub-06", "sub-07"], networks=("dmn3",))
    assert "sub-06 seg-dmn3: no valid run" in str(err.value) and "non-finite" in str(err.value)
    assert "sub-07 seg-dmn3: no valid run" in str(err.value) and "Converged is False" in str(err.value)


def test_bad_networks_sessions_and_regions(deriv, tmp_path):
    with pytest.raises(InputError, match="networks dmn99 not found.*dmn3, net2"):
        collect_features(deriv, ["sub-01"], networks=("dmn99",))
    with pytest.raises(InputError, match="no sub-\\*/ses-p9/func"):
        collect_features(deriv, ["sub-01"], session="p9")
    write_a_matrix(deriv, "sub-08", "b0", "dmn3", _matrix(8), ["PCC", "mPFC", "rIPL"])
    with pytest.raises(InputError, match="regions .* differ"):
        collect_features(deriv, ["sub-01", "sub-08"], networks=("dmn3",))
    # a participant with regions in another order is re-ordered, not rejected
    A = _matrix(9)
    perm = [2, 0, 1]
    write_a_matrix(deriv, "sub-09", "b0", "dmn3", A[np.ix_(perm, perm)], [REGIONS[i] for i in perm])
    feats, _ = collect_features(deriv, ["sub-01", "sub-09"], networks=("dmn3",))
    np.testing.assert_allclose(feats["dmn3"].matrices[1], A)


def test_sidecar_written(deriv):
    path = next(deriv.glob("sub-01/ses-b0/func/*seg-dmn3*.json"))
    assert json.loads(path.read_text())["Converged"] is True
