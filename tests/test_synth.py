"""The synthetic ds005917-shaped dataset: real metadata kept, simulated parts correct."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_ketdcm.errors import InputError
from bids_ketdcm.testing import synth
from bids_ketdcm.testing.synth import (
    ketamine_responses,
    make_synthetic_dataset,
    real_rest_runs,
    real_rest_sidecar,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "ds005917"
SPACE = "MNI152NLin2009cAsym"
FMRIPREP_COLUMNS = [
    "global_signal", "csf", "white_matter", "csf_wm", "std_dvars", "dvars",
    "framewise_displacement", "rmsd", "a_comp_cor_00", "c_comp_cor_00", "w_comp_cor_00",
    "cosine00", "non_steady_state_outlier00",
] + [
    f"{p}{s}" for p in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
    for s in ("", "_derivative1", "_power2", "_derivative1_power2")
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", n_subjects=3, seed=7)


# --------------------------------------------------------------------------- real metadata


@pytest.mark.skipif(not REAL.exists(), reason="real ds005917 metadata not available")
def test_compact_sidecars_rebuild_every_real_sidecar():
    files = sorted((REAL / "sidecars").glob("sub-*/ses-*/func/*_task-rest_run-*_bold.json"))
    assert len(files) == len(real_rest_runs()) == 250
    for path in files:
        subject, session, run = re.match(r"(sub-\w+?)_(ses-\w+?)_task-rest_run-(\d+)", path.name).groups()
        original = path.read_text()
        rebuilt = real_rest_sidecar(subject, session, run)
        assert rebuilt == json.loads(original), path.name
        assert list(rebuilt) == list(json.loads(original)), path.name
    listed = {
        tuple(re.match(r"(sub-\w+?)/(ses-\w+?)/func/.*_run-(\d+)_bold", line).groups())
        for line in (REAL / "FILES.txt").read_text().splitlines()
        if re.search(r"task-rest_run-\d+_bold\.nii\.gz$", line)
    }
    assert listed == set(real_rest_runs()[["participant_id", "session_id", "run"]].itertuples(index=False, name=None))


def test_ketamine_responses_from_real_phenotype():
    table = ketamine_responses()
    assert len(table) == 27
    assert table["participant_id"].is_monotonic_increasing
    row = table.set_index("participant_id").loc["sub-MOA101"]
    assert (row.madrs_b0, row.madrs_d2) == (35, 24)
    assert np.isclose(row.r, 11 / 35)
    assert np.isclose(table.set_index("participant_id").loc["sub-MOA111", "r"], 1.0)


# --------------------------------------------------------------------------- raw tree


def test_raw_tree_mirrors_ds005917(dataset):
    participants = pd.read_csv(dataset / "participants.tsv", sep="\t")
    assert list(participants["participant_id"]) == ["sub-MOA101", "sub-MOA102", "sub-MOA104"]
    real = (synth._data_dir() / "participants.tsv").read_text().splitlines()
    kept = [line for line in real[1:] if line.split("\t")[0] in set(participants.participant_id)]
    assert (dataset / "participants.tsv").read_text().splitlines() == [real[0], *kept]
    phenotype = pd.read_csv(dataset / "phenotype" / "phenotype.tsv", sep="\t")
    assert set(phenotype["participant_id"]) == set(participants["participant_id"])
    assert len(phenotype) == 15  # every session row of the three, as in the real table
    description = json.loads((dataset / "dataset_description.json").read_text())
    assert description["SourceDatasets"][0]["DOI"].endswith("ds005917.v1.0.1")
    assert "SIMULATED" in (dataset / "README").read_text()
    bolds = sorted(p.name for p in dataset.glob("sub-*/ses-*/func/*_bold.nii.gz"))
    assert bolds == [
        "sub-MOA101_ses-b0_task-rest_run-01_bold.nii.gz",
        "sub-MOA101_ses-b0_task-rest_run-02_bold.nii.gz",  # the real run-02 of MOA101
        "sub-MOA102_ses-b0_task-rest_run-01_bold.nii.gz",
        "sub-MOA104_ses-b0_task-rest_run-01_bold.nii.gz",
    ]
    sidecar = dataset / "sub-MOA101/ses-b0/func/sub-MOA101_ses-b0_task-rest_run-02_bold.json"
    assert json.loads(sidecar.read_text()) == real_rest_sidecar("sub-MOA101", "ses-b0", "02")
    raw = nib.load(sidecar.with_suffix("").with_suffix(".nii.gz"))
    assert raw.shape[2] == len(json.loads(sidecar.read_text())["SliceTiming"])
    assert raw.header.get_zooms()[3] == 2.5


# --------------------------------------------------------------------------- derivatives


def test_fmriprep_shaped_derivatives(dataset):
    root = dataset / "derivatives" / "fmriprep"
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "fMRIPrep"
    func = root / "sub-MOA102" / "ses-b0" / "func"
    stem = "sub-MOA102_ses-b0_task-rest_run-01"
    bold = nib.load(func / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz")
    mask = nib.load(func / f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz")
    assert bold.shape[:3] == mask.shape and bold.shape[3] == 192
    assert np.allclose(bold.affine, mask.affine) and bold.header.get_zooms() == (7.0, 7.0, 7.0, 2.5)
    assert json.loads((func / f"{stem}_space-{SPACE}_desc-preproc_bold.json").read_text())["RepetitionTime"] == 2.5
    data = np.asarray(bold.dataobj)
    inside = np.asarray(mask.dataobj) > 0
    assert np.all(data[~inside] == 0)
    assert np.all(data[inside][:, 1:] > 900)
    # the non-steady-state volume is brighter, as real dummy scans are
    assert data[inside][:, 0].mean() > 1.2 * data[inside][:, 1:].mean()

    table = pd.read_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", na_values="n/a")
    assert len(table) == 192
    assert set(FMRIPREP_COLUMNS) <= set(table.columns)
    assert table.loc[0, "non_steady_state_outlier00"] == 1 and table["non_steady_state_outlier00"].sum() == 1
    first_row_nan = ["framewise_displacement", "dvars", "std_dvars", "rmsd", "trans_x_derivative1"]
    assert table.loc[0, first_row_nan].isna().all() and not table.loc[1:, first_row_nan].isna().any().any()
    # FD recomputed by hand from the motion columns (Power 2012, 50 mm sphere)
    motion = table[["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]].to_numpy()
    step = np.abs(np.diff(motion, axis=0))
    fd = step[:, :3].sum(axis=1) + 50.0 * step[:, 3:].sum(axis=1)
    assert np.allclose(table["framewise_displacement"][1:], fd, rtol=1e-4, atol=1e-5)
    # global signal = mean over the brain mask, as fMRIPrep computes it
    assert np.allclose(table["global_signal"], data[inside].mean(axis=0), rtol=1e-5)
    # cosine regressors: fMRIPrep's DCT basis for a 128 s cut-off (6 for 192 x 2.5 s)
    cosines = table.filter(like="cosine").to_numpy()
    assert cosines.shape[1] == 6 and np.allclose(cosines.T @ cosines, np.eye(6), atol=1e-4)
    # every CompCor column is described in the JSON (nilearn selects them from it)
    meta = json.loads((func / f"{stem}_desc-confounds_timeseries.json").read_text())
    compcor = [c for c in table.columns if "comp_cor" in c]
    assert compcor and all(meta[c]["Retained"] for c in compcor)
    assert {meta[c]["Mask"] for c in compcor} == {"CSF", "WM", "combined"}
    assert all(c in table.columns for c in meta)


def test_ground_truth_and_planted_link(dataset):
    truth_root = dataset / "derivatives" / "synthetic_truth"
    truth = json.loads((truth_root / "truth.json").read_text())
    assert truth["Seed"] == 7 and truth["Link"] == "planted"
    targets = ["DMN_PCC", "DMN_L_IPC", "DMN_R_IPC"]
    assert truth["PlantedConnections"] == [{"source": "DMN_mPFC", "target": t} for t in targets]
    planted = pd.read_csv(truth_root / "planted.tsv", sep="\t").set_index("participant_id")
    for subject in planted.index:
        for path in (truth_root / subject / "ses-b0" / "func").glob("*_seg-dmn4_desc-true_connectivity.tsv"):
            A = pd.read_csv(path, sep="\t").set_index("target")
            for target in targets:
                assert A.loc[target, "DMN_mPFC"] == pytest.approx(planted.loc[subject, f"DMN_mPFC->{target}"])
            values = A.to_numpy()
            assert np.all(np.diag(values) < 0)
            assert np.linalg.eigvals(values).real.max() < 0
            series = pd.read_csv(str(path).replace("connectivity", "timeseries"), sep="\t")
            assert list(series.columns) == list(A.columns) and len(series) == 192


def test_planted_link_has_the_stated_correlation():
    responses = ketamine_responses()
    rng = np.random.default_rng(0)
    values = synth._planted_values(responses, 2, "planted", 0.9, 0.1, 0.3, rng)
    for k in range(2):
        assert np.corrcoef(values[:, k], responses["r"])[0, 1] == pytest.approx(0.9, abs=1e-12)
        assert values[:, k].mean() == pytest.approx(0.1) and values[:, k].std() == pytest.approx(0.3)
    # "none": the values do not depend on the responses at all
    shuffled = responses.sample(frac=1.0, random_state=1).reset_index(drop=True)
    none_a = synth._planted_values(responses, 1, "none", 0.9, 0.1, 0.3, np.random.default_rng(0))
    none_b = synth._planted_values(shuffled, 1, "none", 0.9, 0.1, 0.3, np.random.default_rng(0))
    assert np.array_equal(none_a, none_b)
    planted_b = synth._planted_values(shuffled, 1, "planted", 0.9, 0.1, 0.3, np.random.default_rng(0))
    assert not np.array_equal(values[:, :1], planted_b)


def test_signal_scaling_keeps_relative_amplitudes():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((192, 3)) * [1.0, 2.0, 3.0]
    scaled, factor = synth._scale_signals(y, 0.5, 2.5)
    assert np.allclose(scaled, y * factor)
    basis = np.column_stack([np.ones(192), synth._cosine_basis(192, 2.5)])
    filtered = scaled - basis @ np.linalg.lstsq(basis, scaled, rcond=None)[0]
    assert filtered.std(axis=0).mean() == pytest.approx(0.5)


# --------------------------------------------------------------------------- behaviour


def test_same_seed_same_files_and_sizes(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_subjects=1, n_scans=64, seed=11)
    b = make_synthetic_dataset(tmp_path / "b", n_subjects=1, n_scans=64, seed=11)
    c = make_synthetic_dataset(tmp_path / "c", n_subjects=1, n_scans=64, seed=12)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    bold = next(a.rglob("*desc-preproc_bold.nii.gz")).relative_to(a)
    assert (a / bold).read_bytes() != (c / bold).read_bytes()
    # MOA101 has two runs; nothing is left beside the dataset
    assert len(list(a.rglob("*desc-preproc_bold.nii.gz"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_full_size_budget(dataset):
    """28 runs of 192 volumes must stay under 30 MB: each run's files under 1.07 MB."""
    func = dataset / "derivatives" / "fmriprep" / "sub-MOA104" / "ses-b0" / "func"
    per_run = sum(p.stat().st_size for p in func.iterdir())
    assert per_run < 1.07e6, per_run


def test_refusals(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(InputError, match=f"output folder {busy} already exists and is not empty"):
        make_synthetic_dataset(busy, n_subjects=1)
    with pytest.raises(InputError, match="--link must be 'planted' or 'none'"):
        make_synthetic_dataset(tmp_path / "a", link="strong")
    with pytest.raises(InputError, match="--n-subjects must lie between 1 and 27"):
        make_synthetic_dataset(tmp_path / "a", n_subjects=28)
    with pytest.raises(InputError, match=r"ROI\(s\) DMN_X are not in network dmn4"):
        make_synthetic_dataset(tmp_path / "a", planted=[("DMN_X", "DMN_PCC")])
    with pytest.raises(InputError, match="unknown network 'dmn5'"):
        make_synthetic_dataset(tmp_path / "a", network="dmn5")
    with pytest.raises(InputError, match=r"no real ds005917 rest run in session\(s\) ses-x9"):
        make_synthetic_dataset(tmp_path / "a", n_subjects=1, sessions=["x9"])
    assert not (tmp_path / "a").exists()


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_run", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        make_synthetic_dataset(tmp_path / "ds", n_subjects=1, n_scans=64)
    assert list(tmp_path.iterdir()) == []
