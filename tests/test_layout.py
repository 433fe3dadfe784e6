"""pybids layout of fMRIPrep outputs, on a small synthetic dataset, and hostile inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bids_ketdcm.bids.layout import (
    check_writable_dir,
    find_bold_runs,
    load_bids_filters,
    normalise_labels,
    resolve_fmriprep_dir,
)
from bids_ketdcm.errors import InputError
from bids_ketdcm.testing.synth import make_synthetic_dataset

SPACE = "MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layout") / "bids"
    return make_synthetic_dataset(root, n_subjects=2, n_scans=64, seed=5)


@pytest.fixture()
def dataset(source, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(source, tmp_path / "bids"))


def _func(root: Path, subject: str) -> Path:
    return root / "derivatives" / "fmriprep" / f"sub-{subject}" / "ses-b0" / "func"


def test_finds_every_run_with_companions(source, tmp_path):
    before = sorted(p for p in source.rglob("*"))
    runs = find_bold_runs(source)
    assert [(r.subject, r.session, r.run) for r in runs] == [
        ("MOA101", "b0", "01"), ("MOA101", "b0", "02"), ("MOA102", "b0", "01")
    ]
    for r in runs:
        func = _func(source, r.subject)
        stem = f"sub-{r.subject}_ses-b0_task-rest_run-{r.run}"
        assert r.bold == func / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz"
        assert r.mask == func / f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz"
        assert r.confounds == func / f"{stem}_desc-confounds_timeseries.tsv"
        assert r.tr == 2.5 and r.task == "rest" and r.space == SPACE
        assert r.prefix == stem
    # the index lives in memory (one per process); the input is untouched
    assert not (tmp_path / "work").exists()
    assert sorted(p for p in source.rglob("*")) == before


def test_participant_labels(source, tmp_path):
    assert normalise_labels(["sub-MOA102", "MOA102", "MOA101"]) == ["MOA102", "MOA101"]
    assert normalise_labels([]) is None
    runs = find_bold_runs(source, participant_labels=["sub-MOA102"])
    assert [r.subject for r in runs] == ["MOA102"]
    runs = find_bold_runs(source, participant_labels=["MOA101"])
    assert [r.run for r in runs] == ["01", "02"]
    with pytest.raises(InputError, match=r"label\(s\) MOA999 not found in .*available: MOA101, MOA102"):
        find_bold_runs(source, participant_labels=["MOA999"])
    with pytest.raises(InputError, match="not a BIDS participant label"):
        normalise_labels(["sub-MOA_101"])


def test_sessions_and_spaces(source, tmp_path):
    assert len(find_bold_runs(source, session="ses-b0")) == 3
    assert len(find_bold_runs(source, session=None)) == 3
    with pytest.raises(InputError, match=r"no preprocessed BOLD \(task rest, session d2"):
        find_bold_runs(source, session="d2")
    expected = rf"no desc-preproc_bold in space MNI152NLin6Asym .*spaces found: {SPACE} \(use --space\)"
    with pytest.raises(InputError, match=expected):
        find_bold_runs(source, space="MNI152NLin6Asym")


def test_bids_filter_file(source, tmp_path):
    path = tmp_path / "filter.json"
    path.write_text(json.dumps({"bold": {"run": 2}, "t1w": {"acquisition": None}}))
    runs = find_bold_runs(source, bids_filter=load_bids_filters(path))
    assert [(r.subject, r.run) for r in runs] == [("MOA101", "02")]
    path.write_text(json.dumps({"bold": {"acquisition": None}}))
    assert len(find_bold_runs(source, bids_filter=load_bids_filters(path))) == 3
    assert load_bids_filters(None) == {}
    for content, message in [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"bold": [1]}', "'bold' must map entities to values"),
        ('{"bold": {"run": {"x": 1}}}', "the value of 'run' must be"),
    ]:
        path.write_text(content)
        with pytest.raises(InputError, match=rf"--bids-filter-file {path}.*{message}"):
            load_bids_filters(path)
    with pytest.raises(InputError, match="does not exist"):
        load_bids_filters(tmp_path / "absent.json")
    with pytest.raises(InputError, match="invalid BOLD filter"):
        find_bold_runs(source, bids_filter={"flavour": "vanilla"})


def test_fmriprep_folder_resolution(source, tmp_path):
    fmriprep = source / "derivatives" / "fmriprep"
    assert resolve_fmriprep_dir(source) == fmriprep
    assert resolve_fmriprep_dir(source, fmriprep) == fmriprep
    # BIDS_DIR may itself be the fMRIPrep output (RepetitionTime then from its sidecars)
    runs = find_bold_runs(fmriprep)
    assert len(runs) == 3 and runs[0].tr == 2.5
    with pytest.raises(InputError, match="--fmriprep-dir .* does not exist"):
        resolve_fmriprep_dir(source, tmp_path / "nowhere")
    raw_only = tmp_path / "raw"
    raw_only.mkdir()
    (raw_only / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    with pytest.raises(InputError, match="no fMRIPrep derivatives found.*give --fmriprep-dir"):
        resolve_fmriprep_dir(raw_only)
    with pytest.raises(InputError, match="has no dataset_description.json"):
        resolve_fmriprep_dir(source, tmp_path)
    with pytest.raises(InputError, match="BIDS_DIR .* does not exist"):
        resolve_fmriprep_dir(tmp_path / "missing")


def test_missing_companions(dataset, tmp_path):
    func = _func(dataset, "MOA102")
    confounds = func / "sub-MOA102_ses-b0_task-rest_run-01_desc-confounds_timeseries.tsv"
    confounds.unlink()
    expected = rf"no confounds file for this run \(expected {confounds}, or desc-confounds_regressors"
    with pytest.raises(InputError, match=expected):
        find_bold_runs(dataset)
    mask = func / f"sub-MOA101_ses-b0_task-rest_run-02_space-{SPACE}_desc-brain_mask.nii.gz"
    _func(dataset, "MOA101").joinpath(mask.name).unlink()
    with pytest.raises(InputError, match="run-02.*no brain mask beside it"):
        find_bold_runs(dataset, participant_labels=["MOA101"])


def test_repetition_time_fallback_and_absence(dataset, tmp_path):
    sidecar = _func(dataset, "MOA102") / (
        f"sub-MOA102_ses-b0_task-rest_run-01_space-{SPACE}_desc-preproc_bold.json"
    )
    content = json.loads(sidecar.read_text())
    del content["RepetitionTime"]
    sidecar.write_text(json.dumps(content))
    runs = find_bold_runs(dataset, participant_labels=["MOA102"])
    assert runs[0].tr == 2.5  # from the raw sidecar
    raw = dataset / "sub-MOA102" / "ses-b0" / "func" / "sub-MOA102_ses-b0_task-rest_run-01_bold.json"
    content = json.loads(raw.read_text())
    del content["RepetitionTime"]
    raw.write_text(json.dumps(content))
    with pytest.raises(InputError, match=rf"RepetitionTime of .* is missing: not in {sidecar}"):
        find_bold_runs(dataset, participant_labels=["MOA102"])
    content["RepetitionTime"] = "fast"
    raw.write_text(json.dumps(content))
    with pytest.raises(InputError, match=f"RepetitionTime 'fast' of {raw} is not a number"):
        find_bold_runs(dataset, participant_labels=["MOA102"])


def test_several_resolutions_are_kept_apart(dataset, tmp_path):
    func = _func(dataset, "MOA102")
    stem = f"sub-MOA102_ses-b0_task-rest_run-01_space-{SPACE}"
    for suffix in ("desc-preproc_bold.nii.gz", "desc-preproc_bold.json", "desc-brain_mask.nii.gz"):
        shutil.copy(func / f"{stem}_{suffix}", func / f"{stem}_res-2_{suffix}")
    both = find_bold_runs(dataset, participant_labels=["MOA102"])
    assert sorted(r.entities.get("res") or "" for r in both) == ["", "2"]
    assert len({r.entities for r in both}) == 2  # distinct output names
    runs = find_bold_runs(dataset, participant_labels=["MOA102"], resolution="2")
    assert runs[0].bold.name == f"{stem}_res-2_desc-preproc_bold.nii.gz"
    assert runs[0].mask.name == f"{stem}_res-2_desc-brain_mask.nii.gz"
    assert runs[0].confounds.name == "sub-MOA102_ses-b0_task-rest_run-01_desc-confounds_timeseries.tsv"


def test_output_folders(source, tmp_path):
    out = check_writable_dir(tmp_path / "new" / "out", "OUTPUT_DIR", [source])
    assert out.is_dir()
    with pytest.raises(InputError, match=rf"OUTPUT_DIR {source / 'derivatives' / 'x'} is inside the input dataset"):
        check_writable_dir(source / "derivatives" / "x", "OUTPUT_DIR", [source])
    with pytest.raises(InputError, match="--work-dir .* is inside the input dataset"):
        check_writable_dir(source, "--work-dir", [source])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match=rf"OUTPUT_DIR {blocker / 'out'} cannot be written"):
        check_writable_dir(blocker / "out", "OUTPUT_DIR")
