"""The one builder and parser of this app's derivative file names.

Every output of the participant level is named from the entities of the fMRIPrep BOLD run
it comes from, so that runs which differ in any entity keep distinct outputs:
``sub``, ``ses``, ``task``, ``acq``, ``ce``, ``rec``, ``dir``, ``run``, ``echo`` and the
spatial ``space``, ``res``, ``den``, in the order of the BIDS schema. The measure-specific
entities follow:

* ROI time series (BEP012): ``<run>_space-S[_res-R]_seg-NET_desc-denoised_timeseries.tsv``;
* the voxels of the network's regions on the BOLD grid (a BIDS mask):
  ``<run>_space-S[_res-R]_desc-NET_mask.nii.gz``;
* effective connectivity (BEP017): ``<run>_space-S[_res-R]_seg-NET_meas-dcm_relmat.tsv``
  (rows are targets, columns sources, in Hz), with the full posterior beside it
  (``..._meas-dcm_posterior.npz``, a file BIDS has no place for).

The group level and the readers parse these names with :func:`parse_name`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: Entities that identify a BOLD run (and every output made from it), in BIDS order.
RUN_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo")
#: Spatial entities of the BOLD kept in the output names (``seg`` goes between space and res).
SPATIAL_ENTITIES = ("space", "res", "den")
#: pybids entity names of the short BIDS keys.
PYBIDS_NAMES = {"sub": "subject", "ses": "session", "task": "task", "acq": "acquisition",
                "ce": "ceagent", "rec": "reconstruction", "dir": "direction", "run": "run",
                "echo": "echo", "space": "space", "res": "res", "den": "den"}
#: Measure label of the connectivity files (``meas-``) and their suffix (BEP017).
CONNECTIVITY_MEASURE = "dcm"
CONNECTIVITY_SUFFIX = "relmat"
#: ``desc-`` and suffix of the ROI time series (BEP012).
TIMESERIES_DESC = "denoised"
TIMESERIES_SUFFIX = "timeseries"
#: End of the regional gray-matter volume tables.
GMV_SUFFIX = "_desc-gmv_morph.tsv"

_LABEL = re.compile(r"[A-Za-z0-9]+")


def parse_name(path: str | Path) -> dict[str, str]:
    """Entities of a BIDS file name, plus ``suffix`` and ``extension``.

    Parameters
    ----------
    path
        A file name or path such as ``sub-1_task-rest_seg-dmn4_meas-dcm_relmat.tsv``.

    Returns
    -------
    dict
        Short entity keys (``sub``, ``ses`` ...) to labels, ``suffix`` and ``extension``
        (with its dot, e.g. ``.tsv`` or ``.nii.gz``).
    """
    name = Path(path).name
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    out: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if sep:
            out[key] = value
    out["suffix"] = parts[-1]
    out["extension"] = dot + ext
    return out


@dataclass(frozen=True)
class RunEntities:
    """The entities identifying one BOLD run: the start of every output name made from it.

    Attributes
    ----------
    entities
        ``(key, label)`` pairs in BIDS order, keys from :data:`RUN_ENTITIES` and
        :data:`SPATIAL_ENTITIES` (``sub``, ``task`` and ``space`` always present).
    """

    entities: tuple[tuple[str, str], ...]

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> RunEntities:
        """Build from short keys (``sub``, ``ses`` ...); None values and other keys are dropped."""
        pairs = []
        for key in (*RUN_ENTITIES, *SPATIAL_ENTITIES):
            value = values.get(key)
            if value is None or value == "":
                continue
            label = str(value)
            if not _LABEL.fullmatch(label):
                raise ValueError(f"entity {key}-{label}: a BIDS label holds letters and digits only")
            pairs.append((key, label))
        for required in ("sub", "task", "space"):
            if required not in dict(pairs):
                raise ValueError(f"a run needs the {required} entity (got {dict(pairs)})")
        return cls(tuple(pairs))

    @classmethod
    def from_path(cls, path: str | Path, space: str | None = None) -> RunEntities:
        """The run entities of an fMRIPrep file name (``space`` overrides the file's)."""
        values: dict[str, object] = dict(parse_name(path))
        if space is not None:
            values["space"] = space
        return cls.from_mapping(values)

    def get(self, key: str) -> str | None:
        """Label of one entity, or None when absent."""
        return dict(self.entities).get(key)

    @property
    def subject(self) -> str:
        """Participant label without ``sub-``."""
        return dict(self.entities)["sub"]

    @property
    def session(self) -> str | None:
        """Session label without ``ses-``, or None."""
        return self.get("ses")

    @property
    def task(self) -> str:
        """Task label."""
        return dict(self.entities)["task"]

    @property
    def run(self) -> str | None:
        """Run label as in the file name, or None."""
        return self.get("run")

    @property
    def label(self) -> str:
        """Readable run label: every run entity but ``sub`` (e.g. ``ses-b0_task-rest_acq-fast_run-01``)."""
        return "_".join(f"{k}-{v}" for k, v in self.entities if k in RUN_ENTITIES and k != "sub")

    def folder(self, output_dir: str | os.PathLike) -> Path:
        """``OUTPUT_DIR/sub-X[/ses-Y]/func``."""
        out = Path(output_dir) / f"sub-{self.subject}"
        if self.session:
            out = out / f"ses-{self.session}"
        return out / "func"

    def stem(self, seg: str) -> str:
        """Name up to ``seg-<network>``: the run entities, space, seg, then res and den."""
        run = [f"{k}-{v}" for k, v in self.entities if k in RUN_ENTITIES or k == "space"]
        tail = [f"{k}-{v}" for k, v in self.entities if k in ("res", "den")]
        return "_".join([*run, f"seg-{seg}", *tail])


def connectivity_paths(output_dir: str | os.PathLike, run: RunEntities, seg: str) -> dict[str, Path]:
    """Paths of a run's DCM outputs: ``tsv``, ``json`` (BEP017 relmat) and ``npz`` (posterior)."""
    stem = run.folder(output_dir) / f"{run.stem(seg)}_meas-{CONNECTIVITY_MEASURE}"
    return {
        "tsv": stem.with_name(f"{stem.name}_{CONNECTIVITY_SUFFIX}.tsv"),
        "json": stem.with_name(f"{stem.name}_{CONNECTIVITY_SUFFIX}.json"),
        "npz": stem.with_name(f"{stem.name}_posterior.npz"),
    }


def timeseries_paths(output_dir: str | os.PathLike, run: RunEntities, seg: str) -> dict[str, Path]:
    """Paths of a run's denoised ROI time series: ``tsv`` and ``json`` (BEP012)."""
    stem = run.folder(output_dir) / f"{run.stem(seg)}_desc-{TIMESERIES_DESC}_{TIMESERIES_SUFFIX}"
    return {"tsv": stem.with_name(stem.name + ".tsv"), "json": stem.with_name(stem.name + ".json")}


def roi_mask_path(output_dir: str | os.PathLike, run: RunEntities, seg: str) -> Path:
    """The voxels a network's series were made of, on the BOLD grid: ``<run>_space-S[_res-R]_desc-NET_mask.nii.gz``.

    A BIDS ``func`` mask (the schema has no ``seg`` entity for masks: the network is the ``desc``).
    """
    head = [f"{k}-{v}" for k, v in run.entities if k in RUN_ENTITIES or k in ("space", "res")]
    return run.folder(output_dir) / ("_".join([*head, f"desc-{seg}"]) + "_mask.nii.gz")


def connectivity_glob(session: str | None = None) -> str:
    """Glob pattern (relative to OUTPUT_DIR) of the connectivity TSVs, of one session or all."""
    folder = f"sub-*/ses-{session}/func" if session else "sub-*/**/func"
    return f"{folder}/*_meas-{CONNECTIVITY_MEASURE}_{CONNECTIVITY_SUFFIX}.tsv"


def is_connectivity(path: str | Path) -> bool:
    """Whether a file name is one of this app's connectivity TSVs."""
    ent = parse_name(path)
    return (ent.get("meas") == CONNECTIVITY_MEASURE and ent["suffix"] == CONNECTIVITY_SUFFIX
            and ent["extension"] == ".tsv" and "seg" in ent)


def gmv_path(output_dir: str | os.PathLike, subject: str, session: str | None, space: str, seg: str) -> Path:
    """``OUTPUT_DIR/sub-X[/ses-Y]/anat/sub-X[_ses-Y]_space-S_seg-NET_desc-gmv_morph.tsv``."""
    folder = Path(output_dir) / f"sub-{subject}"
    stem = f"sub-{subject}"
    if session:
        folder, stem = folder / f"ses-{session}", f"{stem}_ses-{session}"
    return folder / "anat" / f"{stem}_space-{space}_seg-{seg}{GMV_SUFFIX}"


def bids_uri(path: str | os.PathLike, root: str | os.PathLike, name: str) -> str:
    """A file of an input dataset as a BIDS URI, ``bids:<name>:<path inside the dataset>``."""
    return f"bids:{name}:{Path(path).resolve().relative_to(Path(root).resolve()).as_posix()}"


def normalise_session(session: str) -> str:
    """Session label without the ``ses-`` prefix (``ses-b0`` and ``b0`` -> ``b0``)."""
    session = str(session).strip()
    return session[4:] if session.startswith("ses-") else session


def normalise_participant(label: str) -> str:
    """Participant id with the ``sub-`` prefix (``MOA101`` -> ``sub-MOA101``)."""
    label = str(label).strip()
    return label if label.startswith("sub-") else f"sub-{label}"
