"""The group level's command-line options: the cohort, the labels, the primary analysis.

:func:`group_options` adds them to the BIDS-App command; :func:`group_kwargs` maps the
parsed values onto :class:`bids_ketdcm.group.run.GroupOptions` fields.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bids_ketdcm.cli.options import GROUP, option
from bids_ketdcm.config import NESTED_PERMUTABLE


def _option(*param_decls: str, **attrs: Any) -> Callable:
    """An option of the help's group-level section."""
    return option(*param_decls, section=GROUP, **attrs)


_OPTIONS = [
    _option("--include-group", "include_group", multiple=True,
                 help="Group: participants.tsv 'group' values to analyse (repeatable), e.g. MDD. Required when "
                 "that column holds several groups (patients and controls are never mixed silently)."),
    _option("--score-column", default="MADRS_Total", show_default=True,
                 help="Group: phenotype column of the depression score (long or wide phenotype tables)."),
    _option("--baseline-session", default="b0", show_default=True,
                 help="Group: session of the baseline score (with or without 'ses-')."),
    _option("--post-session", default="d2", show_default=True,
                 help="Group: session of the score after ketamine."),
    _option("--placebo-session", default="p2", show_default=True,
                 help="Group: session of the score after placebo; 'none' skips the placebo analyses."),
    _option("--nested-repeats", type=click.IntRange(min=0), default=10, show_default=True,
                 help="Group: repeats of the exploratory nested CV (0: no nested CV)."),
    _option("--nested-permutations", type=click.IntRange(min=0), default=100, show_default=True,
                 help="Group: permutations of the nested CV of the --nested-permuted-model models on the "
                 "ketamine targets, the inner search redone in every permutation."),
    _option("--nested-permuted-model", "nested_permuted_models", multiple=True,
                 type=click.Choice(NESTED_PERMUTABLE), default=("logistic",), show_default=True,
                 help="Group: models whose repeated nested CV gets a permutation p-value (repeatable): logistic "
                 "and svm on the binary targets, elasticnet on the continuous ones. Each svm or elasticnet "
                 "permutation costs several times a logistic one."),
    _option("--analysis-plan", type=click.Path(path_type=Path),
                 help="Group: JSON file naming the primary analysis (keys network, target, model, n_splits, "
                 "n_repeats, stratify_order); default: dmn4, binary25 (>= 25 % response), logistic, "
                 "repeated stratified 5-fold."),
    _option("--primary-network", help="Group: network of the primary analysis (overrides the plan)."),
    _option("--primary-target", help="Group: label scheme of the primary analysis (overrides the plan)."),
    _option("--clinical-column", "clinical_columns", multiple=True,
                 help="Group: participants.tsv column of the clinical model besides the baseline score "
                 "(repeatable). Default: age, sex and infusion order (infusion_1), where present."),
    _option("--treatment-repeats", type=click.IntRange(min=1), default=10, show_default=True,
                 help="Group, --treatment-selection: repeats of the treatment-selection cross-validation."),
    _option("--treatment-target", type=click.Choice(["response", "difference"]), default="response",
                 show_default=True,
                 help="Group, --treatment-selection: response per arm, or the within-subject difference "
                 "(ketamine minus placebo improvement, a continuous target)."),
    _option("--peb", "peb_target", type=click.Choice(["post", "delta", "improvement"]),
                 help="Group: also predict this continuous ketamine target by PEB leave-one-out (SPM's "
                 "spm_dcm_loo over the full DCM posteriors), one model per network."),
    _option("--peb-permutations", type=click.IntRange(min=0), default=99, show_default=True,
                 help="Group, --peb: permutations of the PEB leave-one-out (each redoes every fit)."),
    _option("--peb-suite", is_flag=True,
                 help="Group: add the PEB predictor (model 'peb': SPM's spm_dcm_loo with a PEB refitted on each "
                 "training fold) to the suite's models on the dcm feature sets, under the same folds and "
                 "permutation test (--n-permutations) as the classifiers."),
    _option("--allow-training-overlap", is_flag=True,
                 help="Group, --apply-model: validate even on participants the models were trained on "
                 "(flagged in the report; not an external validation)."),
]


def group_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator adding every group-level option to a click command."""
    for decorate in reversed(_OPTIONS):
        command = decorate(command)
    return command


def group_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """GroupOptions fields from the parsed command line.

    Parameters
    ----------
    kw
        The click parameters of the BIDS-App command.

    Returns
    -------
    dict
        Keyword arguments of :class:`~bids_ketdcm.group.run.GroupOptions`.
    """
    placebo = kw["placebo_session"]
    return {
        "include_group": tuple(kw["include_group"]) or None,
        "score_column": kw["score_column"],
        "baseline_session": kw["baseline_session"],
        "post_session": kw["post_session"],
        "placebo_session": None if placebo.lower() == "none" else placebo,
        "nested_repeats": kw["nested_repeats"],
        "nested_permutations": kw["nested_permutations"],
        "nested_permuted_models": tuple(kw["nested_permuted_models"]),
        "analysis_plan": kw["analysis_plan"],
        "primary_network": kw["primary_network"],
        "primary_target": kw["primary_target"],
        "clinical_columns": tuple(kw["clinical_columns"]) or None,
        "treatment_repeats": kw["treatment_repeats"],
        "treatment_target": kw["treatment_target"],
        "allow_training_overlap": kw["allow_training_overlap"],
        "peb_target": kw["peb_target"],
        "peb_permutations": kw["peb_permutations"],
        "peb_suite": kw["peb_suite"],
    }
