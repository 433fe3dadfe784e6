"""Saved prediction models: the documented, versioned folder format (format only).

The group level writes it (:mod:`bids_ketdcm.group.model_io` trains the models), the
participant level and external validation read it: both levels use this module, neither
imports the other.

``group --save-model DIR`` writes one folder per feature set x network x label scheme::

    DIR/
      README.md                       this format, in words
      models.tsv                      one row per saved model (index)
      features-<fs>_seg-<net>_target-<scheme>/
        model.joblib                  the fitted models (joblib pickle)
        manifest.json                 everything needed to check and use them

``model.joblib`` holds a dict: ``estimator`` (a scikit-learn ``Pipeline``: the
``StandardScaler`` fitted on the training participants and the classifier, so the
preprocessing travels with the model), ``bootstrap`` (the same pipeline refitted on
stratified bootstrap resamples of the training participants: the spread of their
predictions is the per-patient uncertainty), and ``feature_names``, ``classes``,
``network`` and ``feature_set`` (repeated from the manifest and cross-checked on load).

``manifest.json`` keys:

``format`` (``"bids-ketdcm-model"``), ``format_version`` (``"MAJOR.MINOR"``: a reader
accepts its own major version and refuses a newer one), ``model_id``, ``feature_set``
(``dcm``, ``gmv`` or ``dcm+gmv``), ``network``, ``feature_names`` (column order),
``feature_spec`` (session, space, task, run, drop_diagonal, ...), ``label`` (scheme,
classes, positive class, thresholds, score column, sessions, definition), ``model``
(name, description, hyper-parameters and how they were chosen), ``training``
(participants, class counts, cross-validated metrics of the suite and the apparent
metrics of the final model on its training participants), ``bootstrap`` (number
of resamples, seed), ``software`` (versions) and ``files`` (``model.joblib``: size and
SHA-256 checksum).

Loading (:func:`load_model`) refuses, with :class:`~bids_ketdcm.errors.InputError`, a
folder without a valid manifest, another format, a newer major version, a model file
whose checksum differs from the manifest's (tampered or corrupted), or a model file that
disagrees with its manifest. The checksum is verified *before* the file is unpickled;
still, a pickle can run code: load only models from sources you trust.
:meth:`SavedModel.align` then refuses features the model was not trained on and data
of another network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_ketdcm import __version__
from bids_ketdcm.config import FEATURE_SETS
from bids_ketdcm.errors import InputError
from bids_ketdcm.io import atomic_path, finite_json, read_json_object, write_json, write_text, write_tsv
from bids_ketdcm.provenance import software_versions

log = logging.getLogger(__name__)

FORMAT_NAME = "bids-ketdcm-model"
#: Version written; readers accept the same major version (minor = compatible additions).
FORMAT_VERSION = "1.0"
MODEL_FILE = "model.joblib"
MANIFEST_FILE = "manifest.json"
#: Distributions whose versions a saved model records (unpickling depends on them).
MODEL_DISTRIBUTIONS = ("numpy", "scipy", "scikit-learn", "joblib", "pandas")
_README = """# bids-ketdcm saved models (format {version})

Written by bids-ketdcm {software} (`group --save-model`). One folder per feature set x
network x label scheme, named `features-<set>_seg-<network>_target-<scheme>`, holding:

- `model.joblib`: a joblib pickle of a dict with `estimator` (scikit-learn Pipeline:
  StandardScaler fitted on the training participants + classifier), `bootstrap` (the same
  pipeline refitted on stratified bootstrap resamples; their spread gives the
  per-patient uncertainty interval), `feature_names`, `classes`, `network`, `feature_set`.
- `manifest.json`: `format`, `format_version`, `model_id`, `feature_set`, `network`,
  `feature_names`, `feature_spec`, `label` (the label definition), `model`
  (hyper-parameters), `training` (participants, class counts, cross-validated and apparent
  training-set metrics),
  `bootstrap`, `software` (versions), `files` (SHA-256 checksum of `model.joblib`).

`models.tsv` lists the models. bids-ketdcm refuses to load a model whose checksum does
not match, whose format major version is newer than it reads, or whose features or
network differ from the data it is applied to. A pickle can execute code when loaded:
load only models from sources you trust.

These models are research tools, not clinical devices.
"""


def model_id(feature_set: str, network: str, target: str) -> str:
    """Folder name of a model: ``features-<fs>_seg-<network>_target-<target>``.

    ``dcm+gmv`` is written ``dcmgmv`` (entity values hold letters and digits only).
    """
    return f"features-{feature_set.replace('+', '')}_seg-{network}_target-{target}"


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def positive_coefficients(estimator) -> tuple[np.ndarray, float]:
    """Coefficients and intercept (on standardised features) for the positive (last) class."""
    from sklearn.multiclass import OneVsRestClassifier

    inner = estimator.steps[-1][1]
    if isinstance(inner, OneVsRestClassifier):
        inner = inner.estimators_[-1]
        return inner.coef_[0], float(inner.intercept_[0])
    coef = np.atleast_2d(inner.coef_)
    return coef[-1], float(np.atleast_1d(inner.intercept_)[-1])


def training_cv(manifest: dict) -> dict:
    """The training cross-validated metrics of a manifest: nested CV when it ran, else the
    last k-fold protocol (``{}`` when none is recorded)."""
    cv = (manifest.get("training") or {}).get("cv_metrics") or {}
    return cv.get("nested") or (cv[max(cv)] if cv else {})


@dataclass
class SavedModel:
    """A loaded model and its manifest.

    Attributes
    ----------
    path
        The model folder.
    manifest
        The parsed ``manifest.json``.
    estimator
        Fitted scikit-learn pipeline (scaler + classifier).
    bootstrap
        Pipelines refitted on bootstrap resamples of the training participants.
    """

    path: Path
    manifest: dict
    estimator: Any
    bootstrap: list

    @property
    def model_id(self) -> str:
        """Folder name (feature set, network, target)."""
        return str(self.manifest["model_id"])

    @property
    def feature_names(self) -> list[str]:
        """Feature names, in the column order the model expects."""
        return list(self.manifest["feature_names"])

    @property
    def feature_set(self) -> str:
        """``dcm``, ``gmv`` or ``dcm+gmv``."""
        return str(self.manifest["feature_set"])

    @property
    def network(self) -> str:
        """Network (``seg``) the features come from."""
        return str(self.manifest["network"])

    @property
    def target(self) -> str:
        """Label scheme name."""
        return str(self.manifest["label"]["scheme"])

    @property
    def train_cv_balanced_accuracy(self) -> float:
        """Cross-validated balanced accuracy in training (:func:`training_cv`; NaN if unknown)."""
        value = training_cv(self.manifest).get("balanced_accuracy")
        return float("nan") if value is None else float(value)

    @property
    def classes(self) -> list[str]:
        """Class names, ordinal, the positive (best outcome) class last."""
        return list(self.manifest["label"]["classes"])

    def align(self, X: np.ndarray, names: list[str], network: str, where: str = "the data") -> np.ndarray:
        """Check features against the training ones and return them in model order.

        Parameters
        ----------
        X
            (participants, features) matrix.
        names
            Name of each column of ``X``.
        network
            Network (``seg``) the features come from.
        where
            What the data are, for messages (e.g. a folder).

        Returns
        -------
        numpy.ndarray
            ``X`` with its columns in the order of :attr:`feature_names`.

        Raises
        ------
        InputError
            Another network, or feature names that are not exactly the trained ones.
        """
        if network != self.network:
            raise InputError(
                f"saved model {self.path}: trained on network seg-{self.network}; {where} "
                f"are from seg-{network}. Apply a model trained on seg-{network}."
            )
        trained, given = self.feature_names, list(names)
        missing = [n for n in trained if n not in given]
        extra = [n for n in given if n not in trained]
        if missing or extra or len(set(given)) != len(given):
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} trained feature(s) ({', '.join(missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''})")
            if extra:
                parts.append(f"{len(extra)} feature(s) it was not trained on ({', '.join(extra[:5])}"
                             f"{', ...' if len(extra) > 5 else ''})")
            if not parts:
                parts.append("duplicate feature names")
            raise InputError(
                f"saved model {self.path}: {where} do not match the features it was trained on "
                f"(feature set {self.feature_set}, {len(trained)} features): " + "; ".join(parts)
            )
        X = np.asarray(X, dtype=float)
        if X.ndim != 2 or X.shape[1] != len(given):
            raise InputError(f"saved model {self.path}: {where}: expected a (participants, {len(given)}) matrix")
        if not np.isfinite(X).all():
            raise InputError(f"saved model {self.path}: {where} hold non-finite feature values")
        return X[:, [given.index(n) for n in trained]]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(participants, classes) probabilities of the final model (``X`` aligned).

        The classifier is fitted with balanced class weights (the decision rule of the
        suite); its raw probabilities describe a population with equal classes. They are
        returned on the scale of the training data by the prior correction
        ``p_k * n_k / sum_j p_j * n_j`` (``n_k``: training participants of class k; for two
        classes, King and Zeng's ``logit p + log(n_pos / n_neg)``).
        """
        return self._prior_corrected(self.estimator.predict_proba(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(participants,) class indices of the decision rule the suite cross-validated.

        That is the balanced-weight classifier's choice, which for equal costs per class is
        the class of largest ``p_k / prior_k``; the argmax of the calibrated probabilities of
        :meth:`predict_proba` would favour the majority class.
        """
        return np.asarray(self.estimator.predict(X), dtype=int)

    def bootstrap_proba(self, X: np.ndarray) -> np.ndarray:
        """(resamples, participants, classes) prior-corrected probabilities of the bootstrap
        models (stratified resamples keep the class sizes, so one correction serves all)."""
        return np.stack([self._prior_corrected(_full_proba(m, X, len(self.classes))) for m in self.bootstrap])

    def _prior_corrected(self, proba: np.ndarray) -> np.ndarray:
        counts = self.manifest["training"].get("class_counts")
        if not counts:  # a model saved before class counts were recorded: raw probabilities
            return proba
        return prior_corrected(proba, [counts[c] for c in self.classes])

    def contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-feature contributions to the positive-class log-odds.

        Returns
        -------
        z : numpy.ndarray
            (participants, features) features standardised with the training mean and sd.
        contributions : numpy.ndarray
            ``coefficient x z``: their sum plus ``intercept`` is the model's
            decision value (log-odds of the positive class, one-vs-rest for >2 classes).
        intercept : float
        """
        scaler = self.estimator.steps[0][1]
        z = scaler.transform(X)
        coef, intercept = positive_coefficients(self.estimator)
        return z, z * coef[None, :], intercept


def prior_corrected(proba: np.ndarray, class_counts: list[int] | np.ndarray) -> np.ndarray:
    """Probabilities of a balanced-weight classifier on the scale of its training data.

    Parameters
    ----------
    proba
        (n, K) probabilities of a classifier fitted with balanced class weights.
    class_counts
        (K,) training participants per class.

    Returns
    -------
    numpy.ndarray
        ``p_k n_k / sum_j p_j n_j`` (King and Zeng's prior correction).
    """
    weighted = np.asarray(proba, dtype=float) * np.asarray(class_counts, dtype=float)[None, :]
    return weighted / weighted.sum(axis=1, keepdims=True)


def _full_proba(estimator, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes (a class absent from a resample gets 0)."""
    out = np.zeros((len(X), n_classes))
    out[:, estimator.classes_] = estimator.predict_proba(X)
    return out


def save_model(directory: str | os.PathLike, *, estimator, bootstrap: list, feature_names: list[str],
               feature_set: str, network: str, label: dict, model: dict, training: dict,
               feature_spec: dict, bootstrap_seed: int) -> Path:
    """Write one model folder atomically (replacing an older one of the same id).

    Parameters
    ----------
    directory
        The ``--save-model`` folder.
    estimator, bootstrap
        From :func:`fit_final`.
    feature_names
        Names of the training columns, in order.
    feature_set, network
        What the features are (see :data:`FEATURE_SETS`).
    label
        Label definition: at least ``scheme`` and ``classes`` (positive class last).
    model, training, feature_spec
        Manifest sections (see the module notes).
    bootstrap_seed
        Seed of the bootstrap resampling.

    Returns
    -------
    Path
        The model folder.
    """
    import joblib

    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ident = model_id(feature_set, network, label["scheme"])
    final = directory / ident
    work = Path(tempfile.mkdtemp(prefix=f".{ident}.", dir=directory))
    try:
        payload = {"estimator": estimator, "bootstrap": list(bootstrap), "feature_names": list(feature_names),
                   "classes": list(label["classes"]), "network": network, "feature_set": feature_set}
        with atomic_path(work / MODEL_FILE) as tmp:
            joblib.dump(payload, tmp, compress=3)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_id": ident,
            "feature_set": feature_set, "network": network, "feature_names": list(feature_names),
            "feature_spec": feature_spec, "label": label, "model": model, "training": training,
            "bootstrap": {"n": len(bootstrap), "seed": bootstrap_seed,
                          "method": "stratified bootstrap of the training participants, same hyper-parameters"},
            "software": software_versions(MODEL_DISTRIBUTIONS),
            "files": {MODEL_FILE: {"sha256": sha256(work / MODEL_FILE),
                                   "bytes": (work / MODEL_FILE).stat().st_size}},
            "intended_use": "research tool, not a clinical device",
        }
        write_json(work / MANIFEST_FILE, finite_json(manifest))
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{ident}.old.", dir=directory))
            os.replace(final, old / ident)
        os.replace(work, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def write_index(directory: str | os.PathLike) -> Path:
    """(Re)write ``models.tsv`` and ``README.md`` of a ``--save-model`` folder."""
    directory = Path(directory)
    rows = []
    for folder in model_folders(directory):
        m = _read_manifest(folder)
        best = training_cv(m)
        rows.append({
            "model_id": m["model_id"], "feature_set": m["feature_set"], "network": m["network"],
            "target": m["label"]["scheme"], "classes": ";".join(m["label"]["classes"]),
            "n_features": len(m["feature_names"]), "n_train": m["training"].get("n_participants"),
            "cv_balanced_accuracy": best.get("balanced_accuracy"), "cv_roc_auc": best.get("roc_auc"),
        })
    write_tsv(directory / "models.tsv", pd.DataFrame(rows))
    write_text(directory / "README.md", _README.format(version=FORMAT_VERSION, software=__version__))
    return directory / "models.tsv"


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"saved model {folder}: no {MANIFEST_FILE} (not a bids-ketdcm model folder)")
    manifest = read_json_object(path, "saved model")
    if manifest.get("format") != FORMAT_NAME:
        raise InputError(f"saved model {path}: not a {FORMAT_NAME} manifest (format is {manifest.get('format')!r})")
    version = str(manifest.get("format_version", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise InputError(f"saved model {path}: format_version {version!r} is not MAJOR.MINOR") from None
    ours = int(FORMAT_VERSION.split(".")[0])
    if major != ours:
        newer = "a newer" if major > ours else "an older"
        raise InputError(
            f"saved model {path}: written in {newer} incompatible format version {version}; this "
            f"bids-ketdcm {__version__} reads format {ours}.x. "
            + ("Upgrade bids-ketdcm to apply it." if major > ours else "Re-save the model.")
        )
    required = ("model_id", "feature_set", "network", "feature_names", "label", "files")
    absent = [k for k in required if k not in manifest]
    if absent:
        raise InputError(f"saved model {path}: manifest lacks {', '.join(absent)}")
    return manifest


def load_model(folder: str | os.PathLike) -> SavedModel:
    """Load one model folder, verifying format version and checksum first.

    Parameters
    ----------
    folder
        A ``features-*_seg-*_target-*`` folder written by :func:`save_model`.

    Returns
    -------
    SavedModel

    Raises
    ------
    InputError
        No or invalid manifest, another format, an incompatible (newer) major version, a
        missing model file, a checksum mismatch (tampered or corrupted file), or a model
        file that disagrees with its manifest.
    """
    import joblib
    import sklearn

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"saved model {folder} does not exist or is not a folder")
    manifest = _read_manifest(folder)
    path = folder / MODEL_FILE
    if not path.is_file():
        raise InputError(f"saved model {folder}: {MODEL_FILE} is missing")
    expected = (manifest["files"].get(MODEL_FILE) or {}).get("sha256")
    actual = sha256(path)
    if expected != actual:
        raise InputError(
            f"saved model {path}: SHA-256 checksum {actual[:16]}... does not match the manifest's "
            f"{str(expected)[:16]}...; the file was modified or corrupted after it was saved. "
            "Refusing to load it."
        )
    saved_sklearn = (manifest.get("software") or {}).get("scikit-learn")
    if saved_sklearn and saved_sklearn != sklearn.__version__:
        log.warning("saved model %s was fitted with scikit-learn %s; this is %s", folder, saved_sklearn,
                    sklearn.__version__)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's version warning: logged above
        try:
            payload = joblib.load(path)
        except Exception as err:  # unpickling raises many types
            raise InputError(f"saved model {path}: cannot be loaded ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or "estimator" not in payload:
        raise InputError(f"saved model {path}: not a bids-ketdcm model file")
    for key, value in (("feature_names", manifest["feature_names"]), ("network", manifest["network"]),
                       ("feature_set", manifest["feature_set"]), ("classes", manifest["label"].get("classes"))):
        if payload.get(key) != value:
            raise InputError(f"saved model {folder}: {MODEL_FILE} and {MANIFEST_FILE} disagree on {key}")
    return SavedModel(path=folder, manifest=manifest, estimator=payload["estimator"],
                      bootstrap=list(payload.get("bootstrap", [])))


def model_folders(directory: str | os.PathLike) -> list[Path]:
    """The model folders of a ``--save-model`` folder, sorted.

    Hidden folders (the temporary ones of a save that was interrupted) are left out.
    """
    return sorted(p.parent for p in Path(directory).glob(f"*/{MANIFEST_FILE}") if not p.parent.name.startswith("."))


def load_models(directory: str | os.PathLike) -> list[SavedModel]:
    """Load every model of a ``--save-model`` folder, or the one model folder given.

    Raises
    ------
    InputError
        The folder does not exist, holds no model, or a model fails to load.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"--apply-model {directory} does not exist or is not a folder")
    if (directory / MANIFEST_FILE).is_file():
        return [load_model(directory)]
    folders = model_folders(directory)
    if not folders:
        raise InputError(f"--apply-model {directory}: no saved model (no */{MANIFEST_FILE}); "
                         "write one with group --save-model")
    return [load_model(f) for f in folders]


def feature_fingerprint(row: np.ndarray) -> str:
    """A short hash of one participant's feature vector (rounded to 1e-6).

    Saved models record it per training participant, so that external validation can tell
    a training participant's own data (refused) from another dataset that reuses its label.
    """
    return hashlib.sha256(np.round(np.asarray(row, dtype="<f8"), 6).tobytes()).hexdigest()[:16]
