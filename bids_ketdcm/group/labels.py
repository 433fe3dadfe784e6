"""Response labels and continuous targets from the BIDS phenotype (DESIGN.md section 4).

Every TSV in ``BIDS_DIR/phenotype/`` is read (with its JSON data dictionary when present);
the files that carry the depression score are used, in either layout:

* long (as ds005917): columns ``participant_id``, ``session_id`` and the score column,
  one row per participant and session;
* wide: one row per participant and one column per session, named
  ``<score>_<ses>``, ``<score>_ses-<ses>``, ``<ses>_<score>`` or ``ses-<ses>_<score>``
  (for example ``MADRS_Total_b0``); in a file named after the score
  (``phenotype/MADRS_Total.tsv``) bare ``ses-<ses>`` or ``<ses>`` columns also count.

The percentage improvement is ``r = (score_baseline - score_post) / score_baseline``;
``post`` is the ketamine session (``d2``) for the ketamine analysis and the placebo
session (``p2``) for the placebo analysis. A participant lacking either score, or with
a zero baseline, is left out of that analysis with a logged reason.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm.bids.naming import normalise_participant, normalise_session
from bids_ketdcm.errors import InputError

log = logging.getLogger(__name__)

#: The two analyses: the post-treatment session of each is given by the options.
TREATMENTS = ("ketamine", "placebo")
#: Continuous targets: the post-treatment score, its drop from baseline, and ``r``.
TARGETS = ("post", "delta", "improvement")


@dataclass(frozen=True)
class Scheme:
    """A label scheme: ordered class names and the thresholds that separate them.

    Attributes
    ----------
    name
        Scheme name (``binary50`` ...).
    variable
        ``"improvement"`` (the fraction r) or ``"post"`` (the post-treatment score).
    edges
        Increasing thresholds; class ``i`` holds values in ``[edges[i-1], edges[i])``
        for ``improvement``. For ``post`` (remission) the single edge is an inclusive
        upper bound of the positive class.
    classes
        Class names, ordinal, the positive (best outcome) class last.
    """

    name: str
    variable: str
    edges: tuple[float, ...]
    classes: tuple[str, ...]

    def assign(self, improvement: np.ndarray, post: np.ndarray) -> np.ndarray:
        """Class index (0 .. len(classes)-1) of each participant.

        Parameters
        ----------
        improvement, post
            Fraction improvement r and post-treatment score, same length, finite.

        Returns
        -------
        numpy.ndarray
            Integer class indices.
        """
        if self.variable == "post":
            return (np.asarray(post) <= self.edges[0]).astype(int)
        # Rounding makes r = 3/30 land exactly on the 0.10 edge whatever the arithmetic.
        r = np.round(np.asarray(improvement, dtype=float), 12)
        return np.searchsorted(np.asarray(self.edges), r, side="right").astype(int)


def make_schemes(remission_threshold: float = 10.0) -> dict[str, Scheme]:
    """The label schemes of DESIGN.md section 4, keyed by name.

    Parameters
    ----------
    remission_threshold
        Post-treatment score at or below which a participant remits (MADRS: 10).

    Returns
    -------
    dict of str to Scheme
    """
    return {
        "binary50": Scheme("binary50", "improvement", (0.50,), ("nonresponse", "response")),
        "binary25": Scheme("binary25", "improvement", (0.25,), ("nonresponse", "response")),
        "remission": Scheme(
            "remission", "post", (float(remission_threshold),), ("nonremission", "remission")
        ),
        "tri": Scheme("tri", "improvement", (0.10, 0.50), ("nonresponse", "partial", "response")),
        "quad": Scheme(
            "quad", "improvement", (-0.10, 0.10, 0.50), ("worse", "stable", "partial", "response")
        ),
        "five": Scheme(
            "five",
            "improvement",
            (-0.10, 0.10, 0.25, 0.50),
            ("worse", "stable", "mild", "strong", "response"),
        ),
    }


#: Scheme names in their canonical order.
SCHEME_NAMES = tuple(make_schemes())


@dataclass
class LabelSet:
    """Labels and targets of every included participant, and the exclusion log.

    Attributes
    ----------
    table
        One row per participant included in at least one analysis (index
        ``participant_id``). Columns: ``group`` (when participants.tsv has one),
        ``baseline``; for the ketamine analysis ``post``, ``delta``, ``improvement`` and
        one column per scheme (class names); the same prefixed ``placebo_`` for placebo.
        Missing values (participant not in that analysis) are NaN.
    excluded
        Columns ``participant_id``, ``analysis``, ``reason``: every participant left
        out of an analysis, and why.
    schemes
        The schemes used, by name.
    score_column
        Name of the score column in the phenotype.
    score_description
        Its description from the JSON data dictionary (empty when there is none).
    sources
        Phenotype files the scores came from.
    """

    table: pd.DataFrame
    excluded: pd.DataFrame
    schemes: dict[str, Scheme]
    score_column: str
    score_description: str = ""
    sources: list[str] = field(default_factory=list)

    @staticmethod
    def column(treatment: str, name: str) -> str:
        """Column of ``table`` holding target or scheme ``name`` of ``treatment``."""
        return name if treatment == "ketamine" else f"{treatment}_{name}"

    def target(self, treatment: str, name: str) -> pd.Series:
        """Non-missing values of a scheme or continuous target for one analysis.

        Parameters
        ----------
        treatment
            ``"ketamine"`` or ``"placebo"``.
        name
            A scheme name (values are class names) or one of :data:`TARGETS`.

        Returns
        -------
        pandas.Series
            Indexed by participant_id.
        """
        col = self.column(treatment, name)
        if col not in self.table:
            return pd.Series(dtype=object if name in self.schemes else float)
        return self.table[col].dropna()

    def counts(self, treatment: str, scheme: str) -> dict[str, int]:
        """Number of participants per class (all classes, zeros included)."""
        values = self.target(treatment, scheme)
        return {c: int((values == c).sum()) for c in self.schemes[scheme].classes}


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(
            path, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a", ""]
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a TSV table ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _read_dictionary(tsv: Path) -> dict:
    sidecar = tsv.with_suffix(".json")
    if not sidecar.is_file():
        log.warning("%s has no JSON data dictionary (%s)", tsv, sidecar.name)
        return {}
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{sidecar}: invalid JSON ({exc})") from None


def _wide_columns(table: pd.DataFrame, score: str, stem: str) -> dict[str, str]:
    """Map session -> column for a wide-format table (empty when none match)."""
    out: dict[str, str] = {}
    for col in table.columns:
        ses = None
        for prefix in (f"{score}_ses-", f"{score}_"):
            if col.startswith(prefix) and len(col) > len(prefix):
                ses = col[len(prefix):]
                break
        if ses is None and col.endswith(f"_{score}") and len(col) > len(score) + 1:
            ses = col[: -len(score) - 1]
        if ses is None and stem.lower() == score.lower() and col != "participant_id":
            ses = col
        if ses is not None:
            out[normalise_session(ses)] = col
    return out


def _numeric(values: pd.Series, path: Path, column: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = values[numbers.isna() & values.notna()]
    if len(bad):
        shown = ", ".join(sorted({repr(v) for v in bad})[:5])
        raise InputError(
            f"{path}: column {column!r} holds values that are not numbers or n/a: {shown}"
        )
    if (numbers < 0).any():
        raise InputError(f"{path}: column {column!r} holds negative scores")
    return numbers.astype(float)


def read_scores(bids_dir: str | Path, score_column: str) -> tuple[pd.DataFrame, str, list[str]]:
    """Read one score per participant and session from every phenotype TSV.

    Parameters
    ----------
    bids_dir
        Root of the BIDS dataset.
    score_column
        Name of the score (``MADRS_Total``).

    Returns
    -------
    scores : pandas.DataFrame
        Columns ``participant_id`` (with ``sub-``), ``session`` (without ``ses-``),
        ``score`` (float, NaN for n/a).
    description : str
        The score's description from the data dictionary ('' if none).
    sources : list of str
        Files that contributed scores.

    Raises
    ------
    InputError
        No phenotype folder or TSV, no file with the score, unreadable or non-numeric
        values, or two different scores for one participant and session.
    """
    folder = Path(bids_dir) / "phenotype"
    if not folder.is_dir():
        raise InputError(
            f"{folder}: no phenotype/ folder in the BIDS dataset; the group level needs the "
            f"{score_column} scores there (long or wide TSV)"
        )
    files = sorted(folder.glob("*.tsv"))
    if not files:
        raise InputError(f"{folder}: the phenotype/ folder holds no .tsv file")
    parts, sources, description = [], [], ""
    seen_columns: dict[str, list[str]] = {}
    for path in files:
        table = _read_tsv(path)
        seen_columns[path.name] = list(table.columns)
        if "participant_id" not in table:
            log.warning("%s has no participant_id column; skipped", path)
            continue
        ids = table["participant_id"].map(normalise_participant)
        dictionary = _read_dictionary(path)
        if score_column in table and "session_id" in table:
            long = pd.DataFrame(
                {
                    "participant_id": ids,
                    "session": table["session_id"].map(
                        lambda s: normalise_session(s) if isinstance(s, str) else np.nan
                    ),
                    "score": _numeric(table[score_column], path, score_column),
                }
            )
            long = long.dropna(subset=["session"])
            described = score_column
        elif "session_id" in table:  # a long table without this score
            continue
        else:
            wide = _wide_columns(table, score_column, path.stem)
            if not wide:
                continue
            long = pd.concat(
                [
                    pd.DataFrame(
                        {
                            "participant_id": ids,
                            "session": ses,
                            "score": _numeric(table[col], path, col),
                        }
                    )
                    for ses, col in wide.items()
                ],
                ignore_index=True,
            )
            described = next(iter(wide.values()))
        entry = dictionary.get(score_column) or dictionary.get(described) or {}
        description = description or (entry.get("Description", "") if isinstance(entry, dict) else "")
        parts.append(long)
        sources.append(str(path))
    if not parts:
        shown = "; ".join(f"{name}: {', '.join(cols[:8])}" for name, cols in seen_columns.items())
        raise InputError(
            f"--score-column {score_column!r} not found in any phenotype TSV of {folder} "
            f"(neither a long table with session_id and {score_column}, nor wide columns "
            f"like {score_column}_<session>). Columns found: {shown}"
        )
    scores = pd.concat(parts, ignore_index=True).dropna(subset=["score"])
    scores = scores.drop_duplicates()
    clash = scores[scores.duplicated(["participant_id", "session"], keep=False)]
    if len(clash):
        first = clash.iloc[0]
        raise InputError(
            f"{folder}: {len(clash)} conflicting {score_column} values for one participant "
            f"and session (e.g. {first.participant_id} ses-{first.session}: "
            f"{sorted(clash[(clash.participant_id == first.participant_id) & (clash.session == first.session)].score)})"
        )
    return scores.reset_index(drop=True), description, sources


def read_participants(bids_dir: str | Path) -> pd.DataFrame | None:
    """participants.tsv indexed by participant_id, or None when the file is absent."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return None
    table = _read_tsv(path)
    if "participant_id" not in table:
        raise InputError(f"{path}: no participant_id column")
    table["participant_id"] = table["participant_id"].map(normalise_participant)
    return table.drop_duplicates("participant_id").set_index("participant_id")


def check_single_group(participants: pd.DataFrame | None, path: Path) -> None:
    """Refuse a cohort that mixes several participants.tsv groups when none was chosen.

    Parameters
    ----------
    participants
        participants.tsv indexed by participant_id (None when absent: nothing to check).
    path
        Its path, for the message.

    Raises
    ------
    InputError
        The ``group`` column holds more than one value: patients and controls are never
        analysed together silently; the message lists the groups and their counts and
        names ``--include-group``.
    """
    if participants is None or "group" not in participants:
        return
    counts = participants["group"].dropna().value_counts()
    if len(counts) > 1:
        listed = ", ".join(f"{g} ({n})" for g, n in counts.items())
        raise InputError(
            f"{path}: column 'group' holds {len(counts)} groups: {listed}. Choose the cohort with "
            f"--include-group (repeatable), e.g. --include-group {counts.index[0]}; patients and "
            "controls are never analysed together without it"
        )


def _check_session(scores: pd.DataFrame, session: str, option: str, folder: Path) -> None:
    present = sorted(scores["session"].unique())
    if session not in present:
        raise InputError(
            f"{option} {session!r}: no such session in the phenotype of {folder} "
            f"(sessions with scores: {', '.join('ses-' + s for s in present) or 'none'})"
        )


def build_labels(
    bids_dir: str | Path,
    score_column: str = "MADRS_Total",
    baseline_session: str = "b0",
    post_session: str = "d2",
    placebo_session: str | None = "p2",
    include_group: tuple[str, ...] | None = None,
    remission_threshold: float = 10.0,
) -> LabelSet:
    """Build every label scheme and continuous target from the phenotype.

    Parameters
    ----------
    bids_dir
        BIDS dataset root (with ``phenotype/`` and, for ``include_group``,
        ``participants.tsv``).
    score_column
        Score column (``--score-column``).
    baseline_session, post_session, placebo_session
        Sessions (with or without ``ses-``). ``placebo_session=None`` skips placebo; a
        placebo session absent from the phenotype is skipped with a warning.
    include_group
        Keep only participants whose participants.tsv ``group`` is one of these.
    remission_threshold
        Post score at or below which a participant remits.

    Returns
    -------
    LabelSet

    Raises
    ------
    InputError
        Missing folder, column, file or session; a group not in participants.tsv; no
        participant left for the ketamine analysis.
    """
    bids_dir = Path(bids_dir)
    scores, description, sources = read_scores(bids_dir, score_column)
    baseline_session = normalise_session(baseline_session)
    post_session = normalise_session(post_session)
    folder = bids_dir / "phenotype"
    _check_session(scores, baseline_session, "--baseline-session", folder)
    _check_session(scores, post_session, "--post-session", folder)
    analyses = {"ketamine": post_session}
    if placebo_session is not None:
        placebo_session = normalise_session(placebo_session)
        if placebo_session in set(scores["session"]):
            analyses["placebo"] = placebo_session
        else:
            log.warning(
                "--placebo-session %r has no scores in the phenotype; the placebo "
                "specificity analysis is skipped",
                placebo_session,
            )

    participants = read_participants(bids_dir)
    if not include_group:
        check_single_group(participants, bids_dir / "participants.tsv")
    listed = set(participants.index) if participants is not None else set()
    everyone = sorted(set(scores["participant_id"]) | listed)
    excluded: list[tuple[str, str, str]] = []
    keep = list(everyone)
    if include_group:
        if participants is None or "group" not in participants:
            raise InputError(
                f"--include-group {' '.join(include_group)}: needs a 'group' column in "
                f"{bids_dir / 'participants.tsv'}"
            )
        known = set(participants["group"].dropna())
        unknown = [g for g in include_group if g not in known]
        if unknown:
            raise InputError(
                f"--include-group: {', '.join(unknown)} not a group in "
                f"{bids_dir / 'participants.tsv'} (groups: {', '.join(sorted(known))})"
            )
        keep = []
        reason: str | None
        for pid in everyone:
            group = participants["group"].get(pid) if pid in participants.index else None
            if pid not in participants.index:
                reason = "not in participants.tsv (--include-group needs its group)"
            elif group not in include_group:
                shown = group if isinstance(group, str) else "n/a"
                reason = f"group {shown} not in --include-group {' '.join(include_group)}"
            else:
                keep.append(pid)
                continue
            excluded.extend((pid, a, reason) for a in analyses)

    if not keep:
        raise InputError(f"--include-group {' '.join(include_group or ())}: no participant left")
    wide = scores.pivot(index="participant_id", columns="session", values="score")
    schemes = make_schemes(remission_threshold)
    table = pd.DataFrame(index=pd.Index(keep, name="participant_id"))
    if participants is not None and "group" in participants:
        table["group"] = participants["group"].reindex(table.index)
    table["baseline"] = wide[baseline_session].reindex(table.index)
    included_any = pd.Series(False, index=table.index)
    for treatment, session in analyses.items():
        post = wide[session].reindex(table.index)
        ok = pd.Series(True, index=table.index)
        for pid in table.index:
            b, p = table.at[pid, "baseline"], post.get(pid, np.nan)
            reason = None
            if pid not in wide.index:
                reason = f"no {score_column} in the phenotype"
            elif np.isnan(b) and np.isnan(p):
                reason = f"{score_column} missing (n/a or no row) at ses-{baseline_session} and ses-{session}"
            elif np.isnan(b):
                reason = f"{score_column} missing (n/a or no row) at baseline ses-{baseline_session}"
            elif np.isnan(p):
                reason = f"{score_column} missing (n/a or no row) at ses-{session}"
            elif b == 0:
                reason = f"baseline {score_column} is 0: percentage improvement undefined"
            if reason:
                ok[pid] = False
                excluded.append((pid, treatment, reason))
        b, p = table["baseline"][ok], post[ok]
        improvement = (b - p) / b
        cols = {"post": p, "delta": b - p, "improvement": improvement}
        for name, scheme in schemes.items():
            idx = scheme.assign(improvement.to_numpy(), p.to_numpy())
            cols[name] = pd.Series(np.asarray(scheme.classes, dtype=object)[idx], index=b.index)
        for name, values in cols.items():
            table[LabelSet.column(treatment, name)] = values.reindex(table.index)
        included_any |= ok
        log.info(
            "%s labels (ses-%s vs ses-%s): %d participants, %d excluded",
            treatment, baseline_session, session, int(ok.sum()), int((~ok).sum()),
        )
    for pid, analysis, reason in excluded:
        log.info("excluded %s from the %s analysis: %s", pid, analysis, reason)
    if not table["improvement"].notna().any():
        raise InputError(
            f"no participant has {score_column} at both ses-{baseline_session} and "
            f"ses-{post_session} with a non-zero baseline"
            + (f" in --include-group {' '.join(include_group)}" if include_group else "")
        )
    table = table[included_any]
    excluded_df = pd.DataFrame(excluded, columns=["participant_id", "analysis", "reason"])
    return LabelSet(
        table=table,
        excluded=excluded_df.sort_values(["analysis", "participant_id"], kind="stable").reset_index(drop=True),
        schemes=schemes,
        score_column=score_column,
        score_description=description,
        sources=sources,
    )


def labels_sidecar(labels: LabelSet, baseline_session: str, sessions: dict[str, str]) -> dict:
    """BIDS-style JSON data dictionary for ``group/labels.tsv``.

    Parameters
    ----------
    labels
        The label set written.
    baseline_session
        Baseline session label.
    sessions
        Post session of each analysis present (``{"ketamine": "d2", ...}``).

    Returns
    -------
    dict
    """
    score = labels.score_column
    out: dict[str, dict] = {
        "participant_id": {"Description": "Participant identifier"},
        "baseline": {"Description": f"{score} at ses-{baseline_session}. {labels.score_description}".strip()},
    }
    if "group" in labels.table:
        out["group"] = {"Description": "Group from participants.tsv"}
    for treatment, session in sessions.items():
        col = partial(LabelSet.column, treatment)
        out[col("post")] = {"Description": f"{score} at ses-{session} ({treatment})"}
        out[col("delta")] = {"Description": f"baseline minus {score} at ses-{session}"}
        out[col("improvement")] = {
            "Description": f"fraction improvement r = (baseline - ses-{session}) / baseline"
        }
        for scheme in labels.schemes.values():
            if scheme.variable == "post":
                rule = f"remission: {score} at ses-{session} <= {scheme.edges[0]:g}"
            else:
                bounds = ["-inf", *[f"{e:g}" for e in scheme.edges], "inf"]
                rule = "; ".join(
                    f"{c}: {bounds[i]} <= r < {bounds[i + 1]}" for i, c in enumerate(scheme.classes)
                )
            out[col(scheme.name)] = {
                "Description": f"{scheme.name} label ({treatment}): {rule}",
                "Levels": {c: c for c in scheme.classes},
            }
    return out
