"""Participant level: fMRIPrep BOLD -> ROI time series -> spectral DCM -> derivatives.

With ``features`` holding ``gmv`` the regional gray-matter volumes are written too
(:mod:`bids_ketdcm.participant.structural`); with ``apply_model`` every participant is predicted by
the saved models (:mod:`bids_ketdcm.participant.predict`) and the report gets a prediction section.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed
from tqdm import tqdm

from bids_ketdcm.bids.derivatives import (
    RoiTimeseries,
    finished_results,
    settings_differences,
    write_connectivity,
    write_dataset_description,
    write_timeseries,
)
from bids_ketdcm.bids.layout import BoldRun, resolve_fmriprep_dir
from bids_ketdcm.bids.naming import RunEntities, connectivity_paths
from bids_ketdcm.config import LOG_VERBOSE, ParticipantOptions
from bids_ketdcm.dcm import fit
from bids_ketdcm.dcm.csd import validate_timeseries
from bids_ketdcm.dcm.invert import CPU_CHUNK_BYTES
from bids_ketdcm.dcm.priors import ParamLayout
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import write_text
from bids_ketdcm.model_store import load_models
from bids_ketdcm.participant.denoise import load_strategy
from bids_ketdcm.participant.predict import DISCLAIMER, run_predictions
from bids_ketdcm.participant.rois import load_network, network_label
from bids_ketdcm.participant.structural import run_structural
from bids_ketdcm.participant.timeseries import RunSkipped, extract_timeseries
from bids_ketdcm.report import (
    RunResult,
    citations_bibtex,
    update_participant_report,
    write_participant_report,
)
from bids_ketdcm.report.participant import prediction_section, write_run_figures

log = logging.getLogger(__name__)

#: Share of ``--mem-mb`` the DCM's batch state and its Gauss-Newton chunk may take (half each).
DCM_MEMORY_SHARE = 0.25
#: (R x R) float64 matrices the inversion keeps per subject of a batch (posterior and best covariance,
#: Hessian, Gram sums, ...), R the parameters of the prior subspace; counted high.
SUBJECT_MATRICES = 8


@dataclass
class _RunWork:
    bold: BoldRun
    entities: RunEntities
    series: RoiTimeseries | None = None
    skipped: str | None = None


def result_settings(opts: ParticipantOptions, network: pd.DataFrame) -> dict:
    """The settings that make a result's identity, recorded in its sidecars.

    A finished result is reused only when these are unchanged: the denoising strategy
    (its full record), the ROI summary, the ROIs themselves (a digest of the table), the
    predicted-CSD model, the Jacobian and the iteration limit.
    """
    table = network[[c for c in ("name", "x", "y", "z", "radius_mm", "index") if c in network]]
    return {
        "DenoiseStrategy": load_strategy(opts.denoise).record(),
        "ROISummary": opts.roi_summary,
        "ROIDigest": hashlib.sha1(table.to_csv(index=False).encode()).hexdigest()[:16],
        "CSDModel": opts.csd_model,
        "Jacobian": opts.jacobian,
        "MaxIterations": opts.max_iterations,
    }


def check_settings(opts: ParticipantOptions, runs: list[BoldRun]) -> None:
    """Refuse, before any work, to reuse or mix results made under other settings.

    Raises
    ------
    InputError
        A finished result of a selected run was made with other settings (unless
        ``--overwrite``): the message names the file and every differing setting.
    """
    if opts.overwrite or not opts.wants_dcm:
        return
    clashes = []
    for spec in opts.networks:
        label, network = network_label(spec), load_network(spec)
        settings = result_settings(opts, network)
        for bold in runs:
            diff = settings_differences(opts.output_dir, bold.entities, label, settings)
            if diff:
                path = connectivity_paths(opts.output_dir, bold.entities, label)["json"]
                changes = "; ".join(f"{k}: {old!r} on disk, {new!r} now" for k, (old, new) in diff.items())
                clashes.append(f"{path}: made with other settings ({changes})")
    if clashes:
        raise InputError(
            f"{len(clashes)} finished result(s) in OUTPUT_DIR {opts.output_dir} were made with other settings:\n"
            + "\n".join(clashes[:10]) + ("\n..." if len(clashes) > 10 else "")
            + "\nuse --overwrite to redo them with the new settings, or choose another OUTPUT_DIR"
        )


def run_participant(opts: ParticipantOptions, runs: list[BoldRun],
                    failures: dict[str, str] | None = None) -> dict:
    """Process every BOLD run for every network; return a summary.

    Parameters
    ----------
    opts
        Settings.
    runs
        BOLD runs found by :func:`bids_ketdcm.bids.layout.find_bold_runs`.
    failures
        ``{subject: message}`` of participants that failed; a participant whose run
        turns out to be bad input here is added and its other runs are left out (the
        others go on). None: the first bad run stops everything.

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
    check_settings(opts, runs)
    summary: dict[str, dict[str, Any]] = {}
    skipped: dict[str, list[RunResult]] = defaultdict(list)
    touched: set[str] = set()
    for label, (_, network) in networks.items():
        settings = result_settings(opts, network)
        works = [_RunWork(r, r.entities) for r in runs]
        todo = [w for w in works if opts.overwrite
                or settings_differences(opts.output_dir, w.entities, label, settings) is None]
        done_before = len(works) - len(todo)
        if done_before:
            log.info("%s: %d run(s) already finished with these settings, skipped", label, done_before)
        started = time.perf_counter()
        for work in tqdm(todo, desc=f"{label}: extracting ROI time series", unit="run", disable=None):
            if failures is not None and work.bold.subject in failures:
                continue
            try:
                work.series, work.skipped = _extract(work, network, opts)
            except InputError as err:
                if failures is None:
                    raise
                failures[work.bold.subject] = str(err)
                log.error("sub-%s left out: %s", work.bold.subject, err)
        ready = [w for w in todo if w.series is not None
                 and (failures is None or w.bold.subject not in failures)]
        for w in ready:
            assert w.series is not None
            write_timeseries(opts.output_dir, w.entities, label, network, w.series, w.bold.sources, settings)
            write_run_figures(opts.output_dir, w.entities.subject, w.entities.label, label, w.series)
            log.info("sub-%s %s %s: ROI time series, %d of %d volumes kept (%.0f s elapsed)", w.entities.subject,
                     w.entities.label, label, w.series.data.shape[0],
                     w.series.qc.get("n_volumes", w.series.data.shape[0]), time.perf_counter() - started)
        iterations, n_converged = _invert_all(ready, label, network, opts, device, settings, started)
        touched |= {w.bold.subject for w in ready}
        for w in todo:
            if w.skipped:
                skipped[w.bold.subject].append(_skipped_report(w, label, network))
        summary[label] = {"inverted": len(ready), "skipped": sum(1 for w in todo if w.skipped),
                          "finished_before": done_before}
        log.info("%s: %d run(s) inverted (%d converged; iterations median %s, max %s), %d skipped, %d finished "
                 "before (%.0f s)", label, len(ready), n_converged, int(np.median(iterations)) if iterations else "-",
                 max(iterations, default="-"), summary[label]["skipped"], done_before, time.perf_counter() - started)
    if networks and not opts.wants_gmv and not failures and not any(
            c["inverted"] + c["finished_before"] for c in summary.values()):
        reasons = sorted({r.skipped_reason for rs in skipped.values() for r in rs if r.skipped_reason})
        raise InputError("no run could be inverted:\n" + "\n".join(reasons))
    subjects = sorted((set(opts.participant_labels) | {r.subject for r in runs}) - set(failures or ()))
    if opts.wants_gmv:
        summary["gmv"] = _structural(opts, subjects)
        subjects = sorted(set(subjects) | set(summary["gmv"].pop("subjects")))
    sections: dict[str, list] = {}
    if opts.apply_model is not None:
        sections = _predict(opts, subjects)
        summary["predicted"] = {"participants": sum(1 for v in sections.values() if v)}
    finished_before = any(c["finished_before"] for c in summary.values() if "finished_before" in c)
    if touched or finished_before or skipped or opts.wants_gmv or sections:
        write_dataset_description(opts.output_dir, _inputs(opts, runs))
        write_text(opts.output_dir / "logs" / "CITATION.bib", citations_bibtex())
    report_settings = _report_settings(opts, networks, str(device))
    reports = []
    for subject in sorted({r.subject for r in runs} - set(failures or ())):
        path = opts.output_dir / f"sub-{subject}.html"
        if subject in touched or subject in skipped or _stale(path, opts.output_dir, subject):
            results = [*finished_results(opts.output_dir, subject), *skipped.get(subject, [])]
            if results:
                reports.append((path, subject, results, sections.pop(subject, None)))
    _write_reports(reports, report_settings, opts.nprocs)
    for subject in sorted(sections):  # no run processed now: add to the report
        update_participant_report(opts.output_dir / f"sub-{subject}.html", subject, sections[subject])
    return summary


def _write_reports(reports: list[tuple], settings: dict, nprocs: int) -> None:
    """Write participant reports, several at once in worker processes when ``nprocs`` allows.

    Each report costs seconds of figure drawing (about 4 s for one 4-region run); the
    workers run one thread each, so workers x threads stays within ``nprocs``.
    """
    started = time.perf_counter()
    workers = max(1, min(nprocs, len(reports) // 4))  # starting a worker costs about one report
    written = Parallel(n_jobs=workers, return_as="generator")(
        delayed(write_participant_report)(path, subject, results, settings, extra_sections=extra)
        for path, subject, results, extra in reports)
    for path in written:  # logged here: worker processes have no log handler
        log.info("wrote participant report %s (%.0f s elapsed)", path, time.perf_counter() - started)
    if reports:
        log.info("%d report(s) written by %d process(es) (%.0f s)", len(reports), workers,
                 time.perf_counter() - started)


def rewrite_reports(opts: ParticipantOptions, runs: list[BoldRun]) -> list[str]:
    """``--reports-only``: write the participants' reports again from the results on disk.

    Parameters
    ----------
    opts
        Settings (``output_dir`` and those the report lists).
    runs
        BOLD runs found by :func:`bids_ketdcm.bids.layout.find_bold_runs`: their participants
        are reported.

    Returns
    -------
    list of str
        The participants whose report was written.

    Raises
    ------
    InputError
        When the output folder holds no finished result of these participants.
    """
    networks = {network_label(n): (n, load_network(n)) for n in opts.networks}
    written = []
    for subject in sorted({r.subject for r in runs}):
        results = finished_results(opts.output_dir, subject)
        if results:
            devices = ", ".join(sorted({r.device for r in results}))
            write_participant_report(opts.output_dir / f"sub-{subject}.html", subject, results,
                                     _report_settings(opts, networks, devices))
            written.append(subject)
    if not written:
        raise InputError(f"--reports-only: OUTPUT_DIR {opts.output_dir} holds no finished result of these "
                         "participants; run the participant level first")
    return written


def _report_settings(opts: ParticipantOptions, networks: dict, device: str) -> dict:
    return {"roi_summary": opts.roi_summary, "radius_mm": _radius(networks), "space": opts.space,
            "denoise_strategy": load_strategy(opts.denoise).name, "device": device, "csd_model": opts.csd_model}


def _inputs(opts: ParticipantOptions, runs: list[BoldRun]) -> dict[str, Path]:
    """The input datasets by the names the sidecars' BIDS URIs use."""
    fmriprep = runs[0].root if runs and runs[0].root else resolve_fmriprep_dir(opts.bids_dir, opts.fmriprep_dir)
    inputs = {"fmriprep": Path(fmriprep)}
    if Path(opts.bids_dir).resolve() != Path(fmriprep).resolve():
        inputs = {"raw": Path(opts.bids_dir), **inputs}
    return inputs


def _stale(report: Path, output_dir: Path, subject: str) -> bool:
    """Whether the report is missing or older than a result of the participant on disk."""
    if not report.exists():
        return True
    made = report.stat().st_mtime
    return any(p.stat().st_mtime > made for p in output_dir.glob(f"sub-{subject}/**/func/*.tsv"))


def _structural(opts: ParticipantOptions, subjects: list[str]) -> dict:
    return run_structural(resolve_fmriprep_dir(opts.bids_dir, opts.fmriprep_dir), opts.output_dir,
                          subjects or None, opts.one_session, opts.space,
                          [*opts.networks, *opts.gmv_atlases], overwrite=opts.overwrite)


def _predict(opts: ParticipantOptions, subjects: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """Predict every participant with the saved models; report sections by subject."""
    if opts.apply_model is None:
        return {}
    models = load_models(opts.apply_model)
    predictions = run_predictions(models, opts.output_dir, subjects, opts.one_session, space=opts.space, task=opts.task)
    return {s: [("prediction", "Prediction", prediction_section(p, DISCLAIMER))] for s, p in predictions.items() if p}


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (torch sees none); use --device cpu")
    return torch.device(choice)


def _radius(networks: dict) -> float | None:
    radii = {float(r) for _, table in networks.values() for r in table.get("radius_mm", [])}
    return radii.pop() if len(radii) == 1 else None


def _extract(work: _RunWork, network: pd.DataFrame,
             opts: ParticipantOptions) -> tuple[RoiTimeseries | None, str | None]:
    bold = work.bold
    try:
        series = extract_timeseries(bold.bold, bold.mask, bold.confounds, network, bold.tr,
                                    denoise=opts.denoise, summary=opts.roi_summary)
    except RunSkipped as skip:
        log.warning("skipping %s of sub-%s: %s", work.entities.label, work.entities.subject, skip)
        return None, str(skip)
    try:
        validate_timeseries(series.data)
    except ValueError as err:
        raise InputError(f"{bold.bold}: ROI time series cannot be modelled: {err}") from None
    return series, None


def _invert_all(ready: list[_RunWork], label: str, network: pd.DataFrame, opts: ParticipantOptions,
                device: torch.device, settings: dict, started: float) -> tuple[list[int], int]:
    """Invert runs in batches of equal length and TR; write each run's outputs.

    One log line per run as its inversion ends (the bar advances per run inside a batch),
    with the elapsed time and iterations. Returns the iterations of every run and the
    number that converged.
    """
    groups: dict[tuple, list[_RunWork]] = defaultdict(list)
    for w in ready:
        assert w.series is not None
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

            post = fit(np.stack([w.series.data for w in chunk if w.series is not None]), tr, device=device,
                       jacobian=opts.jacobian, csd_model=opts.csd_model, max_iterations=opts.max_iterations,
                       progress=log.isEnabledFor(LOG_VERBOSE), on_subject_done=done, chunk_bytes=chunk_bytes)
            for b, w in enumerate(chunk):
                sub = post.subject(b)
                sub.seconds = post.seconds / len(chunk)
                assert w.series is not None
                write_connectivity(opts.output_dir, w.entities, label, w.series, sub, w.bold.sources, settings)
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


def _skipped_report(w: _RunWork, label: str, network: pd.DataFrame) -> RunResult:
    return RunResult(
        run_label=w.entities.label, network=label, roi_names=list(network["name"]), roi_coords=None, timeseries=None,
        tr=w.bold.tr, freqs=None, csd_observed=None, csd_predicted=None, A_hz=None, A_var=None,
        F_history=[], free_energy=float("nan"), iterations=0, converged=False, variance_explained=float("nan"),
        seconds=0.0, device="", qc={}, denoise_strategy="", skipped_reason=w.skipped,
    )


__all__ = ["ParticipantOptions", "check_settings", "result_settings", "run_participant"]
