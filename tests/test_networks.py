"""Built-in ROI sets and the validation of user-supplied ones."""

from __future__ import annotations

from itertools import pairwise

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import fetch_coords_seitzman_2018, load_mni152_brain_mask

from bids_ketdcm.errors import InputError
from bids_ketdcm.participant.rois import (
    BUILTIN_NETWORKS,
    COLUMNS,
    builtin_path,
    load_network,
    network_label,
)

EXPECTED_COUNTS = {"dmn4": 4, "dmn11": 11, "dmn15": 15, "ket21": 21}


@pytest.fixture(scope="module")
def mni_mask():
    return load_mni152_brain_mask(resolution=1)


@pytest.mark.parametrize("name", BUILTIN_NETWORKS)
def test_builtin_network_shape(name):
    table = load_network(name)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == EXPECTED_COUNTS[name]
    assert table["name"].is_unique
    assert table["name"].str.fullmatch(r"(DMN|DAN|SAL|SUB)_[A-Za-z_]+").all()
    assert (table["source"].str.len() > 10).all()
    assert table.attrs["label"] == name and table.attrs["labels_img"] is None
    # the file on disk has exactly the contract's columns
    with builtin_path(name).open() as f:
        assert f.readline().rstrip("\n").split("\t") == list(COLUMNS)


@pytest.mark.parametrize("name", BUILTIN_NETWORKS)
def test_builtin_spheres_inside_brain_and_disjoint(name, mni_mask):
    table = load_network(name)
    data = mni_mask.get_fdata() > 0
    inverse = np.linalg.inv(mni_mask.affine)
    centres = table[["x", "y", "z"]].to_numpy()
    for (x, y, z), roi in zip(centres, table["name"], strict=True):
        i, j, k = np.rint(inverse @ [x, y, z, 1.0])[:3].astype(int)
        assert data[i, j, k], f"{roi} centre lies outside the MNI brain mask"
    radius = table["radius_mm"].to_numpy()
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    reach = radius[:, None] + radius[None]
    np.fill_diagonal(distance, np.inf)
    assert np.all(distance > reach), "two spheres of one network overlap"


def test_networks_are_nested_and_dmn4_is_razi():
    tables = [load_network(name) for name in BUILTIN_NETWORKS]
    for smaller, larger in pairwise(tables):
        head = larger.iloc[: len(smaller)].reset_index(drop=True)
        pd.testing.assert_frame_equal(head, smaller.reset_index(drop=True), check_like=False)
    razi = {
        "DMN_mPFC": (3, 54, -2),
        "DMN_PCC": (0, -52, 26),
        "DMN_L_IPC": (-50, -63, 32),
        "DMN_R_IPC": (48, -69, 35),
    }
    dmn4 = load_network("dmn4").set_index("name")
    for roi, xyz in razi.items():
        assert tuple(dmn4.loc[roi, ["x", "y", "z"]]) == xyz
    ket21 = load_network("ket21")
    sub = ket21[ket21["network"] == "SUB"]
    assert sorted(sub["name"]) == sorted(
        f"SUB_{h}_{r}" for h in "LR" for r in ("Thal", "Hipp", "Caud")
    )


def test_seitzman_coordinates_match_nilearn_copy():
    """Every ROI cited from Seitzman et al. is an ROI of the copy bundled with nilearn."""
    atlas = fetch_coords_seitzman_2018()
    rois = atlas.rois[["x", "y", "z"]].to_numpy(float)
    networks = np.asarray(atlas.networks)
    table = load_network("ket21")
    cited = table[table["source"].str.startswith("Seitzman")]
    assert len(cited) == 17
    for _, row in cited.iterrows():
        distance = np.linalg.norm(rois - row[["x", "y", "z"]].to_numpy(float), axis=1)
        best = int(np.argmin(distance))
        assert distance[best] < 0.01, row["name"]
        assert f"network {networks[best]}" in row["source"], row["name"]


def _write(path, text):
    path.write_text(text)
    return path


def test_user_tsv_defaults(tmp_path):
    path = _write(tmp_path / "my_net.tsv", "name\tx\ty\tz\nA\t1\t2\t3\nB\t-4\t5.5\t6\n")
    table = load_network(path)
    assert list(table["name"]) == ["A", "B"]
    assert np.allclose(table["radius_mm"], 8.0)
    assert table.attrs["label"] == "mynet" == network_label(path)
    assert table["source"].iloc[0] == "user file my_net.tsv"
    assert np.allclose(table[["x", "y", "z"]].to_numpy(), [[1, 2, 3], [-4, 5.5, 6]])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "is empty"),
        ("name\tx\ty\tz\n", "no ROI rows"),
        ("name,x,y,z\nA,1,2,3\nB,1,2,3\n", "not tab separated"),
        ("name\tx\ty\nA\t1\t2\nB\t1\t2\n", "lacks the column(s) z"),
        ("name\tx\ty\tz\nA\t1\t2\t3\nA\t4\t5\t6\n", "duplicate ROI names: A"),
        ("name\tx\ty\tz\nA\t1\tabc\t3\nB\t4\t5\t6\n", "column y must hold finite numbers"),
        ("name\tx\ty\tz\nA\t1\tn/a\t3\nB\t4\t5\t6\n", "line 2 (A: 'n/a')"),
        ("name\tx\ty\tz\nA\t1\t2\t3\n\t4\t5\t6\n", "empty ROI name on line(s) 3"),
        ("name\tx\ty\tz\nA\t1\t2\t3\n", "at least 2"),
        ("name\tx\ty\tz\ntarget\t1\t2\t3\nB\t4\t5\t6\n", "reserved ROI name(s) target"),
        ("name\tx\ty\tz\tradius_mm\nA\t1\t2\t3\t0\nB\t4\t5\t6\t5\n", "radius_mm must be positive"),
        ("name\tx\ty\tz\tradius_mm\nA\t1\t2\t3\tinf\nB\t4\t5\t6\t5\n", "finite numbers"),
    ],
)
def test_hostile_user_tsv(tmp_path, content, fragment):
    path = _write(tmp_path / "bad.tsv", content)
    with pytest.raises(InputError) as err:
        load_network(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="unknown network 'dmn5'.*dmn4, dmn11, dmn15, ket21"):
        load_network("dmn5")
    missing = tmp_path / "nothing.tsv"
    with pytest.raises(InputError, match=f"network file {missing} does not exist"):
        load_network(missing)
    with pytest.raises(InputError, match="is a folder"):
        load_network(tmp_path)
    with pytest.raises(InputError, match="no letters or digits"):
        network_label(tmp_path / "__.tsv")


def _labelled_image(tmp_path, labels=(1, 2)):
    data = np.zeros((10, 10, 10), dtype=np.int16)
    data[1:4, 1:4, 1:4] = labels[0]
    data[6:9, 5:8, 2:5] = labels[1]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -10, -10]
    path = tmp_path / "atlas.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def test_labelled_image_centroids(tmp_path):
    image = _labelled_image(tmp_path)
    _write(tmp_path / "atlas.tsv", "index\tname\n1\tfirst\n2\tsecond\n")
    table = load_network(image)
    assert list(table["name"]) == ["first", "second"]
    assert list(table["index"]) == [1, 2]
    # centroid of voxels 1..3 is voxel 2 -> -10 + 2 * 2 = -6 mm on every axis
    assert np.allclose(table.loc[0, ["x", "y", "z"]].to_numpy(float), [-6, -6, -6])
    assert np.allclose(table.loc[1, ["x", "y", "z"]].to_numpy(float), [4, 2, -4])
    assert table.attrs["labels_img"] == str(image)
    assert table.attrs["label"] == "atlas"


def test_hostile_labelled_image(tmp_path):
    image = _labelled_image(tmp_path)
    with pytest.raises(InputError, match="needs a TSV of labels named atlas.tsv"):
        load_network(image)
    labels = _write(tmp_path / "atlas.tsv", "index\tname\n1\tfirst\n3\tthird\n")
    with pytest.raises(InputError, match=r"no voxel with label\(s\) 3 \(third\)"):
        load_network(image)
    _write(labels, "index\tname\n1\tfirst\n1\tsecond\n")
    with pytest.raises(InputError, match="duplicate label indices"):
        load_network(image)
    _write(labels, "index\tname\n1.5\tfirst\n2\tsecond\n")
    with pytest.raises(InputError, match="positive integers"):
        load_network(image)
    _write(labels, "label\tname\n1\tfirst\n2\tsecond\n")
    with pytest.raises(InputError, match="lacks the column"):
        load_network(image)
    _write(labels, "index\tname\n1\tfirst\n2\tsecond\n")
    image.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match=f"image {image} cannot be read"):
        load_network(image)
