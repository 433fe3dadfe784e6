"""Structural features: regional gray-matter volume (GMV) from fMRIPrep's anatomical outputs.

Inputs (fMRIPrep, found with pybids in the ``anat`` folder of each participant, in the
session folder when there is one, else the participant's session-less ``anat``):

* ``sub-X[_ses-Y]_space-S_label-GM_probseg.nii.gz`` (and ``label-WM``, ``label-CSF``): tissue
  probabilities in the template space ``S``;
* optionally a Jacobian-determinant map of the template warp in the same space,
  ``sub-X[_ses-Y]_space-S_desc-jacobian_<suffix>.nii[.gz]`` (fMRIPrep does not write one;
  e.g. ANTs' ``CreateJacobianDeterminantImage`` does): the probabilities are then
  *modulated* (multiplied by it) so that volumes are those of the participant's brain;
* optionally the native-space probabilities (no ``space`` entity), used only to report the
  native total intracranial volume.

Measures, for tissue probability p, Jacobian J (1 when absent) and voxel volume v (mm^3):

* regional GMV = sum over the region's voxels of ``p_GM * J * v``; a sphere holds the voxels
  whose centres lie within its radius plus the voxel holding its centre (as the ROI
  extraction of the time series and nilearn's sphere masker); a labelled atlas is
  resampled (nearest neighbour) onto the probability grid;
* total intracranial volume TIV = sum over the image of ``(p_GM + p_WM + p_CSF) * J * v``;
* ``gmv_tiv`` = GMV / TIV, the feature used at the group level (normalised for head size).

Regions: the built-in networks (``--network``) and whole-brain atlases
(``--gmv-atlas``): ``power264`` (264 spheres of 5 mm radius, Power et al. 2011, from the
coordinates shipped with nilearn, no download) or a user TSV of spheres / labelled NIfTI.

Outputs, per participant and region set:
``sub-X[/ses-Y]/anat/sub-X[_ses-Y]_space-S_seg-NET_desc-gmv_morph.tsv`` (columns ``name,
gmv_mm3, gmv_tiv, n_voxels, x, y, z, radius_mm``) and a JSON sidecar (TIV, tissue volumes,
whether modulated, sources).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from bids_ketdcm import __version__
from bids_ketdcm.bids.naming import gmv_path
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import load_image, write_json, write_tsv
from bids_ketdcm.participant.rois import load_network, network_label, sphere_indices

log = logging.getLogger(__name__)

#: Whole-brain atlases built in (from data shipped with nilearn; no download).
WHOLE_BRAIN_ATLASES = ("power264",)
POWER_RADIUS_MM = 5.0
TISSUES = ("GM", "WM", "CSF")
COLUMN_DESCRIPTIONS = {
    "name": "Region name",
    "gmv_mm3": "Gray-matter volume: sum of GM probability x Jacobian (if modulated) x voxel volume, mm^3",
    "gmv_tiv": "gmv_mm3 divided by the total intracranial volume (TIV_mm3 of this sidecar)",
    "n_voxels": "Voxels of the probability grid in the region",
    "x": "Region centre, MNI x (mm)",
    "y": "Region centre, MNI y (mm)",
    "z": "Region centre, MNI z (mm)",
    "radius_mm": "Sphere radius (n/a for a labelled atlas)",
}


# --------------------------------------------------------------------------- regions


def whole_brain_atlas(name: str) -> pd.DataFrame:
    """A built-in whole-brain atlas as a table of spheres (the format of ``load_network``).

    Parameters
    ----------
    name
        ``power264``: the 264 ROIs of Power et al. (2011, Neuron 72:665-678), 5 mm
        radius, from the coordinate file shipped with nilearn.

    Returns
    -------
    pandas.DataFrame
        Columns ``name, x, y, z, radius_mm, network, source``; ``attrs`` as
        :func:`bids_ketdcm.participant.rois.load_network`.
    """
    if name != "power264":
        raise InputError(f"--gmv-atlas {name}: unknown built-in atlas (choose from {', '.join(WHOLE_BRAIN_ATLASES)}, "
                         "or give a TSV of spheres or a labelled NIfTI)")
    from nilearn.datasets import fetch_coords_power_2011

    rois = fetch_coords_power_2011().rois
    table = pd.DataFrame({
        "name": [f"power{int(i):03d}" for i in rois["roi"]],
        "x": rois["x"].to_numpy(float), "y": rois["y"].to_numpy(float), "z": rois["z"].to_numpy(float),
        "radius_mm": POWER_RADIUS_MM, "network": "whole-brain",
        "source": "Power et al. 2011 Neuron 72:665-678 (coordinates shipped with nilearn)",
    })
    table.attrs = {"label": name, "path": "nilearn.datasets.fetch_coords_power_2011", "labels_img": None}
    return table


def load_regions(spec: str | os.PathLike) -> pd.DataFrame:
    """A built-in whole-brain atlas, a built-in network, or a user TSV / labelled NIfTI."""
    text = str(spec)
    return whole_brain_atlas(text) if text in WHOLE_BRAIN_ATLASES else load_network(text)


def region_label(spec: str | os.PathLike) -> str:
    """The ``seg`` label of a region set."""
    return str(spec) if str(spec) in WHOLE_BRAIN_ATLASES else network_label(spec)


def _sphere_sums(values: np.ndarray, affine: np.ndarray, centres: np.ndarray, radii: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Sum of ``values`` and voxel count within each sphere (:func:`rois.sphere_indices`)."""
    sums, counts = np.zeros(len(centres)), np.zeros(len(centres), dtype=int)
    for k, (centre, radius) in enumerate(zip(centres, radii, strict=True)):
        hits = sphere_indices(centre, radius, affine, values.shape)
        sums[k] = values[tuple(hits.T)].sum()
        counts[k] = len(hits)
    return sums, counts


def _on_grid(img, reference, interpolation: str) -> np.ndarray:
    """``img`` resampled onto the grid of ``reference`` (returned as an array)."""
    if img.shape[:3] == reference.shape[:3] and np.allclose(img.affine, reference.affine):
        return np.asarray(img.dataobj)
    from nilearn.image import resample_to_img

    out = resample_to_img(img, reference, interpolation=interpolation, force_resample=True, copy_header=True)
    return np.asarray(out.dataobj)


def _probabilities(path: str | os.PathLike, what: str):
    img = load_image(path, f"{what} image")
    try:
        data = np.asarray(img.dataobj, dtype=np.float64)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: cannot read the {what} image ({err})") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise InputError(f"{path}: the {what} image must be 3D (shape {data.shape})")
    if not np.isfinite(data).all() or data.min() < -1e-6 or data.max() > 1 + 1e-6:
        raise InputError(f"{path}: the {what} image must hold probabilities in [0, 1]")
    return nib.Nifti1Image(np.clip(data, 0.0, 1.0), img.affine), data


def _jacobian(path: str | os.PathLike | None, reference) -> np.ndarray | None:
    if path is None:
        return None
    try:
        img = nib.load(str(path))
    except Exception as err:
        raise InputError(f"{path}: cannot read the Jacobian image ({err})") from None
    data = np.squeeze(_on_grid(img, reference, "linear")).astype(float)
    if data.shape != reference.shape[:3] or not np.isfinite(data).all() or data.min() < 0:
        raise InputError(f"{path}: the Jacobian determinant must be a 3D map of non-negative numbers")
    return data


def voxel_volume(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3 (absolute determinant of the affine's 3x3 part)."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def regional_volumes(gm: str | os.PathLike, regions: pd.DataFrame, jacobian: str | os.PathLike | None = None
                     ) -> pd.DataFrame:
    """Gray-matter volume of every region.

    Parameters
    ----------
    gm
        GM probability image (template space).
    regions
        Table of :func:`load_regions` (spheres, or a labelled image in ``attrs``).
    jacobian
        Optional Jacobian-determinant map (modulation); resampled (linear) to the GM grid.

    Returns
    -------
    pandas.DataFrame
        Columns ``name, gmv_mm3, n_voxels, x, y, z, radius_mm``, one row per region.
    """
    return _region_table(*_modulated_gm(gm, jacobian), regions)


def _modulated_gm(gm: str | os.PathLike, jacobian: str | os.PathLike | None) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The GM probability image and its values times the Jacobian (when given)."""
    img, p = _probabilities(gm, "GM probability")
    J = _jacobian(jacobian, img)
    return img, (p if J is None else p * J)


def _region_table(img: nib.Nifti1Image, values: np.ndarray, regions: pd.DataFrame) -> pd.DataFrame:
    """:func:`regional_volumes` of already loaded (modulated) GM values on the grid of ``img``."""
    vox = voxel_volume(img.affine)
    labels_img = regions.attrs.get("labels_img")
    if labels_img:
        labels = np.squeeze(_on_grid(nib.load(labels_img), img, "nearest")).astype(int)
        index = regions["index"].to_numpy(int)
        sums = ndimage.sum_labels(values, labels, index)
        counts = ndimage.sum_labels(np.ones_like(values), labels, index).astype(int)
    else:
        sums, counts = _sphere_sums(values, img.affine, regions[["x", "y", "z"]].to_numpy(float),
                                    regions["radius_mm"].to_numpy(float))
    return pd.DataFrame({
        "name": regions["name"].to_numpy(), "gmv_mm3": np.asarray(sums) * vox, "n_voxels": counts,
        "x": regions["x"].to_numpy(float), "y": regions["y"].to_numpy(float), "z": regions["z"].to_numpy(float),
        "radius_mm": regions["radius_mm"].to_numpy(float),
    })


def tissue_volumes(gm: str | os.PathLike, wm: str | os.PathLike, csf: str | os.PathLike,
                   jacobian: str | os.PathLike | None = None) -> dict[str, float]:
    """GM, WM and CSF volumes and the total intracranial volume (mm^3).

    Returns
    -------
    dict
        ``GM_mm3``, ``WM_mm3``, ``CSF_mm3`` and ``TIV_mm3`` (their sum), each the sum of
        probability x Jacobian (if given) x voxel volume over the image.
    """
    out = {}
    reference = None
    J = None
    for tissue, path in zip(TISSUES, (gm, wm, csf), strict=True):
        img, p = _probabilities(path, f"{tissue} probability")
        if reference is None:
            reference, J = img, _jacobian(jacobian, img)
        elif p.shape != reference.shape[:3] or not np.allclose(img.affine, reference.affine):
            raise InputError(f"{path}: not on the grid of the GM probability image {gm}")
        out[f"{tissue}_mm3"] = float((p if J is None else p * J).sum() * voxel_volume(img.affine))
    out["TIV_mm3"] = out["GM_mm3"] + out["WM_mm3"] + out["CSF_mm3"]
    if out["TIV_mm3"] <= 0:
        raise InputError(f"{gm}: GM + WM + CSF probabilities sum to zero (no brain)")
    return out


# --------------------------------------------------------------------------- finding files


@dataclass
class AnatFiles:
    """fMRIPrep anatomical files of one participant."""

    subject: str
    session: str | None
    space: str
    probseg: dict[str, Path]
    jacobian: Path | None = None
    native: dict[str, Path] | None = None


def _anat_layout(fmriprep: Path, labels: list[str] | None):
    """Index the anatomical files in memory (one index per process: concurrent jobs share nothing)."""
    import re

    from bids import BIDSLayout, BIDSLayoutIndexer

    ignore = [re.compile(r"^/(?:code|sourcedata|derivatives|figures|logs?|work)(?:/|$)"),
              re.compile(r"^/sub-[^/]+/(?:ses-[^/]+/)?(?:func|fmap|dwi|perf|figures|log)(?:/|$)"),
              re.compile(r"/\.")]
    if labels:
        keep = "|".join(re.escape(x) for x in labels)
        ignore.append(re.compile(rf"^/sub-(?!(?:{keep})(?:/|$))"))
    try:
        return BIDSLayout(fmriprep, validate=False, is_derivative=True,
                          indexer=BIDSLayoutIndexer(validate=False, ignore=ignore))
    except Exception as err:  # pybids raises various errors on malformed datasets
        raise InputError(f"cannot index the fMRIPrep folder {fmriprep}: {err}") from None


def _pick(layout, subject: str, session: str | None, **query) -> list[Path]:
    from bids.layout import Query

    base = dict(subject=subject, datatype="anat", extension=[".nii.gz", ".nii"], **query)
    found = layout.get(session=session, **base) if session else []
    if not found:
        found = layout.get(session=Query.NONE, **base)
    # several resolutions of one space: the finest (lowest res index) first
    return [Path(f.path) for f in sorted(found, key=lambda f: (str(f.entities.get("res", "")), f.path))]


def find_anat(fmriprep_dir: str | os.PathLike, subjects: list[str] | None,
              session: str | None, space: str) -> list[AnatFiles]:
    """Find the GM/WM/CSF probability maps (and a Jacobian) of each participant.

    Parameters
    ----------
    fmriprep_dir
        fMRIPrep derivatives folder.
    subjects
        Labels without ``sub-``; None for every participant.
    session
        Session label (its ``anat`` folder is preferred; else the session-less one).
    space
        Template space of the probability maps.

    Returns
    -------
    list of AnatFiles

    Raises
    ------
    InputError
        A participant lacks a probability map in ``space``.
    """
    fmriprep = Path(fmriprep_dir)
    layout = _anat_layout(fmriprep, subjects)
    wanted = subjects or sorted(layout.get_subjects())
    if not wanted:
        raise InputError(f"the fMRIPrep folder {fmriprep} holds no participant")
    session = session[4:] if session and session.startswith("ses-") else session
    out, problems = [], []
    for sub in wanted:
        probseg = {}
        for tissue in TISSUES:
            found = _pick(layout, sub, session, suffix="probseg", label=tissue, space=space)
            if not found:
                problems.append(f"sub-{sub}: no anat/*_space-{space}_label-{tissue}_probseg.nii[.gz] in {fmriprep}")
                continue
            if len(found) > 1:
                log.info("sub-%s: several %s maps in %s; using %s", sub, tissue, space, found[0].name)
            probseg[tissue] = found[0]
        if len(probseg) < len(TISSUES):
            continue
        jac = _pick(layout, sub, session, space=space, desc="jacobian")
        native = {}
        from bids.layout import Query

        for tissue in TISSUES:
            found = _pick(layout, sub, session, suffix="probseg", label=tissue, space=Query.NONE)
            if found:
                native[tissue] = found[0]
        out.append(AnatFiles(sub, session, space, probseg, jac[0] if jac else None,
                             native if len(native) == len(TISSUES) else None))
    if problems:
        raise InputError("; ".join(problems) + " (run fMRIPrep with --output-spaces " + space + ")")
    return out


# --------------------------------------------------------------------------- outputs


def extract_structural(anat: AnatFiles, region_sets: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], dict]:
    """Regional GMV of every region set and the tissue volumes of one participant.

    Returns
    -------
    tables : dict of str to DataFrame
        By ``seg`` label: columns ``name, gmv_mm3, gmv_tiv, n_voxels, x, y, z, radius_mm``.
    meta : dict
        Tissue volumes, TIV, modulation and sources (the sidecar's common part).
    """
    p = anat.probseg
    volumes = tissue_volumes(p["GM"], p["WM"], p["CSF"], anat.jacobian)
    meta: dict[str, Any] = {**volumes, "Modulated": anat.jacobian is not None, "Space": anat.space,
            "Sources": [str(p[t]) for t in TISSUES] + ([str(anat.jacobian)] if anat.jacobian else []),
            "Software": f"bids-ketdcm {__version__}"}
    if anat.native:
        native = tissue_volumes(anat.native["GM"], anat.native["WM"], anat.native["CSF"])
        meta["TIVNative_mm3"] = native["TIV_mm3"]
        meta["Sources"] += [str(anat.native[t]) for t in TISSUES]
    tables = {}
    img, values = _modulated_gm(p["GM"], anat.jacobian)  # once for every region set
    for seg, regions in region_sets.items():
        table = _region_table(img, values, regions)
        empty = table["name"][table["n_voxels"] == 0].tolist()
        if empty:
            raise InputError(f"seg-{seg}: region(s) {', '.join(empty[:5])} fall outside the image {p['GM']}")
        table.insert(2, "gmv_tiv", table["gmv_mm3"] / volumes["TIV_mm3"])
        tables[seg] = table
    return tables, meta


def run_structural(fmriprep_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   subjects: list[str] | None, session: str | None, space: str, region_specs: list[str],
                   overwrite: bool = False) -> dict:
    """Participant level ``--features gmv``: write the GMV tables of every participant.

    Parameters
    ----------
    fmriprep_dir, output_dir
        Folders.
    subjects
        Labels without ``sub-``; None: every participant of the fMRIPrep folder.
    session
        Session whose derivative folder receives the tables (and whose ``anat`` is
        preferred).
    space
        Template space.
    region_specs
        Networks and atlases (built-in names or files).
    overwrite
        Redo participants whose tables exist.

    Returns
    -------
    dict
        ``written`` and ``finished_before`` participant counts, ``subjects`` (labels).
    """
    from tqdm import tqdm

    sets = {region_label(s): load_regions(s) for s in region_specs}
    session = session[4:] if session and session.startswith("ses-") else session
    found = find_anat(fmriprep_dir, subjects, session, space)
    written = before = 0
    for anat in tqdm(found, desc="gray-matter volumes", unit="participant", disable=None):
        paths = {seg: gmv_path(output_dir, anat.subject, session, space, seg) for seg in sets}
        if not overwrite and all(p.exists() and p.with_suffix(".json").exists() for p in paths.values()):
            before += 1
            continue
        tables, meta = extract_structural(anat, sets)
        for seg, table in tables.items():
            write_tsv(paths[seg], table)
            write_json(paths[seg].with_suffix(".json"), {
                **meta, "Network": seg, "RegionSource": sets[seg].attrs.get("path"), **COLUMN_DESCRIPTIONS})
        written += 1
        log.info("sub-%s: GMV of %d region sets (TIV %.0f mm^3, modulated: %s)", anat.subject, len(tables),
                 meta["TIV_mm3"], meta["Modulated"])
    return {"written": written, "finished_before": before, "subjects": [a.subject for a in found]}


