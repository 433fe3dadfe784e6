"""Hostile inputs: every bad input ends in exit 2 with one message naming the file, no stub
outputs, and the inputs unchanged (byte for byte)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import SPACE, fmriprep_layout

from bids_ketdcm.cli.app import main
from bids_ketdcm.errors import InputError
from bids_ketdcm.participant.rois import load_network
from bids_ketdcm.participant.timeseries import extract_timeseries

STEM = "sub-01_task-rest"


def _dataset(root: Path, template: dict, subjects=("01",)) -> Path:
    names = [f"sub-{s}/func/sub-{s}_task-rest_bold.nii.gz" for s in subjects]
    return fmriprep_layout(root, names, template, raw=True)


def _file(root: Path, role: str, subject: str = "01") -> Path:
    func = root / f"sub-{subject}" / "func"
    stem = f"sub-{subject}_task-rest"
    return func / {"bold": f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz",
                   "json": f"{stem}_space-{SPACE}_desc-preproc_bold.json",
                   "mask": f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz",
                   "confounds": f"{stem}_desc-confounds_timeseries.tsv"}[role]


def _own(path: Path) -> Path:
    """Break the hard link to the shared template before damaging a file."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def _edit_confounds(root: Path, value: str, row: int = 50, column: str = "trans_x") -> Path:
    path = _own(_file(root, "confounds"))
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    table.loc[row, column] = value
    table.to_csv(path, sep="\t", index=False)
    return path


def _tr_in_json(root: Path) -> Path:
    path = _own(_file(root, "json"))
    meta = json.loads(path.read_text())
    meta["RepetitionTime"] = 2.0  # the header says 2.5
    path.write_text(json.dumps(meta))
    return path


def _mask_off_grid(root: Path) -> Path:
    path = _own(_file(root, "mask"))
    img = nib.load(path)
    affine = img.affine.copy()
    affine[:3, 3] += 1000.0  # a metre away
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), path)
    return path


def _empty_mask(root: Path) -> Path:
    path = _own(_file(root, "mask"))
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), path)
    return path


def _corrupt_bold(root: Path) -> Path:
    path = _own(_file(root, "bold"))
    path.write_bytes(b"not a nifti")
    return path


def _truncated_bold(root: Path) -> Path:
    path = _own(_file(root, "bold"))
    path.write_bytes(path.read_bytes()[:5000])
    return path


def _no_confounds(root: Path) -> Path:
    path = _file(root, "confounds")
    path.unlink()
    return path


def _short_confounds(root: Path) -> Path:
    path = _own(_file(root, "confounds"))
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    table.iloc[:80].to_csv(path, sep="\t", index=False)
    return path


def _no_tr(root: Path) -> Path:
    path = _own(_file(root, "json"))
    path.write_text("{}")
    return path


def _filter_file(tmp: Path, text: str) -> Path:
    path = tmp / "filter.json"
    path.write_text(text)
    return path


def _network(tmp: Path, rows: list[tuple]) -> Path:
    path = tmp / "rois.tsv"
    pd.DataFrame(rows, columns=["name", "x", "y", "z", "radius_mm"]).to_csv(path, sep="\t", index=False)
    return path


DMN = [("PCC", 0, -52, 26, 8), ("mPFC", 2, 46, -2, 8), ("lIPL", -50, -62, 32, 8), ("rIPL", 46, -62, 32, 8)]

#: case -> (damage(root, tmp) -> the file the message must name (or a text, or (text, CLI words)), CLI words)
CASES: dict[str, tuple[Callable, list[str]]] = {
    "confounds n/a mid-run": (lambda r, t: _edit_confounds(r, "n/a"), []),
    "confounds text mid-run": (lambda r, t: _edit_confounds(r, "oops"), []),
    "confounds fewer rows": (lambda r, t: _short_confounds(r), []),
    "confounds missing": (lambda r, t: _no_confounds(r), []),
    "TR json vs header": (lambda r, t: _tr_in_json(r), []),
    "TR missing": (lambda r, t: _no_tr(r), []),
    "mask off the grid": (lambda r, t: _mask_off_grid(r), []),
    "mask empty": (lambda r, t: _empty_mask(r), []),
    "BOLD not a NIfTI": (lambda r, t: _corrupt_bold(r), []),
    "BOLD truncated": (lambda r, t: _truncated_bold(r), []),
    "identical ROIs": (lambda r, t: ("ROI PCC is identical to ROI PCC2",
                                     ["--network", str(_network(t, [*DMN, ("PCC2", 0, -52, 26, 8)]))]), []),
    "nested ROI": (lambda r, t: ("lies entirely inside ROI all",
                                 ["--network", str(_network(t, [*DMN, ("all", 0, -10, 20, 90)]))]), []),
    "unknown participant": (lambda r, t: "available: 01", ["--participant-label", "02"]),
    "unknown session": (lambda r, t: "no preprocessed BOLD", ["--session-label", "b0"]),
    "OUTPUT_DIR inside --fmriprep-dir": (lambda r, t: "is inside --fmriprep-dir", ["OUT=fmriprep/out"]),
    "--work-dir inside --fmriprep-dir": (lambda r, t: f"--work-dir {r}/work is inside",
                                         ["--work-dir", "FMRIPREP/work"]),
    "OUTPUT_DIR inside raw data": (lambda r, t: "inside the raw dataset", ["OUT=raw/sub-01/out"]),
    "unknown denoise strategy": (lambda r, t: "--denoise 'nope'", ["--denoise", "nope"]),
    "bids filter file not JSON": (lambda r, t: ("--bids-filter-file", ["--bids-filter-file",
                                                                       str(_filter_file(t, "{bold: ["))]), []),
    "bids filter 'bold' not an object": (lambda r, t: ("'bold' must map entities to values", [
        "--bids-filter-file", str(_filter_file(t, '{"bold": [1, 2]}'))]), []),
}


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input(case, tmp_path, tiny_run, capsys):
    damage, extra = CASES[case]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.9.0"}')
    (raw / "sub-01").mkdir()
    fmriprep = _dataset(raw / "derivatives" / "fmriprep", tiny_run)
    expect = damage(fmriprep, tmp_path)
    if isinstance(expect, tuple):  # (text, more CLI words)
        expect, more = expect
        extra = [*extra, *more]
    out = tmp_path / "out"
    words = []
    for word in extra:
        if word.startswith("OUT="):
            out = (fmriprep if word[4:].startswith("fmriprep") else raw) / word[4:].split("/", 1)[1]
        else:
            words.append(word.replace("FMRIPREP", str(fmriprep)))
    before = _digest(raw)
    code = main([str(raw), str(out), "participant", "--skip-bids-validation", "--fmriprep-dir", str(fmriprep),
                 *words])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err
    assert str(expect) in err, err
    assert _digest(raw) == before  # the inputs are never written to
    if out.exists():  # no stub of a failed run
        assert sorted(p.name for p in out.iterdir() if p.name != "work") == []


def test_degenerate_roi_series_are_warned(tiny_run, tmp_path, caplog):
    """A one-voxel ROI is accepted (the user may mean it), with the reason in a warning."""
    table = load_network(str(_network(tmp_path, [*DMN[:3], ("dot", 46, -62, 32, 0.1)])))
    extract_timeseries(tiny_run["bold"], tiny_run["mask"], tiny_run["confounds"], table, 2.5)
    assert "ROI dot has a single voxel" in caplog.text


def test_identical_rois_refused_by_the_extraction(tiny_run, tmp_path):
    table = load_network(str(_network(tmp_path, [*DMN, ("copy", *DMN[1][1:])])))
    with pytest.raises(InputError, match="ROI copy is identical to ROI mPFC|ROI mPFC is identical to ROI copy"):
        extract_timeseries(tiny_run["bold"], tiny_run["mask"], tiny_run["confounds"], table, 2.5)


def test_one_bad_participant_does_not_stop_the_others(tmp_path, tiny_run, capsys):
    fmriprep = _dataset(tmp_path / "fmriprep", tiny_run, subjects=("01", "02", "03"))
    bad = _edit_confounds(fmriprep, "n/a")  # sub-01
    gone = _file(fmriprep, "mask", "03")
    gone.unlink()
    out = tmp_path / "out"
    code = main([str(fmriprep), str(out), "participant", "--skip-bids-validation"])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 participant(s) failed (1 processed)" in err
    assert f"sub-01 task-rest dmn4: confounds file {bad}" in err and "sub-03: " in err and "no brain mask" in err
    assert [p.name.split("_")[0] for p in out.rglob("*_relmat.tsv")] == ["sub-02"]
    assert (out / "sub-02.html").exists() and not (out / "sub-01.html").exists()
    shutil.rmtree(out)
