"""Denoising and ROI time-series extraction from fMRIPrep outputs (nilearn).

What this step does, and why (it mirrors what SPM's VOI extraction hands to spectral DCM):

1. ROI voxels: the brain-mask voxels whose centres lie within each sphere (plus the voxel
   holding the centre, as nilearn's sphere masker does), or the voxels of each label of a
   labelled image resampled to the BOLD grid.
2. Confounds: fMRIPrep's confounds table through
   :func:`nilearn.interfaces.fmriprep.load_confounds_strategy` /
   :func:`~nilearn.interfaces.fmriprep.load_confounds`, as the strategy file says
   (:mod:`bids_ketdcm.participant.denoise`).
   Non-steady-state volumes are always dropped; scrubbing strategies also drop
   high-motion volumes.
3. Cleaning: :func:`nilearn.signal.clean` regresses the confounds out of every ROI voxel
   (the cosine regressors are fMRIPrep's 128 s DCT high-pass, the same filter as SPM's
   ``K``), no standardisation (DCM rescales the data itself), then each voxel is
   mean-centred, as SPM's VOI adjustment removes the session constant.
4. Summary per ROI: ``eigenvariate`` (default) is SPM12 ``spm_regions``: the first
   eigenvector ``u`` of the voxel-by-voxel data ``y`` (T x n voxels), sign chosen so the
   eigenimage ``v`` sums positive, scaled ``u * sqrt(s1 / n)`` where ``s1`` is the
   largest eigenvalue of ``y' y``; for a region whose voxels share one signal this is
   that signal (the same scale as the mean). ``mean`` is the plain voxel average.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bids_ketdcm.bids.derivatives import RoiTimeseries
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import load_image
from bids_ketdcm.participant.confounds import is_legacy, modern_confounds
from bids_ketdcm.participant.denoise import load_strategy
from bids_ketdcm.participant.rois import sphere_indices

log = logging.getLogger(__name__)

SUMMARIES = ("eigenvariate", "mean")
#: SPM's own practice for resting-state DCM (the study reproduced used SPM12), and the
#: fewest regressors: with 192 volumes every regressor removes about 1/191 of the
#: signal by chance (on the synthetic data, ROI series vs the high-passed simulated
#: signal: r 0.95-0.97 with "spm", 0.86-0.93 with nilearn's 24-motion "simple").
DEFAULT_DENOISE = "spm"
#: Minimum seconds of data left after scrubbing (XCP-D's ``--min-time`` default).
DEFAULT_MIN_KEPT_SECONDS = 240.0

class RunSkipped(InputError):
    """A run to skip with a logged reason (e.g. too few volumes left after scrubbing).

    The caller goes on with the other runs instead of stopping.
    """


# --------------------------------------------------------------------------- geometry


def voxel_coordinates(affine: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of voxel indices (V, 3) under ``affine``."""
    return nib.affines.apply_affine(affine, indices)


def sphere_voxels(
    centre: np.ndarray, radius: float, affine: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Boolean image of the mask voxels belonging to a sphere.

    Membership is :func:`bids_ketdcm.participant.rois.sphere_indices` (the app's one
    sphere rule), restricted to the mask.

    Parameters
    ----------
    centre
        (3,) sphere centre in mm.
    radius
        Radius in mm.
    affine
        (4, 4) voxel-to-mm affine of the grid.
    mask
        3D boolean brain mask on the grid.

    Returns
    -------
    numpy.ndarray
        3D boolean array, ``mask`` restricted to the sphere.
    """
    inside = np.zeros(mask.shape, dtype=bool)
    hits = sphere_indices(centre, radius, affine, mask.shape)
    inside[tuple(hits.T)] = True
    inside &= mask
    return inside


def roi_masks(
    network: pd.DataFrame, affine: np.ndarray, mask: np.ndarray
) -> list[np.ndarray]:
    """Boolean voxel masks of every ROI of a network on a BOLD grid.

    Parameters
    ----------
    network
        Table from :func:`bids_ketdcm.participant.rois.load_network`.
    affine, mask
        Grid affine and 3D boolean brain mask.

    Returns
    -------
    list of numpy.ndarray
        One 3D boolean array per ROI (possibly empty; the caller checks).
    """
    labels_img = network.attrs.get("labels_img")
    if labels_img:
        from nilearn.image import resample_img

        labels = resample_img(
            nib.load(labels_img),
            target_affine=affine,
            target_shape=mask.shape,
            interpolation="nearest",
            force_resample=True,
            copy_header=True,
        )
        data = np.asarray(labels.dataobj).astype(int)
        return [(data == int(i)) & mask for i in network["index"]]
    centres = network[["x", "y", "z"]].to_numpy(float)
    radii = network["radius_mm"].to_numpy(float)
    return [sphere_voxels(c, r, affine, mask) for c, r in zip(centres, radii, strict=True)]


# --------------------------------------------------------------------------- summaries


def eigenvariate(y: np.ndarray) -> tuple[np.ndarray, float]:
    """First eigenvariate of voxel data as SPM12's ``spm_regions``.

    Parameters
    ----------
    y
        (T, n) voxel time series, already adjusted (confounds and mean removed).

    Returns
    -------
    Y : numpy.ndarray
        (T,) eigenvariate ``u * sqrt(s1 / n)``, sign such that the eigenimage sums
        positive.
    explained : float
        Fraction of the variance explained by the first component, ``s1 / sum(s)``.
    """
    n = y.shape[1]
    u, singular, vt = np.linalg.svd(y, full_matrices=False)
    s = singular**2  # eigenvalues of y'y
    u1, v1 = u[:, 0], vt[0]
    sign = np.sign(v1.sum()) or 1.0
    total = s.sum()
    return u1 * sign * np.sqrt(s[0] / n), float(s[0] / total) if total > 0 else 0.0


# --------------------------------------------------------------------------- confounds


def load_run_confounds(
    bold: str | os.PathLike,
    denoise: str,
    *,
    confounds_file: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """Select the confounds of one run with nilearn.

    Parameters
    ----------
    bold
        Path of the fMRIPrep ``desc-preproc_bold`` image (nilearn finds the confounds
        TSV and JSON beside it).
    denoise
        A preset name or the path of a strategy JSON file
        (:func:`bids_ketdcm.participant.denoise.load_strategy`).
    confounds_file
        The confounds TSV (only used to name it in error messages).

    Returns
    -------
    confounds : pandas.DataFrame or None
        Selected confounds (one row per volume), None when the strategy has none.
    sample_mask : numpy.ndarray or None
        Indices of the volumes to keep; None keeps all.
    """
    from nilearn.interfaces import fmriprep

    strategy = load_strategy(denoise)
    where = confounds_file or f"the confounds file of {bold}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            confounds, sample_mask = getattr(fmriprep, strategy.function)(str(bold), **strategy.parameters)
    except (ValueError, KeyError, OSError) as err:
        message = str(err).replace("\n", " ").replace("\t", "")
        raise InputError(
            f"{where}: cannot load confounds for --denoise {denoise}: {message}"
        ) from None
    if confounds is not None and confounds.shape[1] == 0:
        confounds = None
    return confounds, sample_mask


def _run_motion_qc(confounds_file: str | os.PathLike, n_volumes: int,
                   name: str | os.PathLike) -> tuple[dict, np.ndarray | None]:
    try:
        table = pd.read_csv(confounds_file, sep="\t", na_values=["n/a"])
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"confounds file {name} cannot be read: {err}") from None
    if len(table) != n_volumes:
        raise InputError(
            f"confounds file {name} has {len(table)} rows but the BOLD run "
            f"has {n_volumes} volumes"
        )
    if "framewise_displacement" not in table.columns:
        return {"mean_fd": None, "max_fd": None}, None
    trace = pd.to_numeric(table["framewise_displacement"], errors="coerce").to_numpy(float)
    fd = trace[np.isfinite(trace)]
    return {
        "mean_fd": float(fd.mean()) if fd.size else None,
        "max_fd": float(fd.max()) if fd.size else None,
    }, trace


# --------------------------------------------------------------------------- extraction


def _load_mask(path: str | os.PathLike, bold_img) -> np.ndarray:
    from nilearn.image import resample_to_img

    img = load_image(path, "brain mask")
    try:
        data = np.asarray(img.dataobj)
    except Exception as err:
        raise InputError(f"brain mask {path} cannot be read: {err}") from None
    if np.squeeze(data).ndim != 3:
        raise InputError(f"brain mask {path} must be a 3D image (shape {data.shape})")
    img_shape = img.shape[:3]
    same_grid = img.shape[:3] == bold_img.shape[:3] and np.allclose(
        img.affine, bold_img.affine, atol=1e-3
    )
    if not same_grid:
        log.info("resampling brain mask %s to the BOLD grid", path)
        img = resample_to_img(
            img, bold_img.slicer[..., 0], interpolation="nearest",
            force_resample=True, copy_header=True,
        )
        data = np.asarray(img.dataobj)
    mask = np.squeeze(data) > 0
    if not mask.any() and not same_grid:
        raise InputError(f"brain mask {path} is off the grid of its BOLD image: it does not overlap it "
                         f"(mask shape {img_shape}, BOLD shape {bold_img.shape[:3]}; affines differ)")
    if not mask.any():
        raise InputError(f"brain mask {path} is empty")
    return mask


def _bold_voxels(path: str | os.PathLike, img, union: np.ndarray) -> tuple[np.ndarray, nib.Nifti1Image]:
    """The (T, V) series of the ``union`` voxels, and the run's mean image."""
    try:
        data = np.asarray(img.dataobj)
    except Exception as err:  # truncated gzip, wrong size ...
        raise InputError(f"BOLD image {path} cannot be read: {err}") from None
    if data.ndim != 4:
        raise InputError(f"BOLD image {path} must be 4D (shape {data.shape})")
    series = data[union].T.astype(float)  # (T, V)
    if not np.all(np.isfinite(series)):
        raise InputError(f"BOLD image {path} holds NaN or infinite values inside the ROIs")
    return series, nib.Nifti1Image(data.mean(axis=3, dtype=np.float32), img.affine)


def extract_timeseries(
    bold: str | os.PathLike,
    mask: str | os.PathLike,
    confounds: str | os.PathLike,
    network: pd.DataFrame,
    tr: float,
    *,
    denoise: str = DEFAULT_DENOISE,
    summary: str = "eigenvariate",
    detrend: bool = False,
    min_kept_seconds: float = DEFAULT_MIN_KEPT_SECONDS,
    work_dir: str | os.PathLike | None = None,
) -> RoiTimeseries:
    """Denoise one fMRIPrep BOLD run and summarise every ROI.

    Parameters
    ----------
    bold
        fMRIPrep ``desc-preproc_bold`` image (4D).
    mask
        Brain mask of the run (``desc-brain_mask``).
    confounds
        The run's ``desc-confounds_timeseries.tsv``. nilearn reads the confounds TSV
        and JSON it finds beside ``bold`` (fMRIPrep's layout), which must be this file;
        this path feeds the QC (framewise displacement, non-steady-state volumes) and
        error messages. An fMRIPrep 1.0/1.1 ``_bold_confounds.tsv`` is first translated
        into the later names in ``work_dir`` (:mod:`bids_ketdcm.participant.confounds`).
    network
        ROI table from :func:`bids_ketdcm.participant.rois.load_network`.
    tr
        Repetition time (s).
    denoise
        A preset name or the path of a strategy JSON file
        (:func:`bids_ketdcm.participant.denoise.load_strategy`).
    summary
        ``"eigenvariate"`` (SPM's VOI) or ``"mean"``.
    detrend
        Also remove a linear trend (the cosine regressors already hold SPM's drift
        model; off by default).
    min_kept_seconds
        Fewer seconds of data left after removing volumes raises :class:`RunSkipped`.
    work_dir
        Where fMRIPrep 1.0/1.1 confounds are translated (default: the system's temporary folder).

    Returns
    -------
    RoiTimeseries
        Denoised series, names, coordinates, QC and denoising description.

    Raises
    ------
    InputError
        Unreadable images, an ROI without voxels in the mask or with zero variance,
        confounds missing for the strategy. :class:`RunSkipped` (a subclass) when too
        few volumes are left.
    """
    from nilearn.signal import clean

    if summary not in SUMMARIES:
        raise InputError(f"--roi-summary {summary!r} is not one of {', '.join(SUMMARIES)}")
    bold_img = load_image(bold, "BOLD image")
    if len(bold_img.shape) != 4:
        raise InputError(f"BOLD image {bold} must be 4D (shape {bold_img.shape})")
    n_volumes = bold_img.shape[3]
    brain = _load_mask(mask, bold_img)
    names = [str(n) for n in network["name"]]
    masks = roi_masks(network, bold_img.affine, brain)
    centres = network[["x", "y", "z"]].to_numpy(float)
    for name, roi, centre in zip(names, masks, centres, strict=True):
        if not roi.any():
            raise InputError(
                f"ROI {name} has no voxel inside the brain mask {mask} "
                f"(centre {', '.join(f'{c:g}' for c in centre)} mm)"
            )
    _check_distinct(names, masks, bold)
    union = np.logical_or.reduce(masks)
    position = np.full(brain.shape, -1)
    position[union] = np.arange(union.sum())
    raw, mean_bold = _bold_voxels(bold, bold_img, union)

    _check_confound_values(confounds, None)
    nilearn_bold, table, translation = Path(bold), Path(confounds), None
    if is_legacy(confounds):
        nilearn_bold, table, translation = modern_confounds(bold, confounds, work_dir or tempfile.gettempdir())
    selected, sample_mask = load_run_confounds(
        nilearn_bold, denoise, confounds_file=confounds,
    )
    if selected is not None and len(selected) != n_volumes:
        raise InputError(
            f"confounds file {confounds}: {len(selected)} rows but the BOLD run "
            f"has {n_volumes} volumes"
        )
    if selected is not None:
        _check_confound_values(table, [str(c) for c in selected.columns], name=confounds)
    kept = np.arange(n_volumes) if sample_mask is None else np.asarray(sample_mask, int)
    qc: dict[str, Any] = {"n_volumes": int(n_volumes)}
    motion, fd = _run_motion_qc(table, n_volumes, name=confounds)
    qc.update(motion)
    n_non_steady = _count_non_steady(table)
    qc.update(
        n_non_steady_state=n_non_steady,
        n_scrubbed=int(n_volumes - len(kept) - n_non_steady),
        n_kept=int(len(kept)),
    )
    if len(kept) * tr < min_kept_seconds:
        raise RunSkipped(
            f"BOLD run {bold}: only {len(kept)} of {n_volumes} volumes "
            f"({len(kept) * tr:.0f} s) are left after removing non-steady-state and "
            f"high-motion volumes; at least {min_kept_seconds:g} s are required"
        )

    cleaned = clean(
        raw,
        confounds=None if selected is None else selected.to_numpy(float),
        sample_mask=kept if sample_mask is not None else None,
        detrend=detrend,
        standardize=None,
        standardize_confounds=True,
        filter=False,
        t_r=tr,
    )
    cleaned = cleaned - cleaned.mean(axis=0, keepdims=True)
    raw_kept = raw[kept]

    columns, roi_qc = [], {}
    used = np.zeros(union.shape, np.uint8)
    for name, roi in zip(names, masks, strict=True):
        index = position[roi]
        spread = raw_kept[:, index].std(axis=0)
        alive = index[spread > 0]
        if alive.size == 0:
            raise InputError(
                f"ROI {name} has zero variance in every one of its {index.size} voxels "
                f"of BOLD image {bold}"
            )
        used[np.unravel_index(np.flatnonzero(union)[alive], union.shape)] = 1
        y = cleaned[:, alive]
        if not np.any(y.std(axis=0) > 1e-10 * np.abs(raw_kept[:, alive]).mean()):
            raise InputError(
                f"ROI {name} has zero variance after denoising in BOLD image {bold}"
            )
        entry = {
            "n_voxels": int(alive.size),
            "n_voxels_zero_variance": int(index.size - alive.size),
            "tsnr": _tsnr(raw_kept[:, alive]),
        }
        if alive.size == 1:
            log.warning("ROI %s has a single voxel in BOLD image %s: its series is one voxel's signal "
                        "and noise", name, bold)
        if summary == "eigenvariate":
            series, explained = eigenvariate(y)
            entry["variance_explained"] = explained
        else:
            series = y.mean(axis=1)
        lag1 = float(np.corrcoef(series[:-1], series[1:])[0, 1]) if series.std() > 0 else 0.0
        if lag1 < -0.5:
            log.warning("ROI %s of BOLD image %s alternates from volume to volume (lag-1 autocorrelation "
                        "%.2f): a signal at the Nyquist frequency, not a BOLD signal", name, bold, lag1)
        columns.append(series)
        roi_qc[name] = entry
    qc["rois"] = roi_qc

    description = {
        **load_strategy(denoise).record(),
        "Confounds": [] if selected is None else [str(c) for c in selected.columns],
        "Detrend": detrend,
        "Standardize": False,
        "MeanCentred": True,
        "Summary": summary,
        **({} if translation is None else {"ConfoundsTranslated": translation}),
    }
    return RoiTimeseries(
        data=np.column_stack(columns),
        names=names,
        coords=network[["x", "y", "z"]].to_numpy(float),
        tr=float(tr),
        kept_volumes=kept,
        qc=qc,
        denoise=description,
        fd=fd,
        mean_bold=mean_bold,
        voxels=nib.Nifti1Image(used, bold_img.affine),
    )


def _check_distinct(names: list[str], masks: list[np.ndarray], bold: str | os.PathLike) -> None:
    """Refuse ROIs that are identical or lie inside another on this grid (their series would share signal)."""
    sizes = [int(m.sum()) for m in masks]
    for i, inner in enumerate(masks):
        for j, outer in enumerate(masks):
            if i == j or sizes[i] > sizes[j] or (sizes[i] == sizes[j] and i > j):
                continue
            if not np.any(inner & ~outer):
                what = "is identical to" if sizes[i] == sizes[j] else "lies entirely inside"
                raise InputError(
                    f"ROI {names[i]} {what} ROI {names[j]} on the grid of BOLD image {bold} "
                    f"({sizes[i]} and {sizes[j]} voxels): DCM needs distinct regions; move or shrink one"
                )


def _check_confound_values(path: str | os.PathLike, columns: list[str] | None,
                           name: str | os.PathLike | None = None) -> None:
    """Confound columns hold numbers, and the selected ones ``n/a`` only in leading rows (derivatives, FD).

    ``columns``: the confounds the strategy selected; None checks every column for text only.
    ``name``: the input file named in messages when ``path`` is its translation (default ``path``).
    """
    shown = name or path
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"confounds file {shown} cannot be read: {err}") from None
    for column in table.columns if columns is None else columns:
        if column not in table.columns:
            continue
        values = table[column].str.strip()
        missing = values.isin(["n/a", "NaN", "nan", ""]).to_numpy()
        numbers = pd.to_numeric(values.where(~missing), errors="coerce").to_numpy(float)
        bad = np.flatnonzero(~missing & ~np.isfinite(numbers))
        if bad.size:
            raise InputError(f"confounds file {shown}: column {column!r} holds {values.iloc[bad[0]]!r} at row "
                             f"{bad[0] + 1}; expected numbers (or n/a in the first rows)")
        if columns is None:
            continue
        present = np.flatnonzero(~missing)
        gaps = np.flatnonzero(missing)
        if present.size and gaps.size and gaps.max() > present.min():
            row = int(gaps[gaps > present.min()][0])
            raise InputError(f"confounds file {shown}: column {column!r} is n/a at row {row + 1}, in the middle of "
                             "the run (only the first rows may be n/a)")


def _count_non_steady(confounds_file: str | os.PathLike) -> int:
    header = pd.read_csv(confounds_file, sep="\t", nrows=0).columns
    columns = [c for c in header if c.startswith("non_steady_state")]
    if not columns:
        return 0
    table = pd.read_csv(confounds_file, sep="\t", usecols=columns, na_values=["n/a"])
    return int((table.fillna(0).to_numpy() != 0).any(axis=1).sum())


def _tsnr(raw: np.ndarray) -> float:
    """Median over voxels of temporal mean / standard deviation after linear detrending."""
    from scipy.signal import detrend

    sd = detrend(raw, axis=0).std(axis=0)
    ratio = np.where(sd > 0, raw.mean(axis=0) / np.where(sd > 0, sd, 1.0), np.nan)
    return float(np.nanmedian(ratio))
