"""Treatment-selection metrics, baselines, cross-validation and the ds005917 cohort run."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DS005917

import bids_ketdcm.group.run as group_run
from bids_ketdcm.cli.app import main
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.treatment.cohort import TreatmentOptions, build_crossover_cohort
from bids_ketdcm.group.treatment.cv import SelectionProblem, cross_validate_selection
from bids_ketdcm.group.treatment.dpnn import DPNNSettings
from bids_ketdcm.group.treatment.methods import CaseBasedKNN
from bids_ketdcm.group.treatment.metrics import (
    compare_methods,
    reciprocal_rank,
    recommend,
    regret,
    response_rate,
    selection_metrics,
)
from bids_ketdcm.group.treatment.workflow import run_treatment_selection
from bids_ketdcm.testing.fixtures import write_a_matrix

DS = DS005917


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


@pytest.fixture(scope="module")
def participants() -> pd.DataFrame:
    return _read(DS / "participants.tsv")


@pytest.fixture(scope="module")
def phenotype() -> pd.DataFrame:
    return _read(DS / "phenotype" / "phenotype.tsv")


# --------------------------------------------------------------------------- metrics


def test_metrics_with_ties_hand_computed():
    truth = np.array(
        [
            [0.9, 0.9, 0.1],  # recommended 1: tied for best
            [0.2, 0.5, 0.5],  # recommended 0: worst, regret 0.3
            [0.3, 0.3, 0.3],  # recommended 2: all tied
            [0.7, 0.1, 0.4],  # recommended 0: unique best
        ]
    )
    rec = np.array([1, 0, 2, 0])
    np.testing.assert_allclose(regret(truth, rec), [0.0, 0.3, 0.0, 0.0])
    # average ranks: 1.5, 3, 2, 1
    np.testing.assert_allclose(reciprocal_rank(truth, rec, "average"), [1 / 1.5, 1 / 3, 1 / 2, 1])
    # column order: 2 (column 0 first), 3, 3 (columns 0 and 1 first), 1
    np.testing.assert_allclose(reciprocal_rank(truth, rec, "column"), [1 / 2, 1 / 3, 1 / 3, 1])
    observed = np.array([1, 1, 2, 2])
    outcome = np.array([1, 0, 0, 1])
    assert response_rate(rec, observed, outcome) == (0.5, 2)  # patients 0 (y=1) and 2 (y=0)
    # recommendation from predictions: first column among equals
    np.testing.assert_array_equal(recommend(np.array([[0.5, 0.5, 0.1], [0.1, 0.2, 0.2]])), [0, 1])


def test_metrics_two_treatments_binary_outcomes():
    truth = np.array([[1, 1], [0, 0], [1, 0], [0, 1]], dtype=float)
    pred = np.array([[0.9, 0.1], [0.3, 0.4], [0.2, 0.8], [0.1, 0.6]])  # recommends 0, 1, 1, 1
    observed = np.array([0, 1, 0, 1])
    outcome = truth[np.arange(4), observed]  # 1, 0, 1, 1
    m = selection_metrics(pred, observed, outcome, truth)
    assert m["rpl"] == pytest.approx(0.25)
    assert m["mrr"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2 + 1) / 4)
    assert m["mrr_column"] == pytest.approx((1 + 1 / 2 + 1 / 2 + 1) / 4)
    assert m["rr"] == pytest.approx(2 / 3) and m["rr_n"] == 3  # patients 0, 1, 3
    assert m["base_rate"] == pytest.approx(0.75)
    # AUC of the prediction for the observed treatment: scores 0.9, 0.4, 0.2, 0.6 vs 1, 0, 1, 1
    assert m["auc"] == pytest.approx(2 / 3)


def test_column_rule_gives_random_mrr_above_half_whatever_the_ties():
    truth = np.full((4, 4), 0.5)  # every treatment tied
    rec = np.arange(4)  # each treatment recommended once
    assert reciprocal_rank(truth, rec, "column").mean() == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert reciprocal_rank(truth, rec, "average").mean() == pytest.approx(1 / 2.5)


def test_compare_methods_bonferroni_and_identical_methods():
    rng = np.random.default_rng(0)
    good = rng.normal(0.1, 0.01, 20)
    values = pd.DataFrame({"good": good, "same": good.copy(), "bad": good + 0.2 + rng.normal(0, 0.01, 20)})
    out = compare_methods(values)
    assert out["n_blocks"] == 20 and out["friedman"]["p"] < 1e-4
    pairs = {(p["a"], p["b"]): p for p in out["pairs"]}
    assert pairs[("good", "same")]["p"] == 1.0
    assert pairs[("good", "bad")]["p"] < 1e-4
    assert pairs[("good", "bad")]["p_bonferroni"] == pytest.approx(3 * pairs[("good", "bad")]["p"])


# --------------------------------------------------------------------------- learning

FAST_DPNN = DPNNSettings(n_prototypes=4, epochs=40, batch_size=32, lr=1e-2)


def _planted(n: int, seed: int) -> SelectionProblem:
    """Treatment 0 helps when x0 > 0, treatment 1 when x0 < 0; 5 further noise features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    truth = np.column_stack([1 / (1 + np.exp(-3 * X[:, 0])), 1 / (1 + np.exp(3 * X[:, 0]))])
    t = rng.integers(0, 2, n)
    y = (rng.random(n) < truth[np.arange(n), t]).astype(int)
    return SelectionProblem(X, t, y, truth, ["a", "b"], truth_is_probability=True)


def test_planted_interaction_is_recovered():
    problem = _planted(600, seed=1)
    result = cross_validate_selection(
        problem, ["dpnn", "tlearner", "random", "oracle"], n_splits=3, n_repeats=1, dpnn=FAST_DPNN, progress=False
    )
    best = np.argmax(problem.truth, axis=1)
    agree = {m: np.mean(recommend(result.oof[m][0]) == best) for m in result.oof}
    rpl = result.folds.groupby("method")["rpl"].mean()
    assert agree["oracle"] == 1.0
    assert agree["tlearner"] > 0.85 and agree["dpnn"] > 0.85  # chance is 0.5
    assert abs(agree["random"] - 0.5) < 0.1
    assert rpl["dpnn"] < 0.4 * rpl["random"] and rpl["tlearner"] < 0.4 * rpl["random"]


def _noise_problem(n: int, seed: int) -> SelectionProblem:
    """Best treatment set by a hidden coin; the 10 observed features are pure noise."""
    rng = np.random.default_rng(seed)
    coin = rng.integers(0, 2, n)
    truth = np.where(coin[:, None] == np.array([[0, 1]]), 0.8, 0.2)
    t = rng.integers(0, 2, n)
    y = (rng.random(n) < truth[np.arange(n), t]).astype(int)
    return SelectionProblem(rng.normal(size=(n, 10)), t, y, truth, ["a", "b"], True)


def test_pure_noise_features_give_chance_level_rpl():
    # every method's expected RPL is 0.6 x 0.5 = 0.3 when its recommendation cannot see the coin
    methods = ["dpnn", "tlearner", "cbr", "kmnn", "random"]
    rpl = {m: [] for m in methods}
    for seed in range(4):
        result = cross_validate_selection(
            _noise_problem(200, seed), methods, n_splits=4, n_repeats=1, seed=seed,
            dpnn=DPNNSettings(n_prototypes=3, epochs=15, batch_size=32, lr=1e-2), progress=False,
        )
        for m in methods:
            rpl[m].append(result.folds.loc[result.folds["method"] == m, "rpl"].mean())
    for m in methods:
        assert np.mean(rpl[m]) == pytest.approx(0.3, abs=0.05), m  # SE about 0.01
    # the check has teeth: a 1-NN that has seen the test patients' own outcomes scores
    # 0.21 in expectation (SE 0.01 here), outside the tolerance above
    problem = _noise_problem(1000, 0)
    leaky = CaseBasedKNN(2, k=1).fit(problem.X, problem.treatment, problem.outcome).predict_proba(problem.X)
    assert regret(problem.truth, recommend(leaky)).mean() < 0.25


def test_cross_validation_is_seeded():
    problem = _planted(120, seed=2)
    kwargs = dict(n_splits=3, n_repeats=2, dpnn=DPNNSettings(n_prototypes=3, epochs=2, batch_size=20), progress=False)
    methods = ["dpnn", "tlearner", "cbr", "kmnn", "random"]
    a = cross_validate_selection(problem, methods, seed=5, **kwargs).folds.drop(columns="seconds")
    b = cross_validate_selection(problem, methods, seed=5, **kwargs).folds.drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b)
    c = cross_validate_selection(problem, ["random"], seed=6, **kwargs).folds
    assert not np.allclose(c["rpl"], a.loc[a["method"] == "random", "rpl"])


# --------------------------------------------------------------------------- cohort


def test_crossover_cohort_from_the_real_metadata(participants, phenotype):
    cohort, excluded = build_crossover_cohort(participants, phenotype, TreatmentOptions())
    assert len(cohort) == 24  # MDD participants with b0, d2 and p2
    assert cohort["first_treatment"].value_counts().to_dict() == {"ketamine": 12, "placebo": 12}
    row = cohort.loc["sub-MOA104"]  # MADRS b0 41, d2 17, p2 12; ketamine first
    assert row["first_treatment"] == "ketamine"
    assert row["improvement_ketamine"] == pytest.approx(24 / 41)
    assert row["improvement_placebo"] == pytest.approx(29 / 41)
    assert row["response_ketamine"] == 1 and row["response_placebo"] == 1
    assert "d2" in excluded["sub-MOA103"]  # placebo first, never had the ketamine period
    assert "infusion_1" in excluded["sub-MOA117"]  # n/a
    assert "group" in excluded["sub-MOA301"]  # healthy control
    responders = cohort.index[cohort["response_ketamine"] == 1].str[-3:].tolist()
    assert responders == ["104", "112", "118", "126", "134"]  # improvement >= 50% on ketamine
    assert cohort.index[cohort["response_placebo"] == 1].tolist() == ["sub-MOA104"]


def _features(cohort_ids: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(rng.normal(size=(len(cohort_ids), 4)), columns=[f"A_{i}" for i in range(4)])
    table.insert(0, "participant_id", [p.removeprefix("sub-") for p in cohort_ids])
    return table


def test_run_treatment_selection_writes_table_and_figure(tmp_path, participants, phenotype):
    features = _features(participants["participant_id"].tolist())
    features.loc[features["participant_id"] == "MOA101", "A_0"] = np.nan
    options = TreatmentOptions(n_repeats=2, dpnn=DPNNSettings(n_prototypes=3, epochs=10, lr=1e-3))
    out = run_treatment_selection(features, participants, phenotype, tmp_path, options)
    assert out["skipped"] is None
    assert out["n_participants"] == 23 and out["excluded"]["sub-MOA101"] == "missing feature values"
    summary = pd.read_csv(tmp_path / "group" / "treatment_selection.tsv", sep="\t")
    assert summary["method"].tolist() == ["dpnn", "tlearner", "cbr", "kmnn", "random", "always_ketamine",
                                          "always_placebo"]
    assert {"rpl_mean", "rpl_sd", "mrr_mean", "mrr_column_mean", "rr_mean", "auc_mean", "base_rate",
            "auc_ketamine_mean", "auc_placebo_mean"} <= set(summary)
    assert summary["rpl_mean"].between(0, 1).all() and summary["mrr_mean"].between(0.5, 1).all()
    per = pd.read_csv(tmp_path / "group" / "treatment_selection_participants.tsv", sep="\t")
    assert len(per) == 23 and set(per["dpnn_recommended"]) <= {"ketamine", "placebo"}
    png = (tmp_path / "group" / "treatment_selection.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["tests"]["rpl"]["n_blocks"] == 10
    # ds005917's real crossover (>= 50 % response): ketamine only 112 118 126 134; placebo only nobody
    # (104 responds to both): always-ketamine is an oracle on RPL and no learner can beat it
    assert out["informative"] == {"informative": 4, "ketamine_only": 4, "placebo_only": 0, "both": 1,
                                  "neither": 18}
    assert out["reference_policy"] == "always_ketamine"
    rpl = summary.set_index("method")["rpl_mean"]
    assert rpl["always_ketamine"] == 0 and (rpl >= rpl["always_ketamine"]).all()
    assert set(out["tests"]["rpl"]["versus_reference"]) == {"dpnn", "tlearner", "cbr", "kmnn", "random",
                                                           "always_placebo"}
    assert all(p > 0.05 for p in out["tests"]["rpl"]["versus_reference"].values())
    assert any("always-ketamine scores RPL 0 like an oracle" in n for n in out["notes"])
    assert summary.set_index("method").loc["always_ketamine", ["auc_mean", "auc_ketamine_mean"]].isna().all()


def test_no_informative_participant_means_no_p_values(tmp_path, participants, phenotype):
    """Placebo outcomes equal to the ketamine outcomes: every policy ties, so no test is run."""
    same = phenotype.copy()
    d2 = same[same["session_id"] == "ses-d2"].set_index("participant_id")["MADRS_Total"]
    p2 = same["session_id"] == "ses-p2"
    same.loc[p2, "MADRS_Total"] = same.loc[p2, "participant_id"].map(d2).to_numpy()
    options = TreatmentOptions(n_repeats=1, methods=("tlearner", "random", "always_ketamine", "always_placebo"),
                               target="difference")
    out = run_treatment_selection(_features(participants["participant_id"].tolist()), participants, same,
                                  tmp_path, options)
    assert out["informative"]["informative"] == 0 and out["tests"] is None
    assert any("no p-values" in n for n in out["notes"])
    summary = pd.read_csv(tmp_path / "group" / "treatment_selection.tsv", sep="\t")
    assert (summary["rpl_mean"] == 0).all()
    assert out["difference"]["improvement_loss"]["always_ketamine"] == 0


def test_missing_infusion_column_is_a_logged_skip(tmp_path, participants, phenotype, caplog):
    features = _features(participants["participant_id"].tolist())
    out = run_treatment_selection(features, participants.drop(columns="infusion_1"), phenotype, tmp_path)
    assert "infusion_1" in out["skipped"]
    assert "infusion_1" in caplog.text
    assert not (tmp_path / "group").exists()


def test_single_first_treatment_is_a_skip(tmp_path, participants, phenotype):
    features = _features(participants["participant_id"].tolist())
    infusion = participants["infusion_1"]
    only_ketamine = participants.assign(infusion_1=infusion.where(infusion.isna(), "d"))
    out = run_treatment_selection(features, only_ketamine, phenotype, tmp_path)
    assert out["skipped"].startswith("fewer than two first-period treatments")


def test_no_second_period_is_a_skip_naming_the_session(tmp_path, participants, phenotype):
    features = _features(participants["participant_id"].tolist())
    no_placebo = phenotype[phenotype["session_id"] != "ses-p2"]
    out = run_treatment_selection(features, participants, no_placebo, tmp_path)
    assert out["skipped"].startswith("no participant has a first-period infusion")
    assert "no MADRS_Total at session(s) p2 (" in out["skipped"]
    _, excluded = build_crossover_cohort(participants, no_placebo, TreatmentOptions())
    assert excluded["sub-MOA101"] == "no MADRS_Total at session(s) p2"


@pytest.mark.parametrize(
    "options, name",
    [
        (TreatmentOptions(methods=("dpnn", "oracle")), "methods"),
        (TreatmentOptions(n_splits=1), "n_splits"),
        (TreatmentOptions(response_threshold=1.5), "response_threshold"),
    ],
)
def test_bad_options_raise_input_error(tmp_path, participants, phenotype, options, name):
    with pytest.raises(InputError, match=name):
        run_treatment_selection(_features(["sub-MOA101"]), participants, phenotype, tmp_path, options)


def test_cli_group_level_goes_on_when_treatment_selection_cannot_run(tmp_path, participants, monkeypatch, capsys):
    bids, out = tmp_path / "bids", tmp_path / "out"
    (bids / "phenotype").mkdir(parents=True)
    participants.drop(columns="infusion_1").to_csv(bids / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    shutil.copy(DS / "phenotype" / "phenotype.tsv", bids / "phenotype")
    rng = np.random.default_rng(0)
    for pid in participants.loc[participants["group"] == "MDD", "participant_id"]:
        write_a_matrix(out, pid, "b0", "dmn4", rng.normal(0, 0.1, (4, 4)), ["PCC", "mPFC", "lIPL", "rIPL"])
    # a one-model suite keeps the test fast; the CLI's own options pass through unchanged
    quick = functools.partial(
        group_run.GroupOptions, include_group=("MDD",), schemes=("binary25",), targets=(), models=("logistic",),
        k_values=(3,), nested_repeats=0, progress=False,
    )
    monkeypatch.setattr(group_run, "GroupOptions", quick)
    rc = main([str(bids), str(out), "group", "--treatment-selection", "--n-permutations", "0", "--nprocs", "1",
               "--include-group", "MDD", "--nested-permutations", "0"])
    assert rc == 0
    assert "treatment selection skipped: participants.tsv lacks column(s) infusion_1" in capsys.readouterr().err
    group = out / "group"
    assert (group / "results.tsv").exists() and not (group / "treatment_selection.tsv").exists()
    report = (group / "report.html").read_text()
    assert "Treatment selection" in report and "Not run: participants.tsv lacks column(s) infusion_1" in report
    results = json.loads((group / "results.json").read_text())
    assert results["options"]["treatment_selection"] is True
    assert results["treatment_selection"]["skipped"].startswith("participants.tsv lacks")
