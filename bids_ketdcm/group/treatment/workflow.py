"""Treatment selection on a crossover cohort: cross-validated methods and fixed policies,
tests against the best fixed policy, tables, figure (:func:`run_treatment_selection`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.linear_model import Ridge
from sklearn.model_selection import RepeatedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bids_ketdcm.group.treatment.cohort import (
    TREATMENTS,
    CohortSkip,
    TreatmentOptions,
    build_crossover_cohort,
    feature_matrix,
    informative_counts,
)
from bids_ketdcm.group.treatment.cv import (
    CVResult,
    SelectionProblem,
    cross_validate_selection,
    method_tests,
    pooled_metrics,
)
from bids_ketdcm.group.treatment.methods import FIXED, single_threaded
from bids_ketdcm.group.treatment.metrics import recommend
from bids_ketdcm.io import atomic_path, write_json, write_tsv

log = logging.getLogger(__name__)


def run_treatment_selection(
    features: pd.DataFrame,
    participants: pd.DataFrame,
    phenotype: pd.DataFrame,
    output_dir: str | Path,
    options: TreatmentOptions | None = None,
) -> dict:
    """Ketamine-vs-placebo treatment selection on a crossover cohort.

    Parameters
    ----------
    features
        One row per participant (index or ``participant_id`` column, labels with or without
        ``sub-``); every numeric column is a feature.
    participants, phenotype
        ``participants.tsv`` and the long phenotype table of the raw dataset.
    output_dir
        Derivatives root; results go to ``output_dir/group/``:
        ``treatment_selection.tsv`` (one row per method), ``treatment_selection_participants.tsv``
        (out-of-fold predictions and recommendations), ``treatment_selection.json`` (tests,
        exclusions, options) and ``treatment_selection.png``.
    options
        See :class:`TreatmentOptions`; invalid options raise :class:`InputError`.

    Returns
    -------
    dict
        ``skipped`` (None, or the reason when the cohort cannot support the analysis; then
        nothing is written and the rest of the group level can go on), ``n_participants``,
        ``excluded``, ``summary`` (list of per-method rows: mean and sd over repeats of the
        pooled out-of-fold metrics), ``tests``, ``files``, ``notes``.
    """
    options = options or TreatmentOptions()
    options.validate()
    try:
        cohort, excluded = build_crossover_cohort(participants, phenotype, options)
        X = feature_matrix(features, cohort, excluded)
        cohort = cohort.loc[X.index]
        if cohort.empty:
            common = Counter(excluded.values()).most_common(3)
            raise CohortSkip(
                "no participant has a first-period infusion, features and "
                f"{options.score_column} at sessions {options.baseline_session}, "
                f"{options.ketamine_session} and {options.placebo_session} (most common reasons: "
                + "; ".join(f"{reason} ({n})" for reason, n in common)
                + ")"
            )
        counts = cohort["first_treatment"].value_counts()
        if len(counts) < 2:
            raise CohortSkip(
                f"fewer than two first-period treatments among {len(cohort)} usable participants "
                f"({', '.join(f'{k}: {v}' for k, v in counts.items()) or 'none'})"
            )
        if counts.min() < 2:
            raise CohortSkip(f"a first-period arm has fewer than 2 usable participants ({counts.to_dict()})")
    except CohortSkip as skip:
        log.warning("treatment selection skipped: %s", skip)
        return {"skipped": str(skip)}
    for pid, reason in excluded.items():
        log.info("treatment selection: %s excluded: %s", pid, reason)
    n_splits = min(options.n_splits, int(counts.min()))
    notes = [
        "Trained on first-period outcomes; the second period gives the counterfactual "
        "(carry-over and period effects ignored).",
        "Fold-repeats share participants: the p-values are descriptive.",
    ]
    if n_splits < options.n_splits:
        notes.append(f"n_splits lowered from {options.n_splits} to {n_splits} (smallest first-period arm)")
        log.warning(notes[-1])

    t_index = {name: i for i, name in enumerate(TREATMENTS)}
    observed = cohort["first_treatment"].map(t_index).to_numpy()
    truth = cohort[[f"response_{a}" for a in TREATMENTS]].to_numpy(dtype=float)
    problem = SelectionProblem(
        X=X.to_numpy(dtype=float),
        treatment=observed,
        outcome=truth[np.arange(len(observed)), observed].astype(int),
        truth=truth,
        treatment_names=list(TREATMENTS),
    )
    result = cross_validate_selection(
        problem, options.methods, n_splits, options.n_repeats, options.seed, options.dpnn, options.knn_k,
        random_ties=True,
    )
    pooled = pooled_metrics(problem, result)
    summary = _summary_table(pooled, len(cohort), options.methods)
    informative = informative_counts(cohort)
    fixed = [m for m in options.methods if m in FIXED]
    reference = min(fixed, key=lambda m: pooled.loc[pooled.method == m, "rpl"].mean()) if fixed else "random"
    tests: dict | None = None
    if informative["informative"] == 0:
        notes.append("No informative participant (response under one arm only): every policy has the same "
                     "RPL, so no p-values are computed.")
    else:
        tests = {m: method_tests(result.folds, m, reference=reference) for m in ("rpl", "mrr")}
    if informative["placebo_only"] == 0:
        notes.append("No participant responds to placebo but not to ketamine: always-ketamine scores RPL 0 like "
                     "an oracle, so no method can beat it on these data.")
    difference = _difference_policy(X.to_numpy(dtype=float), cohort, n_splits, options) \
        if options.target == "difference" else None
    per_participant = _participant_table(cohort, result)

    group_dir = Path(output_dir) / "group"
    files = {
        "summary": group_dir / "treatment_selection.tsv",
        "participants": group_dir / "treatment_selection_participants.tsv",
        "json": group_dir / "treatment_selection.json",
        "figure": group_dir / "treatment_selection.png",
    }
    out = {
        "skipped": None,
        "n_participants": int(len(cohort)),
        "first_treatment_counts": {k: int(v) for k, v in counts.items()},
        "response_rates": {a: float(cohort[f"response_{a}"].mean()) for a in TREATMENTS},
        "excluded": excluded,
        "n_splits": n_splits,
        "n_repeats": options.n_repeats,
        "informative": informative,
        "reference_policy": reference,
        "summary": summary.to_dict(orient="records"),
        "tests": tests,
        "difference": difference,
        "notes": notes,
        "options": asdict(options),
        "files": {k: str(v) for k, v in files.items()},
    }
    write_tsv(files["summary"], summary)
    write_tsv(files["participants"], per_participant.reset_index())
    write_json(files["json"], out)
    _figure(files["figure"], summary, per_participant, options)
    return out


def _difference_policy(X: np.ndarray, cohort: pd.DataFrame, n_splits: int, options: TreatmentOptions) -> dict:
    """Ridge regression of the within-subject difference (ketamine minus placebo improvement).

    Out-of-fold predictions (repeated k-fold, scaler and model fitted on the training rows)
    recommend ketamine where the predicted difference is positive. The policy is scored by
    the improvement it loses against the better arm of each participant, beside the fixed
    policies; a paired sign-flip test compares it with the better fixed policy.
    """
    diff = (cohort["improvement_ketamine"] - cohort["improvement_placebo"]).to_numpy(float)
    improvement = cohort[["improvement_ketamine", "improvement_placebo"]].to_numpy(float)
    cv = RepeatedKFold(n_splits=n_splits, n_repeats=options.n_repeats, random_state=options.seed)
    pred = np.zeros((options.n_repeats, len(diff)))
    with single_threaded():
        for i, (train, test) in enumerate(cv.split(X)):
            model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(X[train], diff[train])
            pred[i // n_splits, test] = model.predict(X[test])
    mean = pred.mean(axis=0)
    best = improvement.max(axis=1)
    losses = {
        "model": best - np.where(mean > 0, improvement[:, 0], improvement[:, 1]),
        "always_ketamine": best - improvement[:, 0],
        "always_placebo": best - improvement[:, 1],
    }
    reference = min(("always_ketamine", "always_placebo"), key=lambda m: losses[m].mean())
    d = losses["model"] - losses[reference]
    flips = np.random.default_rng(options.seed).choice([-1.0, 1.0], size=(2000, len(d)))
    null = (flips * d).mean(axis=1)
    total = np.sum((diff - diff.mean()) ** 2)
    r2 = float(np.mean([1 - np.sum((diff - p) ** 2) / total for p in pred])) if total > 0 else float("nan")
    return {
        "target": "improvement_ketamine - improvement_placebo", "model": "ridge (alpha 1, standardised features)",
        "r2": r2, "mean_difference": float(diff.mean()),
        "recommended_ketamine": int((mean > 0).sum()),
        "improvement_loss": {m: float(v.mean()) for m, v in losses.items()},
        "reference_policy": reference,
        "p_versus_reference": float((1 + np.sum(null <= d.mean() + 1e-12)) / (1 + len(null))),
        "note": "one-sided paired sign-flip test that the model loses less improvement than the better fixed policy",
    }


def _summary_table(pooled: pd.DataFrame, n: int, methods: tuple[str, ...]) -> pd.DataFrame:
    metrics = [c for c in pooled.columns if c not in ("method", "repeat")]
    stats = pooled.groupby("method")[metrics].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat.replace('std', 'sd')}" for metric, stat in stats.columns]
    stats = stats.reindex(list(methods))
    stats.insert(0, "n_participants", n)
    return stats.drop(columns=["base_rate_sd"]).rename(columns={"base_rate_mean": "base_rate"}).reset_index()


def _participant_table(cohort: pd.DataFrame, result: CVResult) -> pd.DataFrame:
    table = cohort[
        ["first_treatment"]
        + [f"{k}_{a}" for k in ("improvement", "response") for a in TREATMENTS]
    ].copy()
    for method, preds in result.oof.items():
        mean = preds.mean(axis=0)  # average over repeats
        for i, arm in enumerate(TREATMENTS):
            table[f"{method}_p_{arm}"] = mean[:, i]
        table[f"{method}_recommended"] = [TREATMENTS[i] for i in recommend(mean, seed=0)]
    return table


def _figure(path: Path, summary: pd.DataFrame, per_participant: pd.DataFrame, options: TreatmentOptions) -> None:
    fig = Figure(figsize=(15, 3.8))
    axes = fig.subplots(1, 4)
    x = np.arange(len(summary))
    panels = (
        ("rpl", "RPL (lower is better)"),
        ("mrr", "MRR, tie-aware"),
        ("rr", "response rate if recommended = received"),
    )
    for ax, (metric, title) in zip(axes[:3], panels, strict=True):
        ax.errorbar(x, summary[f"{metric}_mean"], yerr=summary[f"{metric}_sd"], fmt="o", capsize=3)
        ax.set_xticks(x, summary["method"], rotation=30, ha="right", rotation_mode="anchor")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[2].axhline(summary["base_rate"].iloc[0], ls="--", color="grey", label="base rate")
    axes[2].legend(fontsize=8)
    ax = axes[3]
    method = "dpnn" if "dpnn_recommended" in per_participant else options.methods[0]
    for arm, colour in zip(TREATMENTS, ("tab:red", "tab:blue"), strict=True):
        for first, marker in zip(TREATMENTS, ("o", "s"), strict=True):
            rows = per_participant[
                (per_participant[f"{method}_recommended"] == arm) & (per_participant["first_treatment"] == first)
            ]
            if rows.empty:
                continue
            ax.scatter(
                rows["improvement_placebo"], rows["improvement_ketamine"], c=colour, marker=marker,
                label=f"rec. {arm}, first {first}", s=25,
            )
    thr = options.response_threshold
    ax.axhline(thr, ls=":", color="grey")
    ax.axvline(thr, ls=":", color="grey")
    lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lims, lims, color="grey", lw=0.8)
    ax.set_xlabel("improvement under placebo")
    ax.set_ylabel("improvement under ketamine")
    ax.set_title(f"{method} recommendation per participant", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
