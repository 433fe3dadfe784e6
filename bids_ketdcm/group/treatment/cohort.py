"""The crossover cohort of ds005917-like datasets, and the options of its treatment selection.

The randomised crossover gives each participant an outcome under both infusions: the first
infusion (``participants.tsv: infusion_1``) is the observed assignment used for training,
and the second period supplies the counterfactual, so RPL and MRR can be scored against
realised outcomes. Caveat: the second-period outcome follows the first infusion (carry-over
and period effects are ignored). Only informative participants (response under one arm
only) can tell policies apart (:func:`informative_counts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from bids_ketdcm.errors import InputError
from bids_ketdcm.group.treatment.dpnn import DPNNSettings
from bids_ketdcm.group.treatment.methods import FIXED, METHODS

log = logging.getLogger(__name__)




TREATMENT_CODES = {"d": "ketamine", "p": "placebo"}
TREATMENTS = ("ketamine", "placebo")


@dataclass(frozen=True)
class TreatmentOptions:
    """Options of the cohort's treatment selection.

    Attributes
    ----------
    methods
        Methods to compare (no ``oracle``: realised outcomes are not probabilities).
    n_splits, n_repeats, seed
        Repeated stratified k-fold settings. ``n_splits`` is lowered (with a warning) when a
        first-period arm has fewer participants.
    response_threshold
        Response = percentage MADRS improvement ``(b0 - post) / b0`` at least this.
    score_column, baseline_session, ketamine_session, placebo_session
        Phenotype column and sessions (with or without the ``ses-`` prefix).
    groups
        Values of ``participants.tsv: group`` to include (None: everyone).
    dpnn
        DPNN settings. The defaults differ from the paper's (lr 1e-4, 100 epochs, for
        thousands of patients): with about 20 training participants and batch 10 that would
        be 200 tiny updates, so lr 1e-3, 300 epochs and 3 prototypes are used.
    knn_k
        Neighbours of the case-based reasoning baseline (None: square-root rule).
    target
        ``"response"`` (per-arm response, the methods above) or also ``"difference"``: a
        ridge regression of the within-subject difference (ketamine minus placebo
        improvement), recommending ketamine where the predicted difference is positive.
    """

    methods: tuple[str, ...] = ("dpnn", "tlearner", "cbr", "kmnn", "random", *FIXED)
    n_splits: int = 5
    n_repeats: int = 10
    seed: int = 0
    response_threshold: float = 0.5
    score_column: str = "MADRS_Total"
    baseline_session: str = "b0"
    ketamine_session: str = "d2"
    placebo_session: str = "p2"
    groups: tuple[str, ...] | None = ("MDD",)
    dpnn: DPNNSettings = DPNNSettings(n_prototypes=3, lr=1e-3, epochs=300)
    knn_k: int | None = None
    target: str = "response"

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid option."""
        unknown = [m for m in self.methods if m not in (*METHODS, *FIXED) or m == "oracle"]
        if unknown or not self.methods:
            raise InputError(
                f"treatment-selection option 'methods': {unknown or 'none given'} not among "
                f"{', '.join(m for m in (*METHODS, *FIXED) if m != 'oracle')}"
            )
        if self.target not in ("response", "difference"):
            raise InputError(f"--treatment-target: 'response' or 'difference' (got {self.target!r})")
        if self.n_splits < 2:
            raise InputError(f"treatment-selection option 'n_splits' must be at least 2, got {self.n_splits}")
        if self.n_repeats < 1:
            raise InputError(f"treatment-selection option 'n_repeats' must be at least 1, got {self.n_repeats}")
        if not 0 < self.response_threshold <= 1:
            raise InputError(
                "treatment-selection option 'response_threshold' must be in (0, 1], "
                f"got {self.response_threshold}"
            )
        if self.knn_k is not None and self.knn_k < 1:
            raise InputError(f"treatment-selection option 'knn_k' must be at least 1, got {self.knn_k}")


class CohortSkip(Exception):
    """The cohort cannot support treatment selection; the message says why."""


def _subject(label: object) -> str:
    text = str(label)
    return text if text.startswith("sub-") else f"sub-{text}"


def _session(label: object) -> str:
    text = str(label)
    return text[4:] if text.startswith("ses-") else text


def build_crossover_cohort(
    participants: pd.DataFrame, phenotype: pd.DataFrame, options: TreatmentOptions
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Participants with a first-period infusion and outcomes under both infusions.

    Parameters
    ----------
    participants
        ``participants.tsv`` (``participant_id``, ``infusion_1`` with ``d``/``p``, optional
        ``group``).
    phenotype
        Long phenotype table (``participant_id``, ``session_id``, the score column).
    options
        Sessions, score column, groups and response threshold.

    Returns
    -------
    tuple
        (cohort indexed by ``participant_id`` with columns ``first_treatment``,
        ``score_baseline``, ``score_ketamine``, ``score_placebo``, ``improvement_ketamine``,
        ``improvement_placebo``, ``response_ketamine``, ``response_placebo``;
        excluded participant -> reason).

    Raises
    ------
    CohortSkip
        When a needed column is missing.
    """
    for table, name, cols in (
        (participants, "participants.tsv", ("participant_id", "infusion_1")),
        (phenotype, "phenotype", ("participant_id", "session_id", options.score_column)),
    ):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise CohortSkip(f"{name} lacks column(s) {', '.join(missing)}")
    excluded: dict[str, str] = {}
    part = participants.assign(participant_id=participants["participant_id"].map(_subject))
    part = part.drop_duplicates("participant_id").set_index("participant_id")
    if options.groups is not None and "group" in part.columns:
        for pid in part.index[~part["group"].isin(options.groups)]:
            excluded[pid] = f"group {part.at[pid, 'group']!r} not in {list(options.groups)}"
        part = part[part["group"].isin(options.groups)]
    code = part["infusion_1"].astype("string").str.strip().str.lower()
    for pid in part.index[~code.isin(list(TREATMENT_CODES))]:
        excluded[pid] = f"infusion_1 is {part.at[pid, 'infusion_1']!r}, not d (ketamine) or p (placebo)"
    part = part[code.isin(list(TREATMENT_CODES))]

    pheno = phenotype.assign(
        participant_id=phenotype["participant_id"].map(_subject),
        session=phenotype["session_id"].map(_session),
    )
    duplicated = pheno.duplicated(["participant_id", "session"])
    if duplicated.any():
        log.warning("phenotype: %d duplicated participant/session rows; the first is used", duplicated.sum())
    scores = pheno[~duplicated].pivot(index="participant_id", columns="session", values=options.score_column)
    sessions = {
        "score_baseline": options.baseline_session,
        "score_ketamine": options.ketamine_session,
        "score_placebo": options.placebo_session,
    }
    cohort = pd.DataFrame(index=part.index)
    cohort["first_treatment"] = code[part.index].map(TREATMENT_CODES).astype(str)
    for col, ses in sessions.items():
        values = scores[_session(ses)] if _session(ses) in scores.columns else pd.Series(dtype=float)
        cohort[col] = pd.to_numeric(values.reindex(cohort.index), errors="coerce")
    for pid, row in cohort.iterrows():
        lacking = [sessions[c] for c in sessions if pd.isna(row[c])]
        if lacking:
            excluded[pid] = f"no {options.score_column} at session(s) {', '.join(lacking)}"
        elif row["score_baseline"] <= 0:
            excluded[pid] = f"baseline {options.score_column} is {row['score_baseline']}, not positive"
    cohort = cohort.drop(index=[p for p in cohort.index if p in excluded])
    for arm in TREATMENTS:
        improvement = (cohort["score_baseline"] - cohort[f"score_{arm}"]) / cohort["score_baseline"]
        cohort[f"improvement_{arm}"] = improvement
        cohort[f"response_{arm}"] = (improvement >= options.response_threshold).astype(int)
    return cohort, excluded


def feature_matrix(features: pd.DataFrame, cohort: pd.DataFrame, excluded: dict[str, str]) -> pd.DataFrame:
    """Numeric feature columns of the cohort's participants with complete features.

    Participants without features or with missing values are added to ``excluded``
    (participant -> reason).

    Raises
    ------
    CohortSkip
        The table has no numeric column.
    """
    table = features.set_index("participant_id") if "participant_id" in features.columns else features
    table = table.rename(index=_subject).select_dtypes("number")
    if table.shape[1] == 0:
        raise CohortSkip("the feature table has no numeric feature columns")
    for pid in cohort.index.difference(table.index):
        excluded[pid] = "no features"
    table = table.reindex(cohort.index.intersection(table.index))
    for pid in table.index[table.isna().any(axis=1)]:
        excluded[pid] = "missing feature values"
    return table.dropna()


def informative_counts(cohort: pd.DataFrame) -> dict[str, int]:
    """Participants whose two outcomes differ: the only ones a policy can get right or wrong.

    Returns
    -------
    dict
        ``informative`` (response under one arm only), ``ketamine_only``, ``placebo_only``,
        ``both`` and ``neither``.
    """
    k, p = cohort["response_ketamine"] == 1, cohort["response_placebo"] == 1
    return {"informative": int((k != p).sum()), "ketamine_only": int((k & ~p).sum()),
            "placebo_only": int((p & ~k).sum()), "both": int((k & p).sum()), "neither": int((~k & ~p).sum())}
