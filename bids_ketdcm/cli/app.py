"""Command line: the BIDS-App (``BIDS_DIR OUTPUT_DIR participant|group``) and tools.

Only argument parsing, logging and exit codes live here; the work is done by library
functions. Exit codes: 0 success, 1 failure of the program, 2 bad input or usage.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from bids_ketdcm import __version__
from bids_ketdcm.bids.layout import check_writable_dir, find_bold_runs, load_bids_filters, validate_bids
from bids_ketdcm.cli.group_options import group_kwargs, group_options
from bids_ketdcm.cli.options import (
    DCM,
    FEATURES,
    FILTERING,
    GROUP,
    OTHER,
    PERFORMANCE,
    ROIS,
    WORKFLOW,
    SectionedCommand,
    option,
)
from bids_ketdcm.config import FEATURE_SETS, ParticipantOptions, uses_dcm, uses_gmv
from bids_ketdcm.errors import LOG_VERBOSE, Failures, InputError, ParticipantsFailed
from bids_ketdcm.model_store import load_models
from bids_ketdcm.participant.denoise import load_strategy, preset_names
from bids_ketdcm.participant.rois import load_network, network_label
from bids_ketdcm.participant.structural import load_regions, region_label
from bids_ketdcm.threads import limit_threads, resolve

log = logging.getLogger("bids_ketdcm")

EXIT_OK, EXIT_FAILURE, EXIT_INPUT = 0, 1, 2
#: ``--mem-mb`` below this leaves no room for the Python process itself.
MIN_MEM_MB = 512
#: Resident memory of one group-level worker process (measured: benchmarks/group_speed.py workers, sklearn
#: and pandas loaded, about 300 MB; rounded up). ``--mem-mb`` allows one process per this many MB.
WORKER_MB = 400
#: Libraries whose messages only ``-vv`` shows.
_QUIET_LIBRARIES = ("nilearn", "bids", "bidsschematools")
#: Libraries kept at WARNING even with ``-vv`` (their debug messages are about fonts and files).
_SILENT_LIBRARIES = ("matplotlib", "PIL", "numba", "h5py", "fsspec")
#: Options that take several space-separated values, as in fMRIPrep (see :func:`_expand_multi`).
MULTI_VALUED = ("--participant-label", "--session-label")


def setup_logging(verbose: int) -> None:
    """Log to stderr: INFO by default, -v adds the per-iteration lines and tracebacks, -vv debug.

    Parameters
    ----------
    verbose
        How many times ``-v`` was given.
    """
    level = (logging.INFO, LOG_VERBOSE, logging.DEBUG)[min(verbose, 2)]
    logging.addLevelName(LOG_VERBOSE, "VERBOSE")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    for name in _SILENT_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def _strip_sub(label: str) -> str:
    return label[4:] if label.startswith("sub-") else label


def _input_roots(kw: dict) -> list[tuple[str, Path]]:
    """Input folders nothing may be written into.

    The fMRIPrep derivatives (``--fmriprep-dir``, ``BIDS_DIR/derivatives/fmriprep``) and ``--apply-model``.
    """
    bids_dir = kw["bids_dir"]
    roots = [("--fmriprep-dir", kw["fmriprep_dir"]),
             ("the fMRIPrep derivatives", bids_dir / "derivatives" / "fmriprep"),
             ("--apply-model", kw["apply_model"])]
    return [(name, Path(path)) for name, path in roots if path is not None and Path(path).exists()]


def _check_paths(kw: dict, problems: list[str]) -> None:
    """OUTPUT_DIR and --work-dir must be writable and outside every input.

    Inside BIDS_DIR only ``BIDS_DIR/derivatives/<name>`` (the BIDS convention) is allowed,
    where ``<name>`` is not an input itself; raw data are never written to.
    """
    bids_dir = kw["bids_dir"]
    if not bids_dir.is_dir():
        problems.append(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
        return
    root = bids_dir.resolve()
    inputs = _input_roots(kw)
    for name, path in (("OUTPUT_DIR", kw["output_dir"]), ("--work-dir", kw["work_dir"])):
        if path is None:
            continue
        resolved = path.resolve()
        inside = [(what, src) for what, src in inputs if resolved == src.resolve() or src.resolve() in resolved.parents]
        if inside:
            what, src = inside[0]
            problems.append(f"{name} {path} is inside {what} {src}, an input; choose a folder outside it")
            continue
        if resolved == root or root in resolved.parents:
            parts = resolved.relative_to(root).parts
            if len(parts) < 2 or parts[0] != "derivatives":
                problems.append(f"{name} {path} is inside the raw dataset {bids_dir}; choose a folder outside it "
                                f"or {bids_dir / 'derivatives' / 'bids-ketdcm'} (the BIDS convention)")
                continue
        probe = resolved
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            problems.append(f"{name} {path} cannot be created: {probe} is a file, not a folder")
        elif not os.access(probe, os.W_OK):
            problems.append(f"{name} {path} is not writable (no write permission on {probe})")


def _caches_into(work_dir: Path) -> None:
    """Send matplotlib's and fontconfig's caches to the work folder: nothing is written under $HOME.

    Must run before matplotlib is first imported (it reads MPLCONFIGDIR then).
    """
    cache = Path(work_dir).resolve() / "cache"
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))
    os.environ.setdefault("XDG_CACHE_HOME", str(cache))


def _value_options() -> set[str]:
    """Option words of the BIDS-App that take a value (the word after them is not positional)."""
    return {o for p in bids_app.params if isinstance(p, click.Option) and not p.is_flag and not p.count
            for o in p.opts}


def _expand_multi(argv: list[str]) -> list[str]:
    """``--participant-label A B`` and ``--session-label A B`` (as fMRIPrep): one option per value.

    Values are taken up to the next option word; when that would leave fewer than the
    three positional arguments (``--participant-label A B BIDS_DIR OUTPUT_DIR participant``),
    the last values are given back to them.
    """
    out: list[str] = []
    last: tuple[str, list[str]] | None = None
    positional = 0
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word in MULTI_VALUED:
            values = []
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            last = (word, values)
            out.append((word, values))  # type: ignore[arg-type]
            continue
        out.append(word)
        if word.startswith("-"):
            if word in _value_options() and i < len(argv):
                out.append(argv[i])
                i += 1
        else:
            positional += 1
    if last is not None and positional < 3:
        give = min(3 - positional, len(last[1]) - 1)
        if give > 0:
            moved = last[1][-give:]
            del last[1][-give:]
            out += moved
    flat: list[str] = []
    for item in out:
        if isinstance(item, tuple):
            flat += [x for v in item[1] for x in (item[0], v)] if item[1] else [item[0]]
        else:
            flat.append(item)
    return flat


def _read_filter(path: Path | None, problems: list[str]) -> dict | None:
    """``--bids-filter-file`` through the layout's one reader; a problem is collected, not raised."""
    if path is None:
        return None
    try:
        return load_bids_filters(path)
    except InputError as err:
        problems.append(str(err))
        return None


def _check_model_options(kw: dict, problems: list[str]) -> None:
    """--features, --gmv-atlas, --save-model and --apply-model, before any heavy work."""
    level, features = kw["analysis_level"], kw["features"]
    if kw["save_model"] is not None and level != "group":
        problems.append("--save-model is a group-level option")
    if kw["save_model"] is not None and kw["apply_model"] is not None:
        problems.append("--save-model and --apply-model: give one (train here, or apply models trained elsewhere)")
    gmv = level == "participant" and uses_gmv(features)
    if gmv:
        for spec in kw["gmv_atlases"]:
            try:
                load_regions(spec)
            except InputError as err:
                problems.append(str(err))
    if kw["apply_model"] is None:
        return

    try:
        models = load_models(kw["apply_model"])
    except InputError as err:
        problems.append(str(err))
        return
    if level != "participant":
        return
    dcm_nets = {network_label(n) for n in kw["networks"]} if uses_dcm(features) else set()
    gmv_nets = {region_label(n) for n in [*kw["networks"], *kw["gmv_atlases"]]} if gmv else set()
    for m in models:
        lacks_dcm = uses_dcm(m.feature_set) and m.network not in dcm_nets
        lacks_gmv = uses_gmv(m.feature_set) and m.network not in gmv_nets
        if lacks_dcm or lacks_gmv:
            problems.append(f"--apply-model: {m.path.name} needs {m.feature_set} features of seg-{m.network}; "
                            f"add --features {m.feature_set} and --network {m.network}")


@click.command(cls=SectionedCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level", type=click.Choice(["participant", "group"]))
@option("--participant-label", "participant_labels", multiple=True, section=FILTERING,
        help="Subject label(s), with or without 'sub-', space-separated (--participant-label 01 02). "
        "Default: all.")
@option("--session-label", "session_labels", multiple=True, section=FILTERING,
        help="Session label(s), with or without 'ses-', space-separated. Participant default: every "
        "session with a run of --task-label (and datasets without sessions). Group: the session of the "
        "features (default b0).")
@option("--task-label", default="rest", show_default=True, section=FILTERING, help="Task of the resting BOLD runs.")
@option("--fmriprep-dir", type=click.Path(path_type=Path), section=FILTERING,
        help="fMRIPrep derivatives. Default: BIDS_DIR/derivatives/fmriprep (or BIDS_DIR itself).")
@option("--space", default="MNI152NLin2009cAsym", show_default=True, section=FILTERING,
        help="Template space of the BOLD.")
@option("--bids-filter-file", type=click.Path(path_type=Path), section=FILTERING,
        help="pybids filters (JSON keyed by 'bold').")
@option("--network", "networks", multiple=True, default=("dmn4",), show_default=True, section=ROIS,
        help="dmn4, dmn11, dmn15, ket21, or a path to an ROI TSV / labelled NIfTI (repeatable).")
@option("--denoise", default="simple", show_default=True, section=ROIS,
        help=f"Confound strategy: a preset ({', '.join(preset_names())}) or the path of your own strategy "
        "JSON file (same form as the presets in bids_ketdcm/data/denoise; recorded in the sidecars).")
@option("--roi-summary", type=click.Choice(["eigenvariate", "mean"]), default="eigenvariate",
        show_default=True, section=ROIS, help="ROI summary: first eigenvariate (SPM's VOI) or mean.")
@option("--dcm-jacobian", type=click.Choice(["analytic", "autograd", "finite-difference"]),
        default="analytic", show_default=True, section=DCM,
        help="analytic: exact Jacobian by structured forward mode, and SPM12's own path run as well, the higher "
        "free energy kept (sidecar: PathKept); autograd: the same with torch.func's Jacobian (slower); "
        "finite-difference: SPM12's path alone (its finite differences, iterates and free energy).")
@option("--dcm-csd-model", type=click.Choice(["spm12", "direct"]), default="spm12", show_default=True, section=DCM,
        help="Predicted CSD: SPM12's (with its AR(7) round trip), or direct (the transfer-function CSD "
        "without it: fits 1/f-like spectra better, not SPM12).")
@option("--features", multiple=True, type=click.Choice(FEATURE_SETS), default=("dcm",),
        show_default=True, section=FEATURES,
        help="Participant: dcm (spectral DCM) and/or gmv (gray-matter volume); eb needs dcm's outputs. Group: the "
        "feature sets compared by the suite (repeatable); eb: the A matrices' empirical-Bayes estimates, a PEB "
        "of the DCM posteriors refitted on each training fold.")
@option("--gmv-atlas", "gmv_atlases", multiple=True, default=("power264",), show_default=True, section=FEATURES,
        help="Participant, gmv: whole-brain atlas besides the --network regions: power264, or a TSV of "
        "spheres / labelled NIfTI (repeatable).")
@option("--save-model", type=click.Path(path_type=Path), section=FEATURES,
        help="Group: save the final model of every label scheme and feature set to this folder.")
@option("--apply-model", type=click.Path(path_type=Path), section=FEATURES,
        help="Participant: predict each participant with the saved models of this folder (research tool, "
        "not a clinical device). Group: validate them on this dataset (no refitting).")
@option("--n-permutations", type=click.IntRange(min=0), default=1000, show_default=True, section=GROUP,
        help="Group level: label permutations per headline model.")
@option("--allow-missing", is_flag=True, section=GROUP,
        help="Group level: go on with participants that have derivatives.")
@option("--treatment-selection", is_flag=True, section=GROUP,
        help="Group: also recommend ketamine or placebo per participant (DPNN and baselines on the "
        "crossover; needs participants.tsv infusion_1 and both post-infusion sessions).")
@option("--nprocs", type=click.IntRange(min=1), section=PERFORMANCE,
        help="CPUs the app may keep busy (threads x processes): a DCM inversion runs nprocs of its units (paths, "
        "groups of runs) at once, one thread each. Default: every CPU of this process's affinity mask.")
@option("--omp-nthreads", type=click.IntRange(min=1), section=PERFORMANCE,
        help="Most threads one task (a model fit, a time-series extraction) uses: torch intra/inter-op and BLAS; "
        "DCM units always use one. Default: 1 (fastest on busy machines; see README).")
@option("--mem-mb", type=click.IntRange(min=MIN_MEM_MB), section=PERFORMANCE,
        help="Memory the app may use, in MB: bounds the DCM's CPU chunk of subjects and the number of "
        f"group-level processes (about {WORKER_MB} MB each). Default: no bound.")
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
        section=PERFORMANCE, help="Torch device for DCM inversion.")
@option("--work-dir", type=click.Path(path_type=Path), section=WORKFLOW,
        help="Work folder (caches; fMRIPrep 1.0/1.1 confounds translated). Default: OUTPUT_DIR/work.")
@option("--seed", type=int, default=0, show_default=True, section=WORKFLOW, help="Random seed.")
@option("--overwrite", is_flag=True, section=WORKFLOW, help="Redo runs whose outputs already exist.")
@option("--reports-only", is_flag=True, section=WORKFLOW,
        help="Participant: only rewrite the HTML reports from the derivatives already in OUTPUT_DIR "
        "(no denoising, no inversion).")
@option("--skip-bids-validation", is_flag=True, section=WORKFLOW, help="Do not run the BIDS validator on BIDS_DIR.")
@group_options
@option("-v", "--verbose", count=True, section=OTHER,
        help="More logging: -v adds the DCM's per-iteration lines and tracebacks; -vv debug messages, "
        "those of pybids and nilearn included.")
@click.version_option(__version__, "--version", prog_name="bids-ketdcm")
def bids_app(**kw) -> None:
    """bids-ketdcm: spectral DCM of resting fMRI to predict ketamine response.

    \b
    BIDS_DIR        raw BIDS dataset (participants.tsv, phenotype/) or fMRIPrep output
    OUTPUT_DIR      where the BIDS-Derivatives are written
    ANALYSIS_LEVEL  participant (per subject) or group (prediction suite)
    """
    setup_logging(kw["verbose"])

    problems: list[str] = []
    try:
        policy = resolve(kw["nprocs"], kw["omp_nthreads"])
    except ValueError as err:
        raise InputError(str(err)) from None
    limit_threads(policy.omp_nthreads)
    kw["nprocs"], kw["omp_nthreads"] = policy.nprocs, policy.omp_nthreads
    bids_dir, output_dir = kw["bids_dir"], kw["output_dir"]
    work_dir = kw["work_dir"] or output_dir / "work"
    _caches_into(work_dir)
    _check_paths(kw, problems)
    bids_filter = _read_filter(kw["bids_filter_file"], problems)

    for spec in kw["networks"]:
        try:
            load_network(spec)
        except InputError as err:
            problems.append(str(err))
    try:
        load_strategy(kw["denoise"])
    except InputError as err:
        problems.append(str(err))
    if kw["reports_only"] and kw["analysis_level"] != "participant":
        problems.append("--reports-only is a participant-level option (the group report is rewritten by each "
                        "group run)")
    if kw["reports_only"] and kw["overwrite"]:
        problems.append("--reports-only and --overwrite: give one (rewrite the reports, or redo the runs)")
    _check_model_options(kw, problems)
    if problems:
        raise InputError("\n".join(problems))

    check_writable_dir(output_dir, "OUTPUT_DIR")  # what permissions alone do not tell (root, /proc)
    if kw["analysis_level"] == "group":
        _group(kw, bids_dir, output_dir)
    else:
        _participant(kw, bids_dir, output_dir, work_dir, bids_filter)


def _participant(kw: dict, bids_dir: Path, output_dir: Path, work_dir: Path, bids_filter: dict | None) -> None:
    # The levels load matplotlib, which reads MPLCONFIGDIR when first imported: only after
    # _caches_into has pointed it at the work folder (nothing may be written under $HOME).
    from bids_ketdcm.participant.workflow import rewrite_reports, run_participant

    if not kw["skip_bids_validation"] and not kw["reports_only"]:
        validate_bids(bids_dir)
    labels = [_strip_sub(x) for x in kw["participant_labels"]]
    sessions = list(kw["session_labels"]) or None
    failures = Failures()
    runs = []
    if uses_dcm(kw["features"]):
        runs = find_bold_runs(bids_dir, fmriprep_dir=kw["fmriprep_dir"], participant_labels=labels,
                              session=sessions, task=kw["task_label"], space=kw["space"],
                              bids_filter=bids_filter, failures=failures)
    opts = ParticipantOptions(
        bids_dir=bids_dir, output_dir=output_dir, fmriprep_dir=kw["fmriprep_dir"], work_dir=work_dir,
        participant_labels=labels, session=sessions, task=kw["task_label"], space=kw["space"],
        networks=list(kw["networks"]), denoise=kw["denoise"], roi_summary=kw["roi_summary"],
        bids_filter=bids_filter, device=kw["device"], seed=kw["seed"], overwrite=kw["overwrite"],
        jacobian=kw["dcm_jacobian"], csd_model=kw["dcm_csd_model"], features=list(kw["features"]),
        gmv_atlases=list(kw["gmv_atlases"]), apply_model=kw["apply_model"], mem_mb=kw["mem_mb"],
        nprocs=kw["nprocs"],
    )
    if kw["reports_only"]:
        written = rewrite_reports(opts, runs)
        log.info("rewrote %d participant report(s) from the derivatives in %s", len(written), output_dir)
        return
    summary = run_participant(opts, runs, failures)
    for label, counts in summary.items():
        if "inverted" not in counts:  # the networks' lines were logged as each ended
            log.info("%s: %s", label, ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    if failures:  # every failure at the end: exit 2 when all are bad input, else 1
        raise failures.error(len({r.subject for r in runs} - failures.subjects))


def group_processes(nprocs: int, mem_mb: int | None) -> int:
    """Processes of the group level: ``--nprocs``, fewer when ``--mem-mb`` cannot hold them.

    Parameters
    ----------
    nprocs
        ``--nprocs``.
    mem_mb
        ``--mem-mb``, or None.

    Returns
    -------
    int
        At least 1; at most one per :data:`WORKER_MB` of the budget.
    """
    if mem_mb is None:
        return nprocs
    allowed = max(1, mem_mb // WORKER_MB)
    if allowed < nprocs:
        log.info("--mem-mb %d: %d group-level process(es) instead of --nprocs %d (about %d MB each)", mem_mb,
                 allowed, nprocs, WORKER_MB)
    return min(nprocs, allowed)


def _group(kw: dict, bids_dir: Path, output_dir: Path) -> None:
    # After _caches_into, as in _participant (matplotlib reads MPLCONFIGDIR when imported).
    from bids_ketdcm.group.run import GroupOptions, run_group

    opts = GroupOptions(n_permutations=kw["n_permutations"], nprocs=group_processes(kw["nprocs"], kw["mem_mb"]),
                        seed=kw["seed"], allow_missing=kw["allow_missing"],
                        feature_session=kw["session_labels"][0] if kw["session_labels"] else "b0",
                        feature_sets=tuple(kw["features"]), save_model=kw["save_model"],
                        apply_model=kw["apply_model"], treatment_selection=kw["treatment_selection"],
                        **group_kwargs(kw))
    run_group(bids_dir, output_dir, opts)
    log.info("group results: %s", output_dir / "group")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the BIDS-App (``bids-ketdcm``); see :func:`run_command`."""
    return run_command(bids_app, "bids-ketdcm", argv)


def run_command(command: click.Command, prog_name: str, argv: list[str] | None = None) -> int:
    """Run a click command; map errors to exit codes, never show a traceback for bad input.

    Parameters
    ----------
    command
        The click command (the BIDS-App, or the tools group).
    prog_name
        The program's name in usage and error messages.
    argv
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 success, 1 a failure of the program, 2 bad input or usage.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is bids_app:
        argv = _expand_multi(argv)
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as err:
        err.show()
        return EXIT_INPUT
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILURE
    except InputError as err:
        click.echo(f"bids-ketdcm: error: {err}", err=True)
        return EXIT_INPUT
    except ParticipantsFailed as err:  # the others were processed; every traceback was logged with -v
        click.echo(f"bids-ketdcm: error: {err}", err=True)
        return EXIT_FAILURE
    except Exception as err:  # a failure of the program: one line, traceback only with -v
        log.log(LOG_VERBOSE, "traceback", exc_info=True)
        click.echo(f"bids-ketdcm: internal error: {type(err).__name__}: {err} (run with -v for the traceback)",
                   err=True)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
