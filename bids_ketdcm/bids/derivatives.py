"""BIDS-Derivatives writers: dataset description, time series, DCM connectivity.

File names come from :mod:`bids_ketdcm.bids.naming` (BEP012 time series, BEP017 ``relmat``
with ``meas-dcm``). Every file is written atomically; a run is finished when its
connectivity TSV, JSON and posterior NPZ exist, and it is the same result only when the
``Settings`` recorded in its sidecar are those requested (:func:`settings_differences`).
Inputs are named by BIDS URIs (``bids:fmriprep:sub-...``), never by host paths.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from bids_ketdcm import __version__
from bids_ketdcm.bids.naming import (
    CONNECTIVITY_MEASURE,
    CONNECTIVITY_SUFFIX,
    RunEntities,
    connectivity_paths,
    is_connectivity,
    parse_name,
    roi_mask_path,
    timeseries_paths,
)
from bids_ketdcm.dcm import SPM_RELEASE, Posterior
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import atomic_path, write_json, write_text, write_tsv
from bids_ketdcm.provenance import command_line, container, software_versions

log = logging.getLogger(__name__)

BIDS_VERSION = "1.10.0"

#: Files BIDS has no place for: time series (BEP012), relational matrices (BEP017) and
#: morphometry tables, proposed but not in the specification the validator knows; the full
#: DCM posterior (NumPy archive), predictions, the HTML reports and their figures, the logs and the work folder.
#: The ROI masks (``desc-NET_mask.nii.gz``) are BIDS files: the validator sees every subject.
#: Folder names without a trailing slash: the validator (bids-validator-deno 3) matches them only so.
BIDSIGNORE = "\n".join([
    "*_timeseries.tsv", "*_timeseries.json", "*_relmat.tsv", "*_relmat.json", "*_morph.tsv", "*_morph.json",
    "*_predictions.tsv", "*_predictions.json", "*_posterior.npz", "*.html", "logs", "work", "figures", "",
])

@dataclass
class RoiTimeseries:
    """Denoised ROI time series of one run.

    Attributes
    ----------
    data
        (T, n) array: one column per ROI, one row per kept volume.
    names
        ROI names, in column order.
    coords
        (n, 3) ROI centres (MNI mm; label centroids for a labelled image).
    tr
        Repetition time (s).
    kept_volumes
        Indices (0-based) of the BOLD volumes kept, in order.
    qc
        Run-level quality figures (``n_volumes``, ``n_non_steady_state``,
        ``n_scrubbed``, ``n_kept``, ``mean_fd``, ``max_fd``) and ``rois``: per ROI
        ``n_voxels``, ``n_voxels_zero_variance``, ``tsnr`` and, for eigenvariates,
        ``variance_explained``.
    denoise
        Description of the denoising: strategy name, nilearn call, confound columns
        used, summary method.
    fd
        Framewise displacement (mm) of every BOLD volume (NaN where fMRIPrep has none),
        for the report's motion figure; None without the column.
    mean_bold
        The run's mean BOLD image, for the report's figure of the ROIs on it.
    voxels
        The voxels the series were made of (every ROI together), a 3D image on the BOLD grid.
    """

    data: np.ndarray
    names: list[str]
    coords: np.ndarray
    tr: float
    kept_volumes: np.ndarray
    qc: dict[str, Any] = field(default_factory=dict)
    denoise: dict[str, Any] = field(default_factory=dict)
    fd: np.ndarray | None = None
    mean_bold: nib.Nifti1Image | None = None
    voxels: nib.Nifti1Image | None = None

    def to_frame(self) -> pd.DataFrame:
        """Return the series as a DataFrame (columns = ROI names)."""
        return pd.DataFrame(self.data, columns=self.names)


CONNECTIVITY_DESCRIPTION = {
    "Measure": "Effective connectivity (spectral DCM posterior mean of A)",
    "MeasureDescription": (
        "Posterior expectation of the neuronal coupling matrix A of a spectral "
        "(cross-spectral density) dynamic causal model, in Hz. Rows are targets, "
        "columns are sources; the diagonal is the self-inhibition -exp(A_ii)/2."
    ),
    "Units": "Hz",
    "Method": "spectral DCM (Friston et al. 2014), SPM12 spm_dcm_fmri_csd equivalent",
}


@dataclass
class RunResult:
    """One network on one BOLD run, as written to the derivatives: what the reports show.

    Attributes
    ----------
    run_label
        Entities identifying the run, e.g. ``"ses-b0_task-rest_run-01"``.
    network
        Name of the ROI set, e.g. ``"dmn4"``.
    roi_names
        Region names, in the order of every array's region axis.
    roi_coords
        (n, 3) MNI coordinates in mm.
    timeseries
        (T, n) extracted ROI series after denoising.
    tr
        Repetition time in seconds.
    freqs
        (F,) frequencies in Hz.
    csd_observed, csd_predicted
        (F, n, n) complex cross-spectral densities.
    A_hz
        (n, n) posterior effective connectivity in Hz, rows = targets, columns = sources.
    A_var
        (n, n) posterior variances of the A parameters.
    F_history
        Free energy per accepted iteration.
    free_energy
        Final free energy.
    iterations
        Number of Gauss-Newton iterations run.
    converged
        Whether the inversion met its convergence criterion.
    variance_explained
        Fraction (at most 1) of the CSD variance explained by the model.
    seconds
        Wall time of the inversion.
    device
        Where it ran, e.g. ``"cpu"`` or ``"cuda:0"``.
    qc
        QC measures. Scalars are listed; sequences with one value per ROI (or dicts keyed by
        ROI name) become columns of the per-ROI table. Keys used for warnings: ``mean_fd``,
        ``max_fd`` (mm), ``n_scrubbed``, ``n_volumes``, ``roi_voxels``, ``roi_tsnr``.
    denoise_strategy
        Name of the confound strategy.
    skipped_reason
        Why the run was not inverted; then the arrays may be None.
    """

    run_label: str
    network: str
    roi_names: list[str]
    roi_coords: np.ndarray | None
    timeseries: np.ndarray | None
    tr: float
    freqs: np.ndarray | None
    csd_observed: np.ndarray | None
    csd_predicted: np.ndarray | None
    A_hz: np.ndarray | None
    A_var: np.ndarray | None
    F_history: list[float]
    free_energy: float
    iterations: int
    converged: bool
    variance_explained: float
    seconds: float
    device: str
    qc: dict
    denoise_strategy: str
    skipped_reason: str | None = None

def _dataset_link(dataset: Path, output_dir: Path) -> str:
    """Where an input dataset is, without a host path: its DOI, else a path relative to OUTPUT_DIR."""
    try:
        doi = json.loads((dataset / "dataset_description.json").read_text(encoding="utf-8")).get("DatasetDOI")
    except (OSError, ValueError, AttributeError):
        doi = None
    if isinstance(doi, str) and doi:
        return doi if doi.startswith(("doi:", "http")) else f"doi:{doi}"
    return Path(os.path.relpath(dataset.resolve(), output_dir.resolve())).as_posix()


def _portable_command(argv: list[str] | None, output_dir: Path) -> str:
    """The command line without host paths: the program as ``bids-ketdcm``, paths relative to OUTPUT_DIR."""
    words = list(sys.argv[1:] if argv is None else argv)
    out = ["bids-ketdcm"]
    for word in words:
        option, sep, value = word.partition("=") if word.startswith("--") else ("", "", word)
        if os.path.isabs(value):
            value = Path(os.path.relpath(value, output_dir.resolve())).as_posix()
        out.append(option + sep + value)
    return command_line(out)


def write_dataset_description(output_dir: Path, inputs: Mapping[str, Path], argv: list[str] | None = None) -> None:
    """Write ``dataset_description.json`` (with ``GeneratedBy``), ``.bidsignore`` and the top-level sidecar.

    ``GeneratedBy`` holds the version, the exact command line (``argv``, default the
    words this process was started with), the library versions and, inside the
    published image, the container. ``inputs`` maps dataset names (``raw``, ``fmriprep``)
    to their folders: they become ``DatasetLinks`` (a DOI or a path relative to OUTPUT_DIR,
    never a host path) and ``SourceDatasets`` as BIDS URIs (``bids:fmriprep:``), the
    names the ``Sources`` of every sidecar use.
    """
    output_dir = Path(output_dir)
    versions = ", ".join(f"{name} {number}" for name, number in software_versions().items())
    generated_by: dict[str, Any] = {
        "Name": "bids-ketdcm",
        "Version": __version__,
        "CodeURL": "https://github.com/bids-ketdcm/bids-ketdcm",
        "CommandLine": _portable_command(argv, output_dir),
        "Description": f"spectral DCM emulating {SPM_RELEASE} spm_dcm_fmri_csd; {versions}",
    }
    if (image := container()) is not None:
        generated_by["Container"] = image
    description, bidsignore, connectivity = dataset_files(output_dir)
    write_json(description, {
        "Name": "bids-ketdcm spectral DCM derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": f"bids:{name}:"} for name in inputs],
        "DatasetLinks": {name: _dataset_link(Path(path), output_dir) for name, path in inputs.items()},
    })
    write_text(bidsignore, BIDSIGNORE)
    write_json(connectivity, CONNECTIVITY_DESCRIPTION)


def dataset_files(output_dir: Path) -> list[Path]:
    """The dataset-level files of :func:`write_dataset_description`: its description,
    ``.bidsignore`` and the top-level sidecar of the connectivity files."""
    output_dir = Path(output_dir)
    return [output_dir / "dataset_description.json", output_dir / ".bidsignore",
            output_dir / f"meas-{CONNECTIVITY_MEASURE}_{CONNECTIVITY_SUFFIX}.json"]


# --------------------------------------------------------------------------- settings identity


def settings_differences(output_dir: Path, run: RunEntities, network_label: str,
                         settings: Mapping[str, Any]) -> dict[str, tuple[Any, Any]] | None:
    """Compare a finished run's recorded settings with the requested ones.

    Parameters
    ----------
    output_dir, run, network_label
        Which result.
    settings
        The settings that make a result's identity (``Settings`` of its sidecar).

    Returns
    -------
    dict or None
        None when the run is not finished (some output missing or unreadable: it is
        redone); else ``{setting: (recorded, requested)}`` for every setting that
        differs (empty when the result was made with these settings).
    """
    paths = connectivity_paths(output_dir, run, network_label)
    if not all(p.exists() for p in paths.values()):
        return None
    try:
        recorded = json.loads(paths["json"].read_text(encoding="utf-8")).get("Settings", {})
    except (OSError, ValueError, AttributeError):
        return None
    requested = json.loads(json.dumps(dict(settings)))  # as JSON would give it back
    return {key: (recorded.get(key), requested.get(key)) for key in sorted(set(recorded) | set(requested))
            if recorded.get(key) != requested.get(key)}


# --------------------------------------------------------------------------- writers


def write_timeseries(output_dir: Path, run: RunEntities, network_label: str, network: pd.DataFrame,
                     series: RoiTimeseries, sources: list[str], settings: Mapping[str, Any]) -> None:
    """Write the denoised ROI time series (TSV: one column per ROI), its sidecar and the ROI voxels (mask)."""
    paths = timeseries_paths(output_dir, run, network_label)
    if series.voxels is not None:
        mask = roi_mask_path(output_dir, run, network_label)
        series.voxels.header.set_xyzt_units("mm")
        with atomic_path(mask) as tmp:
            tmp.write_bytes(gzip.compress(series.voxels.to_bytes(), mtime=0))
        write_json(mask.with_name(mask.name.replace(".nii.gz", ".json")), {
            "Description": f"voxels whose signal made the regional time series of network {network_label}",
            "Type": "ROI",
            "SpatialReference": sources[0] if sources else run.get("space"),
            "Sources": sources,
        })
    write_tsv(paths["tsv"], series.to_frame())
    write_json(paths["json"], {
        "RepetitionTime": series.tr,
        "SamplingFrequency": 1.0 / series.tr,
        "ROIs": list(series.names),
        "Coordinates": np.asarray(series.coords).round(2).tolist(),
        "CoordinateSpace": "MNI152 (mm)",
        "RadiusMM": network["radius_mm"].tolist() if "radius_mm" in network else None,
        "Network": network_label,
        "DenoiseStrategy": series.denoise,
        "KeptVolumes": np.asarray(series.kept_volumes).tolist(),
        "QC": series.qc,
        "Sources": sources,
        "Settings": dict(settings),
    })


def connectivity_frame(A_hz: np.ndarray, names: list[str]) -> pd.DataFrame:
    """A matrix as a readable table: column ``target`` then one column per source."""
    table = pd.DataFrame(np.asarray(A_hz), columns=list(names))
    table.insert(0, "target", list(names))
    return table


def read_connectivity_table(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read one A matrix (DataFrame indexed by target, columns = sources) and its sidecar.

    Raises
    ------
    InputError
        The table is not square with matching target and source names, or a value is
        not a number.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: cannot be read as a TSV table ({exc})") from None
    if table.columns[0] != "target":
        raise InputError(f"{path}: the first column must be 'target' (found {table.columns[0]!r})")
    table = table.set_index("target")
    table.index = table.index.astype(str)
    if list(table.index) != list(table.columns):
        raise InputError(
            f"{path}: target rows {list(table.index)} do not match source columns {list(table.columns)}"
        )
    try:
        table = table.astype(float)
    except ValueError:
        raise InputError(f"{path}: holds values that are not numbers") from None
    sidecar = path.with_name(path.name[: -len(".tsv")] + ".json")
    meta: dict = {}
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{sidecar}: invalid JSON ({exc})") from None
    else:
        meta = {"_missing_sidecar": str(sidecar)}
    return table, meta


def read_connectivity(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a connectivity TSV back: (A in Hz, region names), checked by :func:`read_connectivity_table`."""
    table, _ = read_connectivity_table(path)
    return table.to_numpy(float), list(table.index)


def write_connectivity(output_dir: Path, run: RunEntities, network_label: str, series: RoiTimeseries,
                       post: Posterior, sources: list[str], settings: Mapping[str, Any]) -> dict[str, Path]:
    """Write one run's posterior: A in Hz (TSV), diagnostics (JSON), everything (NPZ).

    The NPZ and JSON are written first and the TSV last, so an interrupted run never
    looks done. ``sources`` are BIDS URIs of the inputs; ``settings`` the settings that
    make the result's identity (compared on re-runs by :func:`settings_differences`).
    """
    paths = connectivity_paths(output_dir, run, network_label)
    names = list(series.names)
    with atomic_path(paths["npz"]) as tmp:
        with open(tmp, "wb") as handle:
            arrays: dict[str, np.ndarray] = {
                "A": post.A, "A_hz": post.A_hz, "cov": post.cov, "h": post.h,
                "observed_csd": post.observed_csd, "predicted_csd": post.predicted_csd,
                "freqs": post.freqs, "F_history": np.asarray(post.F_history[0], float),
                **{f"param_{k}": v for k, v in post.params.items()},
            }
            # numpy's stubs read a **dict of arrays as its allow_pickle keyword
            np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
    sidecar = {
        "Network": network_label,
        "ROIs": names,
        "RepetitionTime": series.tr,
        "Units": "Hz",
        "Rows": "targets",
        "Columns": "sources",
        "SPMRelease": SPM_RELEASE,
        "Converged": bool(post.converged),
        "Iterations": int(post.iterations),
        "FreeEnergy": float(post.F),
        "FreeEnergyHistory": [None if np.isnan(v) else float(v) for v in post.F_history[0]],
        "VarianceExplained": float(post.variance_explained),
        "PosteriorVarianceA": post.A_var.tolist(),
        "PosteriorMeans": {k: np.asarray(v).tolist() for k, v in post.params.items()},
        "LogPrecisionCSD": post.h.tolist(),
        "DataScale": None if post.scale is None else float(post.scale),
        "Frequencies": post.freqs.tolist(),
        "Seconds": float(post.seconds),
        "Device": post.device,
        "PathKept": {"exact": "exact Jacobian", "spm": "SPM12 path (finite differences)"}[str(post.extra["path"])],
        "Threads": {**post.extra["threads"], "DCMWorkers": int(post.extra["workers"])},
        "FreeEnergyPaths": {name: float(post.extra[key]) for name, key in
                            (("exact Jacobian", "F_exact"), ("SPM12 path", "F_spm")) if key in post.extra},
        "SoftwareVersions": {"bids-ketdcm": __version__, "torch": torch.__version__,
                             "numpy": np.__version__},
        "Sources": sources,
        "Settings": dict(settings),
    }
    write_json(paths["json"], sidecar)
    write_tsv(paths["tsv"], connectivity_frame(post.A_hz, names))
    return paths


# --------------------------------------------------------------------------- reading back


def _report_qc(qc: dict, names: list[str]) -> dict:
    out = {k: v for k, v in qc.items() if k != "rois"}
    rois = qc.get("rois", {})
    if rois:
        out["roi_voxels"] = [rois[n].get("n_voxels") for n in names]
        out["roi_tsnr"] = [rois[n].get("tsnr") for n in names]
    return out


def finished_results(output_dir: Path, subject: str) -> list[RunResult]:
    """Every finished result of a participant on disk, as the report shows them.

    A result is finished when its connectivity TSV, JSON, posterior and time series
    exist; unreadable leftovers of an interrupted run are passed over (they are redone).

    Parameters
    ----------
    output_dir
        OUTPUT_DIR.
    subject
        Participant label without ``sub-``.

    Returns
    -------
    list of RunResult
        Sorted by run and network.
    """
    out = []
    for tsv in sorted(Path(output_dir).glob(f"sub-{subject}/**/func/*_{CONNECTIVITY_SUFFIX}.tsv")):
        if not is_connectivity(tsv):
            continue
        entities = parse_name(tsv)
        run = RunEntities.from_mapping(entities)
        paths = connectivity_paths(output_dir, run, entities["seg"])
        series_paths = timeseries_paths(output_dir, run, entities["seg"])
        try:
            meta = json.loads(paths["json"].read_text(encoding="utf-8"))
            series_meta = json.loads(series_paths["json"].read_text(encoding="utf-8"))
            series = pd.read_csv(series_paths["tsv"], sep="\t")
            A_hz, names = read_connectivity(tsv)
            with np.load(paths["npz"]) as npz:
                observed, predicted = npz["observed_csd"], npz["predicted_csd"]
        except (OSError, ValueError, KeyError):
            log.warning("%s: incomplete result (redone on the next call)", tsv)
            continue
        out.append(RunResult(
            run_label=run.label, network=entities["seg"], roi_names=names,
            roi_coords=np.asarray(series_meta["Coordinates"], float), timeseries=series[names].to_numpy(float),
            tr=float(meta["RepetitionTime"]), freqs=np.asarray(meta["Frequencies"], float),
            csd_observed=observed, csd_predicted=predicted, A_hz=A_hz,
            A_var=np.asarray(meta["PosteriorVarianceA"], float),
            F_history=[v for v in meta["FreeEnergyHistory"] if v is not None],
            free_energy=float(meta["FreeEnergy"]), iterations=int(meta["Iterations"]),
            converged=bool(meta["Converged"]), variance_explained=float(meta["VarianceExplained"]),
            seconds=float(meta["Seconds"]), device=str(meta["Device"]),
            qc=_report_qc(series_meta.get("QC", {}), names),
            denoise_strategy=str(series_meta.get("DenoiseStrategy", {}).get("Name", "")),
        ))
    return out


def read_posterior(connectivity_tsv: Path) -> dict[str, Any]:
    """The full DCM posterior behind one connectivity TSV (what PEB needs).

    Parameters
    ----------
    connectivity_tsv
        A ``..._meas-dcm_relmat.tsv`` written by :func:`write_connectivity`.

    Returns
    -------
    dict
        ``params`` (posterior means by SPM's names), ``cov`` (P, P) posterior covariance in
        SPM's order, ``F`` free energy, ``timeseries`` (T, n) the series inverted (the prior
        of models with more than 8 regions depends on it), ``names`` the regions.

    Raises
    ------
    ValueError
        The posterior NPZ, sidecar or time series is missing or unreadable (the message
        names the file).
    """
    entities = parse_name(connectivity_tsv)
    run = RunEntities.from_mapping(entities)
    output_dir = Path(connectivity_tsv).parents[3 if run.session else 2]
    paths = connectivity_paths(output_dir, run, entities["seg"])
    series_path = timeseries_paths(output_dir, run, entities["seg"])["tsv"]
    current = paths["npz"]
    try:
        with np.load(paths["npz"]) as npz:
            params = {k[len("param_"):]: np.asarray(npz[k], float) for k in npz.files if k.startswith("param_")}
            cov = np.asarray(npz["cov"], float)
        current = paths["json"]
        meta = json.loads(paths["json"].read_text(encoding="utf-8"))
        current = series_path
        names = list(meta["ROIs"])
        series = pd.read_csv(series_path, sep="\t")[names].to_numpy(float)
        return {"params": params, "cov": cov, "F": float(meta["FreeEnergy"]), "timeseries": series,
                "names": names}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{current}: cannot read the DCM posterior ({exc})") from None


def read_gmv(path: str | os.PathLike) -> pd.DataFrame:
    """Read one GMV table (indexed by region name).

    Raises
    ------
    InputError
        Missing columns or values that are not finite numbers.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{path}: cannot be read as a TSV table ({err})") from None
    missing = [c for c in ("name", "gmv_mm3", "gmv_tiv") if c not in table]
    if missing:
        raise InputError(f"{path}: lacks the column(s) {', '.join(missing)}")
    values = pd.to_numeric(table["gmv_tiv"], errors="coerce")
    if not np.isfinite(values).all():
        raise InputError(f"{path}: column gmv_tiv holds values that are not finite numbers")
    return table.set_index(table["name"].astype(str))
