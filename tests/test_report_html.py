"""The group report's new sections hold the numbers of the files they come from; the group tables too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_group_run import FAST, make_cohort

from bids_ketdcm.bids.derivatives import read_connectivity
from bids_ketdcm.bids.naming import CONNECTIVITY_SUFFIX, RunEntities, parse_name, timeseries_paths
from bids_ketdcm.group import GroupOptions, run_group


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """The ds005917 cohort with sidecars as the participant level writes them (one run did not converge)."""
    bids, out = make_cohort(tmp_path_factory.mktemp("report"), effect=0.5)
    truth = {}
    for k, path in enumerate(sorted(out.glob(f"sub-*/ses-b0/func/*_seg-dmn4_meas-dcm_{CONNECTIVITY_SUFFIX}.tsv"))):
        participant = path.name.split("_")[0]
        meta = {"Converged": k != 3, "Iterations": 20 + k, "VarianceExplained": 0.5 + 0.01 * k, "Network": "dmn4"}
        path.with_suffix(".json").write_text(json.dumps(meta))
        qc = {"mean_fd": 0.1 + 0.002 * k, "n_kept": 190 - k % 3, "n_volumes": 192}
        entities = parse_name(path)
        timeseries_paths(out, RunEntities.from_mapping(entities), "dmn4")["json"].write_text(json.dumps({"QC": qc}))
        truth[participant] = {**meta, **qc, "A": read_connectivity(path)[0]}
    run_group(bids, out, GroupOptions(**{**FAST, "n_permutations": 19}, nprocs=1, require_converged=False))
    return out / "group", truth


def test_group_tables_hold_the_participants_files(group_run):
    group, truth = group_run
    qc = pd.read_csv(group / "seg-dmn4_qc.tsv", sep="\t").set_index("participant_id")
    assert sorted(qc.index) == sorted(truth) and len(truth) == 29  # every MDD participant with a label
    for participant, t in truth.items():
        row = qc.loc[participant]
        assert (bool(row.converged), int(row.iterations), int(row.volumes_kept)) == (
            t["Converged"], t["Iterations"], t["n_kept"])
        assert np.isclose(row.variance_explained, t["VarianceExplained"]) and np.isclose(row.mean_fd_mm, t["mean_fd"])
    edges = pd.read_csv(group / "seg-dmn4_edges.tsv", sep="\t").set_index("participant_id")
    regions = ["PCC", "mPFC", "lIPL", "rIPL"]
    for participant, t in truth.items():  # column source->target holds A[target, source]
        for i, target in enumerate(regions):
            for j, source in enumerate(regions):
                assert edges.loc[participant, f"{source}->{target}"] == pytest.approx(t["A"][i, j])


def test_group_report_sections_exist_and_hold_numbers(group_run):
    group, truth = group_run
    page = (group / "report.html").read_text()
    for anchor in ("provenance", "methods", "qc", "results", "software"):
        assert f'<section id="{anchor}">' in page or f"<section id='{anchor}'>" in page, anchor
    assert re.search(r"<th>Date</th><td>\d{4}-\d\d-\d\d \d\d:\d\d UTC</td>", page)
    assert re.search(r"<th>Command line</th><td><code>[^<]+</code>", page)
    assert f"<th>torch</th><td>{torch.__version__}</td>" in page
    methods = re.search(r'<p class="methods">(.*?)</p>', page, re.S).group(1)
    iterations = [t["Iterations"] for t in truth.values()]
    assert f"Of the 29 inversions of &#39;dmn4&#39;, 28 converged (median {np.median(iterations):.0f} iterations" \
        in methods
    assert not truth["sub-MOA104"]["Converged"]
    assert "19 label permutations" in methods and "ses-d2" in methods
    qc = page.split('<section id="qc">', 1)[1].split("</section>", 1)[0]
    assert "seg-dmn4: 28 of 29 converged" in qc
    rows = re.findall(r"<tr><td>(sub-\w+)</td>\s*<td>(.*?)</td>\s*<td>(\d+)</td>\s*<td>([\d.]+ %)</td>\s*"
                      r"<td>([\d.]+)</td>\s*<td>(\d+) / (\d+)</td></tr>", qc)
    assert len(rows) == 29
    for participant, converged, iters, explained, fd, kept, volumes in rows:
        t = truth[participant]
        assert ("NO" in converged) == (not t["Converged"]) and int(iters) == t["Iterations"]
        assert explained == f"{100 * t['VarianceExplained']:.1f} %" and fd == f"{t['mean_fd']:.3f}"
        assert (int(kept), int(volumes)) == (t["n_kept"], 192)
    results = page.split("<section id='results'>", 1)[1]
    assert "<th>Network</th>" in results and "_" not in re.findall(r"<thead>.*?</thead>", results, re.S)[0]


def test_one_stylesheet_for_both_reports(group_run):
    group, _ = group_run
    css = (Path(__file__).resolve().parents[1] / "bids_ketdcm" / "report" / "templates" / "style.css").read_text()
    assert css.strip() in (group / "report.html").read_text()
