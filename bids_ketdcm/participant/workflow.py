"""Participant level: fMRIPrep BOLD -> ROI time series -> spectral DCM -> derivatives.

With ``features`` holding ``gmv`` the regional gray-matter volumes are written too
(:mod:`bids_ketdcm.participant.structural`); with ``apply_model`` every participant is predicted by
the saved models (:mod:`bids_ketdcm.participant.predict`) and the report gets a prediction section.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
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
    dataset_files,
    finished_results,
    settings_differences,
    write_connectivity,
    write_dataset_description,
    write_timeseries,
)
from bids_ketdcm.bids.layout import BoldRun, resolve_fmriprep_dir
from bids_ketdcm.bids.naming import RunEntities, connectivity_paths, roi_mask_path, timeseries_paths
from bids_ketdcm.config import ParticipantOptions
from bids_ketdcm.dcm import fit
from bids_ketdcm.dcm.csd import validate_timeseries
from bids_ketdcm.dcm.invert import CPU_CHUNK_BYTES
from bids_ketdcm.dcm.priors import ParamLayout
from bids_ketdcm.errors import LOG_VERBOSE, Failures, InputError
from bids_ketdcm.io import remove_stale_temporaries, write_text
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
from bids_ketdcm.report.participant import RUN_FIGURES, prediction_section, run_figure_path, write_run_figures

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


def run_participant(opts: ParticipantOptions, runs: list[BoldRun], failures: Failures) -> dict:
    """Process every BOLD run for every network; return a summary.

    Parameters
    ----------
    opts
        Settings.
    runs
        BOLD runs found by :func:`bids_ketdcm.bids.layout.find_bold_runs`.
    failures
        Participants that failed (while their runs were found, then here). A participant
        whose run fails here, for bad input or a failure of the program (extraction,
        writing, inversion, report), is added and left out of the steps that follow; the
        run's outputs are removed; the others go on. A failing batch of DCM inversions
        is inverted again run by run, so that only the failing run fails.

    Returns
    -------
    dict
        Counts of inverted, skipped and already finished runs per network; with
        ``gmv``, under ``"gmv"`` the counts of :func:`bids_ketdcm.participant.structural.run_structural`;
        with ``apply_model``, under ``"predicted"`` the number of participants predicted.
    """
    started_at = time.time()
    torch.manual_seed(opts.seed)
    device = _device(opts.device)
    networks = {network_label(n): (n, load_network(n)) for n in opts.networks} if opts.wants_dcm else {}
    check_settings(opts, runs)
    _remove_leftovers(opts, runs, list(networks), started_at)
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
            if work.bold.subject not in failures:
                _guarded(failures, work, label, opts.output_dir, _extract, work, network, opts)
        for w in [w for w in todo if w.series is not None and w.bold.subject not in failures]:
            _guarded(failures, w, label, opts.output_dir, _write_series, w, label, network, opts, settings, started)
        ready = [w for w in todo if w.series is not None and w.bold.subject not in failures]
        iterations, n_converged = _invert_all(ready, label, network, opts, device, settings, started, failures)
        ready = [w for w in ready if w.bold.subject not in failures]
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
    subjects = sorted((set(opts.participant_labels) | {r.subject for r in runs}) - failures.subjects)
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
    for subject in sorted({r.subject for r in runs} - failures.subjects):
        path = opts.output_dir / f"sub-{subject}.html"
        if subject in touched or subject in skipped or _stale(path, opts.output_dir, subject):
            results = [*finished_results(opts.output_dir, subject), *skipped.get(subject, [])]
            if results:
                reports.append((path, subject, results, sections.pop(subject, None)))
    _write_reports(reports, report_settings, opts.nprocs, failures)
    for subject in sorted(sections):  # no run processed now: add to the report
        update_participant_report(opts.output_dir / f"sub-{subject}.html", subject, sections[subject])
    return summary


def _write_reports(reports: list[tuple], settings: dict, nprocs: int, failures: Failures) -> None:
    """Write participant reports, several at once in worker processes when ``nprocs`` allows.

    Each report costs seconds of figure drawing (about 4 s for one 4-region run); the
    workers run one thread each, so workers x threads stays within ``nprocs``. A report
    that fails is recorded in ``failures`` (the others are written).
    """
    started = time.perf_counter()
    workers = max(1, min(nprocs, len(reports) // 4))  # starting a worker costs about one report
    written = Parallel(n_jobs=workers, return_as="generator")(
        delayed(_report_or_failure)(path, subject, results, settings, extra)
        for path, subject, results, extra in reports)
    for (path, subject, *_), failure in zip(reports, written, strict=True):  # logged here: workers have no handler
        if failure is None:
            log.info("wrote participant report %s (%.0f s elapsed)", path, time.perf_counter() - started)
            continue
        err, trace = failure
        log.log(LOG_VERBOSE, "%s", trace)
        failures.record(subject, err, "report")
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


def _extract(work: _RunWork, network: pd.DataFrame, opts: ParticipantOptions) -> None:
    """Extract the run's ROI time series into ``work.series`` (or its reason to skip into ``work.skipped``)."""
    bold = work.bold
    try:
        series = extract_timeseries(bold.bold, bold.mask, bold.confounds, network, bold.tr,
                                    denoise=opts.denoise, summary=opts.roi_summary, work_dir=opts.work_dir)
    except RunSkipped as skip:
        log.warning("skipping %s of sub-%s: %s", work.entities.label, work.entities.subject, skip)
        work.skipped = str(skip)
        return
    try:
        validate_timeseries(series.data)
    except ValueError as err:
        raise InputError(f"{bold.bold}: ROI time series cannot be modelled: {err}") from None
    work.series = series


def _write_series(w: _RunWork, label: str, network: pd.DataFrame, opts: ParticipantOptions, settings: dict,
                  started: float) -> None:
    assert w.series is not None
    write_timeseries(opts.output_dir, w.entities, label, network, w.series, w.bold.sources, settings)
    write_run_figures(opts.output_dir, w.entities.subject, w.entities.label, label, w.series)
    log.info("sub-%s %s %s: ROI time series, %d of %d volumes kept (%.0f s elapsed)", w.entities.subject,
             w.entities.label, label, w.series.data.shape[0],
             w.series.qc.get("n_volumes", w.series.data.shape[0]), time.perf_counter() - started)


def _guarded(failures: Failures, w: _RunWork, label: str, output_dir: Path,
             step: Callable[..., None], *args: Any) -> bool:
    """Run one step of one run; on any failure record it, remove the run's outputs, return False."""
    try:
        step(*args)
        return True
    except Exception as err:  # one participant's failure leaves the others going
        _fail(failures, w, label, output_dir, err)
        return False


def _fail(failures: Failures, w: _RunWork, label: str, output_dir: Path, err: Exception) -> None:
    failures.record(w.bold.subject, err, f"{w.entities.label} {label}")
    _discard(output_dir, w.entities, label)


def _run_outputs(output_dir: Path, run: RunEntities, label: str) -> list[Path]:
    """Every file the participant level writes for one run and network."""
    mask = roi_mask_path(output_dir, run, label)
    return [*connectivity_paths(output_dir, run, label).values(), *timeseries_paths(output_dir, run, label).values(),
            mask, mask.with_name(mask.name.replace(".nii.gz", ".json")),
            *(run_figure_path(output_dir, run.subject, run.label, label, kind) for kind in RUN_FIGURES)]


def _discard(output_dir: Path, run: RunEntities, label: str) -> None:
    """Remove whatever a failed run left of its outputs for this network (no stubs)."""
    for path in _run_outputs(output_dir, run, label):
        path.unlink(missing_ok=True)


def _remove_leftovers(opts: ParticipantOptions, runs: list[BoldRun], labels: list[str], started: float) -> None:
    """Remove the temporary files of this call's outputs that killed writers left behind.

    Only those older than this call whose writer is gone (:func:`bids_ketdcm.io.remove_stale_temporaries`):
    a concurrent job writing the same outputs keeps its own.
    """
    out = opts.output_dir
    paths = [p for r in runs for label in labels for p in _run_outputs(out, r.entities, label)]
    paths += [out / f"sub-{s}.html" for s in sorted({r.subject for r in runs})]
    paths += [*dataset_files(out), out / "logs" / "CITATION.bib"]
    removed = remove_stale_temporaries(paths, started)
    if removed:
        log.info("removed %d temporary file(s) left by interrupted runs (their writers are gone): %s", len(removed),
                 ", ".join(str(p.relative_to(out)) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))


def _report_or_failure(path: Path, subject: str, results: list[RunResult], settings: dict,
                       extra: list | None) -> tuple[Exception, str] | None:
    """Write one participant report (in a worker); its failure and traceback instead of raising."""
    try:
        write_participant_report(path, subject, results, settings, extra_sections=extra)
    except Exception as err:  # reported by the parent, the other reports go on
        return err, traceback.format_exc()
    return None


def _invert_all(ready: list[_RunWork], label: str, network: pd.DataFrame, opts: ParticipantOptions,
                device: torch.device, settings: dict, started: float,
                failures: Failures) -> tuple[list[int], int]:
    """Invert runs in batches of equal length and TR; write each run's outputs.

    One log line per run as its inversion ends (the bar advances per run inside a batch),
    with the elapsed time and iterations. A batch that fails is inverted again run by
    run: the failing run is recorded in ``failures`` (its outputs removed), the others
    are written. Returns the iterations of every run written and the number that converged.
    """
    groups: dict[tuple, list[_RunWork]] = defaultdict(list)
    for w in ready:
        assert w.series is not None
        groups[(w.series.data.shape[0], round(w.series.tr, 6))].append(w)
    bar = tqdm(total=len(ready), desc=f"{label}: spectral DCM", unit="run", disable=None)
    iterations, n_converged = [], 0
    batch_size, chunk_bytes = dcm_batching(opts, len(network))

    def invert(chunk: list[_RunWork], tr: float) -> None:
        nonlocal n_converged

        def done(b: int, n_iterations: int, converged: bool) -> None:
            entities = chunk[b].entities
            log.log(logging.INFO if converged else logging.WARNING,
                    "sub-%s %s %s: DCM %s after %d iterations (%.0f s elapsed)", entities.subject,
                    entities.label, label, "converged" if converged else "did NOT converge", n_iterations,
                    time.perf_counter() - started)
            bar.update(1)

        try:
            post = fit(np.stack([w.series.data for w in chunk if w.series is not None]), tr, device=device,
                       jacobian=opts.jacobian, csd_model=opts.csd_model, max_iterations=opts.max_iterations,
                       progress=log.isEnabledFor(LOG_VERBOSE), on_subject_done=done, chunk_bytes=chunk_bytes,
                       workers=opts.nprocs)
        except Exception as err:
            if len(chunk) == 1:
                _fail(failures, chunk[0], label, opts.output_dir, err)
                return
            log.warning("%s: the DCM inversion of a batch of %d runs failed (%s: %s); inverting them one by one "
                        "to find the failing run", label, len(chunk), type(err).__name__, err)
            log.log(LOG_VERBOSE, "traceback of the batch's failure", exc_info=True)
            for w in chunk:
                invert([w], tr)
            return
        for b, w in enumerate(chunk):
            sub = post.subject(b)
            sub.seconds = post.seconds / len(chunk)
            if _guarded(failures, w, label, opts.output_dir, _write_result, w, label, sub, opts, settings):
                iterations.append(int(sub.iterations))
                n_converged += bool(sub.converged)

    for (_, tr), members in groups.items():
        for start in range(0, len(members), batch_size):
            invert(members[start : start + batch_size], tr)
    bar.close()
    return iterations, n_converged


def _write_result(w: _RunWork, label: str, post: Any, opts: ParticipantOptions, settings: dict) -> None:
    assert w.series is not None
    write_connectivity(opts.output_dir, w.entities, label, w.series, post, w.bold.sources, settings)


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
        None without a budget (the engine's default), else the other half shared by the
        ``opts.nprocs`` units that run at once, at most
        :data:`bids_ketdcm.dcm.invert.CPU_CHUNK_BYTES` each.
    """
    if opts.mem_mb is None:
        return opts.batch_size, None
    half = opts.mem_mb * 2**20 * DCM_MEMORY_SHARE / 2
    size = ParamLayout(n_regions).size
    per_subject = SUBJECT_MATRICES * size * size * 8
    return (max(1, min(opts.batch_size, int(half // per_subject))),
            int(min(CPU_CHUNK_BYTES, half / opts.nprocs)))


def _skipped_report(w: _RunWork, label: str, network: pd.DataFrame) -> RunResult:
    return RunResult(
        run_label=w.entities.label, network=label, roi_names=list(network["name"]), roi_coords=None, timeseries=None,
        tr=w.bold.tr, freqs=None, csd_observed=None, csd_predicted=None, A_hz=None, A_var=None,
        F_history=[], free_energy=float("nan"), iterations=0, converged=False, variance_explained=float("nan"),
        seconds=0.0, device="", qc={}, denoise_strategy="", skipped_reason=w.skipped,
    )


__all__ = ["ParticipantOptions", "check_settings", "result_settings", "run_participant"]
