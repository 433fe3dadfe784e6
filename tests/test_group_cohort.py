"""The group level's cohort on the real ds005917 phenotype: the chosen group, or exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DS005917

from bids_ketdcm.cli.app import main
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.labels import build_labels
from bids_ketdcm.group.primary import load_plan

# Hand counts (tests/test_labels.py lists the participants): 27 MDD with MADRS at b0 and d2;
# >= 25 % response 13, >= 50 % response 6, remission (d2 <= 10) 4.
HAND = {"n": 27, "binary25": 13, "binary50": 6, "remission": 4}


def _bids(tmp_path: Path) -> Path:
    root = tmp_path / "bids"
    (root / "phenotype").mkdir(parents=True)
    shutil.copy(DS005917 / "participants.tsv", root)
    shutil.copy(DS005917 / "dataset_description.json", root)
    for name in ("phenotype.tsv", "phenotype.json"):
        shutil.copy(DS005917 / "phenotype" / name, root / "phenotype")
    return root


def test_mdd_cohort_matches_hand_counts():
    table = build_labels(DS005917, include_group=("MDD",)).table
    assert table.improvement.notna().sum() == HAND["n"]
    assert set(table.group) == {"MDD"}
    assert (table.binary25 == "response").sum() == HAND["binary25"]
    assert (table.binary50 == "response").sum() == HAND["binary50"]
    assert (table.remission == "remission").sum() == HAND["remission"]


def test_mixed_groups_stop_the_cli_with_exit_2(tmp_path, capsys):
    bids = _bids(tmp_path)
    assert main([str(bids), str(tmp_path / "out"), "group", "--skip-bids-validation"]) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message
    for group in ("MDD (33)", "HC (22)", "BP (3)", "--include-group"):
        assert group in message
    assert not (tmp_path / "out" / "group").exists()  # nothing half-written
    with pytest.raises(InputError, match="3 groups"):
        build_labels(bids)


def test_cohort_options_reach_the_labels(tmp_path, capsys):
    """--score-column and session options on a wide table with other session names."""
    bids = _bids(tmp_path)
    long = pd.read_csv(bids / "phenotype" / "phenotype.tsv", sep="\t").dropna(subset=["session_id"])
    wide = long.pivot(index="participant_id", columns="session_id", values="MADRS_Total")
    wide.columns = [f"MADRS_{c.replace('ses-', '').replace('b0', 'pre').replace('d2', 'post')}" for c in wide.columns]
    (bids / "phenotype" / "phenotype.tsv").unlink()
    (bids / "phenotype" / "phenotype.json").unlink()
    wide.reset_index().to_csv(bids / "phenotype" / "madrs.tsv", sep="\t", index=False, na_rep="n/a")
    table = build_labels(bids, score_column="MADRS", baseline_session="pre", post_session="ses-post",
                         placebo_session=None, include_group=("MDD",)).table
    assert table.improvement.notna().sum() == HAND["n"]
    assert (table.binary25 == "response").sum() == HAND["binary25"]
    # the CLI passes the same options: a wrong session names the option and exits 2
    code = main([str(bids), str(tmp_path / "out"), "group", "--skip-bids-validation", "--include-group", "MDD",
                 "--score-column", "MADRS", "--baseline-session", "pre", "--post-session", "d2"])
    assert code == 2
    assert "--post-session 'd2'" in capsys.readouterr().err
    assert np.isfinite(table.baseline).all()
    assert json.dumps(list(table.columns))


def test_analysis_plan_defaults_file_and_overrides(tmp_path):
    plan = load_plan(None)
    assert (plan.network, plan.target, plan.model, plan.n_splits, plan.n_repeats) == ("dmn4", "binary25", "logistic",
                                                                                       5, 10)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"network": "ket21", "target": "binary50", "n_repeats": 20}))
    assert load_plan(path).network == "ket21" and load_plan(path, target="remission").target == "remission"
    path.write_text(json.dumps({"netwrok": "dmn4"}))
    with pytest.raises(InputError, match="unknown key.*netwrok"):
        load_plan(path)
    with pytest.raises(InputError, match="--primary-target 'improvement'.*must be binary"):
        load_plan(None, target="improvement")
