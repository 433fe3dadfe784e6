"""Participant-level HTML report: one self-contained page per subject, as fMRIPrep's.

The page holds a summary table with QC warnings, one section per inverted run (ROI
positions on a glass brain, time series, observed vs predicted CSD, the A matrix,
convergence), the skipped runs with their reasons, an auto-generated methods paragraph
with references and BibTeX, and the settings used. Figures are embedded as base64 PNG;
there is no script and no external resource.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_ketdcm.bids.derivatives import RunResult
from bids_ketdcm.io import atomic_path, write_text
from bids_ketdcm.report import figures
from bids_ketdcm.report.methods import (
    citations_bibtex,
    cited_software_versions,
    formatted_references,
    methods_paragraph,
)
from bids_ketdcm.report.render import figure_png, png_file, render_page

log = logging.getLogger(__name__)

#: QC thresholds that raise a warning. Motion: the stringent criteria of Parkes et al.
#: (2018, NeuroImage 171:415-436): mean FD > 0.25 mm, any FD > 5 mm, more than 20 % of the
#: volumes censored. ``min_tsnr`` flags ROIs with signal dropout (e.g. subgenual cingulate);
#: ``min_variance_explained`` (a fraction) flags a poor DCM fit.
DEFAULT_QC_THRESHOLDS = {
    "mean_fd": 0.25,
    "max_fd": 5.0,
    "scrubbed_fraction": 0.20,
    "min_tsnr": 20.0,
    "min_variance_explained": 0.10,
}


#: Display names of the QC keys the pipeline writes; other keys are shown with underscores as spaces.
_QC_LABELS = {
    "mean_fd": "Mean framewise displacement (mm)",
    "max_fd": "Maximum framewise displacement (mm)",
    "n_scrubbed": "Censored volumes (high motion)",
    "n_volumes": "Volumes in the run",
    "n_kept": "Volumes kept",
    "n_non_steady_state": "Non-steady-state volumes removed",
    "roi_voxels": "Voxels",
    "roi_tsnr": "Temporal SNR",
}

#: Display names (with units) of the analysis settings in the About section.
_SETTING_LABELS = {
    "network": "Network",
    "n_rois": "Regions",
    "tr": "Repetition time (s)",
    "n_volumes": "Volumes",
    "device": "Device",
    "denoise_strategy": "Denoising strategy",
    "roi_summary": "ROI summary",
    "radius_mm": "Sphere radius (mm)",
    "space": "Template space",
    "csd_model": "Predicted-CSD model",
    "qc_thresholds": "QC thresholds",
}

#: The figures the participant level draws while it extracts a run, stored in ``sub-X/figures/``
#: (as fMRIPrep's reports keep theirs) and embedded by every later report of the run.
RUN_FIGURES = {
    "rois": ("ROIs on the participant's mean BOLD",
             "Regions of interest (centres, projected onto each view) on this run's own mean BOLD image in "
             "template space: check that they sit in brain tissue of this participant."),
    "motion": ("Head motion",
               "Framewise displacement (fMRIPrep, mm) of every volume; shaded: volumes removed by the denoising "
               "(non-steady-state or censored); dashed: the QC threshold of the mean FD."),
}


def run_figure_path(output_dir: str | Path, subject: str, run_label: str, network: str, kind: str) -> Path:
    """Where the participant level stores a figure of :data:`RUN_FIGURES` for one run and network."""
    label = subject.removeprefix("sub-")
    return Path(output_dir) / f"sub-{label}" / "figures" / f"sub-{label}_{run_label}_seg-{network}_desc-{kind}_bold.png"


def write_run_figures(output_dir: str | Path, subject: str, run_label: str, network: str, series: Any,
                      thresholds: Mapping[str, float] | None = None) -> list[Path]:
    """Draw the figures of :data:`RUN_FIGURES` for one run from its extraction, and store them.

    Parameters
    ----------
    output_dir
        The derivatives folder.
    subject, run_label, network
        The run (``run_label`` as :attr:`RunResult.run_label`).
    series
        The run's :class:`~bids_ketdcm.bids.derivatives.RoiTimeseries` (``mean_bold``,
        ``fd``, ``kept_volumes``, ``coords``, ``names``, ``tr``).
    thresholds
        Overrides of :data:`DEFAULT_QC_THRESHOLDS`.

    Returns
    -------
    list of Path
        The files written (a figure whose input is missing is left out).
    """
    t = {**DEFAULT_QC_THRESHOLDS, **dict(thresholds or {})}
    drawn = {}
    if series.mean_bold is not None:
        drawn["rois"] = figures.roi_overlay_figure(series.mean_bold, series.coords, list(series.names))
    if series.fd is not None:
        drawn["motion"] = figures.motion_figure(series.fd, series.kept_volumes, series.tr, t["mean_fd"])
    written = []
    for kind, fig in drawn.items():
        path = run_figure_path(output_dir, subject, run_label, network, kind)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
        fig.clear()
        written.append(path)
    return written




def write_participant_report(
    path: str | Path, subject: str, runs: list[RunResult], settings: Mapping[str, Any],
    extra_sections: list[tuple[str, str, str]] | None = None,
) -> Path:
    """Write the participant's self-contained HTML report atomically.

    Parameters
    ----------
    path
        Destination HTML file (e.g. ``OUTPUT_DIR/sub-X.html``); parent folders are created.
    subject
        Participant label, with or without the ``sub-`` prefix.
    runs
        One entry per run and network, skipped runs included (``skipped_reason`` set).
    settings
        Analysis settings, as for :func:`~bids_ketdcm.report.methods.methods_paragraph`
        (``network``, ``n_rois``, ``tr``, ``device``, ``denoise_strategy`` and
        ``n_volumes`` default to those of the first inverted run, or when every run was
        skipped to what the skipped runs hold); ``qc_thresholds``
        (dict) overrides entries of :data:`DEFAULT_QC_THRESHOLDS`. All settings are listed
        in the report.
    extra_sections
        ``(anchor, navigation title, HTML)`` of further sections (e.g. the per-patient
        prediction of :mod:`bids_ketdcm.participant.predict`), placed after the summary.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        When ``runs`` is empty or an inverted run's arrays have inconsistent shapes (the
        message names the run and the field).
    """
    if not runs:
        raise ValueError("write_participant_report: no runs to report")
    for run in runs:
        if run.skipped_reason is None:
            _check_run(run)
    label = subject.removeprefix("sub-")
    effective = {**_settings_from_runs(runs), **settings}
    methods = _methods_section(effective)  # before the figures: fails fast on bad settings
    thresholds = {**DEFAULT_QC_THRESHOLDS, **dict(settings.get("qc_thresholds") or {})}
    warnings_per_run = [run_warnings(run, thresholds) for run in runs]
    anchors = [
        f"run-{k + 1}-{_slug(run.run_label)}-{_slug(run.network)}" for k, run in enumerate(runs)
    ]
    inverted = [k for k, run in enumerate(runs) if run.skipped_reason is None]

    extra_sections = list(extra_sections or [])
    nav = [("summary", "Summary")] + [(anchor, title) for anchor, title, _ in extra_sections]
    nav += [(anchors[k], f"{runs[k].run_label} ({runs[k].network})") for k in inverted]
    nav += [("skipped", "Skipped runs"), ("methods", "Methods"), ("about", "About")]
    path = Path(path)
    figures_dir = path.parent / f"sub-{label}" / "figures"
    sections = [
        _summary_section(label, runs, anchors, warnings_per_run),
        *(section for _, _, section in extra_sections),
        *(_run_section(runs[k], anchors[k], warnings_per_run[k], figures_dir, label, thresholds) for k in inverted),
        _skipped_section(runs),
        methods,
        _about_section(effective),
    ]
    page = render_page("participant.html", title=f"sub-{label}", nav=nav, heading=f"Participant report: sub-{label}",
                       note=None, sections=sections)
    path = Path(path)
    write_text(path, page)
    log.debug("wrote participant report %s (%d runs, %d inverted)", path, len(runs), len(inverted))
    return path


def update_participant_report(path: str | Path, subject: str, sections: list[tuple[str, str, str]]) -> Path:
    """Put ``sections`` into the participant's report without redoing its runs.

    For a participant level that processed no run this time (every run finished before,
    or only ``--features gmv``) but has further sections, e.g. the per-patient prediction:
    an existing report gets each section in place of the one with the same anchor (or
    after the summary, with a navigation link); without a report a short page holding
    just these sections is written.

    Parameters
    ----------
    path
        The report (``OUTPUT_DIR/sub-X.html``).
    subject
        Participant label, with or without ``sub-``.
    sections
        ``(anchor, navigation title, HTML)``; each HTML is one ``<section id="anchor">``
        without nested sections.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    label = subject.removeprefix("sub-")
    page = path.read_text(encoding="utf-8") if path.is_file() else None
    if page is None or "</nav>" not in page or '<section id="summary">' not in page:
        page = render_page(
            "participant.html", title=f"sub-{label}", nav=[(anchor, title) for anchor, title, _ in sections],
            heading=f"Participant report: sub-{label}", sections=[html_ for _, _, html_ in sections],
            note="No run was processed in this invocation; see the derivatives for the connectivity estimates.")
    else:
        for anchor, title, section in sections:
            found = re.search(rf'<section id="{re.escape(anchor)}">.*?</section>', page, re.DOTALL)
            if found:
                page = page[:found.start()] + section + page[found.end():]
                continue
            end = page.index("</section>", page.index('<section id="summary">')) + len("</section>")
            page = page[:end] + "\n" + section + page[end:]
            link = f'<a href="#summary">{_e("Summary")}</a>'
            if link in page:
                page = page.replace(link, link + f'<a href="#{_e(anchor)}">{_e(title)}</a>', 1)
    write_text(path, page)
    log.info("participant report %s: %s", path, ", ".join(anchor for anchor, _, _ in sections))
    return path


def run_warnings(run: RunResult, thresholds: Mapping[str, float] | None = None) -> list[str]:
    """Human-readable QC and fit warnings for one run.

    Parameters
    ----------
    run
        The run; a skipped run only gets QC (not fit) warnings.
    thresholds
        Overrides of :data:`DEFAULT_QC_THRESHOLDS`.

    Returns
    -------
    list of str
        Empty when nothing is suspicious.
    """
    t = {**DEFAULT_QC_THRESHOLDS, **dict(thresholds or {})}
    qc = run.qc or {}
    out = []
    if run.skipped_reason is None:
        if not run.converged:
            out.append(
                f"DCM inversion did not converge within {run.iterations} iterations: "
                "interpret the connectivity estimates with caution."
            )
        if _finite(run.variance_explained) and run.variance_explained < t["min_variance_explained"]:
            out.append(
                f"The model explains only {100 * run.variance_explained:.1f} % of the CSD "
                f"variance (threshold {100 * t['min_variance_explained']:.0f} %)."
            )
    if _finite(qc.get("mean_fd")) and qc["mean_fd"] > t["mean_fd"]:
        out.append(f"High motion: mean FD {qc['mean_fd']:.3f} mm > {t['mean_fd']:g} mm.")
    if _finite(qc.get("max_fd")) and qc["max_fd"] > t["max_fd"]:
        out.append(f"High motion: maximum FD {qc['max_fd']:.2f} mm > {t['max_fd']:g} mm.")
    if _finite(qc.get("n_scrubbed")) and _finite(qc.get("n_volumes")) and qc["n_volumes"] > 0:
        fraction = qc["n_scrubbed"] / qc["n_volumes"]
        if fraction > t["scrubbed_fraction"]:
            out.append(
                f"{int(qc['n_scrubbed'])} of {int(qc['n_volumes'])} volumes censored "
                f"({100 * fraction:.0f} % > {100 * t['scrubbed_fraction']:.0f} %)."
            )
    names = list(run.roi_names or [])
    for name, voxels in _per_roi(qc.get("roi_voxels"), names):
        if _finite(voxels) and voxels <= 0:
            out.append(f"ROI {name} has no voxels inside the brain mask.")
    for name, tsnr in _per_roi(qc.get("roi_tsnr"), names):
        if _finite(tsnr) and tsnr < t["min_tsnr"]:
            out.append(f"ROI {name} has low temporal SNR ({tsnr:.1f} < {t['min_tsnr']:g}).")
    return out


# ---------------------------------------------------------------------------- sections


def _summary_section(
    label: str, runs: list[RunResult], anchors: list[str], warnings_per_run: list[list[str]]
) -> str:
    n_skipped = sum(run.skipped_reason is not None for run in runs)
    networks = sorted({run.network for run in runs})
    facts = _kv_table(
        [
            ("Subject", f"sub-{label}"),
            ("Runs", f"{len(runs)} ({len(runs) - n_skipped} inverted, {n_skipped} skipped)"),
            ("Networks", ", ".join(networks)),
        ]
    )
    header = [
        "Run", "Network", "Status", "Converged", "Free energy", "Iterations",
        "Variance explained", "Mean FD (mm)", "Max FD (mm)", "Censored volumes", "Warnings",
    ]
    rows = []
    for run, anchor, warns in zip(runs, anchors, warnings_per_run, strict=True):
        qc = run.qc or {}
        skipped = run.skipped_reason is not None
        link = _e(run.run_label) if skipped else f'<a href="#{anchor}">{_e(run.run_label)}</a>'
        converged = (
            "" if skipped else
            '<span class="ok">yes</span>' if run.converged else '<span class="bad">NO</span>'
        )
        censored = (
            f"{int(qc['n_scrubbed'])} / {int(qc['n_volumes'])}"
            if _finite(qc.get("n_scrubbed")) and _finite(qc.get("n_volumes")) else "n/a"
        )
        notes = ([f"skipped: {run.skipped_reason}"] if skipped else []) + warns
        warn_cell = (
            '<span class="ok">none</span>' if not notes else
            '<ul class="compact">'
            + "".join(f'<li class="bad">{_e(w)}</li>' for w in notes)
            + "</ul>"
        )
        rows.append(
            [
                link,
                _e(run.network),
                '<span class="bad">skipped</span>' if skipped else "inverted",
                converged,
                "" if skipped else _num(run.free_energy, ".2f"),
                "" if skipped else str(int(run.iterations)),
                "" if skipped else _percent(run.variance_explained),
                _num(qc.get("mean_fd"), ".3f"),
                _num(qc.get("max_fd"), ".2f"),
                censored,
                warn_cell,
            ]
        )
    return (
        '<section id="summary">\n<h2>Summary</h2>\n' + facts
        + _table(header, rows, raw=True) + "</section>"
    )


def _run_section(run: RunResult, anchor: str, warns: list[str], figures_dir: Path, label: str,
                 thresholds: Mapping[str, float]) -> str:
    names = list(run.roi_names)
    parts = [
        f'<section id="{anchor}" class="run">',
        f"<h2>{_e(run.run_label)} &middot; {_e(run.network)}</h2>",
    ]
    for warning in warns:
        parts.append(f'<div class="warning"><strong>Warning:</strong> {_e(warning)}</div>')
    if (run.timeseries is None or run.roi_coords is None or run.freqs is None or run.csd_observed is None
            or run.csd_predicted is None or run.A_hz is None or run.A_var is None):
        raise ValueError(f"{run.run_label} {run.network}: a run without results has no run section")
    n_volumes = run.timeseries.shape[0]
    parts.append(
        _kv_table(
            [
                ("Converged", "yes" if run.converged else "NO"),
                ("Free energy (nats)", _num(run.free_energy, ".2f")),
                ("Iterations", str(int(run.iterations))),
                ("Variance explained", _percent(run.variance_explained)),
                ("Inversion time", f"{run.seconds:.1f} s on {run.device}"),
                ("Repetition time", f"{run.tr:g} s"),
                ("Volumes", str(n_volumes)),
                ("Denoising strategy", run.denoise_strategy),
            ]
        )
    )
    parts.append(_qc_tables(run))
    for kind, (title, caption) in RUN_FIGURES.items():
        stored = run_figure_path(figures_dir.parent.parent, label, run.run_label, run.network, kind)
        if stored.is_file():
            parts.append(_stored_figure(stored, title, caption))
    glass = figures.glass_brain_figure(run.A_hz, run.roi_coords, names)
    parts.append(
        _figure(
            glass, "ROI positions and connections",
            "Regions of interest on a glass brain (MNI space). Arrows point from source to "
            "target, coloured by the posterior effective connectivity (Hz); self-connections "
            "are not drawn.",
        )
    )
    parts.append(
        _figure(
            figures.timeseries_figure(run.timeseries, run.tr, names), "ROI time series",
            "Denoised ROI time series used for the inversion, each z-scored for display.",
        )
    )
    parts.append(
        _figure(
            figures.csd_figure(run.freqs, run.csd_observed, run.csd_predicted, names, run.A_hz),
            "Observed and predicted cross-spectral density",
            "Observed (black) and model-predicted (red, dashed) cross-spectral density: real "
            "part of each region's auto-spectrum, then the magnitude of the cross-spectra of "
            "the most strongly coupled pairs.",
        )
    )
    parts.append(
        _figure(
            figures.connectivity_matrix_figure(run.A_hz, run.A_var, names),
            "Effective connectivity",
            "Posterior mean of A in Hz; rows are targets, columns are sources. Colour scale "
            "centred at 0 and set by the off-diagonal range; grey diagonal: self-inhibition. "
            "* marks off-diagonal connections with posterior probability of a non-zero value "
            f"above {figures.POSTERIOR_PROBABILITY_THRESHOLD:g}.",
        )
    )
    parts.append(
        _figure(
            figures.convergence_figure(run.F_history, run.converged, run.iterations),
            "Convergence",
            "Free energy after each accepted Gauss-Newton iteration of variational Laplace.",
        )
    )
    parts.append("</section>")
    return "\n".join(parts)


def _qc_tables(run: RunResult) -> str:
    names = list(run.roi_names)
    qc = run.qc or {}
    scalars, per_roi = [], {}
    for key, value in qc.items():
        column = _per_roi(value, names)
        label = _QC_LABELS.get(key, key.replace("_", " ").capitalize())
        if column:
            per_roi[label] = dict(column)
        else:
            scalars.append((label, _format_value(value)))
    out = ["<h3>Quality control</h3>"]
    if scalars:
        out.append(_kv_table(scalars))
    header = ["ROI", "x", "y", "z"] + list(per_roi)
    coords = np.asarray(run.roi_coords, dtype=float)
    rows = [
        [name, *(f"{c:g}" for c in coords[k])]
        + [_format_value(per_roi[key][name]) for key in per_roi]
        for k, name in enumerate(names)
    ]
    out.append(_table(header, rows))
    return "\n".join(out)


def _skipped_section(runs: list[RunResult]) -> str:
    skipped = [run for run in runs if run.skipped_reason is not None]
    out = ['<section id="skipped">', "<h2>Skipped runs</h2>"]
    if not skipped:
        out.append("<p>No run was skipped.</p>")
    else:
        rows = [[run.run_label, run.network, run.skipped_reason] for run in skipped]
        out.append(_table(["Run", "Network", "Reason"], rows))
    out.append("</section>")
    return "\n".join(out)


def _methods_section(settings: Mapping[str, Any]) -> str:
    references = "".join(f"<li>{_e(ref)}</li>" for ref in formatted_references())
    return (
        '<section id="methods">\n<h2>Methods</h2>\n'
        '<p class="note">Auto-generated from the settings of this analysis; you may paste it into '
        "a paper (please keep the citations).</p>\n"
        f'<p class="methods">{_e(methods_paragraph(settings))}</p>\n'
        f"<h3>References</h3>\n<ol>{references}</ol>\n"
        "<h3>BibTeX</h3>\n"
        f'<pre class="bibtex">{_e(citations_bibtex())}</pre>\n</section>'
    )


def _about_section(settings: Mapping[str, Any]) -> str:
    versions = {**cited_software_versions(), **dict(settings.get("versions") or {})}
    other = [(_SETTING_LABELS.get(k, k.replace("_", " ").capitalize()), _format_value(v))
             for k, v in sorted(settings.items()) if k != "versions"]
    return (
        '<section id="about">\n<h2>About</h2>\n<h3>Software</h3>\n'
        + _kv_table(sorted(versions.items()))
        + "\n<h3>Settings</h3>\n" + _kv_table(other) + "\n</section>"
    )


# ---------------------------------------------------------------------------- helpers


def _check_run(run: RunResult) -> None:
    """Raise ValueError naming the run and field when an inverted run is inconsistent."""
    n = len(run.roi_names)
    freqs = np.asarray(run.freqs)
    expected = {
        "roi_coords": (n, 3),
        "csd_observed": (freqs.shape[0], n, n) if freqs.ndim == 1 else None,
        "csd_predicted": (freqs.shape[0], n, n) if freqs.ndim == 1 else None,
        "A_hz": (n, n),
        "A_var": (n, n),
    }
    where = f"run {run.run_label!r} ({run.network})"
    if freqs.ndim != 1:
        raise ValueError(f"{where}: freqs must be 1-D, got shape {freqs.shape}")
    for field, shape in expected.items():
        value = getattr(run, field)
        actual = None if value is None else np.shape(value)
        if actual != shape:
            raise ValueError(f"{where}: {field} has shape {actual}, expected {shape}")
    ts_shape = None if run.timeseries is None else np.shape(run.timeseries)
    if ts_shape is None or len(ts_shape) != 2 or ts_shape[1] != n:
        raise ValueError(f"{where}: timeseries has shape {ts_shape}, expected (T, {n})")
    if not run.F_history:
        raise ValueError(f"{where}: F_history is empty")
    if not (run.tr and run.tr > 0):
        raise ValueError(f"{where}: tr must be positive, got {run.tr!r}")
    if _finite(run.variance_explained) and run.variance_explained > 1:
        raise ValueError(
            f"{where}: variance_explained must be a fraction (<= 1), got {run.variance_explained!r}"
        )


def _settings_from_runs(runs: list[RunResult]) -> dict[str, Any]:
    """Defaults for the methods paragraph: the first inverted run's, else what skipped runs hold."""
    for run in runs:
        if run.skipped_reason is None and run.timeseries is not None:
            return {
                "network": run.network,
                "n_rois": len(run.roi_names),
                "tr": float(run.tr),
                "n_volumes": int(np.shape(run.timeseries)[0]),
                "device": run.device,
                "denoise_strategy": run.denoise_strategy,
            }
    out: dict[str, Any] = {}
    for run in runs:
        candidates = {
            "network": run.network,
            "n_rois": len(run.roi_names) if run.roi_names else None,
            "tr": float(run.tr) if _finite(run.tr) and run.tr > 0 else None,
            "denoise_strategy": run.denoise_strategy,
        }
        for key, value in candidates.items():
            if value and key not in out:
                out[key] = value
    return out


def _per_roi(value: Any, names: list[str]) -> list[tuple[str, Any]]:
    """``[(name, value), ...]`` when ``value`` holds one entry per ROI, else ``[]``."""
    if isinstance(value, Mapping):
        if names and set(map(str, value)) == set(names):
            return [(name, value[name]) for name in names]
        return []
    if (
        isinstance(value, (list, tuple, np.ndarray))
        and names
        and np.ndim(value) == 1
        and len(value) == len(names)
    ):
        return list(zip(names, list(value), strict=True))
    return []


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _num(value: Any, spec: str) -> str:
    return format(float(value), spec) if _finite(value) else "n/a"


def _percent(fraction: Any) -> str:
    return f"{100 * float(fraction):.1f} %" if _finite(fraction) else "n/a"


def _format_value(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    if isinstance(value, (np.floating, float)):
        return f"{float(value):.4g}" if math.isfinite(value) else "n/a"
    if isinstance(value, np.ndarray):
        return ", ".join(_format_value(v) for v in value.tolist())
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    if value is None:
        return "n/a"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _figure(fig: Any, title: str, caption: str) -> str:
    data = figure_png(fig)
    return (
        f'<figure>\n<h3>{_e(title)}</h3>\n<img alt="{_e(title)}" '
        f'src="data:image/png;base64,{data}">\n<figcaption>{_e(caption)}</figcaption>\n</figure>'
    )


def _stored_figure(path: Path, title: str, caption: str) -> str:
    data = png_file(path)
    return (
        f'<figure>\n<h3>{_e(title)}</h3>\n<img alt="{_e(title)}" '
        f'src="data:image/png;base64,{data}">\n<figcaption>{_e(caption)}</figcaption>\n</figure>'
    )


def _kv_table(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f'<table class="kv">{rows}</table>'


def _table(header: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (then the caller has escaped them)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    cell = (lambda v: str(v)) if raw else _e
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def prediction_section(predictions: Sequence[Any], disclaimer: str) -> str:
    """HTML section of the participant report for ``--apply-model``, labelled as a research tool.

    Parameters
    ----------
    predictions
        One participant's predictions (at least one), one per saved model: records with the
        attributes of :class:`bids_ketdcm.participant.predict.PatientPrediction` (the report
        layer does not import the participant level).
    disclaimer
        The intended-use statement shown above the table.

    Returns
    -------
    str
        A ``<section id="prediction">`` for :func:`update_participant_report`.
    """
    return render_page("prediction_section.html", predictions=predictions, disclaimer=disclaimer,
                       level_percent=int(round(100 * predictions[0].level))).rstrip("\n")
