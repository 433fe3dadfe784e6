"""Find fMRIPrep-preprocessed resting BOLD runs, masks, confounds and TR with pybids."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoldRun:
    """One preprocessed BOLD run and the files that go with it."""

    subject: str
    session: str | None
    task: str
    run: str | None
    space: str
    bold: Path
    mask: Path
    confounds: Path
    tr: float


def resolve_fmriprep_dir(bids_dir: Path, fmriprep_dir: Path | None) -> Path:
    """The fMRIPrep folder: the option, else BIDS_DIR/derivatives/fmriprep, else BIDS_DIR."""
    candidates = [Path(fmriprep_dir)] if fmriprep_dir else [Path(bids_dir) / "derivatives" / "fmriprep", Path(bids_dir)]
    for path in candidates:
        if path.is_dir() and any(path.glob("sub-*/**/*desc-preproc_bold.nii*")):
            return path
    where = candidates[0] if fmriprep_dir else f"{candidates[0]} (or {bids_dir} itself)"
    raise InputError(f"no fMRIPrep derivatives found in {where}: no *_desc-preproc_bold.nii[.gz] files; "
                     "run fMRIPrep first or give --fmriprep-dir")


def validate_bids(bids_dir: Path) -> None:
    """Run the BIDS validator (``bids-validator-deno``) when it is installed."""
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        log.warning("bids-validator-deno is not installed: BIDS validation skipped "
                    "(pip install bids-validator-deno, or pass --skip-bids-validation)")
        return
    proc = subprocess.run([exe, "--json", str(bids_dir)], capture_output=True, text=True, check=False)
    try:
        issues = json.loads(proc.stdout).get("issues", {}).get("issues", [])
    except json.JSONDecodeError:
        issues = []
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        codes = sorted({e.get("code", "?") for e in errors})
        raise InputError(f"{bids_dir} is not a valid BIDS dataset ({len(errors)} errors: {', '.join(codes[:8])}); "
                         "fix them or pass --skip-bids-validation")


def find_bold_runs(
    bids_dir: Path,
    *,
    fmriprep_dir: Path | None,
    work_dir: Path,
    participant_labels: list[str],
    session: str | None,
    task: str,
    space: str,
    bids_filter: dict | None = None,
) -> list[BoldRun]:
    """Every preprocessed BOLD run matching the selection, with mask, confounds and TR.

    Parameters
    ----------
    bids_dir
        Raw BIDS dataset (or the fMRIPrep output itself).
    fmriprep_dir
        fMRIPrep derivatives (default: see :func:`resolve_fmriprep_dir`).
    work_dir
        Writable folder for the pybids index database.
    participant_labels
        Labels without ``sub-``; empty means all.
    session, task, space
        Entities of the runs to analyse (session ``None``: any).
    bids_filter
        Extra pybids filters for the BOLD query.

    Raises
    ------
    InputError
        Unknown participant, BOLD only in other spaces, missing mask, confounds or
        RepetitionTime: the message names what is missing.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    deriv = resolve_fmriprep_dir(bids_dir, fmriprep_dir)
    present = sorted(p.name[4:] for p in deriv.glob("sub-*") if p.is_dir())
    unknown = [s for s in participant_labels if s not in present]
    if unknown:
        raise InputError(f"participant label(s) {', '.join(unknown)} not found in {deriv}; "
                         f"available: {', '.join(present) or 'none'}")
    selected = participant_labels or present
    ignore = [re.compile(rf"^/sub-(?!({'|'.join(map(re.escape, selected))})/)")] if participant_labels else []
    work_dir.mkdir(parents=True, exist_ok=True)
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore + [re.compile(r"^/(figures|logs|work)/")])
    layout = BIDSLayout(deriv, validate=False, is_derivative=True, indexer=indexer,
                        database_path=work_dir / "pybids_db", reset_database=True)
    query = {"task": task, "desc": "preproc", "suffix": "bold", "extension": [".nii.gz", ".nii"],
             "subject": selected, **(bids_filter or {})}
    if session:
        query["session"] = session
    runs = []
    for subject in selected:
        found = layout.get(return_type="object", **{**query, "subject": subject, "space": space})
        if not found:
            _explain_missing(layout, {**query, "subject": subject}, subject, space, deriv)
            continue
        for bold in found:
            runs.append(_bold_run(layout, bold, bids_dir, space))
    if not runs:
        raise InputError(f"no preprocessed BOLD runs for task '{task}'"
                         f"{f', session {session}' if session else ''} in space {space} under {deriv}")
    log.info("found %d BOLD run(s) of %d participant(s) in %s", len(runs), len({r.subject for r in runs}), deriv)
    return runs


def _explain_missing(layout, query: dict, subject: str, space: str, deriv: Path) -> None:
    spaces = sorted({f.entities.get("space", "native") for f in layout.get(return_type="object", **{k: v for k, v in query.items() if k != "space"})})
    if spaces:
        raise InputError(f"sub-{subject}: no preprocessed BOLD in space {space} under {deriv}; "
                         f"spaces found: {', '.join(spaces)} (use --space)")
    log.warning("sub-%s: no preprocessed BOLD for this selection in %s, skipped", subject, deriv)


def _bold_run(layout, bold, bids_dir: Path, space: str) -> BoldRun:
    ent = bold.get_entities()
    base = {k: ent[k] for k in ("subject", "session", "task", "run") if k in ent}
    masks = layout.get(**base, space=space, desc="brain", suffix="mask", extension=[".nii.gz", ".nii"])
    if not masks:
        raise InputError(f"{bold.path}: no brain mask (*_space-{space}_desc-brain_mask.nii.gz) beside it")
    confounds = layout.get(**base, desc="confounds", suffix="timeseries", extension=".tsv")
    if not confounds:
        raise InputError(f"{bold.path}: no confounds file (*_desc-confounds_timeseries.tsv) for this run")
    return BoldRun(
        subject=ent["subject"], session=ent.get("session"), task=ent["task"],
        run=None if ent.get("run") is None else f"{int(ent['run']):02d}" if str(ent["run"]).isdigit() else str(ent["run"]),
        space=space, bold=Path(bold.path), mask=Path(masks[0].path), confounds=Path(confounds[0].path),
        tr=_repetition_time(bold, bids_dir),
    )


def _repetition_time(bold, bids_dir: Path) -> float:
    meta = bold.get_metadata()
    tr = meta.get("RepetitionTime")
    if tr is None:  # fall back to the raw dataset's sidecar (inheritance: file, then top level)
        ent = bold.get_entities()
        name = "_".join(p for p in (f"sub-{ent['subject']}", f"ses-{ent['session']}" if ent.get("session") else "",
                                    f"task-{ent['task']}",
                                    f"run-{ent['run']:02d}" if isinstance(ent.get("run"), int) else "") if p)
        for sidecar in Path(bids_dir).glob(f"sub-{ent['subject']}/**/{name}_bold.json"):
            tr = json.loads(sidecar.read_text()).get("RepetitionTime")
        top = Path(bids_dir) / f"task-{ent['task']}_bold.json"
        if tr is None and top.exists():
            tr = json.loads(top.read_text()).get("RepetitionTime")
    if tr is None:
        raise InputError(f"{bold.path}: RepetitionTime missing from its JSON sidecar and from the raw dataset")
    tr = float(tr)
    if not 0.1 <= tr <= 10:
        raise InputError(f"{bold.path}: RepetitionTime {tr} s is implausible (expected seconds, 0.1-10)")
    return tr
