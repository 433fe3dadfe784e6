"""Gray-matter volumes against synthetic anatomical images with known volumes.

The images live on a 2 mm grid (voxel 8 mm^3). A 10 x 10 x 10 voxel box holds GM 0.5,
WM 0.3 and CSF 0.2, nothing elsewhere: GM = 1000 x 8 x 0.5 = 4000 mm^3 and
TIV = 1000 x 8 = 8000 mm^3. A sphere of radius 6 mm (3 voxels) centred on a voxel holds
the 123 lattice points with i^2 + j^2 + k^2 <= 9, so its GMV is 123 x 8 x 0.5 = 492 mm^3;
radius 4.5 mm (2.25 voxels) holds the 57 points with i^2 + j^2 + k^2 <= 5: 228 mm^3.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import DS005917

from bids_ketdcm.bids.features import collect_gmv, gather_features
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.feature_sets import compare_feature_sets
from bids_ketdcm.participant.structural import (
    _sphere_sums,
    find_anat,
    load_regions,
    regional_volumes,
    run_structural,
    tissue_volumes,
    whole_brain_atlas,
)

SPACE = "MNI152NLin2009cAsym"
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = -40.0  # voxel (i, j, k) is at -40 + 2 (i, j, k) mm
BOX = (slice(10, 20),) * 3  # mm -20 .. -2
TISSUE = {"GM": 0.5, "WM": 0.3, "CSF": 0.2}


def _img(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


def write_anat(root: Path, subject: str, session: str | None = None, jacobian: float | None = None) -> dict:
    """An fMRIPrep-shaped anat folder with the box phantom; returns the file paths."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "phantom", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    folder = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    paths = {}
    for tissue, value in TISSUE.items():
        data = np.zeros((40, 40, 40))
        data[BOX] = value
        paths[tissue] = _img(folder / f"{stem}_space-{SPACE}_label-{tissue}_probseg.nii.gz", data)
    if jacobian is not None:
        paths["jacobian"] = _img(folder / f"{stem}_space-{SPACE}_desc-jacobian_map.nii.gz",
                                 np.full((40, 40, 40), jacobian))
    return paths


def spheres(tmp_path: Path) -> pd.DataFrame:
    path = tmp_path / "phantom.tsv"
    pd.DataFrame({"name": ["big", "small"], "x": [-10, -10], "y": [-10, -12], "z": [-10, -10],
                  "radius_mm": [6.0, 4.5]}).to_csv(path, sep="\t", index=False)
    return load_regions(path)


def labelled_atlas(tmp_path: Path, voxel: float) -> pd.DataFrame:
    """Label 1 = the box; label 2 = x from -10 to 8 mm (half inside the box), on a grid of ``voxel`` mm."""
    n = int(80 / voxel)
    affine = np.diag([voxel] * 3 + [1.0])
    affine[:3, 3] = -40.0
    mm = -40.0 + voxel * np.arange(n)
    inside = lambda lo, hi: (mm >= lo - 1e-6) & (mm <= hi + 1e-6)  # noqa: E731
    box = inside(-20, -2)
    labels = np.zeros((n, n, n), dtype=np.int16)
    labels[np.ix_(box, box, box)] = 1
    labels[np.ix_(inside(-10, 8), box, box)] = 2
    path = tmp_path / f"atlas{int(voxel)}.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), path)
    path.with_name(f"atlas{int(voxel)}.tsv").write_text("index\tname\n1\tbox\n2\thalf\n")
    return load_regions(path)


def test_sphere_volumes_closed_form(tmp_path):
    files = write_anat(tmp_path / "fmriprep", "01")
    table = regional_volumes(files["GM"], spheres(tmp_path))
    assert table.n_voxels.tolist() == [123, 57]
    np.testing.assert_allclose(table.gmv_mm3, [492.0, 228.0], rtol=1e-6)


@pytest.mark.parametrize("voxel", [2.0, 1.0])
def test_labelled_atlas_volumes_closed_form(tmp_path, voxel):
    files = write_anat(tmp_path / "fmriprep", "01")
    table = regional_volumes(files["GM"], labelled_atlas(tmp_path, voxel))
    # box: 1000 voxels x 8 x 0.5; half: 10 x 10 x 10 voxels of which x in -10..-2 (5 planes) is GM
    assert table.n_voxels.tolist() == [500, 1000]  # label 2 overwrote half of label 1
    np.testing.assert_allclose(table.gmv_mm3, [2000.0, 2000.0], rtol=1e-6)


def test_tissue_volumes_and_jacobian_modulation(tmp_path):
    plain = write_anat(tmp_path / "a", "01")
    volumes = tissue_volumes(plain["GM"], plain["WM"], plain["CSF"])
    assert volumes == pytest.approx({"GM_mm3": 4000.0, "WM_mm3": 2400.0, "CSF_mm3": 1600.0, "TIV_mm3": 8000.0})
    mod = write_anat(tmp_path / "b", "01", jacobian=1.5)
    assert tissue_volumes(mod["GM"], mod["WM"], mod["CSF"], mod["jacobian"])["TIV_mm3"] == pytest.approx(12000.0)
    np.testing.assert_allclose(regional_volumes(mod["GM"], spheres(tmp_path), mod["jacobian"]).gmv_mm3,
                               [738.0, 342.0], rtol=1e-6)


def test_sphere_sums_match_a_brute_force_search():
    """The bounding-box search of the one sphere rule = every voxel of the grid tested, on an
    oblique grid (distance of voxel centres, plus the voxel holding the centre)."""
    rng = np.random.default_rng(0)
    values = rng.random((30, 28, 26))
    angle = 0.3
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) \
        @ np.diag([2.0, 2.5, 3.0])
    affine[:3, 3] = [-20.0, -30.0, -35.0]
    centres = np.array([[0.0, 0.0, 0.0], [3.3, -7.1, 2.2], [-30.0, 40.0, 0.0], [10.0, 1.0, 1.4]])
    radii = np.array([6.0, 8.0, 5.0, 1.0])  # the third straddles the edge; the last holds one voxel
    sums, counts = _sphere_sums(values, affine, centres, radii)
    every = np.argwhere(np.ones(values.shape, dtype=bool))
    mm = every @ affine[:3, :3].T + affine[:3, 3]
    for k, (c, r) in enumerate(zip(centres, radii, strict=True)):
        inside = np.linalg.norm(mm - c, axis=1) <= r
        holder = np.rint(np.linalg.solve(affine[:3, :3], c - affine[:3, 3])).astype(int)
        if np.all(holder >= 0) and np.all(holder < values.shape):
            inside |= np.all(every == holder, axis=1)
        assert counts[k] == inside.sum() and sums[k] == pytest.approx(values[tuple(every[inside].T)].sum())
    assert counts[3] == 1


def test_power264_atlas_offline():
    atlas = whole_brain_atlas("power264")
    assert len(atlas) == 264 and atlas.name.is_unique and (atlas.radius_mm == 5.0).all()
    assert atlas[["x", "y", "z"]].abs().max().max() < 110
    with pytest.raises(InputError, match="unknown built-in atlas"):
        whole_brain_atlas("aal")


def test_participant_outputs_and_group_features(tmp_path):
    fmriprep, out = tmp_path / "fmriprep", tmp_path / "out"
    write_anat(fmriprep, "01", session="b0")  # session folder
    write_anat(fmriprep, "02", jacobian=2.0)  # session-less anat, modulated
    atlas_tsv = tmp_path / "phantom.tsv"
    spheres(tmp_path)
    labelled_atlas(tmp_path, 2.0)
    summary = run_structural(fmriprep, out, None, "b0", SPACE,
                             [str(atlas_tsv), str(tmp_path / "atlas2.nii.gz")])
    assert summary == {"written": 2, "finished_before": 0, "subjects": ["01", "02"]}
    path = out / "sub-02/ses-b0/anat" / f"sub-02_ses-b0_space-{SPACE}_seg-phantom_desc-gmv_morph.tsv"
    table = pd.read_csv(path, sep="\t")
    np.testing.assert_allclose(table.gmv_mm3, [984.0, 456.0], rtol=1e-6)
    np.testing.assert_allclose(table.gmv_tiv, [984.0 / 16000.0, 456.0 / 16000.0], rtol=1e-6)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["Modulated"] is True and meta["TIV_mm3"] == pytest.approx(16000.0) and meta["Network"] == "phantom"
    again = run_structural(fmriprep, out, ["01"], "b0", SPACE, [str(atlas_tsv)])
    assert again["finished_before"] == 1 and again["written"] == 0
    features, missing = collect_gmv(out, ["sub-01", "sub-02"], session="b0")
    assert sorted(features) == ["atlas2", "phantom"] and missing.empty
    fs = features["phantom"]
    assert fs.feature_names == ["big:gmv", "small:gmv"] and fs.pairs == [None, None]
    np.testing.assert_allclose(fs.X, [[492 / 8000, 228 / 8000], [984 / 16000, 456 / 16000]], rtol=1e-6)
    sets, _ = gather_features(out, ["sub-01", "sub-02"], ("gmv",), session="b0", networks=("atlas2",))
    assert list(sets) == ["gmv_atlas2"]


def test_refusals(tmp_path):
    files = write_anat(tmp_path / "fmriprep", "01")
    files["WM"].unlink()
    with pytest.raises(InputError, match=r"sub-01: no anat/\*_space-MNI152NLin2009cAsym_label-WM_probseg"):
        find_anat(tmp_path / "fmriprep", ["01"], None, SPACE)
    bad = _img(tmp_path / "bad.nii.gz", np.full((4, 4, 4), 1.7))
    with pytest.raises(InputError, match="probabilities in \\[0, 1\\]"):
        regional_volumes(bad, spheres(tmp_path))
    far = tmp_path / "far.tsv"
    far.write_text("name\tx\ty\tz\tradius_mm\na\t0\t0\t0\t4\nb\t500\t0\t0\t4\n")
    write_anat(tmp_path / "ok", "01")
    with pytest.raises(InputError, match="region\\(s\\) b fall outside"):
        run_structural(tmp_path / "ok", tmp_path / "out", None, None, SPACE, [str(far)])


def test_group_feature_sets_side_by_side(tmp_path):
    """dcm, gmv and dcm+gmv through the suite; GMV carries the signal here; saved and re-applied."""
    import shutil

    from bids_ketdcm.group import GroupOptions, run_group
    from bids_ketdcm.io import write_tsv
    from bids_ketdcm.participant.structural import gmv_path
    from bids_ketdcm.testing import synth
    from bids_ketdcm.testing.fixtures import write_a_matrix

    data = DS005917
    responses = synth.ketamine_responses()
    regions = ["PCC", "mPFC", "lIPL", "rIPL"]

    def cohort(root: Path, seed: int) -> tuple[Path, Path]:
        bids, out = root / "bids", root / "out"
        (bids / "phenotype").mkdir(parents=True)
        shutil.copy(data / "participants.tsv", bids)
        shutil.copy(data / "phenotype" / "phenotype.tsv", bids / "phenotype")
        shutil.copy(data / "phenotype" / "phenotype.json", bids / "phenotype")
        rng = np.random.default_rng(seed)
        for pid, r in zip(responses.participant_id, responses.r, strict=True):
            write_a_matrix(out, pid, "b0", "dmn4", rng.normal(0, 0.1, (4, 4)), regions)
            gmv = rng.normal(0.004, 0.0004, 4)
            gmv[1] += 0.002 * r  # mPFC volume tracks the response
            write_tsv(gmv_path(out, pid[4:], "b0", SPACE, "dmn4"),
                      pd.DataFrame({"name": regions, "gmv_mm3": gmv * 1.5e6, "gmv_tiv": gmv}))
        return bids, out

    bids, out = cohort(tmp_path / "a", 0)
    options = dict(include_group=("MDD",), schemes=("binary50",), targets=(),
                   models=("logistic", "majority", "baseline_score"),
                   nested_repeats=2, nested_permutations=0, n_permutations=99, report=False, progress=False,
                   allow_missing=True,
                   feature_sets=("dcm", "gmv", "dcm+gmv"))
    run_group(bids, out, GroupOptions(**{**options, "report": True}, save_model=tmp_path / "models"))
    res = pd.read_csv(out / "group" / "results.tsv", sep="\t")
    head = res[(res.treatment == "ketamine") & (res.model == "logistic") & (res.protocol == "kfold5")]
    head = head.set_index("network")
    assert set(head.index) == {"dmn4", "gmv_dmn4", "dcm+gmv_dmn4"}
    assert head.n_features.to_dict() == {"dmn4": 16, "gmv_dmn4": 4, "dcm+gmv_dmn4": 20}
    assert head.loc["gmv_dmn4", "p_value"] < 0.05 and head.loc["dmn4", "p_value"] > 0.05
    # the report compares the feature sets side by side with the baseline-MADRS-only model
    table = compare_feature_sets(res, "kfold5").set_index("target")
    assert list(table.index) == ["binary50"] and table.loc["binary50", "network"] == "dmn4"
    for fs, key in (("dcm", "dmn4"), ("gmv", "gmv_dmn4"), ("dcm+gmv", "dcm+gmv_dmn4")):
        assert table.loc["binary50", fs] == pytest.approx(head.loc[key, "headline"])
        assert table.loc["binary50", f"{fs}_p"] == pytest.approx(head.loc[key, "p_value"])
    baseline = res[(res.treatment == "ketamine") & (res.model == "baseline_score") & (res.protocol == "kfold5")
                   & (res.network == "dmn4")].headline.iloc[0]
    assert table.loc["binary50", "baseline_score_only"] == pytest.approx(baseline)
    assert table.loc["binary50", "best"] in ("gmv", "dcm+gmv")
    page = (out / "group" / "report.html").read_text()
    section = page[page.index("<h2>Feature sets compared</h2>"):page.index("<h2>Participants and labels</h2>")]
    assert all(f"<th>{c}</th>" in section for c in ("DCM", "GMV", "DCM+GMV", "Baseline score only", "Best"))
    models = sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_dir())
    assert models == ["features-dcm_seg-dmn4_target-binary50", "features-dcmgmv_seg-dmn4_target-binary50",
                      "features-gmv_seg-dmn4_target-binary50"]
    # the saved model records its training-set metrics: recomputed here from its own features
    from bids_ketdcm.bids.features import model_features
    from bids_ketdcm.group.labels import build_labels
    from bids_ketdcm.group.metrics import classification_metrics
    from bids_ketdcm.model_store import load_model

    model = load_model(tmp_path / "models" / "features-gmv_seg-dmn4_target-binary50")
    training = model.manifest["training"]
    labels = build_labels(bids, include_group=("MDD",)).table
    fs = model_features(out, training["participants"], "gmv", "dmn4", model.manifest["feature_spec"])
    assert fs.participants == training["participants"]
    y = labels.loc[fs.participants, "binary50"].map(model.classes.index).to_numpy()
    proba = model.predict_proba(model.align(fs.X, fs.feature_names, "dmn4"))
    expected, _ = classification_metrics(y, model.predict(model.align(fs.X, fs.feature_names, "dmn4")), proba, 2)
    assert training["apparent_metrics"] == pytest.approx(expected)
    assert training["cv_metrics"]["kfold5"]["balanced_accuracy"] == pytest.approx(head.loc["gmv_dmn4", "headline"])
    bids2, out2 = cohort(tmp_path / "b", 1)
    result = run_group(bids2, out2, GroupOptions(**options, apply_model=tmp_path / "models"))
    ext = pd.DataFrame(result["results"]).set_index(["feature_set", "treatment"])
    assert ext.loc[("gmv", "ketamine"), "balanced_accuracy"] > 0.7
    assert ext.loc[("gmv", "ketamine"), "p_balanced_accuracy"] < 0.05


def test_compare_feature_sets_table():
    """Rows per network x target; a set missing for a network is n/a; comparators from the first set present."""
    rows = []
    for key, value in (("dmn4", 0.55), ("gmv_dmn4", 0.70), ("gmv_power264", 0.62)):
        for model, headline in (("logistic", value), ("majority", 0.5), ("baseline_score", 0.6 if key == "dmn4"
                                                                          else 0.58)):
            rows.append({"treatment": "ketamine", "network": key, "target": "binary50", "task": "classification",
                         "model": model, "protocol": "kfold5", "headline": headline,
                         "p_value": 0.01 if model == "logistic" else float("nan")})
    rows.append({**rows[0], "treatment": "placebo", "headline": 0.9})  # placebo rows are not compared
    table = compare_feature_sets(pd.DataFrame(rows), "kfold5").set_index("network")
    assert list(table.index) == ["dmn4", "power264"]
    assert table.loc["dmn4", ["dcm", "gmv", "baseline_score_only", "chance_model"]].tolist() == [0.55, 0.7, 0.6, 0.5]
    assert table.loc["dmn4", "best"] == "gmv" and "dcm+gmv" not in table
    assert np.isnan(table.loc["power264", "dcm"]) and table.loc["power264", "gmv"] == 0.62
    assert table.loc["power264", "baseline_score_only"] == 0.58 and table.loc["power264", "best"] == "gmv"
    assert compare_feature_sets(pd.DataFrame(), "kfold5").empty
