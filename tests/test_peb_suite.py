"""The PEB predictor (model ``peb``) and the empirical-Bayes features (``eb``) inside the suite.

Cohorts: first-level posteriors of 27 participants of 4 regions under SPM's priors
(:func:`bids_ketdcm.testing.peb_cohort.synthetic_posteriors`: exact posteriors of a Gaussian
likelihood, subject deviations of 0.05 Hz), with the covariate acting on one connection
(0.1 Hz per SD) or on none. The ``peb`` row must predict the planted covariate out of sample
with a small permutation p under the suite's own folds and permutations, and not the null
one; the ``eb`` features must be refitted per fold without leakage; and the whole group level
must run them from derivatives through the command line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DS005917

from bids_ketdcm.cli.app import main
from bids_ketdcm.dcm.peb import SubjectPosteriors, a_parameter_index, coupling_hz, fit_peb
from bids_ketdcm.errors import InputError
from bids_ketdcm.group import GroupOptions, run_group
from bids_ketdcm.group.cv import make_splits
from bids_ketdcm.group.hierarchical import DcmPosteriors, peb_scores
from bids_ketdcm.group.labels import build_labels
from bids_ketdcm.group.models import SuiteConfig, Task, fold_features
from bids_ketdcm.group.suite import run_task
from bids_ketdcm.testing.fixtures import write_dcm_posterior
from bids_ketdcm.testing.peb_cohort import synthetic_posteriors

N_REGIONS = 4
PAIRS = [(t, s) for t in range(N_REGIONS) for s in range(N_REGIONS)]
REGIONS = ["PCC", "mPFC", "lIPL", "rIPL"]


def _task(post: SubjectPosteriors, y: np.ndarray, kind: str, eb: bool = False) -> Task:
    """A suite task whose features are the posteriors' A matrices in Hz."""
    A = coupling_hz(post.Ep[:, a_parameter_index(N_REGIONS)], N_REGIONS)
    X = np.stack([A[:, t, s] for t, s in PAIRS], axis=1)
    classes = ("low", "high") if kind == "classification" else ()
    return Task("ketamine", "eb_toy" if eb else "toy", "target", kind, list(post.names), X, y,
                np.zeros(len(y)), classes, [f"{s}->{t}" for t, s in PAIRS],
                dcm=DcmPosteriors(post, N_REGIONS, PAIRS), empirical_bayes=eb)


def _targets(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"regression": x, "classification": (x > np.median(x)).astype(int)}


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_peb_row_predicts_a_planted_covariate_and_not_a_null_one(kind) -> None:
    config = SuiteConfig(models=("peb",), k_values=(5,), nested_repeats=0, n_permutations=49)
    rows = {}
    for effect in (0.1, 0.0):
        post, X, _ = synthetic_posteriors(N_REGIONS, 27, seed=0, effect=effect)
        result = run_task(_task(post, _targets(X[:, 1])[kind], kind), config)
        (rows[effect],) = result.results
        assert rows[effect]["model"] == "peb" and rows[effect]["n_permutations"] == 49
    # measured (99 permutations): r 0.87, R^2 0.74 / AUC 0.87, balanced accuracy 0.81, p 0.01;
    # null: p 0.43 (regression) and 0.12 (classification)
    planted, null = rows[0.1], rows[0.0]
    strength = "pearson_r" if kind == "regression" else "roc_auc"
    assert planted[strength] > 0.75 and planted["p_value"] <= 0.02, planted
    assert null["p_value"] > 0.05, null


def test_eb_features_are_refitted_on_the_training_fold_only() -> None:
    post, X, _ = synthetic_posteriors(N_REGIONS, 27, seed=1)
    y = _targets(X[:, 1])["classification"]
    task = _task(post, y, "classification", eb=True)
    _, _, train, test = make_splits(task, "kfold5", SuiteConfig(k_values=(5,)))[0][0]
    features = fold_features(task, "logistic", train, test)
    # the training rows: the in-sample empirical-Bayes means of an intercept-only PEB of them
    peb = fit_peb(post.take(train), np.ones((len(train), 1)), a_parameter_index(N_REGIONS))
    A = coupling_hz(peb.subject_Ep[:, a_parameter_index(N_REGIONS)], N_REGIONS)
    np.testing.assert_allclose(features[train], np.stack([A[:, t, s] for t, s in PAIRS], axis=1), atol=1e-10)
    assert not np.allclose(features[test], task.X[test])  # held-out rows reduced to the empirical prior
    # held-out participants' posteriors change: the training features do not, theirs do
    Ep = post.Ep.copy()
    Ep[test, a_parameter_index(N_REGIONS)[1]] += 0.3
    moved = SubjectPosteriors(Ep, post.Cp, post.pE, post.pC, post.F, list(post.names))
    again = fold_features(_task(moved, y, "classification", eb=True), "logistic", train, test)
    np.testing.assert_array_equal(again[train], features[train])
    assert np.abs(again[test][:, 4] - features[test][:, 4]).min() > 0.1  # column 4: A[1, 0]
    # labels (held-out or not) never enter the transform
    relabelled = fold_features(_task(post, 1 - y, "classification", eb=True), "logistic", train, test)
    np.testing.assert_array_equal(relabelled, features)


def test_peb_predictions_do_not_read_held_out_labels() -> None:
    post, X, _ = synthetic_posteriors(N_REGIONS, 27, seed=2)
    dcm = DcmPosteriors(post, N_REGIONS, PAIRS)
    train, test = np.arange(21), np.arange(21, 27)
    y = X[:, 1].copy()
    out = peb_scores(dcm, y, "regression", 0, train, test)
    y[test] = 100.0
    np.testing.assert_array_equal(peb_scores(dcm, y, "regression", 0, train, test), out)


def _posterior_cohort(root: Path, effect: float) -> tuple[Path, Path]:
    """ds005917's participants and phenotype; synthetic DCM posteriors of every MDD participant written
    as the participant level does, A[1, 0] (PCC -> mPFC) carrying ``effect`` Hz per SD of the improvement."""
    bids, out = root / "bids", root / "out"
    (bids / "phenotype").mkdir(parents=True)
    shutil.copy(DS005917 / "participants.tsv", bids)
    for name in ("phenotype.tsv", "phenotype.json"):
        shutil.copy(DS005917 / "phenotype" / name, bids / "phenotype")
    improvement = build_labels(bids, include_group=("MDD",)).table["improvement"]
    x = improvement.fillna(improvement.mean()).to_numpy(float)
    post, _, _ = synthetic_posteriors(N_REGIONS, len(x), seed=4, effect=effect, covariate=x)
    rng = np.random.default_rng(4)
    for i, pid in enumerate(improvement.index):
        write_dcm_posterior(out, pid, "b0", "dmn4", post.Ep[i], post.Cp[i], post.F[i],
                            rng.standard_normal((192, N_REGIONS)), REGIONS)
    return bids, out


@pytest.fixture(scope="module")
def derivatives(tmp_path_factory) -> tuple[Path, Path]:
    return _posterior_cohort(tmp_path_factory.mktemp("peb-suite"), effect=0.15)


def test_cli_runs_the_eb_feature_set(derivatives, tmp_path) -> None:
    bids, written = derivatives
    out = tmp_path / "out"
    shutil.copytree(written, out)
    code = main([str(bids), str(out), "group", "--skip-bids-validation", "--include-group", "MDD",
                 "--features", "eb", "--placebo-session", "none", "--n-permutations", "0", "--nested-repeats", "0",
                 "--nested-permutations", "0"])
    assert code == 0
    res = pd.read_csv(out / "group" / "results.tsv", sep="\t")
    assert set(res.network) == {"eb_dmn4"} and len(set(res.target)) == 9
    assert {"logistic", "svm", "elasticnet", "random_forest"} <= set(res.model) and "peb" not in set(res.model)
    info = json.loads((out / "group" / "results.json").read_text())
    assert info["options"]["feature_sets"] == ["eb"] and (out / "group" / "seg-dmn4_qc.tsv").is_file()
    page = (out / "group" / "report.html").read_text()
    assert "<th>EB</th>" in page and "empirical-Bayes estimates" in page


def test_group_level_runs_the_peb_model_beside_raw_and_eb_features(derivatives, tmp_path) -> None:
    bids, written = derivatives
    out = tmp_path / "out"
    shutil.copytree(written, out)
    options = GroupOptions(include_group=("MDD",), placebo_session=None, schemes=("binary25",),
                           targets=("improvement",), models=("logistic", "elasticnet", "majority", "mean"),
                           peb_suite=True, feature_sets=("dcm", "eb"), k_values=(5,), nested_repeats=2,
                           n_permutations=19, nested_permutations=9, progress=False)
    run_group(bids, out, options)
    res = pd.read_csv(out / "group" / "results.tsv", sep="\t").set_index(["network", "target", "model", "protocol"])
    assert "peb" not in set(res.loc["eb_dmn4"].index.get_level_values("model"))
    peb = res.loc[("dmn4", "improvement", "peb", "kfold5")]
    # the planted connection carries 0.15 Hz per SD of the improvement
    assert peb.pearson_r > 0.5 and peb.p_value <= 0.1 and peb.n_permutations == 19, peb
    assert res.loc[("dmn4", "binary25", "peb", "kfold5")].n_permutations == 19
    for network in ("dmn4", "eb_dmn4"):  # the headline models permuted on both feature sets
        assert res.loc[(network, "improvement", "elasticnet", "kfold5")].n_permutations == 19
    assert res.loc[("dmn4", "binary25", "logistic", "nested")].n_permutations == 9
    assert res.loc[("eb_dmn4", "binary25", "logistic", "nested")].n_permutations == 0  # not permuted on eb
    page = (out / "group" / "report.html").read_text()
    assert "PEB predictor in the suite" in page and "spm_dcm_loo" in page


def test_a_missing_posterior_names_the_option_and_the_file(derivatives, tmp_path) -> None:
    bids, written = derivatives
    out = tmp_path / "out"
    shutil.copytree(written, out)
    labelled = build_labels(bids, include_group=("MDD",)).target("ketamine", "improvement").index[0]
    next(out.glob(f"{labelled}/ses-b0/func/*_posterior.npz")).unlink()
    options = GroupOptions(include_group=("MDD",), placebo_session=None, feature_sets=("eb",), n_permutations=0,
                           nested_repeats=0, report=False, progress=False)
    with pytest.raises(InputError, match="--features eb: .*_posterior.npz"):
        run_group(bids, out, options)
