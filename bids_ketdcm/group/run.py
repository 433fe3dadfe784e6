"""Group level entry point: labels + features -> prediction suite -> tables and report.

:func:`run_group` does everything and writes, under ``OUTPUT_DIR/group/``:

* ``labels.tsv`` (+ ``labels.json``): every scheme and continuous target per participant;
  ``labels_excluded.tsv``: each participant left out of an analysis and why;
* ``primary.json`` (+ ``primary_predictions.tsv``): the pre-specified primary analysis
  (:mod:`bids_ketdcm.group.primary`) and the participant flow;
* ``results.tsv``: the exploratory grid, one row per analysis x network x target x model x
  protocol with every metric, the headline metric, the permutation p-value, its Holm,
  Benjamini-Hochberg and max-statistic adjustments and bootstrap intervals;
* ``folds.tsv``: the metrics of every fold; ``predictions.tsv``: out-of-fold
  predictions per participant;
* ``results.json``: definitions, options, label counts, skipped analyses, permutation
  nulls and the summary; ``report.html``: the group report;
* with ``treatment_selection``: ``treatment_selection.tsv``, ``treatment_selection.png``,
  ``treatment_selection_participants.tsv`` and ``treatment_selection.json``
  (:func:`bids_ketdcm.group.treatment.workflow.run_treatment_selection`), unless the cohort cannot
  support it, which is logged and recorded, and the rest of the group level goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm import __version__
from bids_ketdcm.bids.features import FeatureSet, gather_features
from bids_ketdcm.bids.naming import normalise_session
from bids_ketdcm.config import FEATURE_SETS, NESTED_PERMUTABLE, split_key
from bids_ketdcm.dcm.peb import SubjectPosteriors, a_parameter_index
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.external import apply_models
from bids_ketdcm.group.hierarchical import DcmPosteriors
from bids_ketdcm.group.inference import adjust_grid, bootstrap_headline, bootstrap_indices
from bids_ketdcm.group.labels import (
    SCHEME_NAMES,
    TARGETS,
    LabelSet,
    build_labels,
    labels_sidecar,
    read_participants,
    read_scores,
)
from bids_ketdcm.group.model_io import save_group_models
from bids_ketdcm.group.models import (
    ALL_MODELS,
    DEFAULT_MODELS,
    HEADLINE_DEFINITION,
    HEADLINE_METRIC,
    HEADLINE_MODEL,
    MODEL_DESCRIPTIONS,
    PERMUTABLE,
    ResultKey,
    SuiteConfig,
    Task,
    fit_full,
)
from bids_ketdcm.group.peb_analysis import run_peb, subject_posteriors
from bids_ketdcm.group.primary import PrimaryInputs, load_plan, run_primary
from bids_ketdcm.group.qc import write_group_tables
from bids_ketdcm.group.report import write_report
from bids_ketdcm.group.suite import SuiteResult, run_suite
from bids_ketdcm.group.treatment.cohort import TreatmentOptions
from bids_ketdcm.group.treatment.workflow import run_treatment_selection
from bids_ketdcm.io import finite_json, write_json, write_tsv

log = logging.getLogger(__name__)

#: Fewest participants an analysis needs (each fold must train on at least 3).
MIN_PARTICIPANTS = 4


@dataclass
class GroupOptions:
    """Every option of the group level (the CLI maps its flags onto these fields)."""

    score_column: str = "MADRS_Total"
    baseline_session: str = "b0"
    post_session: str = "d2"
    #: None: no placebo specificity analysis.
    placebo_session: str | None = "p2"
    #: Keep only these participants.tsv groups (e.g. ("MDD",)); None keeps everyone.
    include_group: tuple[str, ...] | None = None
    remission_threshold: float = 10.0
    #: Networks (seg entity) to use; None: every network found.
    networks: tuple[str, ...] | None = None
    #: Session of the A matrices; None: the baseline session.
    feature_session: str | None = None
    #: Run of the A matrices; None: the first valid run.
    run: int | None = None
    require_converged: bool = True
    space: str | None = None
    task: str = "rest"
    drop_diagonal: bool = False
    add_baseline_madrs: bool = False
    allow_missing: bool = False
    schemes: tuple[str, ...] = SCHEME_NAMES
    targets: tuple[str, ...] = TARGETS
    models: tuple[str, ...] = DEFAULT_MODELS
    #: Add the PEB predictor ``peb`` to ``models`` (``--peb-suite``; needs the DCM posteriors).
    peb_suite: bool = False
    k_values: tuple[int, ...] = (3, 4, 5)
    nested_repeats: int = 10
    nested_outer_k: int = 5
    inner_k: int = 3
    n_permutations: int = 1000
    #: Models given permutation p-values; None: the headline model of each target.
    permutation_models: tuple[str, ...] | None = None
    rf_trees: int = 25
    nprocs: int = 1
    seed: int = 0
    engine: str = "batched"
    report: bool = True
    #: Progress bar on stderr; None: only when stderr is a terminal.
    progress: bool | None = None
    #: Feature sets run through the suite: dcm (A matrices), gmv (gray-matter volume), dcm+gmv, eb
    #: (empirical-Bayes A matrices, refitted in each training fold).
    feature_sets: tuple[str, ...] = ("dcm",)
    #: Save the final model of every ketamine label scheme here (bids_ketdcm.group.model_io).
    save_model: Path | None = None
    #: Apply the saved models of this folder (external validation, no refitting) instead of the suite.
    apply_model: Path | None = None
    #: Also recommend ketamine or placebo per participant (crossover treatment selection).
    treatment_selection: bool = False
    #: Permutations of the nested CV of the models below (inner search redone).
    nested_permutations: int = 100
    #: Models whose nested CV is permuted (``--nested-permuted-model``).
    nested_permuted_models: tuple[str, ...] = ("logistic",)
    #: JSON analysis plan of the primary analysis (None: the default plan).
    analysis_plan: Path | None = None
    #: Overrides of the plan's network and target.
    primary_network: str | None = None
    primary_target: str | None = None
    #: participants.tsv columns of the clinical model (None: age, sex, infusion_1 where present).
    clinical_columns: tuple[str, ...] | None = None
    #: Repeats of the treatment-selection cross-validation.
    treatment_repeats: int = 10
    #: Treatment-selection target: "response" per arm or the within-subject "difference".
    treatment_target: str = "response"
    #: External validation: accept participants the models were trained on (flagged).
    allow_training_overlap: bool = False
    #: Also run PEB leave-one-out prediction of this continuous ketamine target (None: off).
    peb_target: str | None = None
    #: Permutations of the PEB leave-one-out (each redoes every leave-one-out fit).
    peb_permutations: int = 99

    def __post_init__(self) -> None:
        # a single name given as a string means a one-element list, not its characters
        for name in ("include_group", "networks", "schemes", "targets", "models", "permutation_models",
                     "feature_sets", "clinical_columns"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, (value,))
            elif value is not None:
                setattr(self, name, tuple(value))

    def validate(self) -> None:
        """Check every option; raise one InputError listing all problems."""
        problems = []
        bad = [s for s in self.schemes if s not in SCHEME_NAMES]
        if bad:
            problems.append(f"GroupOptions.schemes: unknown {', '.join(bad)} (choose from {', '.join(SCHEME_NAMES)})")
        if self.peb_target is not None and self.peb_target not in TARGETS:
            problems.append(f"--peb: unknown target {self.peb_target} (choose from {', '.join(TARGETS)})")
        if self.peb_permutations < 0:
            problems.append(f"--peb-permutations: must be >= 0 (got {self.peb_permutations})")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            problems.append(f"GroupOptions.targets: unknown {', '.join(bad)} (choose from {', '.join(TARGETS)})")
        bad = [m for m in self.models if m not in ALL_MODELS]
        if bad:
            problems.append(f"GroupOptions.models: unknown {', '.join(bad)} (choose from {', '.join(ALL_MODELS)})")
        bad = [m for m in self.permutation_models or () if m not in PERMUTABLE]
        if bad:
            problems.append(
                f"GroupOptions.permutation_models: {', '.join(bad)} cannot be permuted "
                f"(choose from {', '.join(PERMUTABLE)})"
            )
        if not self.k_values or any(k < 2 for k in self.k_values):
            problems.append(f"GroupOptions.k_values: every k must be >= 2 (got {list(self.k_values)})")
        if self.nested_repeats < 0:
            problems.append(f"--nested-repeats: must be >= 0 (got {self.nested_repeats})")
        if self.nested_outer_k < 2 or self.inner_k < 2:
            problems.append("GroupOptions.nested_outer_k and inner_k must be >= 2")
        if self.n_permutations < 0:
            problems.append(f"--n-permutations: must be >= 0 (got {self.n_permutations})")
        if self.nested_permutations < 0:
            problems.append(f"--nested-permutations: must be >= 0 (got {self.nested_permutations})")
        unknown = sorted(set(self.nested_permuted_models) - set(NESTED_PERMUTABLE))
        if unknown:
            problems.append(f"--nested-permuted-model: {', '.join(unknown)} cannot be permuted with its inner "
                            f"search (choose from {', '.join(NESTED_PERMUTABLE)})")
        if self.treatment_repeats < 1:
            problems.append(f"--treatment-repeats: must be >= 1 (got {self.treatment_repeats})")
        if self.treatment_target not in ("response", "difference"):
            problems.append(f"--treatment-target: 'response' or 'difference' (got {self.treatment_target!r})")
        try:
            load_plan(self.analysis_plan, self.primary_network, self.primary_target)
        except InputError as err:
            problems.append(str(err))
        if self.rf_trees < 1:
            problems.append(f"GroupOptions.rf_trees: must be >= 1 (got {self.rf_trees})")
        if self.nprocs < 1:
            problems.append(f"--nprocs: must be >= 1 (got {self.nprocs})")
        if self.engine not in ("batched", "sklearn"):
            problems.append(f"GroupOptions.engine: 'batched' or 'sklearn' (got {self.engine!r})")
        if normalise_session(self.baseline_session) == normalise_session(self.post_session):
            problems.append("--baseline-session and --post-session must differ")
        if not self.schemes and not self.targets:
            problems.append("GroupOptions.schemes and targets: nothing to predict")

        bad = [f for f in self.feature_sets if f not in FEATURE_SETS]
        if bad or not self.feature_sets:
            problems.append(f"--features: unknown {', '.join(bad) or '(none given)'} "
                            f"(choose from {', '.join(FEATURE_SETS)})")
        if problems:
            raise InputError("; ".join(problems))

    def suite_config(self) -> SuiteConfig:
        """The prediction-suite settings of these options."""
        models = tuple(self.models)
        if self.peb_suite and "peb" not in models:
            models += ("peb",)
        return SuiteConfig(
            models=models,
            k_values=tuple(sorted(set(self.k_values))),
            nested_outer_k=self.nested_outer_k,
            nested_repeats=self.nested_repeats,
            inner_k=self.inner_k,
            n_permutations=self.n_permutations,
            permutation_models=tuple(self.permutation_models) if self.permutation_models else None,
            rf_trees=self.rf_trees,
            nested_permutations=self.nested_permutations,
            nested_permuted=tuple(self.nested_permuted_models),
            seed=self.seed,
            engine=self.engine,
        )


def _tasks(labels: LabelSet, features: dict[str, FeatureSet], options: GroupOptions,
           analyses: list[str]) -> tuple[list[Task], list[dict]]:
    """One task per analysis x network x target; skipped ones with their reason.

    The tasks of the ``eb`` feature sets, and with the ``peb`` model those of ``dcm``, carry
    their participants' DCM posteriors (read once per network).
    """
    tasks, skipped = [], []
    baseline = labels.table["baseline"]
    score = labels.score_column
    posteriors = _posteriors(features, "peb" in options.suite_config().models)
    for treatment in analyses:
        for network, fs in features.items():
            for target in [*options.schemes, *options.targets]:
                values = labels.target(treatment, target)
                keep = [p for p in fs.participants if p in values.index]
                where = f"{treatment} {target} seg-{network}"
                reason = None
                if len(keep) < MIN_PARTICIPANTS:
                    reason = f"{len(keep)} participants with labels and features (need {MIN_PARTICIPANTS})"
                elif target in labels.schemes:
                    counts = pd.Series(values[keep]).value_counts()
                    if len(counts) < 2:
                        reason = f"every participant is in class {counts.index[0]!r}"
                if reason:
                    if treatment == "ketamine":
                        raise InputError(
                            f"{where}: {reason}; cannot cross-validate (check --include-group, "
                            f"--score-column and the sessions, or leave {target!r} out of "
                            "GroupOptions.schemes / targets)"
                        )
                    log.warning("skipping %s: %s", where, reason)
                    skipped.append({"treatment": treatment, "network": network, "target": target, "reason": reason})
                    continue
                sub = fs.subset(keep)
                if options.add_baseline_madrs:
                    sub = sub.with_column(f"baseline_{score}", baseline[keep].to_numpy(float))
                if target in labels.schemes:
                    classes = labels.schemes[target].classes
                    y = np.array([classes.index(v) for v in values[keep]])
                    kind = "classification"
                else:
                    classes, y, kind = (), values[keep].to_numpy(float), "regression"
                dcm = None
                if network in posteriors:
                    rows = np.array([fs.participants.index(p) for p in keep])
                    dcm = DcmPosteriors(posteriors[network].take(rows), len(fs.regions), sub.pairs)
                tasks.append(Task(
                    treatment=treatment, network=network, target=target, kind=kind,
                    participants=keep, X=sub.X, y=y, baseline=baseline[keep].to_numpy(float),
                    classes=classes, feature_names=sub.feature_names, dcm=dcm,
                    empirical_bayes=split_key(network)[0] == "eb",
                ))
    return tasks, skipped


def _posteriors(features: dict[str, FeatureSet], peb: bool) -> dict:
    """The DCM posteriors of the feature sets that need them, by key: ``eb``, and ``dcm`` with
    the ``peb`` model (one read per network)."""
    wanted = [key for key in features if split_key(key)[0] == "eb" or (peb and split_key(key)[0] == "dcm")]
    if peb and not any(split_key(key)[0] == "dcm" for key in features):
        log.warning("--peb-suite: the peb model runs on the dcm feature sets; none was asked for (--features dcm)")
    read: dict[str, SubjectPosteriors] = {}
    out = {}
    for key in wanted:
        fs = features[key]
        if fs.network not in read:
            option = "--features eb" if split_key(key)[0] == "eb" else "--peb-suite"
            read[fs.network] = subject_posteriors(fs, option).prepare(a_parameter_index(len(fs.regions)))
        out[key] = read[fs.network]
    return out


def _chance(results: pd.DataFrame) -> np.ndarray:
    """Chance level of each row's headline metric: 1/K for K classes, 0 for R^2."""
    n_classes = results.classes.fillna("").map(lambda c: len(c.split(";")) if c else 0)
    return np.where(n_classes > 0, 1.0 / np.maximum(n_classes, 1), 0.0)


def _adjust(suite: SuiteResult, tasks: list[Task], config: SuiteConfig) -> None:
    """Add ``p_holm``, ``p_bh`` (every tested row) and ``p_maxstat`` to the results.

    The max-statistic family is the grid a "best model" is chosen from: every ketamine
    row tested under the permutation protocol whose task holds the same participants (so
    that the permutations are joint).
    """
    res = suite.results
    if res.empty:
        return
    chance = _chance(res)
    gains = res.headline.to_numpy(float) - chance
    ket = [t for t in tasks if t.treatment == "ketamine"]
    reference = ket[0].participants if ket else None
    same = {(t.network, t.target) for t in ket if t.participants == reference}
    nulls = []
    for i, row in enumerate(res.itertuples()):
        null = suite.nulls.get(ResultKey(row.treatment, row.network, row.target, row.model, row.protocol))
        joint = (row.treatment == "ketamine" and row.protocol == config.permutation_protocol
                 and (row.network, row.target) in same)
        nulls.append(null - chance[i] if null is not None and joint else None)
    adjusted = adjust_grid(res.p_value.to_numpy(float), gains, nulls)
    tail = [c for c in ("headline_repeat_sd", "params", "flags") if c in res]
    for name, values in adjusted.items():
        res[name] = values
    res["analysis"] = "exploratory"
    suite.results = res[[c for c in res.columns if c not in tail] + tail]


def _intervals(suite: SuiteResult, tasks: list[Task], config: SuiteConfig, seed: int) -> None:
    """95 % bootstrap intervals of the headline model's headline metric (balanced accuracy or
    R^2) and of its paired differences against the comparators (the chance model and the
    baseline score alone), on the same out-of-fold predictions; columns ``ci95_low``,
    ``ci95_high``, ``diff_<comparator>_ci95`` of the headline model's rows."""
    res, pred = suite.results, suite.predictions
    if res.empty or pred.empty:
        return
    groups = pred.groupby(["treatment", "network", "target", "model", "protocol"], sort=False)
    for column in ("ci95_low", "ci95_high", "diff_chance_ci95", "diff_baseline_score_ci95"):
        res[column] = np.nan if column.startswith("ci95") else None
    for task in tasks:
        head = HEADLINE_MODEL[task.kind]
        index = bootstrap_indices(len(task.y), seed, 1000)
        lookup = {p: i for i, p in enumerate(task.participants)}
        for protocol in (config.permutation_protocol, "nested"):
            arrays = {}
            for model in (head, "majority" if task.kind == "classification" else "mean", "baseline_score"):
                key = (task.treatment, task.network, task.target, model, protocol)
                if key not in groups.groups:
                    continue
                rows = groups.get_group(key)
                values = rows.predicted.map(task.classes.index) if task.kind == "classification" else rows.predicted
                out = np.zeros((int(rows.repeat.max()) + 1, len(task.y)))
                out[rows.repeat.to_numpy(int), rows.participant_id.map(lookup).to_numpy(int)] = values.to_numpy(float)
                arrays[model] = out
            if head not in arrays:
                continue
            sel = ((res.treatment == task.treatment) & (res.network == task.network) & (res.target == task.target)
                   & (res.model == head) & (res.protocol == protocol))
            low, high = bootstrap_headline(task.y, arrays[head], task.kind, task.n_classes, index)
            res.loc[sel, "ci95_low"], res.loc[sel, "ci95_high"] = low, high
            for name, model in (("chance", "majority" if task.kind == "classification" else "mean"),
                                ("baseline_score", "baseline_score")):
                if model in arrays:
                    lo, hi = bootstrap_headline(task.y, arrays[head], task.kind, task.n_classes, index,
                                                reference=arrays[model])
                    res.loc[sel, f"diff_{name}_ci95"] = f"{lo:.3f} to {hi:.3f}"


def _best_weights(tasks: list[Task], suite: SuiteResult, features: dict[str, FeatureSet],
                  config: SuiteConfig) -> dict | None:
    """Weights of the best ketamine imaging model of the permuted grid.

    Best = the largest gain of the headline metric over chance (balanced accuracy - 1/K
    for K classes, R^2 - 0) among the rows of the max-statistic family (ketamine, headline
    models, permutation protocol); its ``p_maxstat`` accounts for the choice.
    """
    res = suite.results
    if res.empty or "p_maxstat" not in res:
        return None
    rows = res[res.p_maxstat.notna()]
    if rows.empty:
        return None
    protocol = config.permutation_protocol
    gain = rows.headline - _chance(rows)
    best = rows.loc[gain.idxmax()]
    task = next(t for t in tasks if (t.treatment, t.network, t.target) == ("ketamine", best.network, best.target))
    chosen = suite.params[ResultKey.of(task, best.model, protocol)]
    counts = pd.Series([tuple(sorted(p.items())) for p in chosen]).value_counts()
    params = dict(counts.index[0])
    weights = fit_full(task, best.model, params, config)
    if weights is None:  # a comparator: no weights to show
        return None
    fs = features[best.network]
    matrix = np.full((len(fs.regions), len(fs.regions)), np.nan)
    extra = {}
    for w, name in zip(weights, task.feature_names, strict=True):
        pair = fs.pairs[fs.feature_names.index(name)] if name in fs.feature_names else None
        if pair is None:
            extra[name] = float(w)
        else:
            t, s = pair
            matrix[t, s] = w
    return {
        "network": best.network, "target": best.target, "model": best.model, "protocol": protocol,
        "headline_metric": best.headline_metric, "headline": float(best.headline), "params": params,
        "selection": (f"largest gain of the headline metric over chance (1/K or R^2 = 0) among {len(rows)} "
                      f"permuted ketamine models ({protocol}); max-statistic p over that grid"),
        "p_value": float(best.p_value), "p_maxstat": float(best.p_maxstat), "grid_size": int(len(rows)),
        "regions": fs.regions, "weights": matrix, "extra_weights": extra,
        "kind": {"random_forest": "importance", "peb": "PEB effect"}.get(best.model, "coefficient"),
        "class": task.classes[-1] if task.classes else None,
    }


def summary_table(results: pd.DataFrame, config: SuiteConfig) -> pd.DataFrame:
    """Plain-language summary of the exploratory grid: one row per network x target
    (headline model, ketamine).

    Columns: network, target, headline model and metric, k-fold (headline protocol)
    value, raw, Holm- and BH-adjusted p, nested mean +- sd, the comparators' values, the
    placebo value and p, and a verdict (judged on the Holm-adjusted p).
    """
    if results.empty:
        return pd.DataFrame()
    proto = config.permutation_protocol
    rows = []
    ket = results[results.treatment == "ketamine"]
    for (network, target), grp in ket.groupby(["network", "target"], sort=False):
        kind = grp.task.iloc[0]
        model = HEADLINE_MODEL[kind]

        def pick(frame, m, p):
            sel = frame[(frame.model == m) & (frame.protocol == p)]
            return sel.iloc[0] if len(sel) else None

        head = pick(grp, model, proto)
        nested = pick(grp, model, "nested")
        dummy = pick(grp, "majority" if kind == "classification" else "mean", proto)
        base = pick(grp, "baseline_score", proto)
        plc = results[(results.treatment == "placebo") & (results.network == network) & (results.target == target)]
        plc_row = pick(plc, model, proto)
        p = head.p_value if head is not None else np.nan
        p_holm = head.p_holm if head is not None and "p_holm" in head else np.nan
        if head is None:
            verdict = "not run"
        elif np.isnan(p):
            verdict = "no permutation test"
        elif p < 0.05 and not p_holm < 0.05:
            verdict = "p < 0.05 before correction only (Holm-adjusted p >= 0.05)"
        elif p < 0.05:
            beats = all(c is None or head.headline > c.headline for c in (dummy, base))
            verdict = "above chance" + ("" if beats else ", but not above a comparator")
            if plc_row is not None and plc_row.p_value < 0.05:
                verdict += "; placebo also above chance (not drug-specific)"
        else:
            verdict = "not distinguishable from chance"
        rows.append({
            "network": network, "target": target, "model": model, "metric": HEADLINE_METRIC[kind],
            f"{proto}": None if head is None else round(float(head.headline), 3),
            "p_value": None if head is None or np.isnan(p) else round(float(p), 4),
            "ci95": None if head is None or "ci95_low" not in head or np.isnan(head.ci95_low)
            else f"{head.ci95_low:.3f} to {head.ci95_high:.3f}",
            "p_holm": None if np.isnan(p_holm) else round(float(p_holm), 4),
            "p_bh": None if head is None or "p_bh" not in head or np.isnan(head.p_bh) else round(float(head.p_bh), 4),
            "nested_mean": None if nested is None else round(float(nested.headline), 3),
            "nested_fold_sd": None if nested is None else round(float(nested[f"{HEADLINE_METRIC[kind]}_fold_sd"]), 3),
            "chance_model": None if dummy is None else round(float(dummy.headline), 3),
            "baseline_score_only": None if base is None else round(float(base.headline), 3),
            "placebo": None if plc_row is None else round(float(plc_row.headline), 3),
            "placebo_p": None if plc_row is None or np.isnan(plc_row.p_value) else round(float(plc_row.p_value), 4),
            "verdict": verdict,
        })
    return pd.DataFrame(rows)


def run_group(bids_dir: str | Path, output_dir: str | Path, options: GroupOptions) -> dict:
    """Run the whole group level and write its outputs under ``output_dir/group``.

    Parameters
    ----------
    bids_dir
        Raw BIDS dataset (``phenotype/``, ``participants.tsv``).
    output_dir
        Derivatives root holding the participant-level connectivity files.
    options
        Group options.

    Returns
    -------
    dict
        Output paths, participant counts, label counts, skipped analyses, the summary
        table (records) and the run time.

    Raises
    ------
    InputError
        Bad options, phenotype, labels or derivatives (see :func:`build_labels`,
        :func:`collect_features`), or a ketamine analysis that cannot be
        cross-validated.
    """
    start = time.perf_counter()
    options.validate()
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    labels = build_labels(
        bids_dir, score_column=options.score_column, baseline_session=options.baseline_session,
        post_session=options.post_session, placebo_session=options.placebo_session,
        include_group=tuple(options.include_group) if options.include_group else None,
        remission_threshold=options.remission_threshold,
    )
    analyses = ["ketamine"] + (["placebo"] if "placebo_improvement" in labels.table.columns else [])
    labelled_mask = labels.table[[labels.column(a, "improvement") for a in analyses]].notna().any(axis=1)
    labelled = list(labels.table.index[labelled_mask])
    if options.apply_model is not None:  # external validation of saved models: no suite

        if options.treatment_selection:
            log.warning("--treatment-selection is not run with --apply-model (external validation only)")
        return apply_models(options.apply_model, labels, output_dir,
                            session=options.feature_session or options.baseline_session, space=options.space,
                            task=options.task, run=options.run, n_permutations=options.n_permutations,
                            seed=options.seed, allow_training_overlap=options.allow_training_overlap)
    features, missing = gather_features(
        output_dir, labelled, tuple(options.feature_sets), session=options.feature_session or options.baseline_session,
        networks=tuple(options.networks) if options.networks else None, run=options.run,
        require_converged=options.require_converged, space=options.space, task=options.task,
        drop_diagonal=options.drop_diagonal, allow_missing=options.allow_missing,
    )
    tasks, skipped = _tasks(labels, features, options, analyses)
    config = options.suite_config()
    log.info("group suite: %d tasks (%s), %d networks", len(tasks), ", ".join(analyses), len(features))
    suite = run_suite(tasks, config, nprocs=options.nprocs, progress=options.progress)
    log.info("suite done in %.1f s", time.perf_counter() - start)
    _adjust(suite, tasks, config)
    _intervals(suite, tasks, config, options.seed)
    spent = suite.results.pop("permutation_seconds") if "permutation_seconds" in suite.results else None
    participants = read_participants(bids_dir)
    plan = load_plan(options.analysis_plan, options.primary_network, options.primary_target)
    suite_done = time.perf_counter()
    primary = run_primary(plan, PrimaryInputs(labels, features, participants, options.clinical_columns,
                                              options.n_permutations, options.seed))
    timings = {"suite": round(suite_done - start, 2), "primary": round(time.perf_counter() - suite_done, 2)}
    if spent is not None:  # seconds in the workers, summed (results.tsv stays free of timings)
        nested = suite.results.protocol == "nested"
        timings["kfold_permutations_cpu"] = round(float(spent[~nested].sum()), 2)
        timings["nested_permutations_cpu"] = round(float(spent[nested].sum()), 2)
    log.info("primary analysis done at %.1f s", time.perf_counter() - start)
    summary = summary_table(suite.results, config)
    best = _best_weights(tasks, suite, features, config)
    if options.save_model is not None:
        save_group_models(options.save_model, tasks, suite, labels, options)

    started = time.perf_counter()
    treatment = _treatment_selection(bids_dir, output_dir, features, options) if options.treatment_selection else None
    timings["treatment_selection"] = round(time.perf_counter() - started, 2)

    group = output_dir / "group"
    peb = None if options.peb_target is None else run_peb(
        features, labels, group, options.peb_target, options.peb_permutations, options.seed)
    sessions = {"ketamine": normalise_session(options.post_session)}
    if "placebo" in analyses and options.placebo_session is not None:
        sessions["placebo"] = normalise_session(options.placebo_session)
    write_tsv(group / "labels.tsv", labels.table.reset_index())
    write_json(group / "labels.json", labels_sidecar(labels, normalise_session(options.baseline_session), sessions))
    write_tsv(group / "labels_excluded.tsv", labels.excluded)
    write_tsv(group / "results.tsv", suite.results)
    write_tsv(group / "folds.tsv", suite.folds)
    write_tsv(group / "predictions.tsv", suite.predictions)
    qc = write_group_tables(group, features)
    flow = participant_flow(labels, participants, features, primary, options)
    if primary.get("skipped") is None:
        write_tsv(group / "primary_predictions.tsv", primary["predictions"])
    primary_record = {k: v for k, v in primary.items() if k != "predictions"}
    write_json(group / "primary.json", finite_json({**primary_record, "participant_flow": flow}))
    counts = {
        a: {s: labels.counts(a, s) for s in labels.schemes}
        for a in analyses
    }
    n_part = {a: int(labels.table[labels.column(a, "improvement")].notna().sum()) for a in analyses}
    info = {
        "GeneratedBy": {"Name": "bids-ketdcm", "Version": __version__},
        "headline": {
            "metric": HEADLINE_METRIC, "definition": HEADLINE_DEFINITION, "model": HEADLINE_MODEL,
            "permutation_protocol": config.permutation_protocol,
            "p_value": "(1 + #{null >= observed}) / (1 + n_permutations); feature rows shuffled "
                       "against fixed labels and folds",
        },
        "models": {m: MODEL_DESCRIPTIONS[m] for m in config.models},
        "options": {f.name: getattr(options, f.name) for f in fields(options)},
        "suite": asdict(config),
        "sessions": {"baseline": normalise_session(options.baseline_session), **sessions},
        "participants": n_part,
        "label_counts": counts,
        "excluded": labels.excluded.to_dict(orient="records"),
        "missing_features": missing.to_dict(orient="records"),
        "networks": {n: {"regions": fs.regions, "participants": len(fs.participants)} for n, fs in features.items()},
        "skipped": skipped,
        "primary": primary_record,
        "participant_flow": flow,
        "multiplicity": {
            "family": f"{int(suite.results.p_value.notna().sum()) if len(suite.results) else 0} exploratory "
                      "permutation tests (every analysis, network, target and protocol with a p-value)",
            "p_holm": "Holm step-down (family-wise error)", "p_bh": "Benjamini-Hochberg (false discovery rate)",
            "p_maxstat": "single-step max-statistic over the ketamine rows of the permutation protocol "
                         "(joint permutations): the grid a best model is chosen from",
        },
        "summary": summary.to_dict(orient="records"),
        "best_model": None if best is None else {**best, "weights": best["weights"]},
        "nulls": suite.nulls,
        "treatment_selection": treatment,
        "peb": peb,
        "results": suite.results.to_dict(orient="records"),
        "seconds": round(time.perf_counter() - start, 2),
        "timings": timings,
    }
    outputs = {name: str(group / name) for name in (
        "labels.tsv", "labels.json", "labels_excluded.tsv", "results.tsv", "folds.tsv",
        "predictions.tsv", "results.json", "primary.json",
        *(f"seg-{n}_{kind}.tsv" for n in qc for kind in ("qc", "edges")))}
    if primary.get("skipped") is None:
        outputs["primary_predictions.tsv"] = str(group / "primary_predictions.tsv")
    if treatment is not None and treatment["skipped"] is None:
        outputs.update({Path(f).name: f for f in treatment["files"].values()})
    if options.report:
        write_report(group / "report.html", info, suite, tasks, best, summary, nprocs=options.nprocs,
                     treatment=treatment, qc=qc)
        log.info("report written at %.1f s", time.perf_counter() - start)
        outputs["report.html"] = str(group / "report.html")
    info["seconds"] = round(time.perf_counter() - start, 2)
    write_json(group / "results.json", finite_json(info))
    log.info("group level done in %.1f s: %s", info["seconds"], group)
    return {
        "outputs": outputs, "participants": n_part, "label_counts": counts, "skipped": skipped,
        "summary": summary.to_dict(orient="records"), "seconds": info["seconds"],
        "n_tasks": len(tasks), "treatment_selection": treatment, "primary": primary_record,
        "participant_flow": flow, "timings": timings,
    }


def participant_flow(labels: LabelSet, participants: pd.DataFrame | None, features: dict[str, FeatureSet],
                     primary: dict, options: GroupOptions) -> list[dict]:
    """Participant flow of the primary analysis (TRIPOD+AI): each step, who was left out, why.

    Returns
    -------
    list of dict
        Steps in order, each with ``step``, ``n`` (participants remaining) and ``excluded``
        (reason -> count).
    """
    steps = []
    listed = set(participants.index) if participants is not None else set()
    known = listed | set(labels.table.index) | set(labels.excluded.participant_id)
    steps.append({"step": "in participants.tsv or the phenotype", "n": len(known), "excluded": {}})
    ket = labels.excluded[labels.excluded.analysis == "ketamine"]
    group_rule = ket.reason.str.contains("--include-group", regex=False)
    by_group = {}
    if participants is not None and "group" in participants and options.include_group:
        dropped = participants.loc[[p for p in ket.participant_id[group_rule] if p in participants.index], "group"]
        by_group = {f"group {g} not included": int(n) for g, n in dropped.fillna("n/a").value_counts().items()}
    n = len(known) - int(group_rule.sum())
    steps.append({"step": f"in the chosen group ({', '.join(options.include_group or ()) or 'all'})", "n": n,
                  "excluded": by_group})
    other = ket[~group_rule].reason.value_counts()
    n -= int(other.sum())
    steps.append({"step": f"with {labels.score_column} at baseline and after ketamine", "n": n,
                  "excluded": {str(r): int(c) for r, c in other.items()}})
    plan_network = primary.get("plan", {}).get("network")
    if plan_network in features:
        scored = set(labels.target("ketamine", "improvement").index)
        have = scored & set(features[plan_network].participants)
        steps.append({"step": f"with usable {plan_network} features", "n": len(have),
                      "excluded": {"no usable features (missing, failed or not converged)": n - len(have)}
                      if n - len(have) else {}})
    if primary.get("skipped") is None:
        steps.append({"step": "analysed in the primary analysis", "n": int(primary["n"]), "excluded": {}})
    return steps


def _treatment_selection(bids_dir: Path, output_dir: Path, features: dict[str, FeatureSet],
                         options: GroupOptions) -> dict:
    """Ketamine-vs-placebo treatment selection on the first feature set that is not ``eb``.

    Parameters
    ----------
    bids_dir
        Raw BIDS dataset (``participants.tsv`` with ``infusion_1``, ``phenotype/``).
    output_dir
        Derivatives root (results go to ``output_dir/group/``).
    features
        The group level's feature sets; the first one (the first network of the first
        ``--features`` set) that is not ``eb`` is used; with ``eb`` only, the raw A matrices
        behind it (its empirical-Bayes estimates exist only inside the suite's folds).
    options
        Group options: score column, sessions, groups and seed are shared with the suite.

    Returns
    -------
    dict
        :func:`~bids_ketdcm.group.treatment.workflow.run_treatment_selection`'s result plus
        ``feature_set`` (its key); ``skipped`` holds the reason when the data cannot support
        the analysis (logged as a warning; nothing is written then).
    """
    key = next((k for k in features if split_key(k)[0] != "eb"), next(iter(features)))
    fs = features[key]
    key = split_key(key)[1] if split_key(key)[0] == "eb" else key
    participants = read_participants(bids_dir)
    placebo_session = options.placebo_session
    if placebo_session is None or participants is None:
        reason = ("no placebo session (--placebo-session) to give the crossover's counterfactual"
                  if placebo_session is None else
                  f"{bids_dir / 'participants.tsv'} is missing (the first infusion, infusion_1, is read from it)")
        log.warning("treatment selection skipped: %s", reason)
        return {"skipped": reason, "feature_set": key}
    scores, _, _ = read_scores(bids_dir, options.score_column)
    phenotype = scores.rename(columns={"session": "session_id", "score": options.score_column})
    table = pd.DataFrame(fs.X, index=pd.Index(fs.participants, name="participant_id"), columns=fs.feature_names)
    treatment_options = TreatmentOptions(
        seed=options.seed, score_column=options.score_column, baseline_session=options.baseline_session,
        ketamine_session=options.post_session, placebo_session=placebo_session,
        groups=tuple(options.include_group) if options.include_group else None,
        n_repeats=options.treatment_repeats, target=options.treatment_target,
    )
    log.info("treatment selection on seg-%s", key)
    result = run_treatment_selection(table, participants.reset_index(), phenotype, output_dir, treatment_options)
    return {**result, "feature_set": key}
