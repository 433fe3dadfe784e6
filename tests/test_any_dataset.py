"""Any fMRIPrep dataset: the layouts of the official BIDS examples, filled with synthetic voxels.

The func file lists of ``ds000001-fmriprep``, ``7t_trt``, ``volume_timing`` and ``synthetic``
(bids-standard/bids-examples, commit in ``tests/data/bids_examples/COMMIT``) are rebuilt with
one small synthetic run linked under every name: every run must be found, and every run kept
under its own output name with the entities that distinguish it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import SPACE, example_names, fmriprep_layout

from bids_ketdcm.bids.layout import find_bold_runs
from bids_ketdcm.bids.naming import RUN_ENTITIES, parse_name
from bids_ketdcm.cli.app import main

#: example -> (task, raw layout?, preprocessed BOLD runs in MNI152NLin2009cAsym)
EXAMPLES = {
    "ds000001-fmriprep": ("balloonanalogrisktask", False, 12),
    "7t_trt": ("rest", True, 132),
    "volume_timing": ("rest", True, 6),
    "synthetic": ("nback", False, 20),  # and 10 task-rest runs
}


def _build(example: str, tmp_path: Path, template: dict) -> Path:
    task, raw, _ = EXAMPLES[example]
    root = fmriprep_layout(tmp_path / example, example_names(example), template, raw=raw)
    if example == "synthetic":  # its confounds predate fMRIPrep's names: give each run 1.x's regressors
        for bold in root.glob(f"sub-*/ses-*/func/*_space-{SPACE}_desc-preproc_bold.nii"):
            os.link(template["confounds"], bold.with_name(bold.name.split("_space-")[0]
                                                          + "_desc-confounds_regressors.tsv"))
    return root


def _run_entities(path: Path) -> dict[str, str]:
    ent = parse_name(path)
    return {k: v for k, v in ent.items() if k in RUN_ENTITIES}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_every_run_of_the_examples_is_found(example, tmp_path, tiny_run):
    root = _build(example, tmp_path, tiny_run)
    task, _, expected = EXAMPLES[example]
    runs = find_bold_runs(root, task=task)  # default: every session, datasets without sessions too
    assert len(runs) == expected
    assert len({r.entities for r in runs}) == expected  # no two runs share output names
    for r in runs:
        assert {k: v for k, v in r.entities.entities if k in RUN_ENTITIES} == _run_entities(r.bold)
    if example == "synthetic":
        assert all(r.mask.name.endswith("label-brain_mask.nii") for r in runs)  # fMRIPrep 1.x masks
        assert all(r.confounds.name.endswith("desc-confounds_regressors.tsv") for r in runs)  # before 20.2


@pytest.mark.parametrize(("example", "selection", "n_runs"), [
    ("volume_timing", [], 6),  # six runs differing only in acq-, no sessions
    ("7t_trt", ["--session-label", "1"], 3),  # acq-fullbrain run-1/2 and acq-prefrontal without run
    ("ds000001-fmriprep", [], 3),  # no sessions, res-2 in every name
])
def test_every_run_is_kept_with_its_entities(example, selection, n_runs, tmp_path, tiny_run):
    root = _build(example, tmp_path, tiny_run)
    task = EXAMPLES[example][0]
    out = tmp_path / "out"
    labels = ["01" if example != "ds000001-fmriprep" else "10"]
    assert main([str(root), str(out), "participant", "--skip-bids-validation", "--task-label", task,
                 "--participant-label", *labels, *selection]) == 0
    session = f"ses-{selection[1]}/" if selection else ""
    bolds = sorted(root.glob(f"sub-{labels[0]}/{session}func/*_space-{SPACE}*desc-preproc_bold.nii*"))
    assert len(bolds) == n_runs
    for bold in bolds:
        ent = parse_name(bold)
        expected = "_".join(f"{k}-{ent[k]}" for k in RUN_ENTITIES if k in ent)
        expected += f"_space-{SPACE}_seg-dmn4" + (f"_res-{ent['res']}" if "res" in ent else "")
        folder = out / f"sub-{ent['sub']}" / (f"ses-{ent['ses']}" if "ses" in ent else "") / "func"
        relmat = folder / f"{expected}_meas-dcm_relmat.tsv"
        assert relmat.exists(), relmat
        assert (folder / f"{expected}_desc-denoised_timeseries.tsv").exists()
        sources = json.loads(relmat.with_suffix(".json").read_text())["Sources"]
        assert sources[0] == f"bids:fmriprep:{bold.relative_to(root).as_posix()}"
    assert len(list(out.rglob("*_relmat.tsv"))) == n_runs
    report = (out / f"sub-{labels[0]}.html").read_text()
    assert report.count("Converged") >= 1


def test_session_labels_select_several_sessions(tmp_path, tiny_run):
    root = _build("7t_trt", tmp_path, tiny_run)
    both = find_bold_runs(root, participant_labels=["01"], session=["1", "ses-2"])
    one = find_bold_runs(root, participant_labels=["01"], session="2")
    assert len(both) == 6 and len(one) == 3
