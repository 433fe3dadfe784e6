"""The primary analysis: one model, one target, one protocol, named before the data are seen.

Default (the DCM study's): A matrices of ``dmn4``, >= 25 % MADRS response (``binary25``),
L2 logistic regression (C = 1, balanced class weights for the decision), repeated
stratified 5-fold CV (10 repeats), folds stratified on response x infusion order where the
order is known. A JSON analysis plan (``--analysis-plan``) or ``--primary-network`` /
``--primary-target`` override it; everything else the group level computes is exploratory.

:func:`run_primary` reports, on the same folds:

* the imaging model's balanced accuracy and AUC (mean over repeats) with a permutation
  p-value (feature rows shuffled, the folds fixed, every repeat refitted) and participant
  bootstrap 95 % intervals;
* comparators: majority class, baseline score alone, the clinical model (baseline score,
  age, sex, infusion order, where present) and imaging + clinical; paired differences
  (intervals and a paired swap test) of imaging against each, and of imaging + clinical
  against clinical (the added value of imaging);
* calibration of the prior-corrected probabilities (:func:`inference.prior_corrected`):
  intercept, slope, Brier score beside the prevalence-only Brier, decision curve;
* crossover: response by infusion order and a first-period-only sensitivity analysis
  (ketamine-first participants, whose post-ketamine session is the first period; at most
  200 permutations);
* drug specificity: the same out-of-fold predictions scored against the same participants'
  placebo outcomes, with a paired bootstrap of the AUC difference and the number of
  placebo responders (the check has no power with fewer than 3 in a class).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedStratifiedKFold

from bids_ketdcm.bids.features import FeatureSet
from bids_ketdcm.errors import InputError
from bids_ketdcm.group import batched
from bids_ketdcm.group.inference import (
    bootstrap_binary,
    bootstrap_indices,
    calibration,
    paired_swap_test,
    prior_corrected,
    repeat_metrics,
)
from bids_ketdcm.group.labels import LabelSet
from bids_ketdcm.seeds import derive_seed

log = logging.getLogger(__name__)

#: Clinical covariates read from participants.tsv by default, where present.
DEFAULT_CLINICAL = ("age", "sex", "infusion_1")
#: Fewest participants of a class for a check to have any power.
MIN_CLASS = 3
#: Permutations of the first-period sensitivity analysis (a check, not the headline).
FIRST_PERIOD_PERMUTATIONS = 200


@dataclass(frozen=True)
class AnalysisPlan:
    """The pre-specified primary analysis.

    Attributes
    ----------
    network
        Feature set key of the imaging features (``dmn4``).
    target
        Binary label scheme (``binary25``, ``binary50`` or ``remission``).
    model
        ``logistic`` (L2, C = 1).
    n_splits, n_repeats
        Repeated stratified k-fold.
    stratify_order
        Stratify the folds on response x infusion order (when participants.tsv has
        ``infusion_1``).
    """

    network: str = "dmn4"
    target: str = "binary25"
    model: str = "logistic"
    n_splits: int = 5
    n_repeats: int = 10
    stratify_order: bool = True

    def describe(self) -> str:
        """The plan in plain words."""
        target = {"binary25": ">= 25 % MADRS improvement", "binary50": ">= 50 % MADRS improvement",
                  "remission": "remission"}.get(self.target, self.target)
        return (f"response ({target}) after ketamine predicted from the {self.network} A matrix by L2 logistic "
                f"regression, repeated stratified {self.n_splits}-fold cross-validation ({self.n_repeats} repeats)")


def load_plan(path: Path | None, network: str | None = None, target: str | None = None) -> AnalysisPlan:
    """The analysis plan: defaults, then the JSON file, then the command-line overrides.

    Raises
    ------
    InputError
        Unreadable JSON, unknown keys or invalid values (naming the file or option).
    """
    values: dict = {}
    where = "--analysis-plan"
    if path is not None:
        where = f"--analysis-plan {path}"
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{where}: cannot read JSON ({err})") from None
        if not isinstance(values, dict):
            raise InputError(f"{where}: expected a JSON object")
        unknown = sorted(set(values) - {f.name for f in fields(AnalysisPlan)})
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(f.name for f in fields(AnalysisPlan))})")
    if network:
        values["network"] = network
    if target:
        values["target"] = target
    try:
        plan = AnalysisPlan(**values)
    except TypeError as err:
        raise InputError(f"{where}: {err}") from None
    if plan.target not in ("binary25", "binary50", "remission"):
        raise InputError(f"{where} / --primary-target {plan.target!r}: the primary target must be binary "
                         "(binary25, binary50 or remission)")
    if plan.model != "logistic":
        raise InputError(f"{where}: model {plan.model!r}; the primary analysis supports 'logistic'")
    if not (isinstance(plan.n_splits, int) and plan.n_splits >= 2
            and isinstance(plan.n_repeats, int) and plan.n_repeats >= 1):
        raise InputError(f"{where}: n_splits must be >= 2 and n_repeats >= 1")
    return plan


def clinical_matrix(labels: LabelSet, participants: pd.DataFrame | None, ids: list[str],
                    columns: tuple[str, ...] | None) -> tuple[np.ndarray, list[str]]:
    """Clinical covariates: baseline score, then the participants.tsv columns asked for.

    Numeric columns are used as they are; ``infusion_1`` becomes ``ketamine_first``
    (1 when the first infusion is d); other text columns are one-hot coded (first level
    dropped). A missing value takes the column mean over the cohort (no outcome is used).

    Raises
    ------
    InputError
        A column asked for explicitly (``--clinical-column``) is not in participants.tsv.
    """
    table = pd.DataFrame({"baseline_score": labels.table["baseline"].reindex(ids).to_numpy(float)}, index=ids)
    wanted = columns if columns is not None else DEFAULT_CLINICAL
    for col in wanted:
        if participants is None or col not in participants:
            if columns is not None:
                raise InputError(f"--clinical-column {col}: not a column of participants.tsv")
            continue
        raw = participants[col].reindex(ids)
        if col == "infusion_1":
            code = raw.astype("string").str.strip().str.lower()
            table["ketamine_first"] = np.where(code.isna(), np.nan, (code == "d").astype(float))
            continue
        numeric = pd.to_numeric(raw, errors="coerce")
        if numeric.notna().sum() == raw.notna().sum():
            table[col] = numeric
        else:
            for level in sorted(raw.dropna().unique())[1:]:
                table[f"{col}_{level}"] = np.where(raw.isna(), np.nan, (raw == level).astype(float))
    table = table.fillna(table.mean()).fillna(0.0)
    return table.to_numpy(float), list(table.columns)


def infusion_order(participants: pd.DataFrame | None, ids: list[str]) -> np.ndarray | None:
    """1 for ketamine first, 0 for placebo first, -1 unknown; None without ``infusion_1``."""
    if participants is None or "infusion_1" not in participants:
        return None
    code = participants["infusion_1"].reindex(ids).astype("string").str.strip().str.lower()
    return np.where(code == "d", 1, np.where(code == "p", 0, -1))



def _splits(y: np.ndarray, order: np.ndarray | None, plan: AnalysisPlan, seed: int) -> tuple[list, str]:
    """Outer folds and how they were stratified."""
    k = int(min(plan.n_splits, np.bincount(y).min()))
    if k < 2:
        raise InputError("the primary analysis needs at least 2 participants in each class")
    strata, how = y, "response"
    if plan.stratify_order and order is not None and (order >= 0).all():
        joint = y * 2 + order
        if np.bincount(joint)[np.unique(joint)].min() >= k:
            strata, how = joint, "response x infusion order"
    cv = RepeatedStratifiedKFold(n_splits=k, n_repeats=plan.n_repeats, random_state=derive_seed(seed, "primary"))
    return [(tr, te) for tr, te in cv.split(np.zeros(len(y)), strata)], f"{k}-fold, stratified on {how}"


def _oof(X: np.ndarray, y: np.ndarray, splits: list, n_repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, n) out-of-fold probabilities: balanced-weight (decision) and prior-corrected."""
    outs = batched.predict_splits("logistic", [X] * len(splits), y, splits, [{"C": 1.0}] * len(splits), 2)
    k = len(splits) // n_repeats
    raw, corrected = np.zeros((n_repeats, len(y))), np.zeros((n_repeats, len(y)))
    for i, ((train, test), out) in enumerate(zip(splits, outs, strict=True)):
        n_pos = y[train].sum()
        raw[i // k, test] = out[:, 1]
        corrected[i // k, test] = prior_corrected(out[:, 1], n_pos, len(train) - n_pos)
    return raw, corrected


def _permutation_null(X: np.ndarray, y: np.ndarray, splits: list, n_repeats: int, n_perm: int,
                      seed: int) -> np.ndarray:
    """Mean-over-repeats balanced accuracy with feature rows shuffled (folds fixed)."""
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    per_chunk = max(1, int(4000 // len(splits)))
    k = len(splits) // n_repeats
    for start in range(0, n_perm, per_chunk):
        perms = [rng.permutation(len(y)) for _ in range(min(per_chunk, n_perm - start))]
        outs = batched.predict_splits("logistic", [X[p] for p in perms for _ in splits], y,
                                      splits * len(perms), [{"C": 1.0}] * (len(splits) * len(perms)), 2)
        pred = np.zeros((len(perms), n_repeats, len(y)), dtype=int)
        for i, out in enumerate(outs):
            j, s = divmod(i, len(splits))
            pred[j, s // k, splits[s][1]] = out[:, 1] >= 0.5
        null[start:start + len(perms)] = _ba_perm(y, pred).mean(axis=1)
    return null


def _ba_perm(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(P, R) balanced accuracy of each permutation and repeat."""
    pos, neg = y.sum(), len(y) - y.sum()
    sens = (pred * y).sum(axis=2) / pos
    spec = ((1 - pred) * (1 - y)).sum(axis=2) / neg
    return (sens + spec) / 2


def _prevalence_oof(y: np.ndarray, splits: list) -> np.ndarray:
    """Out-of-fold prediction of the prevalence-only model (mean over repeats)."""
    total, count = np.zeros(len(y)), np.zeros(len(y))
    for train, test in splits:
        total[test] += y[train].mean()
        count[test] += 1
    return total / count


def _plain(name: str, est: dict, p: float | None = None) -> str:
    lo, hi = est["ci95"]
    text = f"{name} {est['estimate']:.3f} (95 % CI {lo:.3f} to {hi:.3f})"
    return text + (f", permutation p = {p:.3g}" if p is not None else "")


@dataclass
class PrimaryInputs:
    """What the primary analysis needs, gathered by the group level."""

    labels: LabelSet
    features: dict[str, FeatureSet]
    participants: pd.DataFrame | None
    clinical_columns: tuple[str, ...] | None
    n_permutations: int
    seed: int


def run_primary(plan: AnalysisPlan, inputs: PrimaryInputs) -> dict:
    """Run the primary analysis (module docstring) and return its results.

    Returns
    -------
    dict
        ``plan``, ``statement`` (plain words), ``n``, ``class_counts``, ``folds``,
        ``models`` (estimates and intervals per model), ``comparisons`` (paired
        differences and p-values), ``p_value``, ``significant``, ``calibration``,
        ``crossover``, ``placebo``; or ``skipped`` with the reason when the plan's network
        or target is absent.
    """
    labels, features = inputs.labels, inputs.features
    if plan.network not in features:
        reason = (f"the planned network {plan.network} has no features here (found: {', '.join(features)}); "
                  "give --primary-network or --analysis-plan to name another before looking at results")
        log.warning("primary analysis not run: %s", reason)
        return {"plan": asdict(plan), "skipped": reason}
    fs = features[plan.network]
    values = labels.target("ketamine", plan.target)
    ids = [p for p in fs.participants if p in values.index]
    classes = labels.schemes[plan.target].classes
    y = np.array([classes.index(v) for v in values[ids]])
    if len(ids) < 4 or np.bincount(y, minlength=2).min() < 2:
        counts = np.bincount(y, minlength=2).tolist()
        reason = f"{len(ids)} participants, class counts {counts}: too few to cross-validate"
        log.warning("primary analysis not run: %s", reason)
        return {"plan": asdict(plan), "skipped": reason}
    rows = [fs.participants.index(p) for p in ids]
    X = fs.X[rows]
    clinical, clinical_names = clinical_matrix(labels, inputs.participants, ids, inputs.clinical_columns)
    order = infusion_order(inputs.participants, ids)
    splits, fold_rule = _splits(y, order, plan, inputs.seed)
    designs = {
        "imaging": X,
        "baseline_score": clinical[:, :1],
        "clinical": clinical,
        "imaging+clinical": np.column_stack([X, clinical]),
    }
    raw, prob = {}, {}
    for name, design in designs.items():
        raw[name], prob[name] = _oof(design, y, splits, plan.n_repeats)
    raw["majority"] = prob["majority"] = np.full_like(raw["imaging"], 0.5)  # BA 0.5 and AUC 0.5 exactly
    index = bootstrap_indices(len(y), derive_seed(inputs.seed, "primary bootstrap"))
    models = {name: bootstrap_binary(y, raw[name], index) for name in raw}
    null = _permutation_null(X, y, splits, plan.n_repeats, inputs.n_permutations,
                             derive_seed(inputs.seed, "primary perm"))
    observed = models["imaging"]["balanced_accuracy"]["estimate"]
    p_value = float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null))) if len(null) else float("nan")
    comparisons = {}
    pairs = [("imaging", c) for c in ("majority", "baseline_score", "clinical")] + [("imaging+clinical", "clinical")]
    for a, b in pairs:
        diff = bootstrap_binary(y, raw[a], index, reference=raw[b])
        test = paired_swap_test(y, raw[a], raw[b], derive_seed(inputs.seed, "swap", a, b))
        comparisons[f"{a} - {b}"] = {m: {**diff[m], "p_value": test[m]} for m in diff}
    mean_prob = prob["imaging"].mean(axis=0)
    calib = calibration(y, mean_prob, _prevalence_oof(y, splits))
    calib["brier_balanced_weights"] = float(np.mean((raw["imaging"].mean(axis=0) - y) ** 2))
    result = {
        "plan": asdict(plan), "description": plan.describe(), "skipped": None,
        "n": len(y), "class_counts": dict(zip(classes, np.bincount(y, minlength=2).tolist(), strict=True)),
        "folds": fold_rule, "n_permutations": len(null), "features": fs.feature_names,
        "clinical_features": clinical_names,
        "models": models, "comparisons": comparisons, "p_value": p_value,
        "significant": bool(p_value < 0.05),
        "calibration": calib,
        "crossover": _crossover(X, y, order, plan, inputs),
        "placebo": _placebo(labels, plan, ids, y, raw["imaging"], index),
        "predictions": pd.DataFrame({
            "participant_id": ids, "observed": [classes[i] for i in y],
            "probability": mean_prob.round(4), "probability_balanced_weights": raw["imaging"].mean(axis=0).round(4),
        }),
    }
    ba = models["imaging"]["balanced_accuracy"]
    verdict = "above chance" if result["significant"] else "not distinguishable from chance"
    result["statement"] = (
        f"Primary analysis ({plan.describe()}; {len(y)} participants, "
        f"{result['class_counts'][classes[1]]} responders): "
        + _plain("balanced accuracy", ba, p_value)
        + f"; {_plain('AUC', models['imaging']['roc_auc'])}. One pre-specified test, so its p-value needs no "
        f"adjustment: {verdict} at 0.05."
    )
    log.info(result["statement"])
    return result


def _crossover(X: np.ndarray, y: np.ndarray, order: np.ndarray | None, plan: AnalysisPlan,
               inputs: PrimaryInputs) -> dict:
    """Response by infusion order, and the primary model on the ketamine-first period only."""
    if order is None:
        return {"available": False, "note": "participants.tsv has no infusion_1: order not analysed"}
    out: dict = {"available": True, "order_as": "fold stratum and clinical covariate (ketamine_first)"}
    out["response_by_order"] = {
        name: {"n": int((order == code).sum()), "responders": int(y[order == code].sum())}
        for name, code in (("ketamine_first", 1), ("placebo_first", 0))
    }
    first = order == 1
    yf, Xf = y[first], X[first]
    if first.sum() < 6 or np.bincount(yf, minlength=2).min() < 2:
        out["first_period"] = {"skipped": f"{int(first.sum())} ketamine-first participants, "
                                          f"{int(yf.sum())} responders: too few to cross-validate"}
        return out
    sub = AnalysisPlan(**{**asdict(plan), "stratify_order": False})
    splits, rule = _splits(yf, None, sub, derive_seed(inputs.seed, "first period"))
    raw, _ = _oof(Xf, yf, splits, sub.n_repeats)
    est = bootstrap_binary(yf, raw, bootstrap_indices(len(yf), derive_seed(inputs.seed, "first boot")))
    null = _permutation_null(Xf, yf, splits, sub.n_repeats, min(inputs.n_permutations, FIRST_PERIOD_PERMUTATIONS),
                             derive_seed(inputs.seed, "first perm"))
    p = float((1 + np.sum(null >= est["balanced_accuracy"]["estimate"] - 1e-12)) / (1 + len(null))) \
        if len(null) else float("nan")
    out["first_period"] = {"n": int(first.sum()), "responders": int(yf.sum()), "folds": rule, **est, "p_value": p}
    return out


def _placebo(labels: LabelSet, plan: AnalysisPlan, ids: list[str], y: np.ndarray, prob: np.ndarray,
             index: np.ndarray) -> dict:
    """The ketamine model's predictions scored against the same participants' placebo outcome."""
    values = labels.target("placebo", plan.target)
    keep = np.array([p in values.index for p in ids])
    if not keep.any():
        return {"available": False, "note": "no placebo outcome for these participants"}
    classes = labels.schemes[plan.target].classes
    yp = np.array([classes.index(values[p]) for p in np.array(ids)[keep]])
    n_resp = int(yp.sum())
    out: dict = {"available": True, "n": int(keep.sum()), "placebo_responders": n_resp,
           "ketamine_responders_same_participants": int(y[keep].sum())}
    if min(n_resp, len(yp) - n_resp) < MIN_CLASS:
        out["powered"] = False
        out["note"] = (f"{n_resp} placebo responder(s) of {len(yp)}: fewer than {MIN_CLASS} in a class, so the "
                       "drug-specificity check has no power and is not tested")
        return out
    sub = index[:, : keep.sum()] % keep.sum()  # bootstrap over the participants with both outcomes
    ket = bootstrap_binary(y[keep], prob[:, keep], sub)
    plc = bootstrap_binary(yp, prob[:, keep], sub)
    point = ket["roc_auc"]["estimate"] - plc["roc_auc"]["estimate"]
    diffs = (repeat_metrics(y[keep], prob[:, keep], sub)["roc_auc"]
             - repeat_metrics(yp, prob[:, keep], sub)["roc_auc"])
    diffs = diffs[np.isfinite(diffs)]
    p = float(min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)) + 1 / (1 + len(diffs))))
    out.update({
        "powered": True, "ketamine": ket, "placebo": plc,
        "auc_difference": {"estimate": float(point), "ci95": [float(np.quantile(diffs, 0.025)),
                                                              float(np.quantile(diffs, 0.975))],
                           "p_value": p},
        "note": "drug-specific only if the AUC against ketamine outcomes exceeds that against placebo outcomes",
    })
    return out
