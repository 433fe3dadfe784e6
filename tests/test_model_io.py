"""Saved models: round trip, manifest, checksum, and every refusal (exit code 2 from the CLI)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_ketdcm.cli.app import main
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.model_io import fit_final
from bids_ketdcm.model_store import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    load_model,
    load_models,
    save_model,
    write_index,
)

NAMES = [f"f{i}" for i in range(6)]
LABEL = {"scheme": "binary25", "variable": "improvement", "edges": [0.25], "classes": ["nonresponse", "response"],
         "positive_class": "response"}


def _data(seed: int = 0, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(NAMES)))
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    return X, y


def _save(directory: Path, n_bootstrap: int = 10) -> Path:
    X, y = _data()
    est, boots = fit_final(X, y, 2, {"C": 1.0}, n_bootstrap=n_bootstrap, seed=3)
    return save_model(directory, estimator=est, bootstrap=boots, feature_names=NAMES, feature_set="dcm",
                      network="dmn4", label=LABEL, model={"name": "logistic", "params": {"C": 1.0}},
                      training={"n_participants": len(y), "cv_metrics": {"kfold5": {"balanced_accuracy": 0.8}}},
                      feature_spec={"session": "b0"}, bootstrap_seed=3)


@pytest.fixture()
def saved(tmp_path) -> Path:
    return _save(tmp_path / "models")


def test_round_trip_manifest_and_checksum(saved):
    assert saved.name == "features-dcm_seg-dmn4_target-binary25"
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert manifest["format"] == "bids-ketdcm-model" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["feature_names"] == NAMES and manifest["network"] == "dmn4"
    assert manifest["label"]["classes"] == ["nonresponse", "response"]
    assert {"bids-ketdcm", "scikit-learn", "numpy", "python"} <= set(manifest["software"])
    # the checksum is the SHA-256 of the model file, computed independently here
    digest = hashlib.sha256((saved / MODEL_FILE).read_bytes()).hexdigest()
    assert manifest["files"][MODEL_FILE]["sha256"] == digest
    model = load_model(saved)
    X, y = _data(seed=1)
    refit, _ = fit_final(*_data(), 2, {"C": 1.0}, n_bootstrap=0, seed=3)
    np.testing.assert_allclose(model.predict_proba(X), refit.predict_proba(X))
    assert len(model.bootstrap) == 10 and model.bootstrap_proba(X).shape == (10, len(X), 2)
    # columns given in another order are put back in the trained order
    order = NAMES[::-1]
    np.testing.assert_array_equal(model.align(X[:, ::-1], order, "dmn4"), X)


def test_saved_probabilities_are_on_the_training_scale(tmp_path):
    """Balanced class weights shift the log-odds by log(n_neg / n_pos); the saved model undoes
    it with the training class counts (King and Zeng), so on its own imbalanced training data
    the mean probability matches the prevalence instead of sitting near 0.5."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, len(NAMES)))
    y = (0.8 * X[:, 0] + rng.normal(size=400) > 1.0).astype(int)  # about 20 % positive
    est, _ = fit_final(X, y, 2, {"C": 1.0}, n_bootstrap=0, seed=0)
    counts = {"nonresponse": int((y == 0).sum()), "response": int((y == 1).sum())}
    folder = save_model(tmp_path / "m", estimator=est, bootstrap=[], feature_names=NAMES, feature_set="dcm",
                        network="dmn4", label=LABEL, model={"name": "logistic", "params": {"C": 1.0}},
                        training={"n_participants": len(y), "class_counts": counts},
                        feature_spec={"session": "b0"}, bootstrap_seed=0)
    model = load_model(folder)
    raw = est.predict_proba(X)[:, 1]
    corrected = model.predict_proba(X)[:, 1]
    logit = np.log(raw / (1 - raw)) + np.log(counts["response"] / counts["nonresponse"])
    np.testing.assert_allclose(corrected, 1 / (1 + np.exp(-logit)), rtol=1e-10)
    assert abs(raw.mean() - y.mean()) > 0.15  # reweighted: far from the prevalence
    assert abs(corrected.mean() - y.mean()) < 0.03
    brier = np.mean((corrected - y) ** 2)
    assert brier < np.mean((raw - y) ** 2) and brier < np.mean((y.mean() - y) ** 2)


def test_contributions_sum_to_the_log_odds(saved):
    model = load_model(saved)
    X, _ = _data(seed=2)
    z, contrib, intercept = model.contributions(X)
    np.testing.assert_allclose(contrib.sum(axis=1) + intercept, model.estimator.decision_function(X), atol=1e-10)
    mean, sd = _data()[0].mean(axis=0), _data()[0].std(axis=0)
    np.testing.assert_allclose(z, (X - mean) / sd, atol=1e-12)


def test_bootstrap_is_seeded_and_stratified():
    X, y = _data()
    _, a = fit_final(X, y, 2, {"C": 1.0}, n_bootstrap=5, seed=7)
    _, b = fit_final(X, y, 2, {"C": 1.0}, n_bootstrap=5, seed=7)
    _, c = fit_final(X, y, 2, {"C": 1.0}, n_bootstrap=5, seed=8)
    coef = lambda models: np.stack([m.steps[-1][1].coef_ for m in models])  # noqa: E731
    np.testing.assert_array_equal(coef(a), coef(b))
    assert not np.allclose(coef(a), coef(c))


def test_refuses_features_it_was_not_trained_on(saved):
    model = load_model(saved)
    X, _ = _data()
    with pytest.raises(InputError, match=r"not trained on \(g0"):
        model.align(X, ["g0", *NAMES[1:]], "dmn4")
    with pytest.raises(InputError, match=r"missing 1 trained feature\(s\) \(f5\)"):
        model.align(X[:, :5], NAMES[:5], "dmn4")


def test_refuses_another_network(saved):
    model = load_model(saved)
    with pytest.raises(InputError, match="trained on network seg-dmn4.*seg-dmn11"):
        model.align(_data()[0], NAMES, "dmn11")


def test_refuses_a_newer_format(saved):
    path = saved / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["format_version"] = "2.0"
    path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="newer incompatible format version 2.0.*reads format 1.x"):
        load_model(saved)
    manifest["format_version"] = "1.7"  # a newer minor version is compatible
    path.write_text(json.dumps(manifest))
    assert load_model(saved).network == "dmn4"


def test_refuses_a_tampered_file(saved):
    path = saved / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum .* does not match the manifest"):
        load_model(saved)


def test_refuses_a_manifest_that_disagrees_with_its_model(saved):
    path = saved / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["feature_names"] = [*NAMES[:-1], "other"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="disagree on feature_names"):
        load_model(saved)


def test_refuses_folders_that_are_not_models(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_models(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no saved model"):
        load_models(tmp_path / "empty")
    bad = tmp_path / "bad" / "m"
    bad.mkdir(parents=True)
    (bad / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_models(tmp_path / "bad")


def test_replacing_and_index(tmp_path):
    first = _save(tmp_path / "models")
    second = _save(tmp_path / "models", n_bootstrap=4)
    assert first == second and len(load_model(second).bootstrap) == 4
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [first.name]  # no leftovers
    index = pd.read_csv(write_index(tmp_path / "models"), sep="\t")
    assert index.model_id.tolist() == [first.name] and index.cv_balanced_accuracy.iloc[0] == 0.8
    assert "not clinical devices" in (tmp_path / "models" / "README.md").read_text()


def _bids(root: Path) -> Path:
    shared = Path(__file__).resolve().parents[1] / "bids_ketdcm" / "data" / "ds005917"
    bids = root / "bids"
    (bids / "phenotype").mkdir(parents=True)
    shutil.copy(shared / "participants.tsv", bids)
    shutil.copy(shared / "dataset_description.json", bids)
    shutil.copy(shared / "phenotype" / "phenotype.tsv", bids / "phenotype")
    return bids


@pytest.mark.parametrize("damage", ["tamper", "newer"])
def test_cli_exit_code_2(saved, tmp_path, capsys, damage):
    if damage == "tamper":
        (saved / MODEL_FILE).write_bytes((saved / MODEL_FILE).read_bytes()[:-8])
    else:
        manifest = json.loads((saved / MANIFEST_FILE).read_text())
        manifest["format_version"] = "3.1"
        (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    bids = _bids(tmp_path)
    code = main([str(bids), str(tmp_path / "out"), "group", "--apply-model", str(saved.parent)])
    err = capsys.readouterr().err
    assert code == 2
    assert ("checksum" if damage == "tamper" else "newer incompatible format") in err
    assert "Traceback" not in err


@pytest.mark.parametrize("mismatch", ["network", "features"])
def test_cli_exit_code_2_on_other_data(saved, tmp_path, capsys, mismatch):
    """group --apply-model on derivatives of another network, or of features the model was not trained on."""
    from bids_ketdcm.group.labels import build_labels
    from bids_ketdcm.testing.fixtures import write_a_matrix

    bids, out = _bids(tmp_path), tmp_path / "out"
    regions = ["PCC", "mPFC", "lIPL", "rIPL"]
    rng = np.random.default_rng(0)
    for pid in build_labels(bids, include_group=("MDD",)).table.index:
        write_a_matrix(out, pid, "b0", "dmn11" if mismatch == "network" else "dmn4",
                           rng.normal(size=(4, 4)), regions)
    capsys.readouterr()  # drop what was logged before the command
    code = main([str(bids), str(out), "group", "--apply-model", str(saved.parent), "--n-permutations", "9",
                 "--include-group", "MDD"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if mismatch == "network":
        assert "trained on dcm features of network seg-dmn4" in err and "holds dcm features of seg-dmn11" in err
    else:
        assert "do not match the features it was trained on" in err
        assert "missing 6 trained feature(s) (f0, f1, f2, f3, f4, ...)" in err
        assert "16 feature(s) it was not trained on (PCC->PCC" in err
    assert not (out / "group" / "external" / "results.tsv").exists()


def test_format_is_documented_in_the_readme(saved):
    """The README's saved-model section names the current format version and every manifest key."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("**Saved models**")
    section = readme[start:readme.index("**External validation**", start)]
    assert f"version `{FORMAT_VERSION}`" in section and "bids-ketdcm-model" in section
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert [k for k in manifest if k not in section] == []
    assert [k for k in manifest["label"] if k not in section.replace("positive class", "positive_class")] == []


def test_leftovers_of_an_interrupted_save_are_ignored(saved):
    """A hidden temporary folder (a save killed before its rename) is not a model."""
    leftover = saved.parent / f".{saved.name}.abc123"
    shutil.copytree(saved, leftover)
    assert [m.path for m in load_models(saved.parent)] == [saved]
    index = pd.read_csv(write_index(saved.parent), sep="\t")
    assert index.model_id.tolist() == [saved.name]


def test_manifest_is_strict_json_and_nan_metrics_read_as_unknown(tmp_path):
    X, y = _data()
    est, boots = fit_final(X, y, 2, {"C": 1.0}, n_bootstrap=0, seed=3)
    folder = save_model(tmp_path / "m", estimator=est, bootstrap=boots, feature_names=NAMES, feature_set="dcm",
                        network="dmn4", label=LABEL, model={}, feature_spec={}, bootstrap_seed=3,
                        training={"cv_metrics": {"kfold5": {"balanced_accuracy": float("nan"), "roc_auc": 0.6}}})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    manifest = json.loads((folder / MANIFEST_FILE).read_text(), parse_constant=refuse)
    assert manifest["training"]["cv_metrics"]["kfold5"] == {"balanced_accuracy": None, "roc_auc": 0.6}
    assert np.isnan(load_model(folder).train_cv_balanced_accuracy)
