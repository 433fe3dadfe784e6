"""Participant level: fMRIPrep BOLD -> ROI time series -> spectral DCM -> derivatives.

With ``features`` holding ``gmv`` the regional gray-matter volumes are written too
(:mod:`bids_ketdcm.participant.structural`); with ``apply_model`` every participant is predicted by
the saved models (:mod:`bids_ketdcm.participant.predict`) and the report gets a prediction section.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from bids_ketdcm import __version__
from bids_ketdcm.bids.derivatives import (
    RunEntities,
    connectivity_paths,
    is_finished,
    read_run_result,
    timeseries_paths,
    write_connectivity,
    write_dataset_description,
    write_timeseries,
)
from bids_ketdcm.config import LOG_VERBOSE, ParticipantOptions
from bids_ketdcm.dcm import fit
from bids_ketdcm.dcm.invert import CPU_CHUNK_BYTES
from bids_ketdcm.dcm.priors import ParamLayout
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import write_text
from bids_ketdcm.participant.denoise import load_strategy
from bids_ketdcm.participant.rois import load_network, network_label
from bids_ketdcm.participant.timeseries import (
    RoiTimeseries,
    RunSkipped,
    extract_timeseries,
)
from bids_ketdcm.report import (
    RunResult,
    citations_bibtex,
    update_participant_report,
    write_participant_report,
)
from bids_ketdcm.report.participant import write_run_figures

log = logging.getLogger(__name__)

#: Share of ``--mem-mb`` the DCM's batch state and its Gauss-Newton chunk may take (half each).
DCM_MEMORY_SHARE = 0.25
#: (R x R) float64 matrices the inversion keeps per subject of a batch (posterior and best covariance,
#: Hessian, Gram sums, ...), R the parameters of the prior subspace; counted high.
SUBJECT_MATRICES = 8


@dataclass
class _RunWork:
    bold: object  # layout.BoldRun
    entities: RunEntities
    series: RoiTimeseries | None = None
    skipped: str | None = None


def run_participant(opts: ParticipantOptions, runs: list) -> dict:
    """Process every BOLD run for every network; return a summary.

    Parameters
    ----------
    opts
        Settings.
    runs
        BOLD runs found by :func:`bids_ketdcm.bids.layout.find_bold_runs`.

    Returns
    -------
    dict
        Counts of inverted, skipped and already finished runs per network; with
        ``gmv``, under ``"gmv"`` the counts of :func:`bids_ketdcm.participant.structural.run_structural`;
        with ``apply_model``, under ``"predicted"`` the number of participants predicted.
    """
    torch.manual_seed(opts.seed)
    device = _device(opts.device)
    networks = {network_label(n): (n, load_network(n)) for n in opts.networks} if opts.wants_dcm else {}
    write_dataset_description(opts.output_dir)
    write_text(opts.output_dir / "logs" / "CITATION.bib", citations_bibtex())
    summary: dict[str, dict[str, int]] = {}
    reports: dict[str, list[RunResult]] = defaultdict(list)
    for label, (spec, network) in networks.items():
        works = [_RunWork(r, _entities(r, opts.space)) for r in runs]
        todo = [w for w in works if opts.overwrite or not is_finished(opts.output_dir, w.entities, label)]
        done_before = len(works) - len(todo)
        if done_before:
            log.info("%s: %d run(s) already finished, skipped (use --overwrite to redo)", label, done_before)
        started = time.perf_counter()
        for work in tqdm(todo, desc=f"{label}: extracting ROI time series", unit="run", disable=None):
            work.series, work.skipped = _extract(work, network, opts)
            if work.series is not None:
                write_timeseries(opts.output_dir, work.entities, label, network, work.series)
                write_run_figures(opts.output_dir, work.entities.subject, work.entities.label, label, work.series)
                log.info("sub-%s %s %s: ROI time series, %d of %d volumes kept (%.0f s elapsed)",
                         work.entities.subject, work.entities.label, label, work.series.data.shape[0],
                         work.series.qc.get("n_volumes", work.series.data.shape[0]), time.perf_counter() - started)
        ready = [w for w in todo if w.series is not None]
        iterations, n_converged = _invert_all(ready, label, network, opts, device, reports, started)
        for w in todo:
            if w.skipped:
                reports[w.entities.subject].append(_skipped_report(w, label, network))
        summary[label] = {"inverted": len(ready), "skipped": len(todo) - len(ready), "finished_before": done_before}
        log.info("%s: %d run(s) inverted (%d converged; iterations median %s, max %s), %d skipped, %d finished "
                 "before (%.0f s)", label, len(ready), n_converged, int(np.median(iterations)) if iterations else "-",
                 max(iterations, default="-"), len(todo) - len(ready), done_before, time.perf_counter() - started)
    if networks and not opts.wants_gmv and not any(c["inverted"] + c["finished_before"] for c in summary.values()):
        reasons = sorted({r.skipped_reason for rs in reports.values() for r in rs if r.skipped_reason})
        raise InputError("no run could be inverted:\n" + "\n".join(reasons))
    subjects = sorted(set(opts.participant_labels) | {r.subject for r in runs})
    if opts.wants_gmv:
        summary["gmv"] = _structural(opts, subjects)
        subjects = sorted(set(subjects) | set(summary["gmv"].pop("subjects")))
    sections: dict[str, list] = {}
    if opts.apply_model is not None:
        sections = _predict(opts, subjects)
        summary["predicted"] = {"participants": sum(1 for v in sections.values() if v)}
    _write_reports(opts, networks, reports, sections, str(device))
    for subject in sorted(set(sections) - set(reports)):  # no run processed now: add to the report
        update_participant_report(opts.output_dir / f"sub-{subject}.html", subject, sections[subject])
    return summary


def rewrite_reports(opts: ParticipantOptions, runs: list) -> list[str]:
    """``--reports-only``: write the participant reports again from the derivatives in the output folder.

    Parameters
    ----------
    opts
        Settings (``output_dir``, ``networks``, ``space``).
    runs
        BOLD runs found by :func:`bids_ketdcm.bids.layout.find_bold_runs`; those whose
        outputs are finished are reported.

    Returns
    -------
    list of str
        The participants whose report was written.

    Raises
    ------
    InputError
        When no run of these participants and networks is finished in the output folder.
    """
    networks = {network_label(n): (n, load_network(n)) for n in opts.networks}
    reports: dict[str, list[RunResult]] = defaultdict(list)
    for label in networks:
        for bold in runs:
            entities = _entities(bold, opts.space)
            if is_finished(opts.output_dir, entities, label):
                result = read_run_result(opts.output_dir, entities, label)
                result.qc = _report_qc(result.qc, result.roi_names)
                reports[entities.subject].append(result)
    if not reports:
        raise InputError(f"--reports-only: {opts.output_dir} holds no finished run of network(s) "
                         f"{', '.join(networks)} for these participants; run the participant level first")
    devices = sorted({r.device for rs in reports.values() for r in rs})
    _write_reports(opts, networks, reports, {}, ", ".join(devices))
    return sorted(reports)


def _write_reports(opts: ParticipantOptions, networks: dict, reports: dict[str, list[RunResult]],
                   sections: dict[str, list], device: str) -> None:
    for subject, run_reports in reports.items():
        settings = {"roi_summary": opts.roi_summary, "radius_mm": _radius(networks), "space": opts.space,
                    "denoise_strategy": load_strategy(opts.denoise).name, "device": device,
                    "csd_model": opts.csd_model}
        path = opts.output_dir / f"sub-{subject}.html"
        write_participant_report(path, subject, run_reports, settings, extra_sections=sections.get(subject))


def _structural(opts: ParticipantOptions, subjects: list[str]) -> dict:
    from bids_ketdcm.bids.layout import resolve_fmriprep_dir
    from bids_ketdcm.participant.structural import run_structural

    return run_structural(resolve_fmriprep_dir(opts.bids_dir, opts.fmriprep_dir), opts.output_dir,
                          opts.work_dir or opts.output_dir / "work", subjects or None, opts.session, opts.space,
                          [*opts.networks, *opts.gmv_atlases], overwrite=opts.overwrite)


def _predict(opts: ParticipantOptions, subjects: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """Predict every participant with the saved models; report sections by subject."""
    from bids_ketdcm.group.model_io import load_models
    from bids_ketdcm.participant.predict import report_section, run_predictions

    models = load_models(opts.apply_model)
    predictions = run_predictions(models, opts.output_dir, subjects, opts.session, space=opts.space, task=opts.task)
    return {s: [("prediction", "Prediction", report_section(p))] for s, p in predictions.items() if p}


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (torch sees none); use --device cpu")
    return torch.device(choice)


def _entities(bold, space: str) -> RunEntities:
    return RunEntities(subject=bold.subject, session=bold.session, task=bold.task, run=bold.run, space=space)


def _radius(networks: dict) -> float | None:
    radii = {float(r) for _, table in networks.values() for r in table.get("radius_mm", [])}
    return radii.pop() if len(radii) == 1 else None


def _extract(work: _RunWork, network: pd.DataFrame, opts: ParticipantOptions) -> tuple[RoiTimeseries | None, str | None]:
    bold = work.bold
    try:
        series = extract_timeseries(bold.bold, bold.mask, bold.confounds, network, bold.tr,
                                    denoise=opts.denoise, summary=opts.roi_summary)
    except RunSkipped as skip:
        log.warning("skipping %s of sub-%s: %s", work.entities.label, work.entities.subject, skip)
        return None, str(skip)
    try:
        from bids_ketdcm.dcm.csd import validate_timeseries

        validate_timeseries(series.data)
    except ValueError as err:
        raise InputError(f"{bold.bold}: ROI time series cannot be modelled: {err}") from None
    return series, None


def _invert_all(ready: list[_RunWork], label: str, network: pd.DataFrame, opts: ParticipantOptions,
                device: torch.device, reports: dict, started: float) -> tuple[list[int], int]:
    """Invert runs in batches of equal length and TR; write each run's outputs.

    One log line per run as its inversion ends (the bar advances per run inside a batch),
    with the elapsed time and iterations. Returns the iterations of every run and the
    number that converged.
    """
    groups: dict[tuple, list[_RunWork]] = defaultdict(list)
    for w in ready:
        groups[(w.series.data.shape[0], round(w.series.tr, 6))].append(w)
    bar = tqdm(total=len(ready), desc=f"{label}: spectral DCM", unit="run", disable=None)
    iterations, n_converged = [], 0
    batch_size, chunk_bytes = dcm_batching(opts, len(network))
    for (_, tr), members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]

            def done(b: int, n_iterations: int, converged: bool, chunk: list[_RunWork] = chunk) -> None:
                entities = chunk[b].entities
                log.log(logging.INFO if converged else logging.WARNING,
                        "sub-%s %s %s: DCM %s after %d iterations (%.0f s elapsed)", entities.subject,
                        entities.label, label, "converged" if converged else "did NOT converge", n_iterations,
                        time.perf_counter() - started)
                bar.update(1)

            post = fit(np.stack([w.series.data for w in chunk]), tr, device=device, jacobian=opts.jacobian,
                       csd_model=opts.csd_model, max_iterations=opts.max_iterations,
                       progress=log.isEnabledFor(LOG_VERBOSE), on_subject_done=done, chunk_bytes=chunk_bytes)
            for b, w in enumerate(chunk):
                sub = post.subject(b)
                sub.seconds = post.seconds / len(chunk)
                settings = {"DenoiseStrategy": w.series.denoise, "ROISummary": opts.roi_summary,
                            "Source": str(w.bold.bold), "Software": f"bids-ketdcm {__version__}"}
                write_connectivity(opts.output_dir, w.entities, label, w.series, sub, settings)
                reports[w.entities.subject].append(_run_report(w, label, sub))
                iterations.append(int(sub.iterations))
                n_converged += bool(sub.converged)
    bar.close()
    return iterations, n_converged


def dcm_batching(opts: ParticipantOptions, n_regions: int) -> tuple[int, int | None]:
    """Subjects per DCM call and the CPU chunk budget, under ``--mem-mb``.

    Parameters
    ----------
    opts
        Settings (``batch_size``, ``mem_mb``).
    n_regions
        Regions of the network.

    Returns
    -------
    batch_size : int
        ``opts.batch_size``, or fewer so that :data:`SUBJECT_MATRICES` R x R matrices per
        subject fit half of :data:`DCM_MEMORY_SHARE` of the budget.
    chunk_bytes : int or None
        None without a budget (the engine's default), else the other half, at most
        :data:`bids_ketdcm.dcm.invert.CPU_CHUNK_BYTES`.
    """
    if opts.mem_mb is None:
        return opts.batch_size, None
    half = opts.mem_mb * 2**20 * DCM_MEMORY_SHARE / 2
    size = ParamLayout(n_regions).size
    per_subject = SUBJECT_MATRICES * size * size * 8
    return max(1, min(opts.batch_size, int(half // per_subject))), int(min(CPU_CHUNK_BYTES, half))


def _run_report(w: _RunWork, label: str, post) -> RunResult:
    s = w.series
    history = [v for v in post.F_history[0] if np.isfinite(v)]
    return RunResult(
        run_label=w.entities.label, network=label, roi_names=list(s.names), roi_coords=np.asarray(s.coords),
        timeseries=s.data, tr=s.tr, freqs=post.freqs, csd_observed=post.observed_csd,
        csd_predicted=post.predicted_csd, A_hz=post.A_hz, A_var=post.A_var, F_history=history,
        free_energy=float(post.F), iterations=int(post.iterations), converged=bool(post.converged),
        variance_explained=float(post.variance_explained), seconds=float(post.seconds), device=post.device,
        qc=_report_qc(s.qc, s.names), denoise_strategy=str(s.denoise.get("Name", "")),
    )


def _report_qc(qc: dict, names: list[str]) -> dict:
    out = {k: v for k, v in qc.items() if k != "rois"}
    rois = qc.get("rois", {})
    if rois:
        out["roi_voxels"] = [rois[n].get("n_voxels") for n in names]
        out["roi_tsnr"] = [rois[n].get("tsnr") for n in names]
    return out


def _skipped_report(w: _RunWork, label: str, network: pd.DataFrame) -> RunResult:
    return RunResult(
        run_label=w.entities.label, network=label, roi_names=list(network["name"]), roi_coords=None, timeseries=None,
        tr=w.bold.tr, freqs=None, csd_observed=None, csd_predicted=None, A_hz=None, A_var=None,
        F_history=[], free_energy=float("nan"), iterations=0, converged=False, variance_explained=float("nan"),
        seconds=0.0, device="", qc={}, denoise_strategy="", skipped_reason=w.skipped,
    )


__all__ = ["ParticipantOptions", "run_participant", "connectivity_paths", "timeseries_paths"]
