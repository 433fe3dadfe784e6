"""Regions of interest (ROI sets) for the participant level.

Built-in networks are data files beside this module (``<name>.tsv`` with columns
``name, x, y, z, radius_mm, network, source``; MNI coordinates in mm):

========  =====  ===============================================================
name      ROIs   content
========  =====  ===============================================================
dmn4      4      the classic spectral-DCM default mode network (Razi et al. 2015)
dmn11     11     dmn4 + dorsomedial PFC (DMN) + 6 dorsal attention ROIs
dmn15     15     dmn11 + 4 salience ROIs
ket21     21     dmn15 + left/right thalamus, hippocampus and caudate
========  =====  ===============================================================

Users may also give a TSV of spheres (same columns; ``radius_mm``, ``network`` and
``source`` optional) or a labelled NIfTI image with a TSV of labels (columns
``index, name``) beside it, named like the image (``atlas.nii.gz`` + ``atlas.tsv``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_ketdcm.errors import InputError
from bids_ketdcm.io import load_image

log = logging.getLogger(__name__)

BUILTIN_NETWORKS: tuple[str, ...] = ("dmn4", "dmn11", "dmn15", "ket21")
COLUMNS: tuple[str, ...] = ("name", "x", "y", "z", "radius_mm", "network", "source")
DEFAULT_RADIUS_MM = 8.0
#: Column of the connectivity TSV that holds the target names; no ROI may use it.
_RESERVED_NAMES = {"target", "n/a"}
_NIFTI_SUFFIXES = (".nii", ".nii.gz")

__all__ = [
    "BUILTIN_NETWORKS",
    "COLUMNS",
    "DEFAULT_RADIUS_MM",
    "builtin_path",
    "load_network",
    "network_label",
]


def builtin_path(name: str) -> Path:
    """Return the TSV file of a built-in network.

    Parameters
    ----------
    name
        One of :data:`BUILTIN_NETWORKS`.

    Returns
    -------
    Path
        Path of ``bids_ketdcm/data/networks/<name>.tsv``.
    """
    if name not in BUILTIN_NETWORKS:
        raise InputError(_unknown_message(name))
    return Path(__file__).resolve().parents[1] / "data" / "networks" / f"{name}.tsv"


def network_label(name_or_path: str | os.PathLike) -> str:
    """Return the label used for the BIDS ``seg-`` entity of a network.

    Built-in names are returned as they are; for a user file, the file name without
    its extension, keeping letters and digits only (``my_net.tsv`` -> ``mynet``).

    Parameters
    ----------
    name_or_path
        Built-in network name or path to a user TSV or NIfTI.

    Returns
    -------
    str
        Alphanumeric label (BIDS entity values may hold letters and digits only).
    """
    text = str(name_or_path)
    if text in BUILTIN_NETWORKS:
        return text
    stem = Path(text).name
    for suffix in (".nii.gz", ".nii", ".tsv"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    label = re.sub(r"[^A-Za-z0-9]", "", stem)
    if not label:
        raise InputError(
            f"network file {text}: its name has no letters or digits to make a "
            "BIDS 'seg' label from; rename the file"
        )
    return label


def load_network(name_or_path: str | os.PathLike) -> pd.DataFrame:
    """Load and validate an ROI set.

    Parameters
    ----------
    name_or_path
        A built-in network name (see :data:`BUILTIN_NETWORKS`), a path to a TSV of
        spheres (columns ``name, x, y, z`` and optionally ``radius_mm``,
        ``network``, ``source``), or a path to a labelled NIfTI image
        (``.nii``/``.nii.gz``) with a TSV of labels (columns ``index, name``) of the
        same name beside it.

    Returns
    -------
    pandas.DataFrame
        One row per ROI, in file order, with columns ``name, x, y, z, radius_mm,
        network, source`` (and ``index`` for a labelled image, whose ``x, y, z`` are
        the label centroids in mm and ``radius_mm`` is NaN). ``attrs`` holds
        ``label`` (see :func:`network_label`), ``path`` (the file read) and
        ``labels_img`` (path of the labelled image, or None for spheres).

    Raises
    ------
    InputError
        Unknown built-in name, missing file, or any problem in the file's content;
        the message names the file and the problem.
    """
    text = str(name_or_path)
    if text in BUILTIN_NETWORKS:
        path = builtin_path(text)
        table = _read_sphere_tsv(path)
        labels_img = None
    else:
        path = Path(text)
        if not path.exists():
            if path.suffix or os.sep in text or "/" in text:
                raise InputError(f"network file {path} does not exist")
            raise InputError(_unknown_message(text))
        if path.is_dir():
            raise InputError(f"network file {path} is a folder, not a TSV or NIfTI file")
        if path.name.endswith(_NIFTI_SUFFIXES):
            table = _read_labelled_image(path)
            labels_img = str(path)
        else:
            table = _read_sphere_tsv(path)
            labels_img = None
    table.attrs = {"label": network_label(text), "path": str(path), "labels_img": labels_img}
    return table


def _unknown_message(name: str) -> str:
    return (
        f"unknown network '{name}': the built-in networks are "
        f"{', '.join(BUILTIN_NETWORKS)}; otherwise give the path of a TSV of spheres or "
        "of a labelled NIfTI image"
    )


def _read_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(
            path, sep="\t", dtype=str, keep_default_na=False, na_filter=False
        )
    except pd.errors.EmptyDataError:
        raise InputError(f"network file {path} is empty") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise InputError(f"network file {path} cannot be read as a TSV: {err}") from None
    table.columns = [str(c).strip() for c in table.columns]
    if len(table.columns) == 1 and "," in table.columns[0]:
        raise InputError(
            f"network file {path} is not tab separated (it looks comma separated)"
        )
    if table.empty:
        raise InputError(f"network file {path} has a header but no ROI rows")
    return table


def _require_columns(table: pd.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(
            f"network file {path} lacks the column(s) {', '.join(missing)} "
            f"(found: {', '.join(map(str, table.columns))})"
        )


def _check_names(names: pd.Series, path: Path) -> pd.Series:
    names = names.str.strip()
    empty = [i + 2 for i, n in enumerate(names) if not n]
    if empty:
        raise InputError(
            f"network file {path} has an empty ROI name on line(s) "
            f"{', '.join(map(str, empty))}"
        )
    reserved = sorted({n for n in names if n.lower() in _RESERVED_NAMES})
    if reserved:
        raise InputError(
            f"network file {path} uses the reserved ROI name(s) {', '.join(reserved)}; "
            "rename them"
        )
    duplicated = sorted(set(names[names.duplicated()]))
    if duplicated:
        raise InputError(
            f"network file {path} has duplicate ROI names: {', '.join(duplicated)}"
        )
    if len(names) < 2:
        raise InputError(
            f"network file {path} defines {len(names)} ROI; effective connectivity "
            "needs at least 2"
        )
    return names


def _numeric(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(table[column].str.strip(), errors="coerce").to_numpy(float)
    bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
    if bad:
        shown = ", ".join(
            f"line {i + 2} ({table['name'].iloc[i]!s}: {table[column].iloc[i]!r})"
            for i in bad[:5]
        )
        raise InputError(
            f"network file {path}: column {column} must hold finite numbers; "
            f"bad value(s) at {shown}"
        )
    return values


def sphere_indices(centre: np.ndarray, radius: float, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Voxel indices of a sphere on a grid: the one sphere rule of the app.

    A voxel belongs when its centre lies within ``radius`` mm of ``centre``; the voxel
    holding ``centre`` belongs too (as in nilearn's ``NiftiSpheresMasker``), so a small
    radius still gives one voxel. The search runs over the sphere's bounding box only.

    Parameters
    ----------
    centre
        (3,) sphere centre in mm.
    radius
        Radius in mm.
    affine
        (4, 4) voxel-to-mm affine of the grid.
    shape
        Grid shape (the first three axes are used).

    Returns
    -------
    numpy.ndarray
        (V, 3) integer indices of the voxels inside the grid that belong to the sphere.
    """
    centre = np.asarray(centre, dtype=float)
    inverse = np.linalg.inv(affine)
    size = np.array(shape[:3])
    # half-width in voxels of the sphere's bounding box along each axis: r * |row of inv(M)|
    reach = np.linalg.norm(inverse[:3, :3], axis=1)
    voxel = nib.affines.apply_affine(inverse, centre)
    lo = np.clip(np.floor(voxel - radius * reach).astype(int) - 1, 0, size)
    hi = np.clip(np.ceil(voxel + radius * reach).astype(int) + 2, 0, size)
    axes = [np.arange(a, b) for a, b in zip(lo, hi, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    inside = np.linalg.norm(nib.affines.apply_affine(affine, grid) - centre, axis=1) <= radius
    nearest = np.rint(voxel).astype(int)
    if np.all(nearest >= 0) and np.all(nearest < size):
        inside |= np.all(grid == nearest, axis=1)
    return grid[inside]


def _read_sphere_tsv(path: Path) -> pd.DataFrame:
    table = _read_table(path)
    _require_columns(table, path, ("name", "x", "y", "z"))
    out = pd.DataFrame({"name": _check_names(table["name"], path)})
    for axis in ("x", "y", "z"):
        out[axis] = _numeric(table, axis, path)
    if "radius_mm" in table.columns:
        radius = _numeric(table, "radius_mm", path)
        if np.any(radius <= 0):
            bad = out["name"][radius <= 0].tolist()
            raise InputError(
                f"network file {path}: radius_mm must be positive (ROI(s) "
                f"{', '.join(bad)})"
            )
    else:
        radius = np.full(len(out), DEFAULT_RADIUS_MM)
    out["radius_mm"] = radius
    out["network"] = _text_column(table, "network", "")
    out["source"] = _text_column(table, "source", f"user file {path.name}")
    extra = [c for c in table.columns if c not in COLUMNS]
    for column in extra:
        out[column] = table[column].to_numpy()
    return out


def _text_column(table: pd.DataFrame, column: str, default: str) -> np.ndarray:
    if column not in table.columns:
        return np.full(len(table), default, dtype=object)
    values = table[column].str.strip()
    return np.where(values == "", default, values).astype(object)


def _labels_tsv_for(image: Path) -> Path:
    name = image.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return image.with_name(stem + ".tsv")


def _read_labelled_image(path: Path) -> pd.DataFrame:
    import nibabel as nib
    from scipy import ndimage

    labels_path = _labels_tsv_for(path)
    if not labels_path.exists():
        raise InputError(
            f"labelled network image {path} needs a TSV of labels named {labels_path.name} "
            "beside it (columns index, name)"
        )
    table = _read_table(labels_path)
    _require_columns(table, labels_path, ("index", "name"))
    names = _check_names(table["name"], labels_path)
    index = _numeric(table, "index", labels_path)
    if np.any(index != np.round(index)) or np.any(index <= 0):
        raise InputError(
            f"network file {labels_path}: column index must hold positive integers "
            "(0 is the background)"
        )
    index = index.astype(int)
    if len(set(index)) != len(index):
        raise InputError(f"network file {labels_path} has duplicate label indices")
    img = load_image(path, "labelled network image")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise InputError(f"labelled network image {path} cannot be read: {err}") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise InputError(
            f"labelled network image {path} must be a 3D image of integer labels "
            f"(it has shape {data.shape})"
        )
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
        raise InputError(f"labelled network image {path} must hold integer labels only")
    data = data.astype(int)
    present = set(np.unique(data)) - {0}
    absent = [f"{i} ({n})" for i, n in zip(index, names, strict=True) if i not in present]
    if absent:
        raise InputError(
            f"labelled network image {path} has no voxel with label(s) "
            f"{', '.join(absent)} listed in {labels_path.name}"
        )
    unlisted = sorted(present - set(index))
    if unlisted:
        log.warning(
            "labelled network image %s: labels %s are not listed in %s and are ignored",
            path, unlisted, labels_path.name,
        )
    centres = ndimage.center_of_mass(np.ones_like(data), data, index)
    mm = nib.affines.apply_affine(img.affine, np.asarray(centres, float))
    out = pd.DataFrame(
        {
            "name": names.to_numpy(),
            "x": mm[:, 0],
            "y": mm[:, 1],
            "z": mm[:, 2],
            "radius_mm": np.nan,
            "network": _text_column(table, "network", ""),
            "source": _text_column(table, "source", f"labelled image {path.name}"),
            "index": index,
        }
    )
    return out
