"""Denoising strategies as data: the presets are JSON files, a user's own file works and is recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bids_ketdcm.errors import InputError
from bids_ketdcm.participant.denoise import load_strategy, preset_names
from bids_ketdcm.participant.rois import load_network
from bids_ketdcm.participant.timeseries import extract_timeseries
from bids_ketdcm.testing.synth import make_synthetic_dataset

SPACE = "MNI152NLin2009cAsym"
PACKAGE_FILES = Path(__file__).resolve().parents[1] / "bids_ketdcm" / "data" / "denoise"


def test_every_preset_is_a_valid_file_named_as_its_strategy():
    names = preset_names()
    assert {"simple", "simple+gsr", "scrubbing", "compcor", "spm", "9p", "36p", "none"} <= set(names)
    for name in names:
        strategy = load_strategy(name)
        data = (PACKAGE_FILES / f"{name}.json").read_bytes()
        assert strategy.name == name and strategy.file == f"{name}.json" and strategy.builtin
        assert strategy.sha256 == hashlib.sha256(data).hexdigest()
        assert strategy.description


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not valid JSON"),
    ('["spm"]', "must hold a JSON object"),
    ('{"name": "x", "function": "load_confounds", "colour": 1}', "unknown key.*colour"),
    ('{"name": "x", "function": "clean"}', "function 'clean' is not one of"),
    ('{"name": "x", "function": "load_confounds", "parameters": {"motoin": "basic"}}', "takes no parameter.*motoin"),
    ('{"function": "load_confounds"}', "missing key.*name"),
])
def test_a_bad_strategy_file_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "mine.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        load_strategy(path)
    assert str(path) in str(err.value)


def test_unknown_name_lists_the_presets():
    with pytest.raises(InputError, match="simple\\+gsr"):
        load_strategy("aroma")


def test_a_user_strategy_file_denoises_as_the_preset_it_copies_and_is_recorded(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_subjects=1, seed=3, n_scans=128)
    func = root / "derivatives" / "fmriprep" / "sub-MOA101" / "ses-b0" / "func"
    prefix = "sub-MOA101_ses-b0_task-rest_run-01" if list(func.glob("*run-01*")) else "sub-MOA101_ses-b0_task-rest"
    files = [func / f"{prefix}_space-{SPACE}_desc-preproc_bold.nii.gz",
             func / f"{prefix}_space-{SPACE}_desc-brain_mask.nii.gz", func / f"{prefix}_desc-confounds_timeseries.tsv"]
    spec = json.loads((PACKAGE_FILES / "9p.json").read_text())
    spec.update(name="my-9p", description="the 9 parameters, from my lab's file")
    mine = tmp_path / "lab strategy.json"
    mine.write_text(json.dumps(spec))
    network = load_network("dmn4")
    ours = extract_timeseries(*files, network, 2.5, denoise=str(mine), min_kept_seconds=100)
    preset = extract_timeseries(*files, network, 2.5, denoise="9p", min_kept_seconds=100)
    assert np.array_equal(ours.data, preset.data)
    assert len([c for c in ours.denoise["Confounds"] if not c.startswith("cosine")]) == 9  # 6 motion, WM, CSF, GS
    assert ours.denoise["Name"] == "my-9p" and ours.denoise["File"] == "lab strategy.json"
    assert ours.denoise["SHA256"] == hashlib.sha256(mine.read_bytes()).hexdigest()
    assert ours.denoise["Builtin"] is False and str(tmp_path) not in json.dumps(ours.denoise)
