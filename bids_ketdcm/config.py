"""Settings of each level and the feature vocabulary: one definition each, shared by the CLI and the levels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: What a model can learn from: spectral DCM A matrices, gray-matter volumes, both, or the A
#: matrices' empirical-Bayes estimates (a PEB of the training participants' DCMs in each fold).
FEATURE_SETS = ("dcm", "gmv", "dcm+gmv", "eb")


def uses_dcm(feature_sets: str | tuple[str, ...] | list[str]) -> bool:
    """Whether any of these feature sets (or this one) needs spectral DCM (``dcm``, ``dcm+gmv``, ``eb``)."""
    return bool({"dcm", "dcm+gmv", "eb"} & ({feature_sets} if isinstance(feature_sets, str) else set(feature_sets)))


def uses_gmv(feature_sets: str | tuple[str, ...] | list[str]) -> bool:
    """Whether any of these feature sets (or this one) needs gray-matter volumes (``gmv``, ``dcm+gmv``)."""
    return bool({"gmv", "dcm+gmv"} & ({feature_sets} if isinstance(feature_sets, str) else set(feature_sets)))


def feature_key(feature_set: str, network: str) -> str:
    """Key (the suite's "network" column) of a feature set of a network."""
    return network if feature_set == "dcm" else f"{feature_set}_{network}"


def split_key(key: str) -> tuple[str, str]:
    """``(feature_set, network)`` of a key made by :func:`feature_key`."""
    for fs in ("dcm+gmv", "gmv", "eb"):
        if key.startswith(fs + "_"):
            return fs, key[len(fs) + 1:]
    return "dcm", key


@dataclass
class ParticipantOptions:
    """Settings of the participant level (one field per CLI option)."""

    bids_dir: Path
    output_dir: Path
    fmriprep_dir: Path | None = None
    work_dir: Path | None = None
    participant_labels: list[str] = field(default_factory=list)
    #: Session label(s) of the BOLD runs; None: every session with a run.
    session: str | list[str] | None = None
    task: str = "rest"
    space: str = "MNI152NLin2009cAsym"
    networks: list[str] = field(default_factory=lambda: ["dmn4"])
    denoise: str = "simple"
    roi_summary: str = "eigenvariate"
    bids_filter: dict | None = None
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    jacobian: str = "analytic"
    #: Predicted-CSD model of the DCM (:data:`bids_ketdcm.dcm.model.CSD_MODELS`).
    csd_model: str = "spm12"
    max_iterations: int = 128
    batch_size: int = 32
    #: ``dcm`` and/or ``gmv`` (``dcm+gmv``: both).
    features: list[str] = field(default_factory=lambda: ["dcm"])
    #: Whole-brain atlases of the GMV features, besides the networks.
    gmv_atlases: list[str] = field(default_factory=lambda: ["power264"])
    #: Folder of saved models to predict every participant with.
    apply_model: Path | None = None
    #: Memory the app may use in MB (``--mem-mb``): bounds the DCM's batch and chunk sizes; None: no bound.
    mem_mb: int | None = None
    #: CPUs the app may keep busy (``--nprocs``): participant reports are written by this many processes,
    #: and a DCM inversion runs this many of its units (paths, groups of runs) at once, one thread each.
    nprocs: int = 1

    @property
    def one_session(self) -> str | None:
        """The session of the steps that take one (GMV, predictions): the first selected, or None."""
        if isinstance(self.session, list):
            return self.session[0] if self.session else None
        return self.session

    @property
    def wants_dcm(self) -> bool:
        """Whether spectral DCM is requested."""
        return uses_dcm(self.features)

    @property
    def wants_gmv(self) -> bool:
        """Whether gray-matter volumes are requested."""
        return uses_gmv(self.features)

#: Group models whose nested CV can be permuted with the inner search redone (binary or continuous
#: targets); here so that the CLI can offer them without importing the group level.
NESTED_PERMUTABLE = ("logistic", "svm", "elasticnet")
