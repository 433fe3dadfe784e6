"""ROI time-series extraction on a small synthetic dataset, and its failure modes."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.maskers import NiftiSpheresMasker
from nilearn.signal import clean

from bids_ketdcm.errors import InputError
from bids_ketdcm.participant.denoise import preset_names
from bids_ketdcm.participant.rois import load_network
from bids_ketdcm.participant.timeseries import (
    DEFAULT_DENOISE,
    RunSkipped,
    eigenvariate,
    extract_timeseries,
    load_run_confounds,
    sphere_voxels,
)
from bids_ketdcm.testing.synth import _cosine_basis, make_synthetic_dataset

SPACE = "MNI152NLin2009cAsym"
TR = 2.5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ts") / "bids"
    return make_synthetic_dataset(root, n_subjects=2, seed=3)


def _files(root: Path, prefix: str) -> dict[str, Path]:
    subject, session = prefix.split("_")[:2]
    func = root / "derivatives" / "fmriprep" / subject / session / "func"
    truth = root / "derivatives" / "synthetic_truth" / subject / session / "func"
    return {
        "bold": func / f"{prefix}_space-{SPACE}_desc-preproc_bold.nii.gz",
        "mask": func / f"{prefix}_space-{SPACE}_desc-brain_mask.nii.gz",
        "confounds": func / f"{prefix}_desc-confounds_timeseries.tsv",
        "truth": truth / f"{prefix}_seg-dmn4_desc-true_timeseries.tsv",
    }


RUNS = [
    "sub-MOA101_ses-b0_task-rest_run-01",
    "sub-MOA101_ses-b0_task-rest_run-02",
    "sub-MOA102_ses-b0_task-rest_run-01",
]


def _extract(files, network=None, **kwargs):
    network = load_network("dmn4") if network is None else network
    return extract_timeseries(files["bold"], files["mask"], files["confounds"], network, TR,
                              **kwargs)


# --------------------------------------------------------------------------- eigenvariate


def test_eigenvariate_is_spm_regions():
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(120)
    weights = rng.uniform(0.5, 1.5, size=7)
    y = np.outer(signal, weights) + 0.1 * rng.standard_normal((120, 7))
    y -= y.mean(axis=0)
    Y, explained = eigenvariate(y)
    # SPM12 spm_regions, m > n branch, written out independently
    s, V = np.linalg.eigh(y.T @ y)
    v = V[:, -1]
    u = y @ v / np.sqrt(s[-1])
    d = np.sign(v.sum())
    expected = u * d * np.sqrt(s[-1] / y.shape[1])
    assert np.allclose(Y, expected)
    assert np.isclose(explained, s[-1] / s.sum())
    assert np.corrcoef(Y, signal)[0, 1] > 0.99  # sign follows the positive eigenimage


def test_eigenvariate_of_identical_voxels_is_the_signal():
    signal = np.sin(np.linspace(0, 12, 80))
    signal -= signal.mean()
    Y, explained = eigenvariate(np.tile(signal[:, None], (1, 5)))
    assert np.allclose(Y, signal) and np.isclose(explained, 1.0)
    assert np.allclose(eigenvariate(signal[:, None])[0], signal)


def test_sphere_voxels_counts_by_hand():
    mask = np.ones((5, 5, 5), dtype=bool)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    # centre at voxel (2, 2, 2) = (4, 4, 4) mm; radius 2 mm holds the centre + 6 faces
    assert sphere_voxels(np.array([4.0, 4.0, 4.0]), 2.0, affine, mask).sum() == 7
    # radius 1 mm: only the voxel holding the centre (nilearn's rule)
    assert sphere_voxels(np.array([4.4, 4.0, 4.0]), 1.0, affine, mask).sum() == 1
    mask[2, 2, 2] = False
    assert sphere_voxels(np.array([4.0, 4.0, 4.0]), 1.0, affine, mask).sum() == 0


# --------------------------------------------------------------------------- synthetic runs


@pytest.mark.parametrize("prefix", RUNS)
def test_series_recover_simulated_signals(dataset, prefix):
    files = _files(dataset, prefix)
    series = _extract(files)
    truth = pd.read_csv(files["truth"], sep="\t").to_numpy()[series.kept_volumes]
    assert series.names == list(load_network("dmn4")["name"])
    assert series.data.shape == (191, 4)  # one non-steady-state volume dropped
    basis = np.column_stack([np.ones(len(truth)), _cosine_basis(192, TR)[series.kept_volumes]])
    high_passed = truth - basis @ np.linalg.lstsq(basis, truth, rcond=None)[0]
    for k in range(4):
        r = np.corrcoef(series.data[:, k], high_passed[:, k])[0, 1]
        assert r > 0.9, (prefix, series.names[k], r)
    assert np.allclose(series.data.mean(axis=0), 0.0, atol=1e-8)
    assert series.denoise["Name"] == DEFAULT_DENOISE
    assert series.denoise["Confounds"][:2] == ["cosine00", "cosine01"] or "csf" in series.denoise["Confounds"]


@pytest.mark.parametrize("denoise", [d for d in preset_names() if d != "none"])
def test_every_strategy_extracts_the_cleaned_signal(dataset, denoise):
    """The ROI series equal the true signal put through the same confound regression."""
    files = _files(dataset, RUNS[0])
    series = _extract(files, denoise=denoise)
    confounds, sample_mask = load_run_confounds(files["bold"], denoise)
    truth = pd.read_csv(files["truth"], sep="\t").to_numpy()
    expected = clean(truth, confounds=None if confounds is None else confounds.to_numpy(),
                     sample_mask=sample_mask, detrend=False, standardize=None, filter=False,
                     t_r=TR)
    for k in range(4):
        assert np.corrcoef(series.data[:, k], expected[:, k])[0, 1] > 0.9, (denoise, k)
    assert series.denoise["Name"] == denoise
    assert len(series.denoise["Confounds"]) == (0 if confounds is None else confounds.shape[1])


def test_mean_summary_matches_nilearn_sphere_masker(dataset):
    files = _files(dataset, RUNS[2])
    network = load_network("dmn4")
    ours = _extract(files, denoise="spm", summary="mean")
    confounds, sample_mask = load_run_confounds(files["bold"], "spm")
    masker = NiftiSpheresMasker(
        network[["x", "y", "z"]].to_numpy(), radius=8.0, mask_img=str(files["mask"]),
        standardize=None, detrend=False, t_r=TR, dtype="float64",  # else int16 means
    )
    theirs = masker.fit_transform(str(files["bold"]), confounds=confounds,
                                  sample_mask=sample_mask)
    theirs = theirs - theirs.mean(axis=0)
    assert np.allclose(ours.data, theirs, atol=1e-8 * np.abs(theirs).max())


def test_qc_figures(dataset):
    files = _files(dataset, RUNS[0])
    table = pd.read_csv(files["confounds"], sep="\t", na_values="n/a")
    plain = _extract(files, denoise="spm")
    assert plain.qc["n_volumes"] == 192
    assert plain.qc["n_non_steady_state"] == 1
    assert plain.qc["n_scrubbed"] == 0 and plain.qc["n_kept"] == 191
    assert np.isclose(plain.qc["mean_fd"], table["framewise_displacement"].mean())
    assert np.isclose(plain.qc["max_fd"], table["framewise_displacement"].max())
    for name, roi in plain.qc["rois"].items():
        assert roi["n_voxels"] >= 4 and roi["n_voxels_zero_variance"] == 0, name
        assert 20 < roi["tsnr"] < 2000
        assert 0 < roi["variance_explained"] <= 1

    scrubbed = _extract(files, denoise="scrubbing")
    high = np.flatnonzero(table["framewise_displacement"].fillna(0) > 0.5)
    assert high.size > 0, "the synthetic run should contain motion spikes"
    assert not set(high) & set(scrubbed.kept_volumes)
    assert 0 not in scrubbed.kept_volumes
    q = scrubbed.qc
    assert q["n_kept"] == len(scrubbed.kept_volumes) == scrubbed.data.shape[0]
    assert q["n_volumes"] == q["n_kept"] + q["n_scrubbed"] + q["n_non_steady_state"]
    assert q["n_scrubbed"] >= high.size
    assert scrubbed.denoise["Parameters"]["fd_threshold"] == 0.5


def test_labelled_image_network_equals_spheres(dataset, tmp_path):
    files = _files(dataset, RUNS[1])
    network = load_network("dmn4")
    img = nib.load(files["mask"])
    labels = np.zeros(img.shape, dtype=np.int16)
    for k, row in enumerate(network.itertuples(), start=1):
        labels[sphere_voxels(np.array([row.x, row.y, row.z]), row.radius_mm, img.affine,
                             np.asarray(img.dataobj) > 0)] = k
    atlas = tmp_path / "atlas.nii.gz"
    nib.Nifti1Image(labels, img.affine).to_filename(atlas)
    (tmp_path / "atlas.tsv").write_text(
        "index\tname\n" + "".join(f"{k}\t{n}\n" for k, n in enumerate(network["name"], 1))
    )
    from_labels = _extract(files, network=load_network(atlas), summary="mean")
    from_spheres = _extract(files, summary="mean")
    assert from_labels.names == from_spheres.names
    assert np.allclose(from_labels.data, from_spheres.data)


# --------------------------------------------------------------------------- hostile input


@pytest.fixture()
def run_copy(dataset, tmp_path) -> dict[str, Path]:
    files = _files(dataset, RUNS[0])
    func = tmp_path / "func"
    shutil.copytree(files["bold"].parent, func)
    return {k: func / v.name for k, v in files.items() if k != "truth"}


def test_roi_outside_the_mask(run_copy, tmp_path):
    path = tmp_path / "far.tsv"
    path.write_text("name\tx\ty\tz\nNear\t3\t54\t-2\nFar\t0\t0\t140\n")
    with pytest.raises(InputError, match=rf"ROI Far has no voxel inside the brain mask {run_copy['mask']}"):
        _extract(run_copy, network=load_network(path))


def test_roi_with_zero_variance(run_copy):
    img = nib.load(run_copy["bold"])
    data = np.asarray(img.dataobj).copy()
    mask = np.asarray(nib.load(run_copy["mask"]).dataobj) > 0
    pcc = load_network("dmn4").iloc[1]
    roi = sphere_voxels(np.array([pcc.x, pcc.y, pcc.z]), 8.0, img.affine, mask)
    data[roi] = 1000
    nib.Nifti1Image(data, img.affine, img.header).to_filename(run_copy["bold"])
    with pytest.raises(InputError, match=rf"ROI DMN_PCC has zero variance .*{run_copy['bold']}"):
        _extract(run_copy)


def test_corrupt_and_wrong_images(run_copy, tmp_path):
    raw = run_copy["bold"].read_bytes()
    run_copy["bold"].write_bytes(gzip.compress(gzip.decompress(raw)[:100_000]))
    with pytest.raises(InputError, match=rf"BOLD image {run_copy['bold']} cannot be read"):
        _extract(run_copy)
    run_copy["bold"].write_bytes(b"garbage")
    with pytest.raises(InputError, match=rf"BOLD image {run_copy['bold']} cannot be read"):
        _extract(run_copy)
    mask_img = nib.load(run_copy["mask"])
    nib.Nifti1Image(np.zeros(mask_img.shape + (3,), np.int16), mask_img.affine).to_filename(
        run_copy["bold"])
    with pytest.raises(InputError, match="confounds file .* 192 rows but the BOLD run has 3"):
        _extract(run_copy)
    nib.Nifti1Image(np.zeros(mask_img.shape, np.int16), mask_img.affine).to_filename(
        run_copy["bold"])
    with pytest.raises(InputError, match="must be 4D"):
        _extract(run_copy)
    run_copy["bold"].write_bytes(raw)
    run_copy["mask"].write_bytes(b"")
    with pytest.raises(InputError, match=rf"brain mask {run_copy['mask']} cannot be read"):
        _extract(run_copy)


def test_confounds_missing_for_the_strategy(run_copy):
    table = pd.read_csv(run_copy["confounds"], sep="\t")
    table.drop(columns=["csf"]).to_csv(run_copy["confounds"], sep="\t", index=False, na_rep="n/a")
    with pytest.raises(InputError, match=rf"{run_copy['confounds']}: cannot load confounds for --denoise spm"):
        _extract(run_copy, denoise="spm")
    # a strategy without WM/CSF still works
    assert _extract(run_copy, denoise="none").data.shape == (191, 4)


def test_too_few_volumes_is_a_skip(run_copy):
    with pytest.raises(RunSkipped, match=r"only 191 of 192 volumes \(478 s\)") as err:
        _extract(run_copy, min_kept_seconds=600)
    assert isinstance(err.value, InputError)
    assert str(run_copy["bold"]) in str(err.value)


def test_unknown_options(run_copy):
    with pytest.raises(InputError, match="--denoise 'aroma' is not a known strategy"):
        _extract(run_copy, denoise="aroma")
    with pytest.raises(InputError, match="--roi-summary 'median'"):
        _extract(run_copy, summary="median")
