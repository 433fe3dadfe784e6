"""fMRIPrep 1.0/1.1 confounds in the names of later versions, so that nilearn reads them.

fMRIPrep 1.0 and 1.1 wrote ``<run>_bold_confounds.tsv`` with CamelCase columns (their
``docs/outputs.rst`` and ``workflows/bold/confounds.py``): ``CSF``, ``WhiteMatter``,
``GlobalSignal``, ``stdDVARS``, ``non-stdDVARS``, ``vx-wisestdDVARS``,
``FramewiseDisplacement``, ``tCompCorXX``, ``aCompCorXX``, ``CosineXX``,
``NonSteadyStateOutlierXX``, the motion parameters ``X Y Z RotX RotY RotZ`` (mm and rad, as
the later ``trans_*``/``rot_*``) and, with ICA-AROMA, ``AROMAAggrCompXX``. nilearn refuses
these names (it supports fMRIPrep 1.2 and later) and finds a run's confounds by the name of
its BOLD image, which 1.x named ``<run>_bold_space-S_preproc.nii.gz``.

:func:`modern_confounds` writes, in the work folder (the inputs are never modified):

- the table with the later names (``trans_x`` ... ``framewise_displacement``, ``std_dvars``,
  ``dvars``, ``a_comp_cor_XX``, ``t_comp_cor_XX``, ``cosineXX``,
  ``non_steady_state_outlierXX``, ``aroma_motion_XX``), plus the expansions fMRIPrep 1.4
  added (``_derivative1`` the backward difference, n/a in the first row; ``_power2`` the
  square; ``_derivative1_power2``) of the motion parameters and the CSF, white-matter and
  global signals, so that every denoising preset finds its columns;
- its JSON sidecar, describing each aCompCor component as computed in the combined WM+CSF
  mask (as 1.x did) and each tCompCor component, for nilearn's CompCor strategies;
- beside them a link named ``<run>_space-S_desc-preproc_bold.nii.gz`` to the BOLD image,
  the name nilearn looks the confounds up by.

Columns with no later counterpart (``vx-wisestdDVARS``) are left out and listed in the
record of the translation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from bids_ketdcm.bids.layout import LEGACY_BOLD, LEGACY_CONFOUNDS_END
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import write_json, write_tsv

#: fMRIPrep 1.0/1.1 column -> the name fMRIPrep 1.2 and later give it.
LEGACY_COLUMNS = {
    "X": "trans_x", "Y": "trans_y", "Z": "trans_z", "RotX": "rot_x", "RotY": "rot_y", "RotZ": "rot_z",
    "CSF": "csf", "WhiteMatter": "white_matter", "GlobalSignal": "global_signal",
    "FramewiseDisplacement": "framewise_displacement", "stdDVARS": "std_dvars", "non-stdDVARS": "dvars",
}
#: Numbered fMRIPrep 1.0/1.1 columns (``aCompCor00``): prefix -> the later prefix (same number).
LEGACY_PREFIXES = {
    "aCompCor": "a_comp_cor_", "tCompCor": "t_comp_cor_", "Cosine": "cosine",
    "NonSteadyStateOutlier": "non_steady_state_outlier", "AROMAAggrComp": "aroma_motion_",
}
#: Columns fMRIPrep 1.4 and later also give derivatives and squares of (nilearn's "full" models).
EXPANDED = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "csf", "white_matter", "global_signal")


def is_legacy(confounds: str | os.PathLike) -> bool:
    """Whether a confounds file is named as fMRIPrep 1.0/1.1 named them (``_bold_confounds.tsv``)."""
    return Path(confounds).name.endswith(LEGACY_CONFOUNDS_END)


def modern_name(column: str) -> str | None:
    """The later name of an fMRIPrep 1.0/1.1 confound column, None when it has none.

    Parameters
    ----------
    column
        A column of a 1.0/1.1 confounds table (e.g. ``RotX``, ``aCompCor03``).

    Returns
    -------
    str or None
        E.g. ``rot_x``, ``a_comp_cor_03``; None for ``vx-wisestdDVARS`` or an unknown column.
    """
    if column in LEGACY_COLUMNS:
        return LEGACY_COLUMNS[column]
    for prefix, later in LEGACY_PREFIXES.items():
        number = column.removeprefix(prefix)
        if number != column and number.isdigit():
            return later + number
    return None


def modern_confounds(bold: str | os.PathLike, confounds: str | os.PathLike,
                     work_dir: str | os.PathLike) -> tuple[Path, Path, dict]:
    """Write an fMRIPrep 1.0/1.1 run's confounds with the later names, where nilearn finds them.

    Parameters
    ----------
    bold
        The run's ``<run>_bold_space-S_preproc.nii[.gz]``.
    confounds
        Its ``<run>_bold_confounds.tsv``.
    work_dir
        The work folder: the files go to ``work_dir/fmriprep1-confounds/<digest>/`` (one
        folder per input BOLD path, so concurrent jobs and datasets never share one).

    Returns
    -------
    bold_link : Path
        ``<run>_space-S_desc-preproc_bold.nii[.gz]``, a link to ``bold``: give it to nilearn.
    table : Path
        ``<run>_desc-confounds_timeseries.tsv`` beside it, the translated table.
    record : dict
        The translation for the sidecars: ``Source`` (the input table's name), ``Renamed``
        (old -> new), ``Added`` (the expansions) and ``LeftOut`` (columns without a later name).

    Raises
    ------
    InputError
        The BOLD is not named as fMRIPrep 1.0/1.1 named it, or the table cannot be read.
    """
    bold, confounds = Path(bold), Path(confounds)
    match = LEGACY_BOLD.search(bold.name)
    if match is None:
        raise InputError(f"{bold}: not an fMRIPrep 1.0/1.1 BOLD name (<run>_bold_space-S_preproc.nii.gz), "
                         f"so its confounds {confounds} cannot be matched to it")
    try:
        table = pd.read_csv(confounds, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"confounds file {confounds} cannot be read: {err}") from None
    renamed = {c: modern_name(c) for c in table.columns}
    left_out = [c for c, new in renamed.items() if new is None]
    # the renamed columns keep the input's own text (its values are checked where they are used)
    out = table[[c for c in table.columns if renamed[c] is not None]].rename(columns=renamed)
    added = []
    for column in [c for c in EXPANDED if c in out]:
        values = pd.to_numeric(out[column].str.strip().replace("n/a", ""), errors="coerce")
        derivative = values.diff()
        expansions = {"_derivative1": derivative, "_power2": values**2, "_derivative1_power2": derivative**2}
        for suffix, series in expansions.items():
            out[column + suffix] = series
            added.append(column + suffix)
    digest = hashlib.sha1(str(bold.resolve()).encode()).hexdigest()[:16]
    folder = Path(work_dir) / "fmriprep1-confounds" / digest
    head = bold.name[: match.start()]
    extension = ".nii.gz" if bold.name.endswith(".gz") else ".nii"
    link = folder / f"{head}_space-{match.group(1)}_desc-preproc_bold{extension}"
    target = folder / f"{head}_desc-confounds_timeseries.tsv"
    write_tsv(target, out)
    write_json(target.with_suffix(".json"), _components(out.columns))
    _link(link, bold.resolve())
    record = {"Source": confounds.name, "Renamed": {k: v for k, v in renamed.items() if v is not None},
              "Added": added, "LeftOut": left_out}
    return link, target, record


def _components(columns: pd.Index) -> dict:
    """The JSON sidecar nilearn's CompCor strategies read: 1.x computed aCompCor in the combined mask."""
    meta = {}
    for column in columns:
        if column.startswith("a_comp_cor_"):
            meta[column] = {"Method": "aCompCor", "Mask": "combined", "Retained": True}
        elif column.startswith("t_comp_cor_"):
            meta[column] = {"Method": "tCompCor", "Retained": True}
    return meta


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a concurrent job may make the same link)."""
    if link.is_symlink() and link.resolve() == target:
        return
    spare = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    spare.unlink(missing_ok=True)
    spare.symlink_to(target)
    os.replace(spare, link)
