"""Synthetic ds005917-shaped dataset: real metadata, simulated images.

The participants, phenotype (MADRS), sessions, runs and BOLD sidecars are those of
OpenNeuro ds005917 (CC0, copied in ``bids_ketdcm/data/ds005917``). Only the images are
simulated:

- a raw BIDS tree with the real func sidecars and small placeholder raw BOLD images
  (constant; nothing reads them, they make the tree a complete BIDS dataset);
- fMRIPrep-shaped derivatives (``derivatives/fmriprep``) on a coarse MNI grid: BOLD,
  brain mask, confounds TSV/JSON with fMRIPrep's columns, BOLD sidecar;
- the ground truth (``derivatives/synthetic_truth``): each participant's effective
  connectivity A (Hz), the simulated ROI signals, the planted link and the seed.

Generative model of a run. ROI signals come from the spectral DCM generative model
(:func:`bids_ketdcm.dcm.simulate.simulate`) with the participant's A. Every brain voxel
is ``baseline * (1 + signal + nuisance) + noise``: ROI voxels carry their ROI's signal
(percent signal change, voxel gain 0.7-1.3); motion parameters (slow drifts plus a few
spikes) enter linearly through a spatial gradient (removable by motion regression) and,
at spikes, through an FD-proportional artefact (removable only by scrubbing); two
physiological noise sources load mostly on CSF and white matter (removable by WM/CSF or
CompCor regression); a linear scanner drift (removable by the cosine high-pass); white
noise; brighter non-steady-state volumes at the start. The confounds are computed from
the simulated data as fMRIPrep does (mean WM/CSF/global signals, DVARS, FD, aCompCor on
high-passed WM+CSF voxels, cosine basis, outlier columns).

The planted link (``link="planted"``): for each chosen connection, its value in the
participant's A is ``a0 + sd * (rho * z + sqrt(1 - rho^2) * e)``, with z the standardised
real ketamine response r = (MADRS_b0 - MADRS_d2) / MADRS_b0 and e independent noise made
exactly orthogonal to z, so that the sample correlation between the planted connection
and r over the 27 participants is exactly ``rho``. With ``link="none"`` the connection is
``a0 + sd * e`` (unrelated to r).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from bids_ketdcm import __version__
from bids_ketdcm.dcm.simulate import simulate
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import atomic_path, write_json, write_text, write_tsv
from bids_ketdcm.participant.rois import load_network
from bids_ketdcm.participant.timeseries import voxel_coordinates

log = logging.getLogger(__name__)

SPACE = "MNI152NLin2009cAsym"
TASK = "rest"
TR = 2.5
SOURCE_DOI = "doi:10.18112/openneuro.ds005917.v1.0.1"
#: (source, target) connections carrying the planted link: mPFC's outputs to the other DMN
#: nodes (feed-forward, so strong values keep A stable).
DEFAULT_PLANTED = (("DMN_mPFC", "DMN_PCC"), ("DMN_mPFC", "DMN_L_IPC"), ("DMN_mPFC", "DMN_R_IPC"))
#: Default sample correlation of each planted connection with r, and its mean and sd (Hz).
LINK_RHO, LINK_MEAN_HZ, LINK_SD_HZ = 1.0, 0.1, 0.5
#: Box of the MNI152NLin2009cAsym template (mm), as templateflow's 1 mm grid.
_MNI_ORIGIN = np.array([-96.0, -132.0, -78.0])
_MNI_EXTENT = np.array([192.0, 228.0, 174.0])
_HIGH_PASS_S = 128.0
_BASELINE = 1000.0


# --------------------------------------------------------------------------- real metadata


def _data_dir() -> Path:
    return Path(str(resources.files("bids_ketdcm") / "data" / "ds005917"))


@lru_cache(maxsize=1)
def real_rest_runs() -> pd.DataFrame:
    """Every resting-state run of the real ds005917 (participant, session, run, ...)."""
    return pd.read_csv(_data_dir() / "task-rest_runs.tsv", sep="\t", dtype=str)


@lru_cache(maxsize=1)
def _sidecar_common() -> dict:
    return json.loads((_data_dir() / "task-rest_bold_sidecar_common.json").read_text())


def real_rest_sidecar(participant_id: str, session_id: str, run: str) -> dict:
    """Rebuild the real sidecar JSON of one ds005917 resting-state run, key for key.

    Parameters
    ----------
    participant_id, session_id, run
        e.g. ``"sub-MOA101"``, ``"ses-b0"``, ``"01"``.

    Returns
    -------
    dict
        The sidecar's content, in the original key order.
    """
    runs = real_rest_runs()
    row = runs[
        (runs.participant_id == participant_id)
        & (runs.session_id == session_id)
        & (runs.run == run)
    ]
    if row.empty:
        raise KeyError(f"no rest run {participant_id} {session_id} run-{run} in ds005917")
    row = row.iloc[0]
    spec = _sidecar_common()
    values = dict(spec["Common"])
    values.update(
        ProcedureStepDescription=row.ProcedureStepDescription,
        SeriesNumber=int(row.SeriesNumber),
        AcquisitionTime=row.AcquisitionTime,
        SAR=float(row.SAR),
        SliceTiming=spec["SliceTiming"][row.n_slices],
    )
    return {key: values[key] for key in spec["KeyOrder"]}


def ketamine_responses() -> pd.DataFrame:
    """Real MADRS ketamine response of the MDD participants with ``ses-b0`` and ``ses-d2``.

    Returns
    -------
    pandas.DataFrame
        Columns ``participant_id, madrs_b0, madrs_d2, r`` with
        ``r = (madrs_b0 - madrs_d2) / madrs_b0``, sorted by participant (27 rows).
    """
    data = _data_dir()
    participants = pd.read_csv(data / "participants.tsv", sep="\t", na_values="n/a")
    phenotype = pd.read_csv(data / "phenotype" / "phenotype.tsv", sep="\t", na_values="n/a")
    wide = phenotype.pivot(index="participant_id", columns="session_id", values="MADRS_Total")
    mdd = participants.loc[participants["group"] == "MDD", "participant_id"]
    wide = wide.loc[wide.index.isin(mdd), ["ses-b0", "ses-d2"]].dropna()
    wide = wide[wide["ses-b0"] > 0]
    table = pd.DataFrame(
        {
            "participant_id": wide.index,
            "madrs_b0": wide["ses-b0"].to_numpy(),
            "madrs_d2": wide["ses-d2"].to_numpy(),
        }
    )
    table["r"] = (table.madrs_b0 - table.madrs_d2) / table.madrs_b0
    return table.sort_values("participant_id").reset_index(drop=True)


# --------------------------------------------------------------------------- grid


@dataclass
class _Grid:
    affine: np.ndarray
    brain: np.ndarray  # 3D bool
    wm: np.ndarray
    csf: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.brain.shape


@lru_cache(maxsize=4)
def _make_grid(voxel_size: float) -> _Grid:
    """Brain, WM and CSF masks on an MNI grid of ``voxel_size`` mm (nilearn templates)."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_wm_template,
    )
    from nilearn.image import resample_img

    shape = tuple(int(s) for s in np.floor(_MNI_EXTENT / voxel_size).astype(int) + 1)
    affine = np.diag([voxel_size] * 3 + [1.0])
    affine[:3, 3] = _MNI_ORIGIN

    def on_grid(img) -> np.ndarray:
        img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        with warnings.catch_warnings():  # linear on a binary mask is meant: thresholded
            warnings.simplefilter("ignore", UserWarning)
            out = resample_img(
                img, target_affine=affine, target_shape=shape, interpolation="linear",
                force_resample=True, copy_header=True,
            )
        return np.asarray(out.dataobj, dtype=float)

    brain = on_grid(load_mni152_brain_mask(resolution=2)) > 0.5
    gm = on_grid(load_mni152_gm_template(resolution=2))
    wm = on_grid(load_mni152_wm_template(resolution=2))
    wm_mask = brain & (wm > 0.7)
    csf_mask = brain & (gm + wm < 0.3)
    return _Grid(affine=affine, brain=brain, wm=wm_mask, csf=csf_mask)


# --------------------------------------------------------------------------- connectivity


def _draw_connectivity(
    n: int, rng: np.random.Generator, fixed: dict[tuple[int, int], float]
) -> np.ndarray:
    """A stable A (Hz) with self-inhibition near -0.5 Hz and weak positive coupling."""
    mean = 0.3 / max(n - 1, 1)
    for _ in range(1000):
        A = rng.normal(mean, 0.4 * mean + 0.02, size=(n, n))
        np.fill_diagonal(A, -0.5 * np.exp(rng.normal(0.0, 0.1, size=n)))
        for (target, source), value in fixed.items():
            A[target, source] = value
        if np.linalg.eigvals(A).real.max() < -0.05:
            return A
    raise RuntimeError("could not draw a stable connectivity matrix")


def _planted_values(
    responses: pd.DataFrame, n_links: int, link: str, rho: float, a0: float, sd: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """(participants, links) planted values; exact sample correlation rho with r."""
    z = (responses["r"] - responses["r"].mean()) / responses["r"].std(ddof=0)
    z = z.to_numpy()
    out = np.empty((len(z), n_links))
    for k in range(n_links):
        e = rng.standard_normal(len(z))
        if link == "planted":
            e = e - e.mean()
            e = e - (e @ z) / (z @ z) * z
            e = e / e.std()
            out[:, k] = a0 + sd * (rho * z + np.sqrt(1.0 - rho**2) * e)
        else:
            out[:, k] = a0 + sd * (e - e.mean()) / e.std()
    return out


# --------------------------------------------------------------------------- confounds


def _cosine_basis(n: int, tr: float, period: float = _HIGH_PASS_S) -> np.ndarray:
    """fMRIPrep's (nipype) discrete cosine high-pass basis, constant column dropped."""
    order = int(np.floor(2 * n * tr / period))
    t = np.arange(n)
    columns = [np.sqrt(2.0 / n) * np.cos(np.pi / n * (t + 0.5) * k) for k in range(1, order)]
    return np.column_stack(columns) if columns else np.zeros((n, 0))


def _with_expansions(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    derivative = np.r_[np.nan, np.diff(values)]
    return {
        name: values,
        f"{name}_derivative1": derivative,
        f"{name}_power2": values**2,
        f"{name}_derivative1_power2": derivative**2,
    }


def _framewise_displacement(motion: np.ndarray) -> np.ndarray:
    """Power et al. (2012) FD: rotations (rad) on a 50 mm sphere."""
    step = np.abs(np.diff(motion, axis=0))
    step[:, 3:] *= 50.0
    return np.r_[np.nan, step.sum(axis=1)]


def _rmsd(motion: np.ndarray, radius: float = 80.0) -> np.ndarray:
    """Jenkinson (1999) relative RMS displacement between consecutive volumes."""
    from scipy.spatial.transform import Rotation

    out = [np.nan]
    mats = []
    for row in motion:
        m = np.eye(4)
        m[:3, :3] = Rotation.from_euler("xyz", row[3:]).as_matrix()
        m[:3, 3] = row[:3]
        mats.append(m)
    for before, after in pairwise(mats):
        rel = after @ np.linalg.inv(before) - np.eye(4)
        a, t = rel[:3, :3], rel[:3, 3]
        out.append(float(np.sqrt(0.2 * radius**2 * np.trace(a.T @ a) + t @ t)))
    return np.asarray(out)


def _dvars(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DVARS and standardised DVARS (Nichols 2013) of (T, V) in-mask data."""
    diff = np.diff(data, axis=0)
    dvars = np.sqrt((diff**2).mean(axis=1))
    centred = data - data.mean(axis=0)
    sd = (np.percentile(data, 75, axis=0) - np.percentile(data, 25, axis=0)) / 1.349
    lag0 = (centred**2).sum(axis=0)
    lag1 = (centred[:-1] * centred[1:]).sum(axis=0)
    ar1 = np.divide(lag1, lag0, out=np.zeros_like(lag1), where=lag0 > 0)
    expected = np.sqrt(np.mean(2.0 * sd**2 * (1.0 - ar1)))
    return np.r_[np.nan, dvars], np.r_[np.nan, dvars / expected]


def _compcor(
    data: np.ndarray, cosine: np.ndarray, first: int, mask_name: str, prefix: str,
    max_components: int = 10,
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Anatomical CompCor on (T, V) data: high-pass, centre, SVD.

    As fMRIPrep, the components explaining 50 % of the variance are retained (the TSV
    and JSON hold those only; fMRIPrep's JSON also lists the dropped ones).
    """
    y = data[first:]
    basis = np.column_stack([np.ones(len(y)), cosine[first:]])
    y = y - basis @ np.linalg.lstsq(basis, y, rcond=None)[0]
    y = y - y.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(y @ y.T)  # left singular vectors of y
    order = np.argsort(eigval)[::-1]
    power, u = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    s = np.sqrt(power)
    explained = power / power.sum()
    cumulative = np.cumsum(explained)
    k = min(max_components, int(np.searchsorted(cumulative, 0.5)) + 1)
    columns, meta = {}, {}
    for i in range(k):
        name = f"{prefix}_comp_cor_{i:02d}"
        values = np.zeros(len(data))
        values[first:] = u[:, i]
        columns[name] = values
        meta[name] = {
            "CumulativeVarianceExplained": float(cumulative[i]),
            "Mask": mask_name,
            "Method": "aCompCor",
            "Retained": True,
            "SingularValue": float(s[i]),
            "VarianceExplained": float(explained[i]),
        }
    return columns, meta


def _confounds_table(
    data: np.ndarray, grid_sel: dict[str, np.ndarray], motion: np.ndarray, n_dummy: int,
    tr: float,
) -> tuple[pd.DataFrame, dict]:
    """fMRIPrep-style confounds from simulated in-mask data (T, V)."""
    n = len(data)
    cosine = _cosine_basis(n, tr)
    columns: dict[str, np.ndarray] = {}
    columns.update(_with_expansions("global_signal", data.mean(axis=1)))
    columns.update(_with_expansions("csf", data[:, grid_sel["csf"]].mean(axis=1)))
    columns.update(_with_expansions("white_matter", data[:, grid_sel["wm"]].mean(axis=1)))
    both = grid_sel["csf"] | grid_sel["wm"]
    columns.update(_with_expansions("csf_wm", data[:, both].mean(axis=1)))
    dvars, std_dvars = _dvars(data)
    columns["std_dvars"] = std_dvars
    columns["dvars"] = dvars
    fd = _framewise_displacement(motion)
    columns["framewise_displacement"] = fd
    columns["rmsd"] = _rmsd(motion)
    meta: dict[str, dict] = {}
    for mask_name, prefix, selection in (
        ("CSF", "c", grid_sel["csf"]),
        ("WM", "w", grid_sel["wm"]),
        ("combined", "a", both),
    ):
        comp, info = _compcor(data[:, selection], cosine, n_dummy, mask_name, prefix)
        columns.update(comp)
        meta.update(info)
    for k in range(cosine.shape[1]):
        columns[f"cosine{k:02d}"] = cosine[:, k]
        meta[f"cosine{k:02d}"] = {"Method": "Discrete Cosine Transform", "Cutoff": _HIGH_PASS_S}
    for k in range(n_dummy):
        one_hot = np.zeros(n)
        one_hot[k] = 1.0
        columns[f"non_steady_state_outlier{k:02d}"] = one_hot
    for j, name in enumerate(["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]):
        expanded = _with_expansions(name, motion[:, j])
        for key in (name, f"{name}_derivative1", f"{name}_derivative1_power2", f"{name}_power2"):
            columns[key] = expanded[key]
    outliers = np.flatnonzero((np.nan_to_num(fd) > 0.5) | (np.nan_to_num(columns["std_dvars"]) > 1.5))
    for k, t in enumerate(outliers):
        one_hot = np.zeros(n)
        one_hot[t] = 1.0
        columns[f"motion_outlier{k:02d}"] = one_hot
    table = pd.DataFrame(columns).map(lambda v: float(f"{v:.6g}"))
    return table, meta


# --------------------------------------------------------------------------- one run


def _motion(rng: np.random.Generator, n: int, n_spikes: int) -> np.ndarray:
    """Six rigid-body parameters (mm, rad): slow drift, volume-to-volume jitter, spikes.

    The drift lives below the 128 s high-pass cut-off (the two slowest cosines of
    fMRIPrep's basis, so that its squares stay there too), the jitter is white (FD
    about 0.15 mm) and each spike displaces one volume. Motion that wanders through the
    signal band would share variance with the ROI signals by chance and make the regression
    remove signal; real motion does that too, but it would blur what the synthetic data are for.
    """
    slow = _cosine_basis(n, TR)[:, :2] * np.sqrt(n / 2.0)  # unit amplitude
    drift = slow @ rng.normal(0.0, 1.0, size=(slow.shape[1], 6))
    scale = np.array([0.1, 0.15, 0.2, 0.002, 0.001, 0.001])
    jitter = rng.normal(0.0, 1.0, size=(n, 6)) * np.array(
        [0.02, 0.02, 0.03, 0.0003, 0.0002, 0.0002]
    )
    motion = drift * scale + jitter
    motion -= motion[0]
    for t_spike in rng.choice(np.arange(5, n - 2), size=n_spikes, replace=False):
        motion[t_spike] += rng.normal(0.0, 1.0, size=6) * np.array(
            [0.3, 0.3, 0.3, 0.004, 0.004, 0.004]
        )
    return motion


def _run_volumes(
    signals: np.ndarray, grid: _Grid, roi_index: np.ndarray, rng: np.random.Generator,
    n_dummy: int, tr: float,
) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """(T, V) in-mask intensities and the confounds of one run.

    Every term is a fraction of the baseline (uniform, :data:`_BASELINE`): ROI signal
    (percent signal change from the DCM simulator, voxel gain 0.7-1.3), motion through a
    spatial gradient (0.5 % per mm at 8 cm from the centre), an FD-proportional artefact
    (2 % per mm of FD), two physiological noise sources (white: cardiac and respiratory
    cycles aliased at this TR; one in CSF, 1 %, one in WM, 0.4 %, both 0.2 % in grey
    matter), a
    0.3 % linear drift and 0.15 % white noise; non-steady-state volumes are 30 % brighter.
    """
    n_scans = signals.shape[0]
    voxels = np.argwhere(grid.brain)
    n_voxels = voxels.shape[0]
    position = (voxel_coordinates(grid.affine, voxels) / 80.0).clip(-1.5, 1.5)
    wm = grid.wm[grid.brain]
    csf = grid.csf[grid.brain]

    motion = _motion(rng, n_scans, int(rng.integers(0, 5)))
    fd = np.nan_to_num(_framewise_displacement(motion))
    gradient = rng.normal(0.0, 1.0, size=(6, 3)) @ position.T  # (6, V)
    gradient *= np.array([0.005, 0.005, 0.005, 0.25, 0.25, 0.25])[:, None]  # per mm, rad
    physio = rng.standard_normal((n_scans, 2))  # cardiac/respiratory, aliased: broadband
    other = ~(csf | wm)
    physio_load = np.vstack(
        [np.where(csf, 0.01, np.where(other, 0.002, 0.0)),
         np.where(wm, 0.004, np.where(other, 0.002, 0.0))]
    ) * rng.uniform(0.5, 1.0, size=(2, n_voxels))

    fraction = np.zeros((n_scans, n_voxels))
    in_roi = roi_index >= 0
    gain = rng.uniform(0.7, 1.3, size=int(in_roi.sum()))
    fraction[:, in_roi] = 0.01 * signals[:, roi_index[in_roi]] * gain
    fraction += motion @ gradient
    fraction += 0.02 * np.outer(fd, rng.uniform(0.0, 1.0, size=n_voxels))
    fraction += physio @ physio_load
    fraction += 0.003 * np.linspace(-1.0, 1.0, n_scans)[:, None]
    fraction += rng.normal(0.0, 0.0015, size=fraction.shape)
    data = _BASELINE * (1.0 + fraction)
    data[:n_dummy] *= 1.3
    data = np.rint(data)
    confounds, meta = _confounds_table(data, {"wm": wm, "csf": csf}, motion, n_dummy, tr)
    return data, confounds, meta


def _roi_index(grid: _Grid, network: pd.DataFrame, voxel_size: float) -> np.ndarray:
    """For every brain voxel, the ROI it carries (nearest centre within its reach) or -1.

    A sphere's signal fills ``radius + voxel_size / 2`` mm so that every voxel a sphere
    masker of the same radius selects carries the ROI's signal.
    """
    coords = voxel_coordinates(grid.affine, np.argwhere(grid.brain))
    centres = network[["x", "y", "z"]].to_numpy(float)
    reach = network["radius_mm"].to_numpy(float) + voxel_size / 2.0
    distance = np.linalg.norm(coords[:, None, :] - centres[None], axis=-1)
    distance = np.where(distance <= reach, distance, np.inf)
    nearest = distance.argmin(axis=1)
    return np.where(np.isfinite(distance.min(axis=1)), nearest, -1)


# --------------------------------------------------------------------------- writers


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype, zooms, tr=None) -> None:
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header.set_zooms(tuple(zooms) + (tr,))
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _volume(grid: _Grid, values: np.ndarray) -> np.ndarray:
    """(T, V) in-mask values -> 4D array (X, Y, Z, T)."""
    out = np.zeros(grid.shape + (values.shape[0],), dtype=values.dtype)
    out[grid.brain] = values.T
    return out


def _raw_placeholder(path: Path, n_slices: int, n_scans: int, tr: float) -> None:
    data = np.full((8, 8, n_slices, n_scans), 500, dtype=np.int16)
    affine = np.diag([3.75, 3.75, 3.5, 1.0])
    _write_nifti(path, data, affine, np.int16, (3.75, 3.75, 3.5), tr=tr)


def _connectivity_frame(A: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    frame = pd.DataFrame(A, columns=list(names))
    frame.insert(0, "target", list(names))
    return frame


# --------------------------------------------------------------------------- main entry


@dataclass
class _Run:
    subject: int  # row of the participants table
    session: str  # "ses-b0"
    run: str  # "01"

    def entities(self, participant_id: str) -> str:
        return f"{participant_id}_{self.session}_task-{TASK}_run-{self.run}"


def make_synthetic_dataset(
    outdir: str | os.PathLike,
    n_subjects: int | None = None,
    network: str | os.PathLike = "dmn4",
    link: str = "planted",
    seed: int = 0,
    n_scans: int = 192,
    *,
    sessions: Sequence[str] = ("b0",),
    planted: Sequence[tuple[str, str]] = DEFAULT_PLANTED,
    link_rho: float = LINK_RHO,
    link_mean: float = LINK_MEAN_HZ,
    link_sd: float = LINK_SD_HZ,
    voxel_size: float = 7.0,
    n_dummy: int = 1,
    signal_percent: float = 0.5,
) -> Path:
    """Write a ds005917-shaped dataset with simulated images.

    Parameters
    ----------
    outdir
        Folder to create (must not exist or be empty). It is written in a temporary
        folder beside it and renamed at the end, so it is never half-written.
    n_subjects
        Number of participants: the first ``n_subjects`` (sorted labels) of the 27 MDD
        participants with MADRS at ``ses-b0`` and ``ses-d2``; None for all 27.
    network
        ROI set whose regions carry the simulated signals (built-in name or TSV of
        spheres).
    link
        ``"planted"``: the planted connections relate to the real ketamine response;
        ``"none"``: they are drawn independently of it.
    seed
        Random seed; the same arguments give identical files.
    n_scans
        Volumes per run (the real runs have 192: 8 min at TR 2.5 s).
    sessions
        Sessions to generate (labels with or without ``ses-``); a participant gets a
        session, and its runs, only where the real dataset has them.
    planted
        Connections carrying the link, as (source, target) ROI names.
    link_rho
        Sample correlation, over the 27 participants, between each planted connection
        and the response r.
    link_mean, link_sd
        Mean and standard deviation (Hz) of a planted connection over the 27. The
        defaults (three connections, rho 1.0, sd 0.5 Hz) were strengthened from one
        connection with rho 0.9 and sd 0.3 Hz, whose estimate after spectral DCM on 192
        scans related to r at only 0.49 (binary25 balanced accuracy 0.62-0.74). With the
        defaults ``benchmarks/synth_link_strength.py`` measures r(true, estimated) about
        0.7 per connection through the whole pipeline, and the demo's group level finds
        binary25 at balanced accuracy 0.92 (permutation p 0.005); the same design with
        ``link="none"`` stays at chance (tests/test_demo_cohort.py).
    voxel_size
        Voxel size (mm) of the derivative images: coarse, so that the 28 runs of the
        27 participants take about 20 MB (at 6 mm they would take about 33 MB).
    n_dummy
        Non-steady-state volumes at the start of each run (flagged in the confounds).
    signal_percent
        Size of the ROI signals: standard deviation (percent of the baseline, mean over
        ROIs) after the 128 s high-pass. The simulator's own scale (about 0.2 %) would
        bury them under the nuisance terms; real resting-state fluctuations in grey
        matter are of the order of 0.5-1 %.

    Returns
    -------
    Path
        ``outdir``.
    """
    outdir = Path(outdir)
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise InputError(f"output folder {outdir} already exists and is not empty")
    if link not in ("planted", "none"):
        raise InputError(f"--link must be 'planted' or 'none' (got {link!r})")
    if not -1.0 <= link_rho <= 1.0:
        raise InputError(f"link correlation must lie in [-1, 1] (got {link_rho})")
    if n_scans < 64:
        raise InputError(f"--n-scans must be at least 64 (got {n_scans})")
    if not 0 <= n_dummy < n_scans // 2:
        raise InputError(f"non-steady-state volumes must lie in [0, {n_scans // 2})")
    table = load_network(network)
    if table.attrs.get("labels_img"):
        raise InputError(f"network {network}: synthetic data need a network of spheres")
    names = list(table["name"])
    pairs = _planted_pairs(planted, names, network)
    responses = ketamine_responses()
    if n_subjects is not None and not 1 <= n_subjects <= len(responses):
        raise InputError(f"--n-subjects must lie between 1 and {len(responses)}")
    chosen = responses if n_subjects is None else responses.iloc[:n_subjects]
    wanted = [s if s.startswith("ses-") else f"ses-{s}" for s in sessions]
    real = real_rest_runs()
    runs = [
        _Run(i, row.session_id, row.run)
        for i, subject in enumerate(chosen["participant_id"])
        for row in real[(real.participant_id == subject) & real.session_id.isin(wanted)]
        .itertuples()
    ]
    if not runs:
        raise InputError(f"no real ds005917 rest run in session(s) {', '.join(wanted)}")

    values, A, sim_seq = planted_connectivity(responses, names, pairs, link, seed, link_rho, link_mean, link_sd)
    A = A[: len(chosen)]
    sim_seed = int(sim_seq.generate_state(1)[0])
    signals = _simulate_runs([A[r.subject] for r in runs], n_scans, sim_seed)
    scaled = [_scale_signals(y, signal_percent, TR) for y in signals]

    grid = _make_grid(float(voxel_size))
    roi_index = _roi_index(grid, table, voxel_size)
    empty = [names[k] for k in range(len(names)) if not np.any(roi_index == k)]
    if empty:
        raise InputError(f"network {network}: ROI(s) {', '.join(empty)} fall outside the brain")

    outdir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        subjects = chosen["participant_id"].tolist()
        _write_top_level(work, subjects)
        _write_derivative_descriptions(work)
        run_seqs = sim_seq.spawn(len(runs))
        # small matrices: one BLAS thread is faster and avoids oversubscription
        with threadpool_limits(limits=1, user_api="blas"):
            for k, run in enumerate(runs):
                _write_run(
                    work, subjects[run.subject], run, scaled[k], A[run.subject], names,
                    table.attrs["label"], grid, roi_index,
                    np.random.default_rng(run_seqs[k]), n_dummy, voxel_size,
                )
        truth = work / "derivatives" / "synthetic_truth"
        planted_table = chosen[["participant_id", "madrs_b0", "madrs_d2", "r"]].rename(
            columns={"r": "r_ketamine"}
        )
        for k, (target, source) in enumerate(pairs):
            planted_table[f"{names[source]}->{names[target]}"] = values[: len(chosen), k]
        write_tsv(truth / "planted.tsv", planted_table)
        write_json(
            truth / "truth.json",
            {
                "Generator": f"bids_ketdcm.testing.synth.make_synthetic_dataset ({__version__})",
                "Seed": seed,
                "SimulationSeed": sim_seed,
                "Network": table.attrs["label"],
                "ROIs": names,
                "Link": link,
                "PlantedConnections": [
                    {"source": names[s], "target": names[t]} for t, s in pairs
                ],
                "LinkCorrelationOver27": link_rho if link == "planted" else None,
                "LinkMeanHz": link_mean,
                "LinkSdHz": link_sd,
                "ResponseDefinition": "r = (MADRS_b0 - MADRS_d2) / MADRS_b0 (ketamine)",
                "NScans": n_scans,
                "RepetitionTime": TR,
                "VoxelSizeMm": voxel_size,
                "NonSteadyStateVolumes": n_dummy,
                "SignalPercent": signal_percent,
                "Sessions": wanted,
            },
        )
        if outdir.exists():
            outdir.rmdir()
        os.replace(work, outdir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("synthetic dataset with %d participants, %d runs in %s", len(chosen), len(runs), outdir)
    return outdir


def planted_connectivity(
    responses: pd.DataFrame, names: list[str], pairs: list[tuple[int, int]], link: str, seed: int,
    rho: float = LINK_RHO, mean: float = LINK_MEAN_HZ, sd: float = LINK_SD_HZ,
) -> tuple[np.ndarray, np.ndarray, np.random.SeedSequence]:
    """True connectivity of every participant, as :func:`make_synthetic_dataset` draws it.

    Parameters
    ----------
    responses
        :func:`ketamine_responses` (participant order of the draws).
    names
        ROI names of the network.
    pairs
        (target, source) indices of the planted connections.
    link
        ``"planted"`` or ``"none"``.
    seed
        The dataset's seed.
    rho, mean, sd
        Correlation with r, mean and sd (Hz) of each planted connection.

    Returns
    -------
    values : numpy.ndarray
        (participants, links) values of the planted connections.
    A : numpy.ndarray
        (participants, n, n) true connectivity (Hz).
    sim_seq : numpy.random.SeedSequence
        Seed sequence of the simulated signals.
    """
    link_seq, sim_seq, *subject_seqs = np.random.SeedSequence(seed).spawn(2 + len(responses))
    values = _planted_values(responses, len(pairs), link, rho, mean, sd, np.random.default_rng(link_seq))
    A = np.stack([
        _draw_connectivity(
            len(names), np.random.default_rng(subject_seqs[i]),
            {pair: values[i, k] for k, pair in enumerate(pairs)},
        )
        for i in range(len(responses))
    ])
    return values, A, sim_seq


def _planted_pairs(
    planted: Sequence[tuple[str, str]], names: list[str], network: Any
) -> list[tuple[int, int]]:
    """(target, source) indices of the planted connections."""
    pairs = []
    for source, target in planted:
        missing = [r for r in (source, target) if r not in names]
        if missing:
            raise InputError(
                f"planted connection {source}->{target}: ROI(s) {', '.join(missing)} are "
                f"not in network {network} ({', '.join(names)})"
            )
        if source == target:
            raise InputError(f"planted connection {source}->{target} is a self-connection")
        pairs.append((names.index(target), names.index(source)))
    return pairs


def _simulate_runs(A: list[np.ndarray], n_scans: int, seed: int) -> list[np.ndarray]:
    """Simulate every run in one call of the DCM simulator.

    Independent runs form one block-diagonal system (no coupling between blocks, and
    fluctuations, hemodynamics and observation noise are per region), so one call
    simulates them all at the cost of one.
    """
    import torch
    from scipy.linalg import block_diag

    n = A[0].shape[0]
    # thousands of tiny steps: extra torch threads only add synchronisation (on two
    # busy cores, 40 times slower); restore the caller's setting afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = simulate(block_diag(*A), TR, n_scans, seed)
    finally:
        torch.set_num_threads(threads)
    return [y[:, k * n : (k + 1) * n] for k in range(len(A))]


def _scale_signals(y: np.ndarray, percent: float, tr: float) -> tuple[np.ndarray, float]:
    """Scale a run's ROI signals (one factor for all ROIs) to a percent signal change.

    The factor makes the mean over ROIs of the standard deviation after the 128 s
    high-pass equal ``percent``; relative amplitudes between ROIs, which depend on A,
    are kept.
    """
    basis = np.column_stack([np.ones(len(y)), _cosine_basis(len(y), tr)])
    filtered = y - basis @ np.linalg.lstsq(basis, y, rcond=None)[0]
    factor = percent / filtered.std(axis=0).mean()
    return y * factor, float(factor)


def _write_run(
    root: Path, participant_id: str, run: _Run, scaled: tuple[np.ndarray, float],
    A: np.ndarray,
    names: list[str], seg: str, grid: _Grid, roi_index: np.ndarray,
    rng: np.random.Generator, n_dummy: int, voxel_size: float,
) -> None:
    """Raw sidecar and placeholder, fMRIPrep-shaped derivatives and truth of one run."""
    signals, factor = scaled
    entities = run.entities(participant_id)
    func = Path(participant_id) / run.session / "func"
    sidecar = real_rest_sidecar(participant_id, run.session, run.run)
    write_json(root / func / f"{entities}_bold.json", sidecar)
    _raw_placeholder(
        root / func / f"{entities}_bold.nii.gz", len(sidecar["SliceTiming"]),
        signals.shape[0], TR,
    )
    data, confounds, meta = _run_volumes(signals, grid, roi_index, rng, n_dummy, TR)
    fmriprep = root / "derivatives" / "fmriprep" / func
    prefix = f"{entities}_space-{SPACE}"
    zooms = (voxel_size,) * 3
    _write_nifti(
        fmriprep / f"{prefix}_desc-preproc_bold.nii.gz", _volume(grid, data),
        grid.affine, np.int16, zooms, tr=TR,
    )
    write_json(
        fmriprep / f"{prefix}_desc-preproc_bold.json",
        {
            "RepetitionTime": TR,
            "SkullStripped": False,
            "SliceTimingCorrected": True,
            "StartTime": float(np.median(sidecar["SliceTiming"])),
            "TaskName": sidecar.get("TaskName", "Resting state (eyes closed)"),
            "Sources": [f"bids:raw:{func.as_posix()}/{entities}_bold.nii.gz"],
        },
    )
    _write_nifti(
        fmriprep / f"{prefix}_desc-brain_mask.nii.gz", grid.brain.astype(np.uint8),
        grid.affine, np.uint8, zooms,
    )
    write_json(fmriprep / f"{prefix}_desc-brain_mask.json", {"Type": "Brain"})
    write_tsv(fmriprep / f"{entities}_desc-confounds_timeseries.tsv", confounds)
    write_json(fmriprep / f"{entities}_desc-confounds_timeseries.json", meta)
    truth = root / "derivatives" / "synthetic_truth" / func
    write_tsv(
        truth / f"{entities}_seg-{seg}_desc-true_timeseries.tsv",
        pd.DataFrame(signals, columns=names),
    )
    write_tsv(
        truth / f"{entities}_seg-{seg}_desc-true_connectivity.tsv",
        _connectivity_frame(A, names),
    )
    write_json(
        truth / f"{entities}_seg-{seg}_desc-true_connectivity.json",
        {"Units": "Hz", "Network": seg, "RepetitionTime": TR,
         "NonSteadyStateVolumes": n_dummy, "SignalScaleFactor": factor,
         "TimeseriesUnits": "percent of the baseline intensity"},
    )


def _write_top_level(root: Path, subjects: list[str]) -> None:
    data = _data_dir()
    description = json.loads((data / "dataset_description.json").read_text())
    description.pop("DatasetDOI", None)
    description["Name"] = (
        "Synthetic images with the metadata of ds005917 (NIMH Ketamine Mechanism of "
        "Action Study)"
    )
    description["GeneratedBy"] = [
        {
            "Name": "bids-ketdcm",
            "Version": __version__,
            "Description": "bids_ketdcm.testing.synth.make_synthetic_dataset: simulated images; "
            "participants, phenotype and sidecars are the real ds005917 metadata",
        }
    ]
    description["SourceDatasets"] = [{"DOI": SOURCE_DOI, "Version": "1.0.1"}]
    write_json(root / "dataset_description.json", description)
    readme = (
        "# Synthetic ds005917-shaped dataset\n\n"
        "The images of this dataset are SIMULATED by bids-ketdcm (spectral DCM "
        "generative model, coarse MNI grid); the raw BOLD files are constant placeholders "
        "and the fMRIPrep derivatives are not the output of fMRIPrep. The participants, "
        "phenotype (MADRS), sessions, runs and BOLD sidecars are the real metadata of "
        f"OpenNeuro ds005917 ({SOURCE_DOI}, CC0). The ground truth is in "
        "derivatives/synthetic_truth.\n\n"
        "# Original README of ds005917\n\n" + (data / "README").read_text()
    )
    write_text(root / "README", readme)
    write_text(root / "CHANGES", (data / "CHANGES").read_text())
    for name in ("participants.json", "task-rest_bold.json"):
        write_text(root / name, (data / name).read_text())
    write_text(
        root / "phenotype" / "phenotype.json",
        (data / "phenotype" / "phenotype.json").read_text(),
    )
    participants = pd.read_csv(data / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    write_tsv(root / "participants.tsv", participants[participants.participant_id.isin(subjects)])
    phenotype = pd.read_csv(
        data / "phenotype" / "phenotype.tsv", sep="\t", dtype=str, keep_default_na=False
    )
    write_tsv(
        root / "phenotype" / "phenotype.tsv",
        phenotype[phenotype.participant_id.isin(subjects)],
    )


def _write_derivative_descriptions(root: Path) -> None:
    fmriprep = root / "derivatives" / "fmriprep"
    truth = root / "derivatives" / "synthetic_truth"
    write_json(
        fmriprep / "dataset_description.json",
        {
            "Name": "fMRIPrep - fMRI PREProcessing workflow (synthetic stand-in)",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "fMRIPrep",
                    "Version": "synthetic",
                    "Description": "Not produced by fMRIPrep: files simulated by "
                    f"bids-ketdcm {__version__} with fMRIPrep's names and formats",
                }
            ],
            "SourceDatasets": [{"URL": "bids:raw:.", "DOI": SOURCE_DOI}],
        },
    )
    write_json(
        truth / "dataset_description.json",
        {
            "Name": "Ground truth of the synthetic ds005917-shaped dataset",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "bids-ketdcm", "Version": __version__}],
        },
    )
