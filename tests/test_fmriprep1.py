"""fMRIPrep 1.0/1.1 outputs (``_bold_space-S_preproc``, ``_bold_space-S_brainmask``,
``_bold_confounds.tsv`` with CamelCase columns, no dataset_description.json before 1.1.5):
found, translated in the work folder, denoised and inverted end to end."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SPACE

from bids_ketdcm.bids.layout import find_bold_runs
from bids_ketdcm.cli.app import main
from bids_ketdcm.errors import InputError
from bids_ketdcm.participant.confounds import modern_confounds
from bids_ketdcm.participant.rois import load_network
from bids_ketdcm.participant.timeseries import extract_timeseries

#: fMRIPrep 1.0/1.1 column names of the later columns (their docs/outputs.rst and
#: workflows/bold/confounds.py), written here independently of the app's translation.
CAMEL = {"trans_x": "X", "trans_y": "Y", "trans_z": "Z", "rot_x": "RotX", "rot_y": "RotY", "rot_z": "RotZ",
         "csf": "CSF", "white_matter": "WhiteMatter", "global_signal": "GlobalSignal",
         "framewise_displacement": "FramewiseDisplacement", "std_dvars": "stdDVARS", "dvars": "non-stdDVARS"}
PREFIXES = {"a_comp_cor_": "aCompCor", "cosine": "Cosine", "non_steady_state_outlier": "NonSteadyStateOutlier"}
RUN = "sub-01_task-rest_run-1"


def _camel(column: str) -> str | None:
    if column in CAMEL:
        return CAMEL[column]
    return next((new + column[len(old):] for old, new in PREFIXES.items() if column.startswith(old)), None)


def legacy_dataset(root: Path, template: dict[str, Path]) -> Path:
    """A raw dataset (TR in its top-level sidecar) with fMRIPrep 1.0-shaped derivatives made of
    the template run's voxels; also a T1w-space run and an ICA-AROMA variant, which are not selected."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "old", "BIDSVersion": "1.0.2"}))
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.5, "TaskName": "rest"}))
    raw = root / "sub-01" / "func" / f"{RUN}_bold.nii.gz"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"")  # never read: only its sidecars are
    func = root / "derivatives" / "fmriprep" / "sub-01" / "func"  # fMRIPrep < 1.1.5: no dataset_description.json
    func.mkdir(parents=True)
    for name, role in ((f"{RUN}_bold_space-{SPACE}_preproc.nii.gz", "bold"),
                       (f"{RUN}_bold_space-{SPACE}_brainmask.nii.gz", "mask"),
                       (f"{RUN}_bold_space-{SPACE}_variant-smoothAROMAnonaggr_preproc.nii.gz", "bold"),
                       (f"{RUN}_bold_space-T1w_preproc.nii.gz", "bold"),
                       (f"{RUN}_bold_space-T1w_brainmask.nii.gz", "mask")):
        os.link(template[role], func / name)
    modern = pd.read_csv(template["confounds"], sep="\t", dtype=str, keep_default_na=False)
    kept = {c: _camel(c) for c in modern.columns if _camel(c)}
    modern[list(kept)].rename(columns=kept).to_csv(func / f"{RUN}_bold_confounds.tsv", sep="\t", index=False)
    return root


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, tiny_run) -> Path:
    return legacy_dataset(tmp_path_factory.mktemp("fmriprep1") / "bids", tiny_run)


def _inputs_digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def test_runs_and_companions_are_found(legacy):
    [run] = find_bold_runs(legacy)
    func = legacy / "derivatives" / "fmriprep" / "sub-01" / "func"
    assert run.bold == func / f"{RUN}_bold_space-{SPACE}_preproc.nii.gz"
    assert run.mask == func / f"{RUN}_bold_space-{SPACE}_brainmask.nii.gz"
    assert run.confounds == func / f"{RUN}_bold_confounds.tsv"
    assert run.tr == 2.5 and run.run == "1" and run.space == SPACE
    assert run.entities.label == "task-rest_run-1"
    assert [r.space for r in find_bold_runs(legacy, space="T1w")] == ["T1w"]
    # the 1.x folder itself as BIDS_DIR: found without dataset_description.json; the TR is asked
    # of the 1.x sidecar name (no raw dataset to fall back on)
    with pytest.raises(InputError, match=rf"RepetitionTime of .* is missing: not in .*{RUN}_bold_space-{SPACE}_preproc"
                                         r"\.json"):
        find_bold_runs(legacy / "derivatives" / "fmriprep")


@pytest.mark.parametrize("missing, message", [
    (f"{RUN}_bold_space-{SPACE}_brainmask.nii.gz", rf"no brain mask beside it \(expected .*/{RUN}_bold_space-{SPACE}"
                                                   r"_brainmask\.nii\.gz\)"),
    (f"{RUN}_bold_confounds.tsv", rf"no confounds file for this run \(expected .*/{RUN}_bold_confounds\.tsv\)")])
def test_missing_companions_are_named_as_fmriprep1_named_them(tmp_path, tiny_run, missing, message):
    root = legacy_dataset(tmp_path / "bids", tiny_run)
    (root / "derivatives" / "fmriprep" / "sub-01" / "func" / missing).unlink()
    with pytest.raises(InputError, match=message):
        find_bold_runs(root)


def test_translation_reproduces_the_later_columns(legacy, tiny_run, tmp_path):
    """Renamed columns are the same numbers; the expansions fMRIPrep 1.4 added are recomputed
    (from 6-digit values, so to about 1e-5 of their scale)."""
    [run] = find_bold_runs(legacy)
    link, table, record = modern_confounds(run.bold, run.confounds, tmp_path)
    assert link.name == f"{RUN}_space-{SPACE}_desc-preproc_bold.nii.gz" and link.resolve() == run.bold.resolve()
    assert table.name == f"{RUN}_desc-confounds_timeseries.tsv" and table.parent == link.parent
    ours = pd.read_csv(table, sep="\t", na_values="n/a")
    truth = pd.read_csv(tiny_run["confounds"], sep="\t", na_values="n/a")
    expected = [c for c in truth.columns if _camel(c) or c.split("_derivative1")[0].split("_power2")[0] in CAMEL]
    assert sorted(ours.columns) == sorted(expected)
    for column in ours.columns:
        base = column.split("_derivative1")[0].split("_power2")[0]
        if base == column:  # renamed: the very numbers
            np.testing.assert_array_equal(ours[column], truth[column], err_msg=column)
            continue
        # 6 significant digits: each value off by 5e-6 of the column's largest at most
        size, step = np.nanmax(np.abs(truth[base])), np.nanmax(np.abs(truth[f"{base}_derivative1"]))
        atol = {"_derivative1": 2e-5 * size, "_power2": 2e-5 * size**2,
                "_derivative1_power2": 4e-5 * size * step + 1e-9 * size**2}[column[len(base):]]
        np.testing.assert_allclose(ours[column], truth[column], rtol=0, atol=atol, err_msg=column)
    assert record["Renamed"]["RotX"] == "rot_x" and record["LeftOut"] == []
    meta = json.loads(table.with_suffix(".json").read_text())
    assert {k: v["Mask"] for k, v in meta.items()} == {c: "combined" for c in ours if c.startswith("a_comp_cor")}


def _recomputed(root: Path, template: dict[str, Path]) -> dict[str, Path]:
    """The template run in fMRIPrep 20.2+ names, its expansions recomputed from the table's own
    6-digit values (as fMRIPrep computes them from its own): the reference for the 1.x run."""
    table = pd.read_csv(template["confounds"], sep="\t", na_values="n/a")
    for base in [c for c in CAMEL if f"{c}_power2" in table]:
        values = table[base].to_numpy(float)
        step = np.r_[np.nan, values[1:] - values[:-1]]
        table[f"{base}_derivative1"], table[f"{base}_power2"] = step, values**2
        table[f"{base}_derivative1_power2"] = step**2
    files = {role: root / template[role].name for role in ("bold", "mask", "confounds", "confounds_json")}
    root.mkdir()
    for role in ("bold", "mask", "confounds_json"):
        os.link(template[role], files[role])
    table.to_csv(files["confounds"], sep="\t", index=False, na_rep="n/a")
    return files


@pytest.mark.parametrize("denoise", ["spm", "36p", "compcor", "scrubbing"])
def test_presets_denoise_as_with_the_later_names(legacy, tiny_run, tmp_path, denoise):
    """Every family of presets (basic, expansions, CompCor, scrubbing) gives the series it gives
    on the same run named by fMRIPrep 20.2+."""
    [run] = find_bold_runs(legacy)
    network = load_network("dmn4")
    reference = _recomputed(tmp_path / "reference", tiny_run)
    old = extract_timeseries(run.bold, run.mask, run.confounds, network, run.tr, denoise=denoise,
                             work_dir=tmp_path / "work", min_kept_seconds=0)
    new = extract_timeseries(reference["bold"], reference["mask"], reference["confounds"], network, 2.5,
                             denoise=denoise, min_kept_seconds=0)
    assert old.denoise["Confounds"] == new.denoise["Confounds"]
    np.testing.assert_array_equal(old.kept_volumes, new.kept_volumes)
    np.testing.assert_allclose(old.data, new.data, rtol=0, atol=1e-6 * np.abs(new.data).max())
    assert old.qc == new.qc
    assert old.denoise["ConfoundsTranslated"]["Source"] == run.confounds.name


def test_participant_level_end_to_end(legacy, tmp_path):
    before = _inputs_digest(legacy)
    out, work = tmp_path / "out", tmp_path / "work"
    assert main([str(legacy), str(out), "participant", "--skip-bids-validation", "--work-dir", str(work)]) == 0
    assert _inputs_digest(legacy) == before
    func = out / "sub-01" / "func"
    stem = f"{RUN}_space-{SPACE}_seg-dmn4"
    relmat = pd.read_csv(func / f"{stem}_meas-dcm_relmat.tsv", sep="\t")
    assert relmat.shape == (4, 5) and np.isfinite(relmat.iloc[:, 1:].to_numpy()).all()
    series = json.loads((func / f"{stem}_desc-denoised_timeseries.json").read_text())
    assert series["Sources"] == [f"bids:fmriprep:sub-01/func/{RUN}_bold_space-{SPACE}_preproc.nii.gz",
                                 f"bids:fmriprep:sub-01/func/{RUN}_bold_space-{SPACE}_brainmask.nii.gz",
                                 f"bids:fmriprep:sub-01/func/{RUN}_bold_confounds.tsv"]
    assert series["DenoiseStrategy"]["ConfoundsTranslated"]["Renamed"]["FramewiseDisplacement"] == \
        "framewise_displacement"
    text = (func / f"{stem}_desc-denoised_timeseries.json").read_text()
    assert str(tmp_path) not in text and str(legacy) not in text  # no host path
    assert sorted(p.name for p in func.iterdir()) == sorted([
        f"{stem}_desc-denoised_timeseries.tsv", f"{stem}_desc-denoised_timeseries.json",
        f"{stem}_meas-dcm_relmat.tsv", f"{stem}_meas-dcm_relmat.json", f"{stem}_meas-dcm_posterior.npz",
        f"{RUN}_space-{SPACE}_desc-dmn4_mask.nii.gz", f"{RUN}_space-{SPACE}_desc-dmn4_mask.json"])
    assert (out / "sub-01.html").exists()
