"""Per-patient prediction: probabilities, bootstrap intervals, contributions, outputs, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_ketdcm.cli.app import main
from bids_ketdcm.group.model_io import fit_final
from bids_ketdcm.model_store import load_model, save_model
from bids_ketdcm.participant.predict import DISCLAIMER, predict_patients, run_predictions
from bids_ketdcm.report import RunResult, update_participant_report, write_participant_report
from bids_ketdcm.report.participant import prediction_section
from bids_ketdcm.testing.fixtures import write_a_matrix

sys.path.insert(0, str(Path(__file__).parent))
from test_structural import labelled_atlas, spheres, write_anat  # noqa: E402

LABEL = {"scheme": "binary50", "variable": "improvement", "edges": [0.5], "classes": ["nonresponse", "response"],
         "positive_class": "response"}
REGIONS = ["PCC", "mPFC"]
A_NAMES = [f"{s}->{t}" for t in REGIONS for s in REGIONS]


def _training(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """y depends on feature 0 only (logistic, slope 2)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = (rng.random(n) < 1 / (1 + np.exp(-2 * X[:, 0]))).astype(int)
    return X, y


def _model(folder: Path, n: int = 60, seed: int = 0, n_bootstrap: int = 100, names=A_NAMES,
           feature_set: str = "dcm", network: str = "dmn2"):
    X, y = _training(n, seed)
    est, boots = fit_final(X[:, : len(names)], y, 2, {"C": 1.0}, n_bootstrap=n_bootstrap, seed=seed)
    path = save_model(folder, estimator=est, bootstrap=boots, feature_names=list(names), feature_set=feature_set,
                      network=network, label=LABEL, model={"name": "logistic"},
                      training={"cv_metrics": {"nested": {"balanced_accuracy": 0.7}}},
                      feature_spec={"session": "b0", "drop_diagonal": False, "require_converged": True},
                      bootstrap_seed=seed)
    return load_model(path)


def test_probability_interval_and_contributions(tmp_path):
    model = _model(tmp_path / "m")
    X = np.array([[2.5, 0.0, 0.0, 0.0], [-2.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 9.0, 0.0, 0.0]])
    preds = predict_patients(model, X, A_NAMES, ["sub-a", "sub-b", "sub-c", "sub-d"], "dmn2")
    high, low, mid, odd = preds
    assert high.probability > 0.8 and low.probability < 0.2
    assert high.predicted_class == "response" and low.predicted_class == "nonresponse"
    for p in preds:
        # contributions + intercept = the model's log-odds of the positive class
        logit = np.log(p.probability / (1 - p.probability))
        assert p.contributions.contribution.sum() + p.intercept == pytest.approx(logit, abs=1e-9)
        assert p.interval[0] <= p.interval[1]
        np.testing.assert_allclose(p.probabilities.sum(), 1.0)
    assert high.contributions.feature.iloc[0] == "PCC->PCC"  # feature 0 drove it
    assert odd.out_of_range == ["mPFC->PCC"] and high.out_of_range == []
    assert high.train_cv_balanced_accuracy == 0.7


def test_interval_narrows_with_more_training_data(tmp_path):
    """The bootstrap interval reflects sampling uncertainty: 10x the participants, narrower."""
    X = _training(50, 99)[0]
    widths = {}
    for n in (30, 300):
        model = _model(tmp_path / f"m{n}", n=n, seed=1, n_bootstrap=60)
        preds = predict_patients(model, X, A_NAMES, [f"sub-{i}" for i in range(len(X))], "dmn2")
        widths[n] = np.mean([p.interval[1] - p.interval[0] for p in preds])
    assert widths[300] < 0.6 * widths[30]


def test_run_predictions_writes_derivatives(tmp_path):
    model = _model(tmp_path / "models")
    out = tmp_path / "out"
    rng = np.random.default_rng(3)
    for label in ("01", "02"):
        write_a_matrix(out, label, "b0", "dmn2", rng.normal(size=(2, 2)), REGIONS)
    result = run_predictions([model], out, ["01", "02", "03"], "b0")
    assert [len(result[s]) for s in ("01", "02", "03")] == [1, 1, 0]  # sub-03 has no features
    table = pd.read_csv(out / "sub-01/ses-b0/sub-01_ses-b0_desc-response_predictions.tsv", sep="\t")
    row = table.iloc[0]
    assert row.model_id == model.model_id and row.positive_class == "response"
    assert row.interval_low <= row.interval_high and row.proba_response == pytest.approx(row.probability)
    assert row.probability == pytest.approx(result["01"][0].probability)
    meta = json.loads((out / "sub-01/ses-b0/sub-01_ses-b0_desc-response_predictions.json").read_text())
    assert meta["IntendedUse"] == DISCLAIMER
    assert meta["Predictions"][0]["model_sha256"] == model.manifest["files"]["model.joblib"]["sha256"]
    assert len(meta["Predictions"][0]["contributions"]) == 4
    assert not (out / "sub-03").exists()


def test_report_section_is_labelled(tmp_path):
    model = _model(tmp_path / "m")
    preds = predict_patients(model, np.zeros((1, 4)), A_NAMES, ["sub-01"], "dmn2")
    section = prediction_section(preds, DISCLAIMER)
    assert "research tool, not a clinical device" in section and DISCLAIMER in section
    skipped = RunResult(
        run_label="ses-b0_task-rest", network="dmn4", roi_names=REGIONS, roi_coords=None, timeseries=None, tr=2.5,
        freqs=None, csd_observed=None, csd_predicted=None, A_hz=None, A_var=None, F_history=[],
        free_energy=float("nan"), iterations=0, converged=False, variance_explained=float("nan"), seconds=0.0,
        device="cpu", qc={}, denoise_strategy="simple", skipped_reason="no mask")
    page = write_participant_report(tmp_path / "sub-01.html", "01", [skipped], {},
                                    extra_sections=[("prediction", "Prediction", section)]).read_text()
    assert '<a href="#prediction">Prediction</a>' in page and '<section id="prediction">' in page
    assert page.index('id="prediction"') > page.index('id="summary"')


def test_participant_cli_gmv_and_apply_model(tmp_path, capsys):
    """participant --features gmv --apply-model: GMV tables, then each participant predicted."""
    fmriprep, bids, out = tmp_path / "fmriprep", tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    for sub in ("01", "02"):
        write_anat(fmriprep, sub, jacobian=1.0 if sub == "01" else 2.0)
    spheres(tmp_path)
    labelled_atlas(tmp_path, 2.0)
    model = _model(tmp_path / "models", names=["big:gmv", "small:gmv"], feature_set="gmv", network="phantom")
    args = [str(bids), str(out), "participant", "--skip-bids-validation", "--fmriprep-dir", str(fmriprep),
            "--features", "gmv", "--network", str(tmp_path / "phantom.tsv"), "--gmv-atlas",
            str(tmp_path / "atlas2.nii.gz"), "--apply-model", str(model.path.parent), "--session-label", "b0"]
    assert main(args) == 0, capsys.readouterr().err
    gmv = pd.read_csv(next(out.glob("sub-01/ses-b0/anat/*seg-atlas2_desc-gmv_morph.tsv")), sep="\t")
    np.testing.assert_allclose(gmv.gmv_mm3, [2000.0, 2000.0], rtol=1e-6)
    for sub in ("01", "02"):
        table = pd.read_csv(out / f"sub-{sub}/ses-b0/sub-{sub}_ses-b0_desc-response_predictions.tsv", sep="\t")
        assert table.model_id.tolist() == [model.model_id]
        # no DCM run here, yet the prediction reaches the participant's report, labelled
        page = (out / f"sub-{sub}.html").read_text()
        assert '<section id="prediction">' in page and DISCLAIMER in page
        assert f"{table.probability.iloc[0]:.2f}" in page
    # a model of another network, or of features not requested: exit code 2 before any work
    other = _model(tmp_path / "other", network="dmn4")
    bad = [*args[:-4], "--apply-model", str(other.path.parent), "--session-label", "b0"]
    assert main(bad) == 2
    assert "needs dcm features of seg-dmn4" in capsys.readouterr().err


def test_prediction_section_added_to_an_existing_report(tmp_path):
    """A later --apply-model run puts its section into the report of runs finished before, once."""
    model = _model(tmp_path / "m")
    skipped = RunResult(
        run_label="ses-b0_task-rest", network="dmn4", roi_names=REGIONS, roi_coords=None, timeseries=None, tr=2.5,
        freqs=None, csd_observed=None, csd_predicted=None, A_hz=None, A_var=None, F_history=[],
        free_energy=float("nan"), iterations=0, converged=False, variance_explained=float("nan"), seconds=0.0,
        device="cpu", qc={}, denoise_strategy="simple", skipped_reason="no mask")
    path = write_participant_report(tmp_path / "sub-01.html", "01", [skipped], {})
    before = path.read_text()
    for x in (2.5, -2.5):  # a second prediction replaces the first
        preds = predict_patients(model, np.array([[x, 0.0, 0.0, 0.0]]), A_NAMES, ["sub-01"], "dmn2")
        update_participant_report(path, "01", [("prediction", "Prediction", prediction_section(preds, DISCLAIMER))])
    page = path.read_text()
    assert page.count('<section id="prediction">') == 1 and page.count('<a href="#prediction">') == 1
    assert f"<td>{preds[0].probability:.2f}</td>" in page and preds[0].probability < 0.2
    assert page.index('id="summary"') < page.index('id="prediction"') < page.index('id="skipped"')
    # everything else of the report is kept
    section = prediction_section(preds, DISCLAIMER)
    stripped = page.replace(section + "\n", "").replace('<a href="#prediction">Prediction</a>', "")
    assert stripped == before


def test_prediction_paths_accept_a_ses_prefix(tmp_path):
    from bids_ketdcm.participant.predict import prediction_paths

    assert prediction_paths(tmp_path, "sub-01", "ses-b0") == prediction_paths(tmp_path, "01", "b0")
    expected = tmp_path / "sub-01/ses-b0/sub-01_ses-b0_desc-response_predictions.tsv"
    assert prediction_paths(tmp_path, "01", "b0")["tsv"] == expected
