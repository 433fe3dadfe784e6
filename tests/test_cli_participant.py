"""The BIDS-App participant level through the command line, on synthetic data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bids_ketdcm.bids.derivatives import read_connectivity
from bids_ketdcm.bids.layout import run_bids_validator
from bids_ketdcm.cli.app import main
from bids_ketdcm.testing.synth import make_synthetic_dataset
from bids_ketdcm.threads import available_cpus

SPACE = "MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "bids"
    make_synthetic_dataset(root, n_subjects=3, network="dmn4", link="planted", seed=1, n_scans=512)
    return root


@pytest.fixture(scope="module")
def participant_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "derivatives"
    rc = main([str(dataset), str(out), "participant", "--network", "dmn4"])  # the BIDS validator runs
    return rc, out


def _connectivity_files(out: Path) -> list[Path]:
    return sorted(out.glob("sub-*/ses-b0/func/*_seg-dmn4_meas-dcm_relmat.tsv"))


def test_participant_level_writes_bids_derivatives(participant_run, dataset):
    rc, out = participant_run
    assert rc == 0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "bids-ketdcm"
    files = _connectivity_files(out)
    n_bold = len(list(dataset.glob(f"derivatives/fmriprep/sub-*/ses-b0/func/*space-{SPACE}_desc-preproc_bold.nii.gz")))
    assert len(files) == n_bold >= 3
    for f in files:
        assert f.name.endswith(f"_space-{SPACE}_seg-dmn4_meas-dcm_relmat.tsv")
        sidecar = json.loads(f.with_suffix(".json").read_text())
        assert {"Converged", "FreeEnergy", "Iterations", "VarianceExplained"} <= sidecar.keys()
        # the evidence guarantee ran both paths and kept the higher; the default thread policy was in force
        assert sidecar["FreeEnergy"] == max(sidecar["FreeEnergyPaths"].values())
        assert sidecar["PathKept"] in ("exact Jacobian", "SPM12 path (finite differences)")
        assert sidecar["Threads"]["TorchThreads"] == 1
        # the 3 runs in one batch: min(3, nprocs) groups on as many threads of one torch thread, each
        # with both paths as rows of one batch (4 regions)
        assert sidecar["Threads"]["DCMWorkers"] == min(available_cpus(), 3)
        assert f.with_name(f.name.replace("relmat.tsv", "posterior.npz")).exists()
        ts = f.with_name(f.name.replace("_meas-dcm_relmat", "_desc-denoised_timeseries"))
        assert ts.exists() and ts.with_suffix(".json").exists()
    reports = sorted(out.glob("sub-*.html"))
    assert len(reports) == 3
    assert "Denoising strategy</th><td>simple</td>" in reports[0].read_text()  # each run's own
    assert (out / "logs" / "CITATION.bib").exists()


def test_recovered_connectivity_correlates_with_truth(participant_run, dataset):
    _, out = participant_run
    est, true = [], []
    for f in _connectivity_files(out):
        truth = dataset / "derivatives" / "synthetic_truth" / f.relative_to(out).parent / f.name.replace(
            f"_space-{SPACE}", "").replace("meas-dcm_relmat", "desc-true_connectivity")
        a, _ = read_connectivity(f)
        t, _ = read_connectivity(truth)
        est.append(a.ravel())
        true.append(t.ravel())
    r = np.corrcoef(np.concatenate(est), np.concatenate(true))[0, 1]
    assert r > 0.5, r


def test_derivatives_pass_the_bids_validator(participant_run):
    _, out = participant_run
    errors, tolerated = run_bids_validator(out)
    assert errors == [] and tolerated == []


def test_invalid_bids_dataset_is_refused(dataset, tmp_path, capsys):
    root = _copy(dataset, tmp_path)
    (root / "dataset_description.json").unlink()
    _fails_cleanly([str(root), str(tmp_path / "out"), "participant"], tmp_path, capsys,
                   "is not a valid BIDS dataset")


def test_rerun_skips_finished_runs(participant_run, dataset, caplog):
    _, out = participant_run
    files = _connectivity_files(out)
    before = [f.stat().st_mtime_ns for f in files]
    assert main([str(dataset), str(out), "participant", "--skip-bids-validation"]) == 0
    assert [f.stat().st_mtime_ns for f in files] == before


def _copy(dataset: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bids"
    shutil.copytree(dataset, dst)
    return dst


def _fails_cleanly(args: list[str], out: Path, capsys, expect: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err
    assert not list(out.glob("**/sub-*/**/*_relmat.tsv"))
    assert not list(out.glob("**/logs/CITATION.bib"))  # no stub of a failed run


def test_missing_bids_dir(tmp_path, capsys):
    _fails_cleanly([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"], tmp_path, capsys, "does not exist")


def test_no_fmriprep_derivatives(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    _fails_cleanly([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--skip-bids-validation"],
                   tmp_path, capsys, "fMRIPrep")


def test_unknown_participant_lists_existing(dataset, tmp_path, capsys):
    _fails_cleanly([str(dataset), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                    "--participant-label", "sub-XYZ"], tmp_path, capsys, "available: MOA")


def test_other_space_only(dataset, tmp_path, capsys):
    _fails_cleanly([str(dataset), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                    "--space", "MNI152NLin6Asym"], tmp_path, capsys, f"spaces found: {SPACE}")


def test_output_inside_input_refused(dataset, tmp_path, capsys):
    _fails_cleanly([str(dataset), str(dataset / "sub-MOA101" / "ours"), "participant"], tmp_path, capsys,
                   "inside the raw dataset")
    _fails_cleanly([str(dataset), str(tmp_path / "o"), "participant", "--work-dir",
                    str(dataset / "derivatives" / "fmriprep" / "work")], tmp_path, capsys,
                   "--work-dir " + str(dataset / "derivatives" / "fmriprep" / "work") + " is inside")


def test_unwritable_output(dataset, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").parent.stat().st_mode and __import__("os").access(locked, __import__("os").W_OK):
            pytest.skip("running as a user who can write anywhere")
        _fails_cleanly([str(dataset), str(locked / "out"), "participant", "--skip-bids-validation"], tmp_path,
                       capsys, "not writable")
    finally:
        locked.chmod(0o700)


def test_output_that_cannot_be_created(dataset, tmp_path, capsys):
    """Permissions alone do not tell (root writes anywhere): /proc refuses new folders to everyone."""
    _fails_cleanly([str(dataset), "/proc/bids-ketdcm-test/out", "participant", "--skip-bids-validation"], tmp_path,
                   capsys, "OUTPUT_DIR /proc/bids-ketdcm-test/out cannot be written")


def test_too_few_volumes(dataset, tmp_path, capsys):
    """30 volumes (75 s) are far below the 240 s the participant level requires of a run."""
    import nibabel as nib
    import pandas as pd

    root = _copy(dataset, tmp_path)
    for bold in root.glob(f"derivatives/fmriprep/sub-*/ses-b0/func/*space-{SPACE}_desc-preproc_bold.nii.gz"):
        img = nib.load(bold)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :30], img.affine, img.header), bold)
        confounds = Path(str(bold).split("_space-")[0] + "_desc-confounds_timeseries.tsv")
        table = pd.read_csv(confounds, sep="\t")
        table.iloc[:30].to_csv(confounds, sep="\t", index=False, na_rep="n/a")
    _fails_cleanly([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                    "--participant-label", "MOA101"], tmp_path, capsys,
                   "no run could be inverted:\nBOLD run ")


def test_output_under_a_file(dataset, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    _fails_cleanly([str(dataset), str(blocker / "out"), "participant", "--skip-bids-validation"], tmp_path,
                   capsys, "is a file, not a folder")


def test_missing_confounds(dataset, tmp_path, capsys):
    root = _copy(dataset, tmp_path)
    for f in root.glob("derivatives/fmriprep/sub-*/ses-b0/func/*desc-confounds_timeseries.tsv"):
        f.unlink()
    _fails_cleanly([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation"], tmp_path, capsys,
                   "no confounds file")


def test_corrupt_nifti(dataset, tmp_path, capsys):
    root = _copy(dataset, tmp_path)
    bold = sorted(root.glob(f"derivatives/fmriprep/sub-*/ses-b0/func/*space-{SPACE}_desc-preproc_bold.nii.gz"))[0]
    bold.write_bytes(b"not a nifti at all")
    subject = bold.name.split("_")[0]
    _fails_cleanly([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                    "--participant-label", subject], tmp_path, capsys, bold.name)


def test_missing_repetition_time(dataset, tmp_path, capsys):
    root = _copy(dataset, tmp_path)
    for sidecar in list(root.rglob("*_bold.json")):
        meta = json.loads(sidecar.read_text())
        meta.pop("RepetitionTime", None)
        sidecar.write_text(json.dumps(meta))
    _fails_cleanly([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation"], tmp_path, capsys,
                   "RepetitionTime")


def test_roi_outside_mask(dataset, tmp_path, capsys):
    rois = tmp_path / "outside.tsv"
    rois.write_text("name\tx\ty\tz\nInBrain\t0\t-52\t26\nOutside\t90\t90\t90\n")
    _fails_cleanly([str(dataset), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--network",
                    str(rois)], tmp_path, capsys, "Outside")


def test_bad_options_reported_together(dataset, tmp_path, capsys):
    assert main([str(dataset), str(tmp_path / "out"), "participant", "--network", "dmn99", "--denoise", "magic"]) == 2
    err = capsys.readouterr().err
    assert "dmn99" in err and "magic" in err
