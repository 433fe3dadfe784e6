"""External validation: apply saved models to another dataset, without refitting.

``group --apply-model DIR`` loads every model of ``DIR`` (:mod:`bids_ketdcm.group.model_io`),
builds the features each needs from this dataset's derivatives, builds this dataset's
labels with the model's own label definition (refusing a different one), and computes:

* the suite's metrics (:func:`bids_ketdcm.group.metrics.classification_metrics`) of the
  frozen model's predictions (class of highest probability);
* permutation p-values of balanced accuracy and ROC AUC: the labels are permuted against
  the fixed predictions, ``p = (1 + #{null >= observed}) / (1 + n_permutations)``;
* calibration: observed frequency of the positive class against the mean predicted
  probability in quantile bins (:func:`sklearn.calibration.calibration_curve`), and the
  Brier score;
* the same on the placebo labels of the same participants (specificity check: a
  drug-specific signal must fall to chance there).

Outputs under ``OUTPUT_DIR/group/external/``: ``results.tsv`` (one row per model x
treatment), ``predictions.tsv``, ``calibration.tsv``, ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from bids_ketdcm import __version__
from bids_ketdcm.bids.features import model_features
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.labels import LabelSet
from bids_ketdcm.group.metrics import balanced_accuracy_batch, classification_metrics
from bids_ketdcm.io import finite_json, write_json, write_text, write_tsv
from bids_ketdcm.model_store import SavedModel, feature_fingerprint, load_models
from bids_ketdcm.report.render import figure_png, render_page

log = logging.getLogger(__name__)

#: Fewest labelled participants an external evaluation needs.
MIN_PARTICIPANTS = 4


@dataclass
class Evaluation:
    """Metrics of one frozen model on one set of labels."""

    metrics: dict[str, float]
    undefined: set[str]
    p_balanced_accuracy: float
    p_roc_auc: float
    n_permutations: int
    calibration: pd.DataFrame
    brier: float
    null_balanced_accuracy: np.ndarray


def permutation_p(observed: float, null: np.ndarray) -> float:
    """``(1 + #{null >= observed}) / (1 + len(null))`` (NaN without permutations)."""
    if len(null) == 0:
        return float("nan")
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def evaluate_frozen(y: np.ndarray, proba: np.ndarray, n_permutations: int = 1000, seed: int = 0,
                    n_bins: int = 5, decisions: np.ndarray | None = None) -> Evaluation:
    """Metrics, permutation p-values and calibration of fixed predictions.

    Parameters
    ----------
    y
        True class indices (0..K-1).
    proba
        (n, K) predicted probabilities of the frozen model.
    n_permutations
        Label permutations (0: no p-values).
    seed
        Seed of the permutations.
    n_bins
        Calibration bins (quantiles of the predicted positive-class probability).
    decisions
        (n,) predicted class indices (the model's decision rule); None: the argmax of ``proba``.

    Returns
    -------
    Evaluation
    """
    y = np.asarray(y, dtype=int)
    proba = np.asarray(proba, dtype=float)
    k = proba.shape[1]
    pred = proba.argmax(axis=1) if decisions is None else np.asarray(decisions, dtype=int)
    metrics, undefined = classification_metrics(y, pred, proba, k)
    rng = np.random.default_rng(seed)
    perms = np.array([rng.permutation(len(y)) for _ in range(n_permutations)], dtype=int).reshape(-1, len(y))
    # permuting the labels against fixed predictions = permuting the predictions against fixed labels
    null_bacc = balanced_accuracy_batch(y, pred[perms], k) if n_permutations else np.zeros(0)
    null_auc = np.array([classification_metrics(y[p], pred, proba, k)[0]["roc_auc"] for p in perms])
    positive = (y == k - 1).astype(int)
    if 0 < positive.sum() < len(y):
        bins = max(1, min(n_bins, len(y) // 3))
        frac, mean_pred = calibration_curve(positive, proba[:, -1], n_bins=bins, strategy="quantile")
        calibration = pd.DataFrame({"mean_predicted": mean_pred, "observed_fraction": frac})
    else:
        calibration = pd.DataFrame(columns=["mean_predicted", "observed_fraction"])
    return Evaluation(
        metrics=metrics, undefined=undefined,
        p_balanced_accuracy=permutation_p(metrics["balanced_accuracy"], null_bacc),
        p_roc_auc=float("nan") if "roc_auc" in undefined else permutation_p(metrics["roc_auc"], null_auc),
        n_permutations=n_permutations, calibration=calibration,
        brier=float(brier_score_loss(positive, proba[:, -1])), null_balanced_accuracy=null_bacc,
    )


def check_label_definition(model: SavedModel, labels: LabelSet) -> None:
    """Refuse labels defined differently from the model's (scheme, thresholds, classes)."""
    want = model.manifest["label"]
    scheme = labels.schemes.get(want["scheme"])
    if scheme is None:
        raise InputError(f"saved model {model.path}: label scheme {want['scheme']!r} is not built for this dataset "
                         f"(schemes: {', '.join(labels.schemes)}); add it to GroupOptions.schemes")
    mine = {"variable": scheme.variable, "edges": list(scheme.edges), "classes": list(scheme.classes)}
    theirs = {k: want.get(k) for k in mine}
    if mine != theirs:
        raise InputError(f"saved model {model.path}: its label definition {theirs} differs from this dataset's "
                         f"{want['scheme']} ({mine}); use the same thresholds (GroupOptions.remission_threshold)")
    if want.get("score_column") and want["score_column"] != labels.score_column:
        log.warning("saved model %s was trained on %s labels; this dataset uses %s", model.path,
                    want["score_column"], labels.score_column)


def _calibration_figure(curves: dict[str, pd.DataFrame], title: str) -> Figure:
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    for name, curve in curves.items():
        if len(curve):
            ax.plot(curve["mean_predicted"], curve["observed_fraction"], marker="o", label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed fraction", title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def apply_models(model_dir: str | Path, labels: LabelSet, output_dir: str | Path, *, session: str,
                 space: str | None = None, task: str = "rest", run: int | None = None,
                 n_permutations: int = 1000, seed: int = 0, allow_training_overlap: bool = False) -> dict:
    """Evaluate every saved model of ``model_dir`` on this dataset; write the outputs.

    Parameters
    ----------
    model_dir
        ``--apply-model`` folder (several models, or one model folder).
    labels
        This dataset's labels (:func:`bids_ketdcm.group.labels.build_labels`).
    output_dir
        Derivatives root; outputs go to ``output_dir/group/external``.
    session, space, task, run
        Which derivatives give the features (the model's own settings otherwise).
    n_permutations, seed
        Permutation test.
    allow_training_overlap
        Evaluate even participants the model was trained on (with the same features);
        their number is then recorded in ``training_overlap`` and flagged in the report.

    Returns
    -------
    dict
        ``results`` (records, one per model x treatment), ``outputs`` (paths), ``skipped``.

    Raises
    ------
    InputError
        A model that fails to load or whose label definition or features do not match
        this dataset; participants of the model's training list with the same features
        (not an external validation) unless ``allow_training_overlap``; or no model that
        could be evaluated.
    """
    models = load_models(model_dir)
    for model in models:
        check_label_definition(model, labels)
    output_dir = Path(output_dir)
    folder = output_dir / "group" / "external"
    participants = list(labels.table.index)
    rows, predictions, calib, figures, skipped = [], [], [], [], []
    for model in models:
        spec = {**model.manifest.get("feature_spec", {}), "session": session, "task": task}
        spec["space"] = space or spec.get("space")
        spec["run"] = run
        fs = model_features(output_dir, participants, model.feature_set, model.network, spec,
                            where=f"saved model {model.path}")
        if fs is None:
            skipped.append({"model_id": model.model_id, "reason": "no participant has its features"})
            continue
        X, names = fs.X, list(fs.feature_names)
        baseline_name = spec.get("baseline_feature")
        if baseline_name:
            X = np.column_stack([X, labels.table.loc[fs.participants, "baseline"].to_numpy(float)])
            names.append(baseline_name)
        X = model.align(X, names, model.network, where=f"the features of {output_dir}")
        overlap, relabelled = training_overlap(model, fs.participants, X)
        if overlap and not allow_training_overlap:
            shown = ", ".join(overlap[:10]) + (" ..." if len(overlap) > 10 else "")
            raise InputError(
                f"--apply-model {model.path}: {len(overlap)} participant(s) of {output_dir} are in the model's "
                f"training list with the same features ({shown}): that is not an external validation. "
                "Give --allow-training-overlap to evaluate anyway (flagged in the report)")
        if overlap:
            log.warning("%s: %d training participant(s) evaluated (--allow-training-overlap): NOT external",
                        model.model_id, len(overlap))
        if relabelled:
            log.warning("%s: %d participant label(s) also in the training list, with other features (another "
                        "dataset reusing the labels?)", model.model_id, len(relabelled))
        proba, decisions = model.predict_proba(X), model.predict(X)
        curves = {}
        for treatment in ("ketamine", "placebo"):
            values = labels.target(treatment, model.target)
            keep = [i for i, p in enumerate(fs.participants) if p in values.index]
            if len(keep) < MIN_PARTICIPANTS:
                if treatment == "ketamine" or labels.column(treatment, model.target) in labels.table:
                    skipped.append({"model_id": model.model_id, "treatment": treatment,
                                    "reason": f"{len(keep)} participants with labels and features"})
                continue
            ids = [fs.participants[i] for i in keep]
            y = np.array([model.classes.index(v) for v in values[ids]])
            ev = evaluate_frozen(y, proba[keep], n_permutations, seed, decisions=decisions[keep])
            curves[treatment] = ev.calibration
            rows.append({
                "model_id": model.model_id, "feature_set": model.feature_set, "network": model.network,
                "target": model.target, "treatment": treatment, "n_participants": len(ids),
                "classes": ";".join(f"{c}:{int((y == i).sum())}" for i, c in enumerate(model.classes)),
                **ev.metrics, "p_balanced_accuracy": ev.p_balanced_accuracy, "p_roc_auc": ev.p_roc_auc,
                "n_permutations": ev.n_permutations, "brier": ev.brier,
                "train_cv_balanced_accuracy": model.train_cv_balanced_accuracy,
                "undefined": ";".join(sorted(ev.undefined)),
                "training_overlap": len(set(overlap) & set(ids)),
                "note": _power_note(y, len(model.classes)) + (
                    " NOT EXTERNAL: includes training participants (--allow-training-overlap)."
                    if set(overlap) & set(ids) else ""),
            })
            calib += [{"model_id": model.model_id, "treatment": treatment, **r}
                      for r in ev.calibration.to_dict("records")]
            for i, pid in enumerate(ids):
                row = {"model_id": model.model_id, "treatment": treatment, "participant_id": pid,
                       "observed": model.classes[y[i]], "predicted": model.classes[int(decisions[keep[i]])]}
                row.update({f"proba_{c}": float(v) for c, v in zip(model.classes, proba[keep[i]], strict=True)})
                predictions.append(row)
        if curves:
            figures.append((model.model_id, _calibration_figure(curves, model.model_id)))
    if not rows:
        raise InputError(f"--apply-model {model_dir}: no model could be evaluated on {output_dir} "
                         f"({'; '.join(s['model_id'] + ': ' + s['reason'] for s in skipped)})")
    results = pd.DataFrame(rows)
    outputs = {name: str(folder / name) for name in
               ("results.tsv", "predictions.tsv", "calibration.tsv", "results.json", "report.html")}
    write_tsv(folder / "results.tsv", results)
    write_tsv(folder / "predictions.tsv", pd.DataFrame(predictions))
    write_tsv(folder / "calibration.tsv", pd.DataFrame(calib, columns=["model_id", "treatment", "mean_predicted",
                                                                        "observed_fraction"]))
    info = {
        "GeneratedBy": {"Name": "bids-ketdcm", "Version": __version__},
        "model_dir": str(model_dir), "models": [m.manifest for m in models],
        "p_value": "(1 + #{null >= observed}) / (1 + n_permutations); labels permuted against the frozen "
                   "model's fixed predictions",
        "calibration": "sklearn.calibration.calibration_curve, quantile bins of the positive-class probability",
        "results": results.to_dict("records"), "skipped": skipped,
    }
    write_json(folder / "results.json", finite_json(info))
    write_text(folder / "report.html", _report(results, figures))
    log.info("external validation: %d model(s) evaluated, results in %s", results.model_id.nunique(), folder)
    return {"results": results.to_dict("records"), "outputs": outputs, "skipped": skipped}


def training_overlap(model: SavedModel, participants: list[str], X: np.ndarray) -> tuple[list[str], list[str]]:
    """Participants the model was trained on.

    Returns
    -------
    same, relabelled
        Labels in the training list whose features are the training features (or any
        listed label, for a model saved without fingerprints); labels in the list whose
        features differ.
    """
    training = model.manifest.get("training", {})
    listed = set(training.get("participants", []))
    prints = training.get("feature_fingerprints")
    same, relabelled = [], []
    for pid, row in zip(participants, X, strict=True):
        if pid not in listed:
            continue
        if prints is None or prints.get(pid) == feature_fingerprint(row):
            same.append(pid)
        else:
            relabelled.append(pid)
    return same, relabelled


#: A class with fewer participants than this makes balanced accuracy and AUC jump by large steps.
FEW_IN_CLASS = 3


def _power_note(y: np.ndarray, n_classes: int) -> str:
    """A warning when the smallest class is too small for the metrics to mean much."""
    smallest = int(np.bincount(y, minlength=n_classes).min())
    if smallest >= FEW_IN_CLASS:
        return ""
    return (f"smallest class has {smallest} participant(s): balanced accuracy and AUC move in large steps "
            "and the permutation test has little power")


def _report(results: pd.DataFrame, figures: list) -> str:
    cols = ["model_id", "treatment", "n_participants", "classes", "balanced_accuracy", "p_balanced_accuracy",
            "roc_auc", "p_roc_auc", "brier", "train_cv_balanced_accuracy", "note"]
    table = results[cols].to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a", border=0,
                                  classes="data")
    return render_page("external.html", title="external validation", table=table,
                       figures=[(name, figure_png(fig)) for name, fig in figures],
                       nav=[("metrics", "Metrics"), ("calibration", "Calibration")])
