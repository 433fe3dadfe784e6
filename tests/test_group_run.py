"""End to end: ds005917 phenotype + synthetic A matrices -> run_group outputs.

The A matrices of a 4-region network vary between participants with estimation noise
(sd 0.05 Hz on every connection); in the planted cohort one connection (PCC -> mPFC)
also carries 0.5 Hz x the participant's real ketamine improvement r. The suite must find
it; in the null cohort (no planted term) it must report chance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DS005917

from bids_ketdcm.errors import InputError
from bids_ketdcm.group import GroupOptions, run_group
from bids_ketdcm.group.labels import build_labels
from bids_ketdcm.group.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS
from bids_ketdcm.testing.fixtures import write_a_matrix

DS = DS005917
REGIONS = ["PCC", "mPFC", "lIPL", "rIPL"]


def make_cohort(root: Path, effect: float, noise: float = 0.05, seed: int = 0) -> tuple[Path, Path]:
    """Real participants.tsv and phenotype; derivative A matrices for every MDD participant."""
    bids, out = root / "bids", root / "out"
    (bids / "phenotype").mkdir(parents=True)
    shutil.copy(DS / "participants.tsv", bids)
    for name in ("phenotype.tsv", "phenotype.json"):
        shutil.copy(DS / "phenotype" / name, bids / "phenotype")
    labels = build_labels(bids, include_group=("MDD",))
    r = labels.table["improvement"]
    rng = np.random.default_rng(seed)
    base = rng.normal(0.05, 0.1, (4, 4))
    np.fill_diagonal(base, -0.5)
    for pid in labels.table.index:
        A = base + rng.normal(0, noise, (4, 4))
        A[1, 0] += effect * (r[pid] if pd.notna(r[pid]) else r.mean())
        write_a_matrix(out, pid, "b0", "dmn4", A, REGIONS)
    return bids, out


FAST = dict(include_group=("MDD",), n_permutations=99, nested_repeats=2, nested_permutations=49, rf_trees=20,
            progress=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    bids, out = make_cohort(tmp_path_factory.mktemp("planted"), effect=0.5)
    summary = run_group(bids, out, GroupOptions(**FAST, nprocs=2))
    return out / "group", summary


def test_planted_link_is_found(planted):
    group, summary = planted
    res = pd.read_csv(group / "results.tsv", sep="\t")
    ket = res[(res.treatment == "ketamine") & (res.target == "binary25")]
    head = ket[(ket.model == "logistic") & (ket.protocol == "kfold5")].iloc[0]
    assert head.n_permutations == 99 and head.p_value < 0.1  # one 5-fold split: exploratory
    primary = summary["primary"]  # the pre-specified analysis: 10 repeats of the same model
    assert primary["p_value"] < 0.05 and primary["models"]["imaging"]["balanced_accuracy"]["ci95"][0] > 0.5
    imaging = ket[~ket.model.isin(["majority", "baseline_score"]) & (ket.protocol == "nested")]
    assert imaging.headline.max() >= 0.8
    assert head.headline > ket[(ket.model == "majority") & (ket.protocol == "kfold5")].headline.iloc[0]
    reg = res[(res.treatment == "ketamine") & (res.target == "improvement") & (res.model == "elasticnet")
              & (res.protocol == "kfold5")].iloc[0]
    assert reg.r2 > 0.5 and reg.p_value < 0.05
    # the weights of the best model point at the planted connection (row mPFC, column PCC)
    best = json.loads((group / "results.json").read_text())["best_model"]
    w = np.abs(np.array(best["weights"], dtype=float))
    assert np.unravel_index(np.nanargmax(w), w.shape) == (1, 0), best
    # placebo labels carry no planted signal
    plc = res[(res.treatment == "placebo") & (res.target == "binary25") & (res.model == "logistic")
              & (res.protocol == "kfold5")].iloc[0]
    assert plc.p_value > 0.05
    assert summary["participants"] == {"ketamine": 27, "placebo": 26}


def test_outputs_are_complete(planted):
    group, summary = planted
    res = pd.read_csv(group / "results.tsv", sep="\t")
    assert not res.duplicated(["treatment", "network", "target", "model", "protocol"]).any()
    cls = res[res.task == "classification"]
    reg = res[res.task == "regression"]
    assert not cls[list(CLASSIFICATION_METRICS)].isna().any().any()
    assert not reg[list(REGRESSION_METRICS)].isna().any().any()
    assert set(res.protocol) == {"kfold3", "kfold4", "kfold5", "nested"}
    assert set(res[res.treatment == "ketamine"].target) == {
        "binary50", "binary25", "remission", "tri", "quad", "five", "post", "delta", "improvement"}
    # placebo remission has one class (no MDD participant remits on placebo): skipped, logged
    assert summary["skipped"] == [{"treatment": "placebo", "network": "dmn4", "target": "remission",
                                   "reason": "every participant is in class 'nonremission'"}]
    folds = pd.read_csv(group / "folds.tsv", sep="\t")
    assert len(folds[(folds.model == "logistic") & (folds.protocol == "nested")
                     & (folds.target == "binary25") & (folds.treatment == "ketamine")]) == 10
    pred = pd.read_csv(group / "predictions.tsv", sep="\t")
    one = pred[(pred.treatment == "ketamine") & (pred.target == "binary25") & (pred.model == "logistic")
               & (pred.protocol == "kfold5")]
    assert sorted(one.participant_id) == sorted(set(one.participant_id)) and len(one) == 27
    labels = pd.read_csv(group / "labels.tsv", sep="\t")
    assert labels.binary25.notna().sum() == 27
    excluded = pd.read_csv(group / "labels_excluded.tsv", sep="\t")
    assert "sub-MOA117" in set(excluded.participant_id)
    info = json.loads((group / "results.json").read_text())
    assert info["headline"]["metric"] == {"classification": "balanced_accuracy", "regression": "r2"}
    html = (group / "report.html").read_text()
    assert html.index("Primary analysis (pre-specified)") < html.index("Participant flow") \
        < html.index("Exploratory analyses (not pre-specified)")
    assert html.count("data:image/png") == 10  # 9 targets + weights
    # multiplicity: Holm >= BH >= raw on every tested row; max-statistic over the ketamine k-fold grid
    tested = res[res.p_value.notna()]
    assert (tested.p_holm >= tested.p_bh - 1e-12).all() and (tested.p_bh >= tested.p_value - 1e-12).all()
    grid = tested[tested.p_maxstat.notna()]
    assert set(grid.treatment) == {"ketamine"} and set(grid.protocol) == {"kfold5"} and len(grid) == 9
    assert (grid.p_maxstat >= grid.p_value - 1e-12).all()
    assert info["best_model"]["p_maxstat"] == pytest.approx(grid.p_maxstat.min())
    # nested permutations (inner search redone) on the ketamine binary targets
    nested = tested[(tested.protocol == "nested")]
    assert set(nested.target) == {"binary25", "binary50", "remission"} and set(nested.treatment) == {"ketamine"}
    assert (nested.n_permutations == 49).all()
    flow = {f["step"]: f["n"] for f in info["participant_flow"]}
    assert flow["in the chosen group (MDD)"] == 33 and flow["analysed in the primary analysis"] == 27


def test_null_cohort_reports_chance_and_is_reproducible(tmp_path):
    bids, out = make_cohort(tmp_path, effect=0.0)
    options = dict(FAST, schemes=("binary25",), targets=("improvement",), models=("logistic", "elasticnet",
                   "majority", "mean"), nested_repeats=1, report=False, drop_diagonal=True,
                   add_baseline_madrs=True)
    first = run_group(bids, out, GroupOptions(**options, nprocs=1))
    table1 = pd.read_csv(out / "group" / "results.tsv", sep="\t")
    assert set(table1[table1.model == "logistic"].n_features) == {4 * 3 + 1}  # no diagonal, + baseline
    for row in first["summary"]:
        assert row["p_value"] > 0.05 and row["verdict"] == "not distinguishable from chance"
    run_group(bids, out, GroupOptions(**options, nprocs=2))
    pd.testing.assert_frame_equal(table1, pd.read_csv(out / "group" / "results.tsv", sep="\t"))


def test_hostile_inputs(tmp_path):
    bids, out = make_cohort(tmp_path, effect=0.5)
    quick = dict(FAST, schemes=("binary25",), targets=(), models=("logistic",), n_permutations=0,
                 nested_repeats=0, report=False)
    missing = next(out.glob("sub-MOA104/ses-b0/func/*.tsv"))
    missing.unlink()
    with pytest.raises(InputError, match="sub-MOA104 seg-dmn4: no connectivity file.*--allow-missing"):
        run_group(bids, out, GroupOptions(**quick))
    summary = run_group(bids, out, GroupOptions(**quick, allow_missing=True))
    res = pd.read_csv(out / "group" / "results.tsv", sep="\t")
    assert res[res.treatment == "ketamine"].n_participants.iloc[0] == 26
    # sub-MOA104 was the only placebo responder: placebo binary25 now has one class, skipped
    assert summary["n_tasks"] == 1 and summary["skipped"][0]["treatment"] == "placebo"
    # a single class after filtering (no one remits with a threshold of -1)
    with pytest.raises(InputError, match="ketamine remission seg-dmn4: every participant is in class"):
        run_group(bids, out, GroupOptions(**{**quick, "schemes": ("remission",)}, remission_threshold=-1,
                                          allow_missing=True))
    # too few participants: the BP group has 2 with ketamine labels
    for pid in ("sub-MOA202", "sub-MOA203"):
        write_a_matrix(out, pid, "b0", "dmn4", np.eye(4), REGIONS)
    with pytest.raises(InputError, match="ketamine binary25 seg-dmn4: 2 participants with labels and features"):
        run_group(bids, out, GroupOptions(**{**quick, "include_group": ("BP",)}))
    # every bad option reported at once
    with pytest.raises(InputError, match="GroupOptions.models: unknown svr.*GroupOptions.k_values.*--nprocs"):
        run_group(bids, out, GroupOptions(models=("svr",), k_values=(1, 5), nprocs=0))
    with pytest.raises(InputError, match="GroupOptions.permutation_models: random_forest cannot be permuted"):
        run_group(bids, out, GroupOptions(permutation_models=("random_forest",)))
    assert not (out / "group" / "report.html").exists()
