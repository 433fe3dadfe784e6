"""External validation: a frozen model keeps its accuracy on independent synthetic cohorts
with the same planted link, and falls to chance on null cohorts.

The cohorts are those of ``bids_ketdcm.testing.synth.make_synthetic_dataset`` (the 27 real ds005917
participants and their real MADRS; the connection mPFC -> PCC correlates 0.9 with the
ketamine improvement r when ``link="planted"``). To stay fast, the A matrices are the
generator's true ones (rebuilt from the seed exactly as the generator draws them; the first
test checks this against written truth files) plus Gaussian estimation noise of 0.15 Hz on
every connection. That keeps r(true, estimate) of the planted connection near 0.89, above
what the full pipeline gives (0.57, benchmarks/synth_link_strength.py), so this tests the
machinery; benchmarks/external_validation.py measures the realistic case.
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
from bids_ketdcm.group.external import check_label_definition, evaluate_frozen
from bids_ketdcm.group.labels import build_labels
from bids_ketdcm.group.model_io import fit_final
from bids_ketdcm.model_store import load_model, load_models, save_model
from bids_ketdcm.testing import synth
from bids_ketdcm.testing.fixtures import write_a_matrix

DATA = DS005917
NOISE_HZ = 0.15
FAST = dict(include_group=("MDD",), schemes=("binary25", "binary50"), targets=(), models=("logistic", "majority"),
            nested_repeats=2, nested_permutations=0, report=False, progress=False, allow_missing=True)


def true_connectivity(seed: int, link: str) -> tuple[list[str], list[str], np.ndarray]:
    """Participants, regions and true A (27, 4, 4) that make_synthetic_dataset(seed, link) plants."""
    responses = synth.ketamine_responses()
    names = list(synth.load_network("dmn4")["name"])
    pairs = synth._planted_pairs(synth.DEFAULT_PLANTED, names, "dmn4")
    _, A, _ = synth.planted_connectivity(responses, names, pairs, link, seed)
    return list(responses["participant_id"]), names, A


def make_cohort(root: Path, seed: int, link: str) -> tuple[Path, Path]:
    """Real participants.tsv + phenotype; A = true A + estimation noise as derivatives."""
    bids, out = root / "bids", root / "out"
    (bids / "phenotype").mkdir(parents=True)
    shutil.copy(DATA / "participants.tsv", bids)
    shutil.copy(DATA / "phenotype" / "phenotype.tsv", bids / "phenotype")
    participants, names, A = true_connectivity(seed, link)
    A = A + np.random.default_rng(seed + 10_000).normal(0.0, NOISE_HZ, A.shape)
    for pid, matrix in zip(participants, A, strict=True):
        write_a_matrix(out, pid, "b0", "dmn4", matrix, names)
    return bids, out


def test_true_connectivity_is_what_the_generator_writes(tmp_path):
    root = synth.make_synthetic_dataset(tmp_path / "ds", n_subjects=2, n_scans=64, seed=5, link="planted")
    participants, names, A = true_connectivity(5, "planted")
    for k in range(2):
        truth = root / "derivatives" / "synthetic_truth" / participants[k]
        files = sorted(truth.rglob("*_desc-true_connectivity.tsv"))
        assert files
        for path in files:
            table = pd.read_csv(path, sep="\t").set_index("target").loc[names, names]
            np.testing.assert_allclose(table.to_numpy(), A[k], rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    """Train on one planted cohort (seed 1); apply to 8 planted (seeds 2-9) and 8 null (10-17) cohorts."""
    root = tmp_path_factory.mktemp("external")
    bids, out = make_cohort(root / "train", 1, "planted")
    models = root / "models"  # one training cohort; with 27 participants a single external cohort's
    # balanced accuracy varies by about 0.1 around its expectation, hence 8 + 8 cohorts
    run_group(bids, out, GroupOptions(**FAST, n_permutations=0, save_model=models))
    applied = {}
    for seed, link in [(s, "planted") for s in range(2, 10)] + [(s, "none") for s in range(10, 18)]:
        bids, out = make_cohort(root / f"{link}{seed}", seed, link)
        run_group(bids, out, GroupOptions(**FAST, n_permutations=199, apply_model=models))
        applied[(seed, link)] = out / "group" / "external"
    return models, applied


def _pooled(applied: dict, link: str, target: str, treatment: str):
    frames = [pd.read_csv(folder / "predictions.tsv", sep="\t") for (_, lk), folder in applied.items() if lk == link]
    pred = pd.concat(frames)
    pred = pred[pred.model_id.str.endswith(target) & (pred.treatment == treatment)]
    classes = ["nonresponse", "response"]
    y = pred.observed.map(classes.index).to_numpy()
    return evaluate_frozen(y, pred[[f"proba_{c}" for c in classes]].to_numpy(), n_permutations=999, seed=0,
                           decisions=pred.predicted.map(classes.index).to_numpy())


@pytest.mark.parametrize("target", ["binary25", "binary50"])
def test_planted_cohorts_keep_accuracy_null_cohorts_fall_to_chance(validation, target):
    _, applied = validation
    results = pd.concat(pd.read_csv(f / "results.tsv", sep="\t").assign(link=lk) for (_, lk), f in applied.items())
    ket = results[(results.target == target) & (results.treatment == "ketamine")]
    assert (ket.n_participants == 27).all() and ket.undefined.isna().all()
    planted, null = ket[ket.link == "planted"], ket[ket.link == "none"]
    print(f"\n{target}: planted {planted.balanced_accuracy.round(3).tolist()} "
          f"(p {planted.p_balanced_accuracy.tolist()}); null {null.balanced_accuracy.round(3).tolist()} "
          f"(p {null.p_balanced_accuracy.tolist()})")
    assert planted.balanced_accuracy.mean() > 0.58
    assert planted.balanced_accuracy.mean() > null.balanced_accuracy.mean() + 0.08
    # pooled over the 8 cohorts of each kind (216 predictions): far above chance vs chance
    pooled_planted = _pooled(applied, "planted", target, "ketamine")
    pooled_null = _pooled(applied, "none", target, "ketamine")
    placebo = _pooled(applied, "planted", target, "placebo")
    print(f"pooled planted {pooled_planted.metrics['balanced_accuracy']:.3f} (p {pooled_planted.p_balanced_accuracy}), "
          f"null {pooled_null.metrics['balanced_accuracy']:.3f} (p {pooled_null.p_balanced_accuracy}), "
          f"placebo {placebo.metrics['balanced_accuracy']:.3f} (p {placebo.p_balanced_accuracy})")
    assert pooled_planted.metrics["balanced_accuracy"] > 0.6 and pooled_planted.p_balanced_accuracy < 0.01
    assert abs(pooled_null.metrics["balanced_accuracy"] - 0.5) < 0.1 and pooled_null.p_balanced_accuracy > 0.05
    # placebo labels of the planted cohorts (the specificity check): each cohort's own permutation test
    # is at chance. Not the pooled one: the 8 cohorts share the same 24 real placebo labels (one
    # responder, who also responded to ketamine; placebo and ketamine improvement correlate 0.29), so
    # pooling counts the same labels 8 times against predictions that all track the ketamine response.
    plc = results[(results.target == target) & (results.treatment == "placebo") & (results.link == "planted")]
    print(f"placebo per cohort {plc.balanced_accuracy.round(3).tolist()} (p {plc.p_balanced_accuracy.tolist()})")
    assert len(plc) == 8 and (plc.n_participants == 24).all() and (plc.p_balanced_accuracy > 0.05).all()


def test_outputs_and_calibration(validation):
    models, applied = validation
    folder = applied[(2, "planted")]
    results = pd.read_csv(folder / "results.tsv", sep="\t")
    assert set(results.treatment) == {"ketamine", "placebo"}
    assert (results.n_permutations == 199).all() and results.p_balanced_accuracy.between(0.005, 1).all()
    # one placebo responder among 24: flagged; the ketamine labels are not
    note = results.set_index("treatment").note
    assert note.loc["placebo"].str.startswith("smallest class has 1 participant(s)").all()
    assert note.loc["ketamine"].isna().all()
    # the frozen model was applied, not refitted: the predictions are the saved model's
    model = load_model(models / "features-dcm_seg-dmn4_target-binary50")
    pred = pd.read_csv(folder / "predictions.tsv", sep="\t")
    pred = pred[(pred.model_id == model.model_id) & (pred.treatment == "ketamine")].set_index("participant_id")
    matrices = [pd.read_csv(next((folder.parents[1] / p / "ses-b0" / "func").glob("*.tsv")), sep="\t")
                .set_index("target") for p in pred.index]
    names = [f"{s}->{t}" for t in matrices[0].index for s in matrices[0].columns]
    X = np.stack([m.to_numpy().reshape(-1) for m in matrices])
    np.testing.assert_allclose(model.predict_proba(model.align(X, names, "dmn4"))[:, 1], pred.proba_response)
    calibration = pd.read_csv(folder / "calibration.tsv", sep="\t")
    assert len(calibration) and calibration[["mean_predicted", "observed_fraction"]].stack().between(0, 1).all()
    html = (folder / "report.html").read_text()
    assert "Research tool, not a clinical device" in html and html.count("data:image/png") == 2
    info = json.loads((folder / "results.json").read_text())
    assert len(info["models"]) == 2 and info["skipped"] == []


def test_evaluate_frozen_exact_cases():
    y = np.array([0] * 5 + [1] * 5)
    # constant prediction: balanced accuracy 0.5 and every permutation ties it, p = 1
    const = np.tile([0.6, 0.4], (10, 1))
    ev = evaluate_frozen(y, const, n_permutations=200)
    assert ev.metrics["balanced_accuracy"] == 0.5 and ev.p_balanced_accuracy == 1.0
    # perfect prediction: only the 1 in C(10,5) = 252 label arrangements equal to y ties it
    perfect = np.column_stack([1 - y, y]).astype(float)
    ev = evaluate_frozen(y, perfect, n_permutations=999, seed=1)
    assert ev.metrics["balanced_accuracy"] == 1.0 and ev.p_balanced_accuracy < 0.02
    # calibration by hand: p = 0.2 for 5 with 1 positive, p = 0.8 for 5 with 4 positive
    y2 = np.array([1, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    p = np.r_[[0.2] * 5, [0.8] * 5]
    ev = evaluate_frozen(y2, np.column_stack([1 - p, p]), n_permutations=0, n_bins=2)
    np.testing.assert_allclose(ev.calibration.to_numpy(), [[0.2, 0.2], [0.8, 0.8]])
    assert ev.brier == pytest.approx(0.16) and np.isnan(ev.p_balanced_accuracy)


def test_refuses_another_label_definition(tmp_path):
    bids, _ = make_cohort(tmp_path, 1, "planted")
    labels = build_labels(bids, include_group=("MDD",))
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), np.r_[[0] * 10, [1] * 10]
    est, boots = fit_final(X, y, 2, {"C": 1.0}, n_bootstrap=0)
    label = {"scheme": "binary25", "variable": "improvement", "edges": [0.3], "classes": ["nonresponse", "response"]}
    folder = save_model(tmp_path / "m", estimator=est, bootstrap=boots, feature_names=["a", "b", "c"],
                        feature_set="dcm", network="dmn4", label=label, model={}, training={},
                        feature_spec={}, bootstrap_seed=0)
    with pytest.raises(InputError, match="label definition .* differs"):
        check_label_definition(load_models(folder)[0], labels)


def test_training_participants_are_refused_unless_overridden(tmp_path):
    """Models applied to their own training participants: exit-2 error naming them, or a flagged run."""
    bids, out = make_cohort(tmp_path / "train", 1, "planted")
    models = tmp_path / "models"
    run_group(bids, out, GroupOptions(**{**FAST, "schemes": ("binary25",)}, n_permutations=0, save_model=models))
    options = dict(FAST, schemes=("binary25",), n_permutations=19, apply_model=models)
    with pytest.raises(InputError, match="27 participant.*training list with the same features.*sub-MOA101.*"
                                         "--allow-training-overlap"):
        run_group(bids, out, GroupOptions(**options))
    assert not (out / "group" / "external").exists()
    result = run_group(bids, out, GroupOptions(**options, allow_training_overlap=True))
    rows = pd.DataFrame(result["results"])
    assert (rows.training_overlap == rows.n_participants).all()
    assert rows.note.str.contains("NOT EXTERNAL").all()
    # another cohort under the same participant labels (other features) is external: accepted
    bids2, out2 = make_cohort(tmp_path / "other", 2, "planted")
    rows2 = pd.DataFrame(run_group(bids2, out2, GroupOptions(**options))["results"])
    assert (rows2.training_overlap == 0).all() and not rows2.note.str.contains("NOT EXTERNAL").any()
