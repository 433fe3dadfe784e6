"""Find the inputs of the participant level: fMRIPrep BOLD runs and their companions.

pybids indexes the fMRIPrep derivatives (validation off, as they are not raw BIDS) and,
only when a derivative sidecar lacks ``RepetitionTime``, the raw dataset. The index
database lives in the work folder, never in the (possibly read-only) inputs, and the
folders of unselected participants, and every non-functional folder, are ignored so that
a one-participant job starts fast (27 participants index in about 3 s, one in about 1 s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from bids_ketdcm.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_SPACE = "MNI152NLin2009cAsym"
DEFAULT_TASK = "rest"
DEFAULT_SESSION = "b0"
#: Entities of a BOLD file that its confounds TSV does not carry (fMRIPrep naming).
_SPATIAL_ENTITIES = {"space", "res", "den", "cohort"}
#: Entities that are not part of a file's identity when matching companions.
_FILE_ENTITIES = {"desc", "suffix", "extension", "datatype"}


@dataclass(frozen=True)
class BoldRun:
    """One preprocessed BOLD run and the files that go with it.

    Attributes
    ----------
    subject
        Participant label, without ``sub-``.
    session
        Session label without ``ses-``, or None for a dataset without sessions.
    task
        Task label.
    run
        Run label exactly as in the file name (e.g. ``"01"``), or None when the file
        has no ``run`` entity.
    space
        Template space of the BOLD image.
    bold, mask, confounds
        Paths of ``desc-preproc_bold``, ``desc-brain_mask`` and
        ``desc-confounds_timeseries.tsv``.
    tr
        Repetition time (s).
    """

    subject: str
    session: str | None
    task: str
    run: str | None
    space: str
    bold: Path
    mask: Path
    confounds: Path
    tr: float

    @property
    def prefix(self) -> str:
        """``sub-X[_ses-Y]_task-Z[_run-N]``: the start of every output name of the run."""
        parts = [f"sub-{self.subject}"]
        if self.session is not None:
            parts.append(f"ses-{self.session}")
        parts.append(f"task-{self.task}")
        if self.run is not None:
            parts.append(f"run-{self.run}")
        return "_".join(parts)


# --------------------------------------------------------------------------- arguments


def normalise_labels(labels: Iterable[str] | None) -> list[str] | None:
    """Participant labels without the ``sub-`` prefix, in order, without repeats.

    Parameters
    ----------
    labels
        Labels as the user typed them (``MOA101`` or ``sub-MOA101``), or None.

    Returns
    -------
    list of str or None
        None when ``labels`` is None or empty (meaning every participant).
    """
    if not labels:
        return None
    out: list[str] = []
    for label in labels:
        text = str(label).strip()
        text = text[4:] if text.startswith("sub-") else text
        if not re.fullmatch(r"[A-Za-z0-9]+", text):
            raise InputError(
                f"--participant-label {label!r} is not a BIDS participant label "
                "(letters and digits, with or without 'sub-')"
            )
        if text not in out:
            out.append(text)
    return out


def resolve_fmriprep_dir(
    bids_dir: str | os.PathLike, fmriprep_dir: str | os.PathLike | None = None
) -> Path:
    """Locate the fMRIPrep derivatives.

    Parameters
    ----------
    bids_dir
        The BIDS dataset (BIDS_DIR).
    fmriprep_dir
        ``--fmriprep-dir`` if given.

    Returns
    -------
    Path
        ``fmriprep_dir`` if given; else ``BIDS_DIR/derivatives/fmriprep`` if it exists;
        else BIDS_DIR itself when it is a derivative dataset (an fMRIPrep output).
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    if fmriprep_dir is not None:
        path = Path(fmriprep_dir)
        if not path.is_dir():
            raise InputError(f"--fmriprep-dir {path} does not exist or is not a folder")
    elif (bids_dir / "derivatives" / "fmriprep").is_dir():
        path = bids_dir / "derivatives" / "fmriprep"
    elif _read_description(bids_dir, "BIDS_DIR").get("DatasetType") == "derivative":
        path = bids_dir
    else:
        raise InputError(
            f"no fMRIPrep derivatives found: {bids_dir / 'derivatives' / 'fmriprep'} does "
            f"not exist and {bids_dir} is not a derivative dataset; run fMRIPrep first or "
            "give --fmriprep-dir"
        )
    _read_description(path, "fMRIPrep folder")
    return path


def _read_description(root: Path, what: str) -> dict[str, Any]:
    path = root / "dataset_description.json"
    if not path.is_file():
        raise InputError(f"{what} {root} has no dataset_description.json")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise InputError(f"{path} must hold a JSON object")
    return content


def check_writable_dir(path: str | os.PathLike, option: str,
                       inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Create ``path`` if needed and check it can be written; refuse input folders.

    Parameters
    ----------
    path
        The output or work folder.
    option
        Its name for messages (e.g. ``"OUTPUT_DIR"``, ``"--work-dir"``).
    inputs
        Input datasets the folder must not be inside (BIDS_DIR, the fMRIPrep folder).

    Returns
    -------
    Path
        The folder, resolved.
    """
    target = Path(path).expanduser().resolve()
    for source in inputs:
        root = Path(source).expanduser().resolve()
        if target == root or target.is_relative_to(root):
            raise InputError(
                f"{option} {path} is inside the input dataset {source}; "
                "choose a folder outside it (inputs are never written to)"
            )
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InputError(f"{option} {path} cannot be written: {err.strerror or err}") from None
    return target


def load_bids_filters(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a ``--bids-filter-file``: pybids filters keyed by ``bold``, as in fMRIPrep.

    Parameters
    ----------
    path
        JSON file such as ``{"bold": {"session": "b0", "run": 1}}``, or None.

    Returns
    -------
    dict
        The ``bold`` filters (empty if none). In values, ``null`` means "the entity
        must be absent" and ``"*"`` "any value" (see :func:`find_bold_runs`).
    """
    if path is None:
        return {}
    file = Path(path)
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--bids-filter-file {file} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--bids-filter-file {file} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise InputError(f"--bids-filter-file {file} must hold a JSON object")
    others = sorted(set(content) - {"bold"})
    if others:
        log.info("--bids-filter-file %s: ignoring the %s filters", file, ", ".join(others))
    filters = content.get("bold", {})
    _pybids_filters(filters, f"--bids-filter-file {file}")
    return filters


def _pybids_filters(filters: Any, where: str) -> dict[str, Any]:
    """Validate filters and translate null / "*" into pybids queries."""
    from bids.layout import Query

    if not isinstance(filters, dict):
        raise InputError(
            f"{where}: 'bold' must map entities to values (got {type(filters).__name__})"
        )
    out: dict[str, Any] = {}
    for entity, value in filters.items():
        if value is None:
            out[entity] = Query.NONE
        elif value == "*":
            out[entity] = Query.ANY
        elif isinstance(value, (str, int)) or (
            isinstance(value, list) and all(isinstance(v, (str, int)) for v in value)
        ):
            out[entity] = value
        else:
            raise InputError(
                f"{where}: the value of {entity!r} must be a string, a number, a list of "
                'them, null or "*"'
            )
    return out


#: Validator errors that are false alarms for datasets this app reads: bids-validator 3.0
#: takes participant_id alone as the index of phenotype tables, so the long format of
#: ds005917 (one row per participant and session) is reported as duplicate indices.
_TOLERATED_ERRORS = {("TSV_INDEX_VALUE_NOT_UNIQUE", "/phenotype/")}


def run_bids_validator(path: Path) -> tuple[list[dict], list[dict]]:
    """Run ``bids-validator-deno --json`` on a dataset (raw or derivative).

    Parameters
    ----------
    path
        Dataset root.

    Returns
    -------
    errors, tolerated : list of dict
        The validator's issues of severity ``error`` (code, location, message), and those
        among them known to be false alarms (:data:`_TOLERATED_ERRORS`), set apart.

    Raises
    ------
    InputError
        When the validator is not installed or its output cannot be read.
    """
    # the environment's own scripts first: a venv's python run by path has them off PATH
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("bids-validator-deno", path=search)
    if exe is None:
        raise InputError("bids-validator-deno is not installed (pip install bids-validator-deno, "
                         "or pass --skip-bids-validation)")
    proc = subprocess.run([exe, "--json", str(path)], capture_output=True, text=True, check=False)
    try:
        issues = json.loads(proc.stdout)["issues"]["issues"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"bids-validator-deno could not validate {path}: {proc.stderr.strip()[-500:]}") from None
    errors = [i for i in issues if i.get("severity") == "error"]
    tolerated = [e for e in errors if any(e.get("code") == code and str(e.get("location", "")).startswith(where)
                                          for code, where in _TOLERATED_ERRORS)]
    return [e for e in errors if e not in tolerated], tolerated


def validate_bids(bids_dir: Path) -> None:
    """Validate the input dataset with the BIDS validator; refuse it on errors.

    Known false alarms (:data:`_TOLERATED_ERRORS`) are logged as warnings.
    """
    errors, tolerated = run_bids_validator(bids_dir)
    for code in sorted({e["code"] for e in tolerated}):
        log.warning("BIDS validator: %s in %s tolerated (long-format phenotype tables are read by session)",
                    code, ", ".join(sorted({e["location"] for e in tolerated if e["code"] == code})))
    if errors:
        codes = sorted({e.get("code", "?") for e in errors})
        where = sorted({str(e.get("location", "?")) for e in errors})
        raise InputError(f"{bids_dir} is not a valid BIDS dataset ({len(errors)} errors: {', '.join(codes[:8])}; "
                         f"in {', '.join(where[:5])}{' ...' if len(where) > 5 else ''}); "
                         "fix them or pass --skip-bids-validation")


# --------------------------------------------------------------------------- indexing


def _subject_folders(root: Path) -> list[str]:
    return sorted(p.name[4:] for p in root.glob("sub-*") if p.is_dir())


def _ignore_patterns(labels: Sequence[str] | None) -> list[re.Pattern]:
    """pybids ignore rules (matched against '/relative/path'): unselected participants,
    non-functional folders, fMRIPrep's reports and logs, hidden files."""
    patterns = [
        re.compile(r"^/(?:code|models|sourcedata|stimuli|derivatives|figures|logs?|work)(?:/|$)"),
        re.compile(r"^/sub-[^/]+/(?:ses-[^/]+/)?(?:anat|fmap|dwi|perf|figures|log|xfm)(?:/|$)"),
        re.compile(r"/\."),
    ]
    if labels:
        keep = "|".join(re.escape(label) for label in labels)
        patterns.append(re.compile(rf"^/sub-(?!(?:{keep})(?:/|$))"))
    return patterns


def _index(root: Path, work_dir: Path, labels: Sequence[str] | None, kind: str):
    from bids import BIDSLayout, BIDSLayoutIndexer

    key = json.dumps([str(root.resolve()), kind, list(labels or [])])
    database = work_dir / "pybids" / hashlib.sha1(key.encode()).hexdigest()[:16]
    try:
        database.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--work-dir {work_dir} cannot be written: {err.strerror or err}") from None
    indexer = BIDSLayoutIndexer(validate=False, ignore=_ignore_patterns(labels))
    try:
        return BIDSLayout(
            root,
            validate=False,
            is_derivative=kind == "derivative",
            database_path=database,
            reset_database=True,
            indexer=indexer,
        )
    except Exception as err:  # pybids raises various errors on malformed datasets
        raise InputError(f"cannot index the dataset {root}: {err}") from None


# --------------------------------------------------------------------------- queries


def _identity(entities: dict[str, Any], drop: set[str]) -> dict[str, str]:
    return {k: str(v) for k, v in entities.items() if k not in drop}


def _companion(layout, bold, suffix: str, desc: str, extensions: Sequence[str],
               spatial: bool):
    """The file beside the BOLD with the same identity, another desc and suffix.

    ``spatial``: whether the companion carries the BOLD's space/res entities (the mask
    does, the confounds TSV does not).
    """
    entities = bold.get_entities()
    drop = _FILE_ENTITIES | (set() if spatial else _SPATIAL_ENTITIES)
    want = _identity(entities, drop)
    candidates = layout.get(
        subject=entities["subject"], suffix=suffix, desc=desc, extension=list(extensions)
    )
    matches = [
        f for f in candidates
        if Path(f.path).parent == Path(bold.path).parent
        and _identity(f.get_entities(), drop) == want
    ]
    return matches[0] if matches else None


def _expected_name(bold: Path, spatial: bool, replacement: str) -> Path:
    head = bold.name.split("_desc-preproc_bold")[0]
    if not spatial:
        head = re.sub(r"_(?:space|res|den|cohort)-[A-Za-z0-9]+", "", head)
    return bold.with_name(head + replacement)


def _repetition_time(bold, raw_dir: Path | None, work_dir: Path,
                     labels: Sequence[str] | None, cache: dict) -> float:
    """RepetitionTime from the derivative's sidecars, else from the raw dataset's."""
    value = bold.get_metadata().get("RepetitionTime")
    source = _expected_name(Path(bold.path), True, "_desc-preproc_bold.json")
    tried = [str(source)]
    if value is None and raw_dir is not None:
        if "raw" not in cache:
            cache["raw"] = _index(raw_dir, work_dir, labels, "raw")
        entities = _identity(bold.get_entities(), _FILE_ENTITIES | _SPATIAL_ENTITIES)
        raw = [
            f for f in cache["raw"].get(
                subject=entities["subject"], suffix="bold", extension=[".nii.gz", ".nii"]
            )
            if _identity(f.get_entities(), _FILE_ENTITIES) == entities
        ]
        if raw:
            value = raw[0].get_metadata().get("RepetitionTime")
            source = Path(raw[0].path.split(".nii")[0] + ".json")
            tried.append(f"{source} (or the raw dataset's top-level sidecars)")
        else:
            tried.append(f"the raw dataset {raw_dir} (no matching raw BOLD)")
    if value is None:
        raise InputError(
            f"RepetitionTime of {bold.path} is missing: not in {' nor in '.join(tried)}"
        )
    try:
        tr = float(value)
    except (TypeError, ValueError):
        raise InputError(f"RepetitionTime {value!r} of {source} is not a number") from None
    if not 0.1 <= tr <= 10.0:
        raise InputError(
            f"RepetitionTime {tr} s of {source} is implausible (expected seconds, 0.1-10)"
        )
    return tr


def find_bold_runs(
    bids_dir: str | os.PathLike,
    *,
    work_dir: str | os.PathLike,
    fmriprep_dir: str | os.PathLike | None = None,
    participant_labels: Iterable[str] | None = None,
    session: str | None = DEFAULT_SESSION,
    task: str = DEFAULT_TASK,
    space: str = DEFAULT_SPACE,
    resolution: str | None = None,
    bids_filter: dict[str, Any] | None = None,
) -> list[BoldRun]:
    """Every preprocessed BOLD run matching the selection, with mask, confounds and TR.

    Parameters
    ----------
    bids_dir
        BIDS_DIR (raw dataset, or itself an fMRIPrep output).
    work_dir
        Work folder; the pybids index goes to ``work_dir/pybids``.
    fmriprep_dir
        ``--fmriprep-dir``; default ``BIDS_DIR/derivatives/fmriprep`` (see
        :func:`resolve_fmriprep_dir`).
    participant_labels
        Labels with or without ``sub-``; None or empty for every participant.
    session
        Session label (with or without ``ses-``), or None for all sessions.
    task, space
        Task and template space of the BOLD runs.
    resolution
        The ``res`` entity, needed only when the space exists at several resolutions.
    bids_filter
        Extra pybids filters for the BOLD query (:func:`load_bids_filters`: ``null``
        for "absent", ``"*"`` for "any"); they override ``session`` and ``task``.

    Returns
    -------
    list of BoldRun
        Sorted by participant, session and run.

    Raises
    ------
    InputError
        Unknown participant, BOLD missing or only in other spaces, missing mask,
        confounds or RepetitionTime, ambiguous resolution; each message names the
        file or option.
    """
    bids_dir = Path(bids_dir)
    fmriprep = resolve_fmriprep_dir(bids_dir, fmriprep_dir)
    work = Path(work_dir)
    labels = normalise_labels(participant_labels)
    available = _subject_folders(fmriprep)
    if not available:
        raise InputError(f"the fMRIPrep folder {fmriprep} holds no sub-* folder")
    if labels:
        unknown = [label for label in labels if label not in available]
        if unknown:
            raise InputError(
                f"participant label(s) {', '.join(unknown)} not found in {fmriprep}; "
                f"available: {', '.join(available)}"
            )
    layout = _index(fmriprep, work, labels, "derivative")
    query: dict[str, Any] = {"task": task, "suffix": "bold", "desc": "preproc",
                             "extension": [".nii.gz", ".nii"]}
    if session is not None:
        query["session"] = session[4:] if session.startswith("ses-") else session
    if resolution is not None:
        query["res"] = resolution
    query.update(_pybids_filters(bids_filter or {}, "--bids-filter-file"))
    subjects = labels or available
    try:
        found = layout.get(subject=subjects, space=space, **query)
    except (ValueError, KeyError) as err:
        raise InputError(f"invalid BOLD filter ({err}); check --bids-filter-file") from None

    for subject in subjects:
        if any(f.entities["subject"] == subject for f in found):
            continue
        other = layout.get(subject=subject, **query)
        if other:
            spaces = sorted({str(f.entities.get("space", "native")) for f in other})
            raise InputError(
                f"sub-{subject}: no desc-preproc_bold in space {space} in {fmriprep}; "
                f"spaces found: {', '.join(spaces)} (use --space)"
            )
        if labels:
            raise InputError(
                f"sub-{subject}: no preprocessed BOLD ({_describe(query)}) in {fmriprep}"
            )
        log.warning("sub-%s: no preprocessed BOLD (%s); skipped", subject, _describe(query))
    if not found:
        raise InputError(f"no preprocessed BOLD ({_describe(query)}, space {space}) in {fmriprep}")
    _check_unique_resolution(found)

    raw_dir = None if bids_dir.resolve() == fmriprep.resolve() else bids_dir
    cache: dict = {}
    runs = []
    for bold in found:
        path = Path(bold.path)
        mask = _companion(layout, bold, "mask", "brain", [".nii.gz", ".nii"], spatial=True)
        if mask is None:
            raise InputError(
                f"{path}: no brain mask beside it "
                f"(expected {_expected_name(path, True, '_desc-brain_mask.nii.gz')})"
            )
        confounds = _companion(layout, bold, "timeseries", "confounds", [".tsv"],
                               spatial=False)
        if confounds is None:
            raise InputError(
                f"{path}: no confounds file for this run "
                f"(expected {_expected_name(path, False, '_desc-confounds_timeseries.tsv')})"
            )
        entities = bold.get_entities()
        runs.append(
            BoldRun(
                subject=str(entities["subject"]),
                session=str(entities["session"]) if "session" in entities else None,
                task=str(entities["task"]),
                run=_run_label(path),
                space=str(entities["space"]),
                bold=path,
                mask=Path(mask.path),
                confounds=Path(confounds.path),
                tr=_repetition_time(bold, raw_dir, work, labels, cache),
            )
        )
    log.info("found %d BOLD run(s) of %d participant(s) in %s", len(runs),
             len({r.subject for r in runs}), fmriprep)
    return sorted(runs, key=lambda r: (r.subject, r.session or "", r.run or "", str(r.bold)))


def _run_label(path: Path) -> str | None:
    match = re.search(r"_run-([A-Za-z0-9]+)", path.name)
    return match.group(1) if match else None


def _describe(query: dict[str, Any]) -> str:
    shown = {k: v for k, v in query.items() if k not in ("suffix", "desc", "extension")}
    return ", ".join(f"{k} {getattr(v, 'name', v)}" for k, v in shown.items())


def _check_unique_resolution(found) -> None:
    groups: dict[tuple, list[str]] = {}
    for f in found:
        ident = tuple(sorted(_identity(f.get_entities(), _FILE_ENTITIES | {"res", "den"}).items()))
        groups.setdefault(ident, []).append(f.path)
    for paths in groups.values():
        if len(paths) > 1:
            raise InputError(
                "several preprocessed BOLD files for one run (different resolutions): "
                f"{', '.join(sorted(paths))}; choose one with --res"
            )
