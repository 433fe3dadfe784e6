"""Per-patient prediction: "will this new patient respond?" (research tool, not a clinical device).

``participant ... --apply-model DIR`` applies every saved model of ``DIR``
(:mod:`bids_ketdcm.model_store`) to each participant's own features and writes, per
participant:

* the predicted probability of every class of the model's label scheme (the positive,
  best-outcome class last) from the final model;
* an uncertainty interval for the positive-class probability: the central ``level``
  (95 %) percentile interval of the predictions of the bootstrap refits saved with the
  model (each refitted on a stratified bootstrap resample of the training participants);
* the features that drove it: each feature's contribution ``coefficient x z`` to the
  positive-class log-odds, ``z`` the feature standardised with the training mean and sd
  (contributions + intercept = the model's log-odds); features with ``|z| > 3`` lie
  outside the training range and are flagged.

Outputs: ``sub-X[/ses-Y]/sub-X[_ses-Y]_desc-response_predictions.tsv`` (one row per model)
and ``.json`` (every contribution, the interval method, the models' provenance), and a
section of the participant report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm import __version__
from bids_ketdcm.bids.features import model_features
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import write_json, write_tsv
from bids_ketdcm.model_store import SavedModel, positive_coefficients

log = logging.getLogger(__name__)

DISCLAIMER = (
    "Research tool, not a clinical device. These predictions come from models trained on a small "
    "research cohort; they are not validated for clinical decisions and must not guide treatment."
)
#: |z| above which a feature is flagged as outside the training range.
OUT_OF_RANGE_Z = 3.0
TOP_FEATURES = 5


@dataclass
class PatientPrediction:
    """One model's prediction for one participant.

    Attributes
    ----------
    participant_id
        With ``sub-``.
    model_id, feature_set, network, target
        The model (see :class:`~bids_ketdcm.model_store.SavedModel`).
    classes
        Class names, positive class last.
    probabilities
        (K,) class probabilities of the final model, on the scale of its training data.
    predicted_class
        The model's decision (the balanced-weight rule the suite cross-validated).
    interval
        (low, high) bootstrap percentile interval of the positive-class probability.
    level
        Coverage of ``interval`` (0.95).
    contributions
        Columns ``feature, value, z, coefficient, contribution``, largest ``|contribution|``
        first.
    intercept
        The positive-class log-odds at the training mean.
    train_cv_balanced_accuracy
        The model's cross-validated balanced accuracy in training (NaN if unknown).
    """

    participant_id: str
    model_id: str
    feature_set: str
    network: str
    target: str
    classes: list[str]
    probabilities: np.ndarray
    predicted_class: str
    interval: tuple[float, float]
    level: float
    contributions: pd.DataFrame
    intercept: float
    train_cv_balanced_accuracy: float = float("nan")
    out_of_range: list[str] = field(default_factory=list)

    @property
    def positive_class(self) -> str:
        """The best-outcome class (e.g. ``response``)."""
        return self.classes[-1]

    @property
    def probability(self) -> float:
        """Predicted probability of the positive class."""
        return float(self.probabilities[-1])

    def top_features(self, k: int = TOP_FEATURES) -> str:
        """``name (+0.52); name (-0.31)`` of the ``k`` largest contributions."""
        head = self.contributions.head(k)
        return "; ".join(f"{f} ({c:+.2f})" for f, c in zip(head["feature"], head["contribution"], strict=True))


def predict_patients(model: SavedModel, X: np.ndarray, names: list[str], participants: list[str],
                     network: str, level: float = 0.95, where: str = "the participant's features"
                     ) -> list[PatientPrediction]:
    """Predict every participant (rows of ``X``) with one saved model.

    Parameters
    ----------
    model
        A loaded model.
    X, names
        (participants, features) matrix and its column names.
    participants
        Participant ids, one per row.
    network
        Network the features come from (checked against the model's).
    level
        Coverage of the bootstrap interval.
    where
        What the data are, for error messages.

    Returns
    -------
    list of PatientPrediction

    Raises
    ------
    InputError
        Features or network other than the model's (:meth:`SavedModel.align`).
    """
    X = model.align(X, names, network, where=where)
    proba, decisions = model.predict_proba(X), model.predict(X)
    boots = model.bootstrap_proba(X)[:, :, -1] if model.bootstrap else np.full((1, len(X)), np.nan)
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(boots, tail, axis=0), np.nanquantile(boots, 1.0 - tail, axis=0)
    z, contrib, intercept = model.contributions(X)
    coef, _ = positive_coefficients(model.estimator)
    out = []
    for i, pid in enumerate(participants):
        table = pd.DataFrame({"feature": model.feature_names, "value": X[i], "z": z[i], "coefficient": coef,
                              "contribution": contrib[i]})
        table = table.reindex(table["contribution"].abs().sort_values(ascending=False, kind="stable").index)
        out.append(PatientPrediction(
            participant_id=pid, model_id=model.model_id, feature_set=model.feature_set, network=model.network,
            target=model.target, classes=model.classes, probabilities=proba[i],
            predicted_class=model.classes[int(decisions[i])],
            interval=(float(low[i]), float(high[i])),
            level=level, contributions=table.reset_index(drop=True), intercept=intercept,
            train_cv_balanced_accuracy=model.train_cv_balanced_accuracy,
            out_of_range=[f for f, v in zip(model.feature_names, z[i], strict=True) if abs(v) > OUT_OF_RANGE_Z],
        ))
    return out


def prediction_paths(output_dir: str | os.PathLike, subject: str, session: str | None) -> dict[str, Path]:
    """``tsv`` and ``json`` paths of a participant's predictions."""
    sub = subject.removeprefix("sub-")
    session = session.removeprefix("ses-") if session else session
    folder, stem = Path(output_dir) / f"sub-{sub}", f"sub-{sub}"
    if session:
        folder, stem = folder / f"ses-{session}", f"{stem}_ses-{session}"
    base = folder / f"{stem}_desc-response_predictions"
    return {"tsv": base.with_suffix(".tsv"), "json": base.with_suffix(".json")}


def prediction_table(predictions: list[PatientPrediction]) -> pd.DataFrame:
    """One row per participant x model (probability, interval, top features)."""
    rows = []
    for p in predictions:
        row = {"participant_id": p.participant_id, "model_id": p.model_id, "feature_set": p.feature_set,
               "network": p.network, "target": p.target, "positive_class": p.positive_class,
               "probability": p.probability, "interval_low": p.interval[0], "interval_high": p.interval[1],
               "interval_level": p.level, "predicted_class": p.predicted_class,
               "train_cv_balanced_accuracy": p.train_cv_balanced_accuracy, "top_features": p.top_features(),
               "out_of_range_features": ";".join(p.out_of_range)}
        row.update({f"proba_{c}": float(v) for c, v in zip(p.classes, p.probabilities, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)


def write_predictions(output_dir: str | os.PathLike, subject: str, session: str | None,
                      predictions: list[PatientPrediction], models: list[SavedModel]) -> dict[str, Path]:
    """Write one participant's predictions (TSV + JSON) atomically; return the paths."""
    paths = prediction_paths(output_dir, subject, session)
    write_tsv(paths["tsv"], prediction_table(predictions))
    by_id = {m.model_id: m for m in models}
    write_json(paths["json"], {
        "IntendedUse": DISCLAIMER,
        "GeneratedBy": {"Name": "bids-ketdcm", "Version": __version__},
        "Interval": "central percentile interval of the positive-class probability over the bootstrap refits "
                    "saved with the model (stratified bootstrap of the training participants)",
        "Contribution": "coefficient x z on the positive-class log-odds (z: feature standardised with the "
                        "training mean and sd); contributions + intercept = log-odds",
        "Predictions": [{
            "model_id": p.model_id, "model_path": str(by_id[p.model_id].path),
            "model_sha256": by_id[p.model_id].manifest["files"]["model.joblib"]["sha256"],
            "label": by_id[p.model_id].manifest["label"], "classes": p.classes,
            "probabilities": dict(zip(p.classes, map(float, p.probabilities), strict=True)),
            "positive_class": p.positive_class, "interval": list(p.interval), "interval_level": p.level,
            "intercept": p.intercept, "out_of_range_features": p.out_of_range,
            "contributions": p.contributions.to_dict("records"),
        } for p in predictions],
    })
    return paths


def run_predictions(models: list[SavedModel], output_dir: str | os.PathLike, subjects: list[str],
                    session: str | None, space: str | None = None, task: str = "rest"
                    ) -> dict[str, list[PatientPrediction]]:
    """Participant level ``--apply-model``: predict and write every participant.

    Parameters
    ----------
    models
        Loaded models.
    output_dir
        Derivatives root holding the participants' features.
    subjects
        Labels without ``sub-``.
    session, space, task
        Which derivatives give the features.

    Returns
    -------
    dict
        Predictions by subject label (participants without a model's features are
        logged and left out of that model).
    """
    ids = [f"sub-{s.removeprefix('sub-')}" for s in subjects]
    out: dict[str, list[PatientPrediction]] = {s.removeprefix("sub-"): [] for s in subjects}
    for model in models:
        if (model.manifest.get("feature_spec") or {}).get("baseline_feature"):
            log.warning("saved model %s needs the baseline score, which the participant level does not read; "
                        "skipped", model.path)
            continue
        spec = {**model.manifest.get("feature_spec", {}), "session": session, "task": task, "run": None}
        spec["space"] = space or spec.get("space")
        try:
            fs = model_features(Path(output_dir), ids, model.feature_set, model.network, spec,
                                where=f"saved model {model.path}")
        except InputError as err:  # e.g. every run of these participants was skipped
            log.warning("%s; not predicted", err)
            continue
        if fs is None:
            continue
        lacking = sorted(set(ids) - set(fs.participants))
        if lacking:
            log.warning("model %s: no features for %s; not predicted", model.model_id, ", ".join(lacking))
        for p in predict_patients(model, fs.X, fs.feature_names, fs.participants, model.network,
                                  where=f"the features in {output_dir}"):
            out[p.participant_id.removeprefix("sub-")].append(p)
    for subject, preds in out.items():
        if preds:
            paths = write_predictions(output_dir, subject, session, preds, models)
            log.info("sub-%s: %d prediction(s) in %s", subject, len(preds), paths["tsv"])
    return out
