"""Find the inputs of the participant level: fMRIPrep BOLD runs and their companions.

pybids indexes the fMRIPrep derivatives (validation off, as they are not raw BIDS) and,
only when a derivative sidecar lacks ``RepetitionTime``, the raw dataset. Each process
indexes in memory (no database: concurrent jobs share nothing, the inputs are never
written to), and the folders of unselected participants, and every non-functional folder, are ignored so that
a one-participant job starts fast (27 participants index in about 3 s, one in about 1 s).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bids_ketdcm.bids.naming import RunEntities, bids_uri
from bids_ketdcm.errors import Failures, InputError
from bids_ketdcm.io import read_json_object

log = logging.getLogger(__name__)

DEFAULT_SPACE = "MNI152NLin2009cAsym"
DEFAULT_TASK = "rest"
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
        Paths of ``desc-preproc_bold``, the brain mask (``desc-brain_mask``, or
        ``label-brain_mask`` of fMRIPrep 1.x) and the confounds
        (``desc-confounds_timeseries.tsv``, or ``desc-confounds_regressors.tsv`` before 20.2);
        for fMRIPrep 1.0/1.1, ``_bold_space-S_preproc``, ``_bold_space-S_brainmask`` and
        ``_bold_confounds.tsv`` (translated when read: :mod:`bids_ketdcm.participant.confounds`).
    tr
        Repetition time (s).
    root
        The fMRIPrep dataset the files belong to.
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
    root: Path | None = None

    @property
    def entities(self) -> RunEntities:
        """Every entity that distinguishes this run (acq, ce, rec, dir, run, echo, res, den ...)."""
        return RunEntities.from_path(self.bold, space=self.space)

    @property
    def prefix(self) -> str:
        """``sub-X[_ses-Y]_task-Z[_acq-A...][_run-N]``: the run entities of every output name."""
        return f"sub-{self.subject}_{self.entities.label}"

    @property
    def sources(self) -> list[str]:
        """BOLD, mask and confounds as BIDS URIs of the fMRIPrep dataset (``bids:fmriprep:...``)."""
        root = self.root or self.bold.parents[2 if self.session is None else 3]
        return [bids_uri(p, root, "fmriprep") for p in (self.bold, self.mask, self.confounds)]


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
        else BIDS_DIR itself when it is a derivative dataset (an fMRIPrep output). It must
        hold a ``dataset_description.json``, unless it holds fMRIPrep 1.0/1.1 outputs
        (before 1.1.5 fMRIPrep wrote none).
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
    elif not (bids_dir / "dataset_description.json").exists() and _holds_fmriprep1(bids_dir):
        path = bids_dir
    elif _read_description(bids_dir, "BIDS_DIR").get("DatasetType") == "derivative":
        path = bids_dir
    else:
        raise InputError(
            f"no fMRIPrep derivatives found: {bids_dir / 'derivatives' / 'fmriprep'} does "
            f"not exist and {bids_dir} is not a derivative dataset; run fMRIPrep first or "
            "give --fmriprep-dir"
        )
    if (path / "dataset_description.json").exists() or not _holds_fmriprep1(path):
        _read_description(path, "fMRIPrep folder")
    else:  # fMRIPrep before 1.1.5 wrote none
        log.info("fMRIPrep folder %s: no dataset_description.json, read as fMRIPrep 1.0/1.1 outputs", path)
    return path


def _holds_fmriprep1(root: Path) -> bool:
    """Whether a folder holds fMRIPrep 1.0/1.1 BOLD outputs (:data:`LEGACY_BOLD`)."""
    files = (f for pattern in ("sub-*/func/*_preproc.nii*", "sub-*/ses-*/func/*_preproc.nii*")
             for f in root.glob(pattern))
    return any(LEGACY_BOLD.search(f.name) for f in files)


def _read_description(root: Path, what: str) -> dict[str, Any]:
    path = root / "dataset_description.json"
    if not path.is_file():
        raise InputError(f"{what} {root} has no dataset_description.json")
    return read_json_object(path)


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
    content = read_json_object(file, "--bids-filter-file")
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


def _index(root: Path, labels: Sequence[str] | None, kind: str):
    """Index a dataset in memory: each process has its own index (concurrent jobs share nothing)."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=False, ignore=_ignore_patterns(labels))
    try:
        return BIDSLayout(root, validate=False, is_derivative=kind == "derivative", indexer=indexer)
    except Exception as err:  # pybids raises various errors on malformed datasets
        raise InputError(f"cannot index the dataset {root}: {err}") from None


# --------------------------------------------------------------------------- queries


def _identity(entities: dict[str, Any], drop: set[str]) -> dict[str, str]:
    return {k: str(v) for k, v in entities.items() if k not in drop}


def _expected_name(bold: Path, spatial: bool, replacement: str) -> Path:
    """The name of a companion of ``bold`` (``replacement`` in fMRIPrep 1.2+ naming).

    For an fMRIPrep 1.0/1.1 BOLD (:data:`LEGACY_BOLD`) the 1.0/1.1 name of that companion.
    """
    legacy = LEGACY_BOLD.search(bold.name)
    if legacy is not None:
        head, space = bold.name[: legacy.start()], legacy.group(1)
        return bold.with_name(head + {"_desc-preproc_bold.json": f"_bold_space-{space}_preproc.json",
                                      "_desc-brain_mask.nii.gz": f"_bold_space-{space}_brainmask.nii.gz",
                                      "_desc-confounds_timeseries.tsv": LEGACY_CONFOUNDS_END}[replacement])
    head = bold.name.split("_desc-preproc_bold")[0]
    if not spatial:
        head = re.sub(r"_(?:space|res|den|cohort)-[A-Za-z0-9]+", "", head)
    return bold.with_name(head + replacement)


def _repetition_time(bold, raw_dir: Path | None,
                     labels: Sequence[str] | None, cache: dict) -> float:
    """RepetitionTime from the derivative's sidecars, else from the raw dataset's."""
    value = bold.get_metadata().get("RepetitionTime")
    source = _expected_name(Path(bold.path), True, "_desc-preproc_bold.json")
    tried = [str(source)]
    if value is None and raw_dir is not None:
        if "raw" not in cache:
            cache["raw"] = _index(raw_dir, labels, "raw")
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


#: Brain masks and confounds across fMRIPrep versions, newest first: (suffix, entity, label).
MASK_NAMES = (("mask", "desc", "brain"), ("mask", "label", "brain"))
CONFOUNDS_NAMES = (("timeseries", "desc", "confounds"), ("regressors", "desc", "confounds"))
#: fMRIPrep 1.0/1.1 names (before BIDS-Derivatives): ``<run>_bold_space-S_preproc.nii.gz``,
#: ``<run>_bold_space-S_brainmask.nii.gz``, ``<run>_bold_confounds.tsv`` (CamelCase columns).
LEGACY_BOLD = re.compile(r"_bold_space-([A-Za-z0-9]+)_preproc\.nii(?:\.gz)?$")
LEGACY_MASK = re.compile(r"_bold_space-[A-Za-z0-9]+_brainmask\.nii(?:\.gz)?$")
LEGACY_CONFOUNDS_END = "_bold_confounds.tsv"


def _companion(layout, bold, names: Sequence[tuple[str, str, str]], extensions: Sequence[str],
               spatial: bool):
    """The file beside the BOLD with the same identity and one of these (suffix, entity, label).

    ``spatial``: whether the companion carries the BOLD's space/res entities (the mask
    does, the confounds TSV does not). For an fMRIPrep 1.0/1.1 BOLD, its 1.0/1.1 companion.
    """
    entities = bold.get_entities()
    drop = _FILE_ENTITIES | {"label"} | (set() if spatial else _SPATIAL_ENTITIES)
    want = _identity(entities, drop)

    def same_run(file) -> bool:
        return Path(file.path).parent == Path(bold.path).parent and _identity(file.get_entities(), drop) == want

    if LEGACY_BOLD.search(Path(bold.path).name):
        suffix = "brainmask" if spatial else "confounds"
        named = [f for f in layout.get(subject=entities["subject"], suffix=suffix, extension=list(extensions))
                 if (LEGACY_MASK.search(Path(f.path).name) if spatial else f.path.endswith(LEGACY_CONFOUNDS_END))]
        return next((f for f in named if same_run(f)), None)
    for suffix, key, value in names:
        candidates = layout.get(subject=entities["subject"], suffix=suffix, extension=list(extensions),
                                **{"desc" if key == "desc" else key: value})
        matches = [f for f in candidates if same_run(f)]
        if matches:
            return matches[0]
    return None


def _header_tr(path: Path) -> float | None:
    """The repetition time in a NIfTI header (s), or None when the header holds none."""
    import nibabel as nib

    try:
        header: Any = nib.load(str(path)).header
        zooms = header.get_zooms()
        unit = header.get_xyzt_units()[1]
    except Exception as err:  # nibabel raises many types for corrupt files
        raise InputError(f"BOLD image {path} cannot be read: {err}") from None
    if len(zooms) < 4 or not zooms[3] or zooms[3] == 1.0 and unit == "unknown":
        return None
    return float(zooms[3]) / {"msec": 1000.0, "usec": 1e6}.get(unit, 1.0)


def _select_sessions(session: str | Sequence[str] | None) -> list[str] | None:
    if session is None:
        return None
    labels = [session] if isinstance(session, str) else list(session)
    return [s[4:] if s.startswith("ses-") else s for s in labels if s] or None


def find_bold_runs(
    bids_dir: str | os.PathLike,
    *,
    fmriprep_dir: str | os.PathLike | None = None,
    participant_labels: Iterable[str] | None = None,
    session: str | Sequence[str] | None = None,
    task: str = DEFAULT_TASK,
    space: str = DEFAULT_SPACE,
    resolution: str | None = None,
    bids_filter: dict[str, Any] | None = None,
    failures: Failures | None = None,
) -> list[BoldRun]:
    """Every preprocessed BOLD run matching the selection, with mask, confounds and TR.

    Parameters
    ----------
    bids_dir
        BIDS_DIR (raw dataset, or itself an fMRIPrep output).
    fmriprep_dir
        ``--fmriprep-dir``; default ``BIDS_DIR/derivatives/fmriprep`` (see
        :func:`resolve_fmriprep_dir`).
    participant_labels
        Labels with or without ``sub-``; None or empty for every participant.
    session
        Session label(s) (with or without ``ses-``); None for every session with a run
        (and for datasets without sessions).
    task, space
        Task and template space of the BOLD runs.
    resolution
        The ``res`` entity, to keep one resolution where the space exists at several
        (by default every resolution is processed, with ``res-`` in the output names).
    bids_filter
        Extra pybids filters for the BOLD query (:func:`load_bids_filters`: ``null``
        for "absent", ``"*"`` for "any"); they override ``session`` and ``task``.
    failures
        When given, a participant whose runs cannot be used (missing mask, confounds,
        RepetitionTime; TR disagreeing with the header; a failure of the program while
        reading them) is recorded here and left out instead of stopping everything.

    Returns
    -------
    list of BoldRun
        Sorted by participant, session and run entities.

    Raises
    ------
    InputError
        Unknown participant, BOLD missing or only in other spaces, missing mask,
        confounds or RepetitionTime; each message names the file or option.
    """
    bids_dir = Path(bids_dir)
    fmriprep = resolve_fmriprep_dir(bids_dir, fmriprep_dir)
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
    layout = _index(fmriprep, labels, "derivative")
    query: dict[str, Any] = {"task": task, "suffix": "bold", "desc": "preproc",
                             "extension": [".nii.gz", ".nii"]}
    sessions = _select_sessions(session)
    if sessions is not None:
        query["session"] = sessions if len(sessions) > 1 else sessions[0]
    if resolution is not None:
        query["res"] = resolution
    query.update(_pybids_filters(bids_filter or {}, "--bids-filter-file"))
    subjects = labels or available
    try:
        found = _bold_files(layout, subject=subjects, space=space, **query)
    except (ValueError, KeyError) as err:
        raise InputError(f"invalid BOLD filter ({err}); check --bids-filter-file") from None

    for subject in subjects:
        if any(f.entities["subject"] == subject for f in found):
            continue
        other = _bold_files(layout, subject=subject, **query)
        if other:
            spaces = sorted({str(f.entities.get("space", "native")) for f in other})
            message = (f"sub-{subject}: no desc-preproc_bold in space {space} in {fmriprep}; "
                       f"spaces found: {', '.join(spaces)} (use --space)")
        elif labels:
            message = f"sub-{subject}: no preprocessed BOLD ({_describe(query)}) in {fmriprep}"
        else:
            log.warning("sub-%s: no preprocessed BOLD (%s); skipped", subject, _describe(query))
            continue
        if failures is None or not found:
            raise InputError(message)
        failures.record(subject, InputError(message))
    if not found:
        hint = ""
        if sessions is not None:
            present = sorted(layout.get_sessions())
            hint = (f" (sessions present: {', '.join(present)})" if present
                    else " (the dataset has no sessions: leave out --session-label)")
        raise InputError(f"no preprocessed BOLD ({_describe(query)}, space {space}) in {fmriprep}{hint}")

    raw_dir = None if bids_dir.resolve() == fmriprep.resolve() else bids_dir
    cache: dict = {}
    runs = []
    for bold in found:
        subject = str(bold.entities["subject"])
        if failures is not None and subject in failures:
            continue
        try:
            runs.append(_bold_run(layout, bold, fmriprep, raw_dir, labels, cache))
        except Exception as err:  # one participant's failure leaves the others going
            if failures is None:
                raise
            failures.record(subject, err)
    if failures:
        runs = [r for r in runs if r.subject not in failures]
    log.info("found %d BOLD run(s) of %d participant(s) in %s", len(runs),
             len({r.subject for r in runs}), fmriprep)
    return sorted(runs, key=lambda r: (r.subject, r.session or "", r.entities.label, str(r.bold)))


def _bold_files(layout, **query: Any) -> list:
    """The preprocessed BOLD files matching a query: ``desc-preproc_bold``, and the fMRIPrep
    1.0/1.1 ``_bold_space-S_preproc`` (pybids reads its suffix as ``preproc``, without desc)."""
    legacy = {k: v for k, v in query.items() if k != "desc"} | {"suffix": "preproc"}
    return [*layout.get(**query), *(f for f in layout.get(**legacy) if LEGACY_BOLD.search(Path(f.path).name))]


def _bold_run(layout, bold, fmriprep: Path, raw_dir: Path | None, labels: Sequence[str] | None,
              cache: dict) -> BoldRun:
    path = Path(bold.path)
    mask = _companion(layout, bold, MASK_NAMES, [".nii.gz", ".nii"], spatial=True)
    if mask is None:
        raise InputError(
            f"{path}: no brain mask beside it "
            f"(expected {_expected_name(path, True, '_desc-brain_mask.nii.gz')}"
            f"{'' if LEGACY_BOLD.search(path.name) else ', or label-brain_mask'})"
        )
    confounds = _companion(layout, bold, CONFOUNDS_NAMES, [".tsv"], spatial=False)
    if confounds is None:
        raise InputError(
            f"{path}: no confounds file for this run "
            f"(expected {_expected_name(path, False, '_desc-confounds_timeseries.tsv')}"
            f"{'' if LEGACY_BOLD.search(path.name) else ', or desc-confounds_regressors.tsv before fMRIPrep 20.2'})"
        )
    tr = _repetition_time(bold, raw_dir, labels, cache)
    header = _header_tr(path)
    if header is not None and abs(header - tr) > 0.01 * tr:
        raise InputError(
            f"RepetitionTime {tr:g} s in {_expected_name(path, True, '_desc-preproc_bold.json')} (or the raw "
            f"sidecars) but {header:g} s in the NIfTI header of {path}; fix the one that is wrong"
        )
    entities = bold.get_entities()
    return BoldRun(
        subject=str(entities["subject"]),
        session=str(entities["session"]) if "session" in entities else None,
        task=str(entities["task"]),
        run=_run_label(path),
        space=str(entities["space"]),
        bold=path,
        mask=Path(mask.path),
        confounds=Path(confounds.path),
        tr=tr,
        root=fmriprep,
    )


def _run_label(path: Path) -> str | None:
    match = re.search(r"_run-([A-Za-z0-9]+)", path.name)
    return match.group(1) if match else None


def _describe(query: dict[str, Any]) -> str:
    shown = {k: v for k, v in query.items() if k not in ("suffix", "desc", "extension")}
    return ", ".join(f"{k} {getattr(v, 'name', v)}" for k, v in shown.items())
