"""Labels from the real ds005917 phenotype, checked against hand counts, and hostile input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import DS005917

from bids_ketdcm.errors import InputError
from bids_ketdcm.group.labels import build_labels, make_schemes

DS = DS005917

# Counted by hand from phenotype.tsv (MDD rows with MADRS at ses-b0 and ses-d2; r = (b0 - d2) / b0):
# responders r >= 0.5: 104 (.585) 111 (1.0) 112 (.857) 118 (.848) 126 (.625) 134 (.514);
# r >= 0.25 adds 101 (.314) 102 (.290) 107 (.447) 109 (.280) 116 (.353) 127 (.375) 136 (.405);
# remitters (d2 <= 10): 111 (0) 112 (5) 118 (5) 126 (9); worse (r < -0.1): 108 (-.242) 122 (-.233);
# stable (-0.1 <= r < 0.1): 105 110 121 124 131 133 135; mild (0.1 <= r < 0.25): 114 115 123 (r = 3/30
# exactly 0.1) 128 130.
HAND_COUNTS = {
    "binary50": {"nonresponse": 21, "response": 6},
    "binary25": {"nonresponse": 14, "response": 13},
    "remission": {"nonremission": 23, "remission": 4},
    "tri": {"nonresponse": 9, "partial": 12, "response": 6},
    "quad": {"worse": 2, "stable": 7, "partial": 12, "response": 6},
    "five": {"worse": 2, "stable": 7, "mild": 5, "strong": 7, "response": 6},
}
MDD_EXCLUDED = {  # MDD participants without both scores, and the session at fault
    "sub-MOA103": "ses-d2", "sub-MOA113": "ses-d2", "sub-MOA117": "MADRS_Total",
    "sub-MOA120": "ses-d2", "sub-MOA125": "ses-d2", "sub-MOA138": "ses-d2",
}


def _independent_counts() -> dict[str, dict[str, int]]:
    """Re-count the schemes with the csv module and plain Python (no project code)."""
    with open(DS / "participants.tsv", newline="") as f:
        mdd = {r["participant_id"] for r in csv.DictReader(f, delimiter="\t") if r["group"] == "MDD"}
    scores: dict[tuple[str, str], float] = {}
    with open(DS / "phenotype" / "phenotype.tsv", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["MADRS_Total"] != "n/a":
                scores[(r["participant_id"], r["session_id"])] = float(r["MADRS_Total"])
    out = {s: {} for s in HAND_COUNTS}
    for pid in mdd:
        b, d = scores.get((pid, "ses-b0")), scores.get((pid, "ses-d2"))
        if b is None or d is None or b == 0:
            continue
        r = (b - d) / b
        labels = {
            "binary50": "response" if r >= 0.5 else "nonresponse",
            "binary25": "response" if r >= 0.25 else "nonresponse",
            "remission": "remission" if d <= 10 else "nonremission",
            "tri": "nonresponse" if r < 0.1 else "partial" if r < 0.5 else "response",
            "quad": "worse" if r < -0.1 else "stable" if r < 0.1 else "partial" if r < 0.5 else "response",
            "five": "worse" if r < -0.1 else "stable" if r < 0.1 else "mild" if r < 0.25
            else "strong" if r < 0.5 else "response",
        }
        for scheme, label in labels.items():
            out[scheme][label] = out[scheme].get(label, 0) + 1
    return out


@pytest.fixture(scope="module")
def mdd():
    return build_labels(DS, include_group=("MDD",))


def test_mdd_counts_match_hand_count(mdd):
    assert mdd.table["improvement"].notna().sum() == 27
    independent = _independent_counts()
    for scheme, counts in HAND_COUNTS.items():
        assert mdd.counts("ketamine", scheme) == counts, scheme
        assert {k: v for k, v in independent[scheme].items()} == {k: v for k, v in counts.items() if v}
    # the 0.10 edge: 30 -> 27 is r = 0.1 exactly, 'partial' not 'nonresponse'
    assert mdd.table.at["sub-MOA123", "tri"] == "partial"
    assert mdd.table.at["sub-MOA111", "remission"] == "remission"
    assert mdd.table.at["sub-MOA101", "delta"] == 11
    assert mdd.table.at["sub-MOA101", "improvement"] == pytest.approx(11 / 35)


def test_mdd_exclusions_logged(mdd):
    ket = mdd.excluded[mdd.excluded.analysis == "ketamine"].set_index("participant_id").reason
    for pid, what in MDD_EXCLUDED.items():
        assert what in ket[pid], (pid, ket[pid])
    non_mdd = ket.drop(list(MDD_EXCLUDED))
    assert len(non_mdd) == 58 - 33 and non_mdd.str.contains("not in --include-group MDD").all()
    # every participant of participants.tsv is either labelled or excluded, with a reason
    everyone = set(pd.read_csv(DS / "participants.tsv", sep="\t").participant_id)
    labelled = set(mdd.table.index[mdd.table.improvement.notna()])
    assert labelled | set(ket.index) == everyone and not labelled & set(ket.index)


def test_placebo_labels(mdd):
    # 26 MDD participants have b0 and p2 (the 24 with b0, d2, p2 plus 103 and 113)
    assert mdd.table["placebo_improvement"].notna().sum() == 26
    assert mdd.table.at["sub-MOA104", "placebo_binary50"] == "response"  # 41 -> 12
    assert mdd.counts("placebo", "remission") == {"nonremission": 26, "remission": 0}


def _copy_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "bids"
    (root / "phenotype").mkdir(parents=True)
    shutil.copy(DS / "participants.tsv", root)
    for name in ("phenotype.tsv", "phenotype.json"):
        shutil.copy(DS / "phenotype" / name, root / "phenotype")
    return root


def test_wide_format_gives_same_labels(tmp_path, mdd):
    root = _copy_dataset(tmp_path)
    long = pd.read_csv(root / "phenotype" / "phenotype.tsv", sep="\t", na_values="n/a")
    wide = long.pivot(index="participant_id", columns="session_id", values="MADRS_Total")
    wide.columns = [f"MADRS_Total_{c}" for c in wide.columns]
    (root / "phenotype" / "phenotype.tsv").unlink()
    (root / "phenotype" / "phenotype.json").unlink()
    wide.reset_index().to_csv(root / "phenotype" / "madrs.tsv", sep="\t", index=False, na_rep="n/a")
    # an unrelated phenotype table is ignored
    pd.DataFrame({"participant_id": ["sub-MOA101"], "handedness": ["R"]}).to_csv(
        root / "phenotype" / "demographics.tsv", sep="\t", index=False)
    labels = build_labels(root, include_group=("MDD",))
    cols = ["baseline", "post", "improvement", *make_schemes()]
    pd.testing.assert_frame_equal(labels.table[cols], mdd.table[cols])


def test_missing_phenotype_folder(tmp_path):
    root = _copy_dataset(tmp_path)
    shutil.rmtree(root / "phenotype")
    with pytest.raises(InputError, match="no phenotype/ folder"):
        build_labels(root)


def test_score_column_missing(tmp_path):
    root = _copy_dataset(tmp_path)
    with pytest.raises(InputError, match="--score-column 'MADRS' not found.*phenotype.tsv"):
        build_labels(root, score_column="MADRS")


def test_sessions_named_differently(tmp_path):
    root = _copy_dataset(tmp_path)
    path = root / "phenotype" / "phenotype.tsv"
    path.write_text(path.read_text().replace("ses-b0", "ses-baseline"))
    with pytest.raises(InputError, match="--baseline-session 'b0'.*ses-baseline"):
        build_labels(root, include_group=("MDD",))
    assert build_labels(root, baseline_session="ses-baseline",
                        include_group=("MDD",)).table.improvement.notna().sum() > 0
    with pytest.raises(InputError, match="--post-session 'd3'"):
        build_labels(root, baseline_session="baseline", post_session="d3", include_group=("MDD",))


def test_na_and_zero_baselines_are_excluded(tmp_path):
    root = tmp_path / "bids"
    (root / "phenotype").mkdir(parents=True)
    rows = ["participant_id\tsession_id\tMADRS_Total",
            "sub-a\tses-b0\t20", "sub-a\tses-d2\t5",
            "sub-b\tses-b0\t0", "sub-b\tses-d2\t3",
            "sub-c\tses-b0\tn/a", "sub-c\tses-d2\t10",
            "sub-d\tses-b0\t30", "sub-d\tses-d2\tn/a",
            "sub-e\tses-b0\t10", "sub-e\tses-d2\t12"]
    (root / "phenotype" / "scores.tsv").write_text("\n".join(rows) + "\n")
    labels = build_labels(root, placebo_session=None)
    assert list(labels.table.index) == ["sub-a", "sub-e"]
    reasons = labels.excluded.set_index("participant_id").reason
    assert "baseline MADRS_Total is 0" in reasons["sub-b"]
    assert "at baseline ses-b0" in reasons["sub-c"]
    assert "at ses-d2" in reasons["sub-d"]
    assert labels.table.at["sub-e", "quad"] == "worse"  # r = -0.2


def test_bad_values_and_groups(tmp_path):
    root = _copy_dataset(tmp_path)
    with pytest.raises(InputError, match="--include-group: XYZ not a group.*MDD"):
        build_labels(root, include_group=("XYZ",))
    path = root / "phenotype" / "phenotype.tsv"
    path.write_text(path.read_text().replace("sub-MOA101\tses-b0\t35", "sub-MOA101\tses-b0\tthirty"))
    with pytest.raises(InputError, match="not numbers or n/a: 'thirty'"):
        build_labels(root)
    path.write_text(path.read_text().replace("sub-MOA101\tses-b0\tthirty", "sub-MOA101\tses-b0\t35")
                    + "sub-MOA101\tses-b0\t36\tn/a\tn/a\n")
    with pytest.raises(InputError, match="conflicting MADRS_Total.*sub-MOA101 ses-b0"):
        build_labels(root)


def test_labels_table_has_no_participant_without_labels(mdd):
    ket = mdd.table[["improvement", *make_schemes()]]
    assert ((ket.notna().all(axis=1)) | (ket.isna().all(axis=1))).all()
