"""BIDS-Derivatives writers: dataset description, time series, DCM connectivity.

File names follow DESIGN.md section 3 and the Giga Connectome / XCP-D conventions
(``seg-`` for the network, ``desc-dcm`` for the measure). Every file is written
atomically; a run is finished when its connectivity TSV, JSON and posterior NPZ exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bids_ketdcm import __version__
from bids_ketdcm.dcm import SPM_RELEASE, Posterior
from bids_ketdcm.io import atomic_path, write_json, write_text, write_tsv
from bids_ketdcm.participant.timeseries import RoiTimeseries
from bids_ketdcm.provenance import command_line, container, software_versions

BIDS_VERSION = "1.9.0"

#: Outputs the BIDS validator does not know yet (timeseries and connectivity with ``seg-``,
#: morphometry, predictions: BEP012/BEP017-style names, as XCP-D and Giga Connectome write)
#: and folders that are not data. Folder names without a trailing slash: the validator
#: (bids-validator-deno 3) matches them only so.
BIDSIGNORE = "\n".join([
    "*_timeseries.tsv", "*_timeseries.json", "*_connectivity.tsv", "*_connectivity.json", "*_morph.tsv",
    "*_morph.json", "*_predictions.tsv", "*_predictions.json", "*_posterior.npz", "*.html",
    "logs", "figures", "group", "work", "",
])

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


@dataclass(frozen=True)
class RunEntities:
    """BIDS entities identifying one BOLD run."""

    subject: str
    session: str | None
    task: str
    run: str | None
    space: str

    def prefix(self, network_label: str) -> str:
        """File-name stem up to and including ``seg-<network>``."""
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        parts.append(f"task-{self.task}")
        if self.run:
            parts.append(f"run-{self.run}")
        parts += [f"space-{self.space}", f"seg-{network_label}"]
        return "_".join(parts)

    def folder(self, output_dir: Path) -> Path:
        """``OUTPUT_DIR/sub-X[/ses-Y]/func``."""
        out = Path(output_dir) / f"sub-{self.subject}"
        if self.session:
            out = out / f"ses-{self.session}"
        return out / "func"

    @property
    def label(self) -> str:
        """Readable run label, e.g. ``ses-b0_task-rest_run-01``."""
        parts = ([f"ses-{self.session}"] if self.session else []) + [f"task-{self.task}"]
        return "_".join(parts + ([f"run-{self.run}"] if self.run else []))



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
    roi_coords: np.ndarray
    timeseries: np.ndarray
    tr: float
    freqs: np.ndarray
    csd_observed: np.ndarray
    csd_predicted: np.ndarray
    A_hz: np.ndarray
    A_var: np.ndarray
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

def connectivity_paths(output_dir: Path, run: RunEntities, network_label: str) -> dict[str, Path]:
    """Paths of a run's DCM outputs: ``tsv``, ``json`` and ``npz`` (full posterior)."""
    stem = run.folder(output_dir) / f"{run.prefix(network_label)}_desc-dcm"
    return {
        "tsv": stem.with_name(stem.name + "_connectivity.tsv"),
        "json": stem.with_name(stem.name + "_connectivity.json"),
        "npz": stem.with_name(stem.name + "_posterior.npz"),
    }


def timeseries_paths(output_dir: Path, run: RunEntities, network_label: str) -> dict[str, Path]:
    """Paths of a run's ROI time series TSV and JSON."""
    stem = run.folder(output_dir) / f"{run.prefix(network_label)}_timeseries"
    return {"tsv": stem.with_suffix(".tsv"), "json": stem.with_suffix(".json")}


def is_finished(output_dir: Path, run: RunEntities, network_label: str) -> bool:
    """Whether every DCM output of this run and network exists (re-runs skip it)."""
    return all(p.exists() for p in connectivity_paths(output_dir, run, network_label).values())


def write_dataset_description(output_dir: Path, argv: list[str] | None = None) -> None:
    """Write ``dataset_description.json`` (with ``GeneratedBy``) and ``.bidsignore``.

    ``GeneratedBy`` holds the version, the exact command line (``argv``, default the
    words this process was started with), the library versions and, inside the
    published image, the container.
    """
    output_dir = Path(output_dir)
    versions = ", ".join(f"{name} {number}" for name, number in software_versions().items())
    generated_by = {
        "Name": "bids-ketdcm",
        "Version": __version__,
        "CodeURL": "https://github.com/bids-ketdcm/bids-ketdcm",
        "CommandLine": command_line(argv),
        "Description": f"spectral DCM emulating {SPM_RELEASE} spm_dcm_fmri_csd; {versions}",
    }
    if (image := container()) is not None:
        generated_by["Container"] = image
    write_json(output_dir / "dataset_description.json", {
        "Name": "bids-ketdcm spectral DCM derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [],
    })
    write_text(output_dir / ".bidsignore", BIDSIGNORE)
    write_json(output_dir / "desc-dcm_connectivity.json", CONNECTIVITY_DESCRIPTION)


def write_timeseries(output_dir: Path, run: RunEntities, network_label: str, network: pd.DataFrame,
                     series: RoiTimeseries) -> None:
    """Write the denoised ROI time series (TSV: one column per ROI) and its sidecar."""
    paths = timeseries_paths(output_dir, run, network_label)
    write_tsv(paths["tsv"], series.to_frame())
    write_json(paths["json"], {
        "RepetitionTime": series.tr,
        "ROIs": list(series.names),
        "Coordinates": np.asarray(series.coords).round(2).tolist(),
        "CoordinateSpace": "MNI152 (mm)",
        "RadiusMM": network["radius_mm"].tolist() if "radius_mm" in network else None,
        "Network": network_label,
        "DenoiseStrategy": series.denoise,
        "KeptVolumes": np.asarray(series.kept_volumes).tolist(),
        "QC": series.qc,
    })


def connectivity_frame(A_hz: np.ndarray, names: list[str]) -> pd.DataFrame:
    """A matrix as a readable table: column ``target`` then one column per source."""
    table = pd.DataFrame(np.asarray(A_hz), columns=list(names))
    table.insert(0, "target", list(names))
    return table


def read_connectivity(path: Path) -> tuple[np.ndarray, list[str]]:
    """Read a connectivity TSV back: (A in Hz, region names)."""
    table = pd.read_csv(path, sep="\t")
    names = table["target"].tolist()
    return table[names].to_numpy(float), names


def write_connectivity(output_dir: Path, run: RunEntities, network_label: str,
                       series: RoiTimeseries, post: Posterior, settings: dict) -> dict[str, Path]:
    """Write one run's posterior: A in Hz (TSV), diagnostics (JSON), everything (NPZ).

    The NPZ is written first and the TSV last, so an interrupted run never looks done.
    """
    paths = connectivity_paths(output_dir, run, network_label)
    names = list(series.names)
    with atomic_path(paths["npz"]) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle, A=post.A, A_hz=post.A_hz, cov=post.cov, h=post.h,
                observed_csd=post.observed_csd, predicted_csd=post.predicted_csd,
                freqs=post.freqs, F_history=np.asarray(post.F_history[0], float),
                **{f"param_{k}": v for k, v in post.params.items()},
            )
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
        "Jacobian": post.extra.get("jacobian", "autograd"),
        "PathKept": {"exact": "exact Jacobian", "spm": "SPM12 path (finite differences)"}[str(post.extra["path"])],
        "FreeEnergyPaths": {name: float(post.extra[key]) for name, key in
                            (("exact Jacobian", "F_exact"), ("SPM12 path", "F_spm")) if key in post.extra},
        "CSDModel": post.extra.get("csd_model", "spm12"),
        "SoftwareVersions": {"bids-ketdcm": __version__, "torch": torch.__version__,
                             "numpy": np.__version__},
        **settings,
    }
    write_json(paths["json"], sidecar)
    write_tsv(paths["tsv"], connectivity_frame(post.A_hz, names))
    return paths
