"""The synthetic experiment of Kleinerman et al. (PLoS ONE 2021, Appendix C).

Generator (:func:`generate_synthetic`):

1. ``n_prototypes`` latent prototypes of ``latent_dim`` dimensions drawn from N(0, 10)
   (read as variance 10, standard deviation sqrt(10); ``prototype_variance``);
   ``n_per_prototype`` patients per prototype, latent code = prototype + N(0, patient_sd^2).
2. Each of ``n_treatments`` treatments has a random ReLU network latent -> 5 -> 2 (weights
   uniform in [0, 1), as in the authors' generator) followed by a softmax; the first
   softmax output is the response probability of a patient under that treatment. These
   probabilities are the counterfactual truth.
3. Observed features: a random linear decoder latent -> 16 (uniform [0, 1) weights) plus
   N(0, decoder_noise_sd^2) noise, and 4 pure N(0, 1) noise features: 20 features.
4. One uniformly random treatment per patient; the outcome is drawn from the assigned
   treatment's probability, or (``threshold_outcome``) is ``probability >= 0.5`` as the
   authors' code did. ``truth_decimals`` rounds the true probabilities as their CSV did
   (which creates ties).

Experiment (:func:`run_dpnn_synthetic`): repeated stratified 5-fold CV of every method of
:mod:`.treatment`; per method the median and MAD of AUC, RPL, MRR (tie-aware and the paper's
column-order convention) and RR over fold-repeats; Friedman and Bonferroni-corrected Wilcoxon
tests; and where DPNN wins or loses (RPL by latent cluster and by the gap between the best
and second-best true probability).

Deviations from the paper, by default (:data:`FAST_DPNN`):

* mini-batches of 100 at learning rate 1e-3 instead of 10 at 1e-4 (same epochs, same
  learning rate per example). Batch 10 means 80,000 Adam steps per fold on 8,000 training
  patients: 139 s per fold on a shared CPU core against 12 s.
* no dropout in the classifier (the paper gives no rate; 0.5 was used before). With 8,000
  training patients and a 16-unit classifier dropout only adds noise, and it blurs the
  treatment x prototype interaction that the latent cluster whose best treatment switches
  needs: on the first fold (seed 0) RPL 0.0037 with dropout 0.5, 0.0033 with 0.1, 0.0010
  without (T-learner 0.0015).
* the learning rate annealed to 0 along a cosine over the 100 epochs: with a constant rate
  the recommendations in that cluster jitter from epoch to epoch (RPL 0.0010 at epoch 100,
  0.0021 at epoch 150 on that fold). Early stopping on a 10% validation split (patience
  20, learning rate cut on plateaus) was no better (RPL 0.0014, 0.0019 and 0.0039 against
  0.0011, 0.0018 and 0.0011 with the cosine on three folds): the validation cross-entropy
  is a noisy guide to which treatment is best. It stays available
  (``DPNNSettings.validation_fraction``).
* three random initialisations, keeping the lowest final training loss: about one fit in
  four ends in a poor local optimum whose training loss is visibly higher (0.445 against
  0.424) and whose recommendations fail in the switching cluster (RPL 0.05 on such a fold).

Measured with ``benchmarks/dpnn_synthetic.py`` (20 fold-repeats): with the earlier settings
(dropout 0.5, constant rate, one initialisation) DPNN's median RPL was 0.0064 against the
T-learner's 0.0021 (worse, p 9.5e-7); with dropout 0 and the cosine 0.0031 (still worse,
p 0.016; five of the 20 folds stuck at RPL 0.02-0.05); with these defaults 0.0016 against
0.0021 (p 0.51 that DPNN is worse). These choices were made on seed 0; on a fresh data set
(seed 1), not used to choose them, DPNN's median RPL is 0.0065 against the T-learner's
0.0102 (lower, two-sided p 0.004). Pass ``dpnn=DPNNSettings()`` for the paper's settings.

Interpretations where the brief and the authors' code leave room (all options of
:class:`SyntheticConfig`): N(0, 10) as variance 10; patients scattered with sd 1 around
their prototype; uniform [0, 1) weights; unit noise on the decoded features.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import softmax
from scipy.stats import median_abs_deviation

from bids_ketdcm.group.treatment.cv import SelectionProblem, cross_validate_selection, method_tests
from bids_ketdcm.group.treatment.dpnn import DPNNSettings
from bids_ketdcm.group.treatment.methods import METHODS
from bids_ketdcm.group.treatment.metrics import recommend, regret, wilcoxon_p
from bids_ketdcm.io import write_json, write_tsv

log = logging.getLogger(__name__)

FAST_DPNN = DPNNSettings(dropout=0.0, lr=1e-3, batch_size=100, lr_schedule="cosine", n_init=3)

PAPER_FIGURES = {
    "source": "Kleinerman et al., PLoS ONE 2021, synthetic-data experiment",
    "dpnn": {"mrr": 0.451, "rpl": 0.084},
    "benchmarks": {"mrr": [0.440, 0.444], "rpl": [0.084, 0.097]},
    "note": (
        "The paper's MRR ranks with ties broken by column order; under that rule a uniformly "
        "random recommendation among 4 treatments scores 0.521, so the paper's MRR is not a "
        "bar to clear."
    ),
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator (defaults: the paper's Appendix C)."""

    n_prototypes: int = 5
    latent_dim: int = 10
    n_per_prototype: int = 2000
    prototype_variance: float = 10.0
    patient_sd: float = 1.0
    n_treatments: int = 4
    treatment_hidden: int = 5
    n_decoded: int = 16
    n_noise: int = 4
    decoder_noise_sd: float = 1.0
    threshold_outcome: bool = False
    truth_decimals: int | None = None


@dataclass
class SyntheticData:
    """A generated data set.

    Attributes
    ----------
    X
        (n, n_decoded + n_noise) observed features.
    treatment, outcome
        (n,) assigned treatment and observed binary outcome.
    truth
        (n, T) true response probability under every treatment.
    cluster
        (n,) index of the latent prototype each patient was drawn around.
    latent
        (n, latent_dim) latent codes.
    """

    X: np.ndarray
    treatment: np.ndarray
    outcome: np.ndarray
    truth: np.ndarray
    cluster: np.ndarray
    latent: np.ndarray

    def problem(self) -> SelectionProblem:
        """As a :class:`SelectionProblem` with probabilistic truth."""
        names = [f"treatment_{k}" for k in range(self.truth.shape[1])]
        return SelectionProblem(self.X, self.treatment, self.outcome, self.truth, names, True)


def generate_synthetic(config: SyntheticConfig = SyntheticConfig(), seed: int = 0) -> SyntheticData:
    """Draw one synthetic treatment-selection data set (see the module docstring)."""
    rng = np.random.default_rng(seed)
    c = config
    prototypes = rng.normal(0.0, np.sqrt(c.prototype_variance), (c.n_prototypes, c.latent_dim))
    cluster = np.repeat(np.arange(c.n_prototypes), c.n_per_prototype)
    latent = prototypes[cluster] + rng.normal(0.0, c.patient_sd, (len(cluster), c.latent_dim))
    truth = np.empty((len(cluster), c.n_treatments))
    for k in range(c.n_treatments):
        w1 = rng.random((c.latent_dim, c.treatment_hidden))
        w2 = rng.random((c.treatment_hidden, 2))
        truth[:, k] = softmax(np.maximum(latent @ w1, 0.0) @ w2, axis=1)[:, 0]
    if c.truth_decimals is not None:
        truth = np.round(truth, c.truth_decimals)
    decoder = rng.random((c.latent_dim, c.n_decoded))
    decoded = latent @ decoder + rng.normal(0.0, c.decoder_noise_sd, (len(cluster), c.n_decoded))
    X = np.hstack([decoded, rng.normal(0.0, 1.0, (len(cluster), c.n_noise))])
    treatment = rng.integers(0, c.n_treatments, len(cluster))
    p = truth[np.arange(len(cluster)), treatment]
    outcome = (p >= 0.5) if c.threshold_outcome else (rng.random(len(cluster)) < p)
    order = rng.permutation(len(cluster))
    return SyntheticData(
        X[order], treatment[order], outcome[order].astype(int), truth[order], cluster[order], latent[order]
    )


def _summary(folds: pd.DataFrame) -> dict:
    out = {}
    for method, rows in folds.groupby("method", sort=False):
        entry = {}
        for metric in ("auc", "rpl", "mrr", "mrr_column", "rr"):
            values = rows[metric].dropna().to_numpy()
            entry[metric] = {
                "median": float(np.median(values)),
                "mad": float(median_abs_deviation(values)),
                "mean": float(values.mean()),
            }
        entry["base_rate"] = float(rows["base_rate"].mean())
        entry["seconds_per_fold"] = float(rows["seconds"].mean())
        out[method] = entry
    return out


def _where(data: SyntheticData, oof: dict[str, np.ndarray]) -> dict:
    """Mean RPL per method by latent cluster, by best treatment and by quartile of the gap
    between the best and second-best true probability (all repeats pooled)."""
    sorted_truth = np.sort(data.truth, axis=1)
    gap = sorted_truth[:, -1] - sorted_truth[:, -2]
    quartile = np.digitize(gap, np.quantile(gap, [0.25, 0.5, 0.75]))
    best = np.argmax(data.truth, axis=1)
    strata = {"cluster": data.cluster, "best_treatment": best, "gap_quartile": quartile}
    out: dict = {
        "gap_quartile_edges": [float(q) for q in np.quantile(gap, [0.0, 0.25, 0.5, 0.75, 1.0])],
        "cluster_sizes": np.bincount(data.cluster).tolist(),
        # heterogeneity a sub-grouping model cannot see: sd of the truth inside each cluster
        "truth_sd_within_cluster": [
            float(data.truth[data.cluster == g].std(axis=0).mean()) for g in np.unique(data.cluster)
        ],
        "best_treatment_counts": np.bincount(best, minlength=data.truth.shape[1]).tolist(),
    }
    for name, labels in strata.items():
        table = {}
        for method, preds in oof.items():
            losses = np.mean([regret(data.truth, recommend(p)) for p in preds], axis=0)
            table[method] = [float(losses[labels == g].mean()) for g in np.unique(labels)]
        out[f"rpl_by_{name}"] = table
    return out


def run_dpnn_synthetic(
    config: SyntheticConfig = SyntheticConfig(),
    n_splits: int = 5,
    repeats: int = 4,
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    dpnn: DPNNSettings = FAST_DPNN,
    knn_k: int | None = None,
    outdir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the paper's synthetic experiment.

    Parameters
    ----------
    config
        Generator parameters.
    n_splits, repeats, seed
        Folds, repeats (fresh splits each) and the seed of data, splits and models.
    methods
        Methods of :data:`.treatment.METHODS` to compare.
    dpnn
        DPNN settings (default :data:`FAST_DPNN`, see the module docstring).
    knn_k
        Neighbours of the case-based reasoning baseline (None: square-root rule).
    outdir
        When given, ``dpnn_synthetic_folds.tsv`` (per fold-repeat metrics) and
        ``dpnn_synthetic.json`` (this function's result) are written there.
    progress
        Progress bar on stderr.

    Returns
    -------
    dict
        ``summary`` (method -> metric -> median/MAD/mean), ``tests`` (Friedman + Wilcoxon on
        RPL and MRR), ``bar`` (DPNN vs random and vs the T-learner on RPL), ``where``
        (RPL by stratum), ``data`` (descriptives), ``seconds``, ``paper`` and the settings.
    """
    start = time.perf_counter()
    data = generate_synthetic(config, seed)
    result = cross_validate_selection(
        data.problem(), methods, n_splits, repeats, seed, dpnn, knn_k, progress
    )
    folds = result.folds
    tests = {metric: method_tests(folds, metric) for metric in ("rpl", "mrr")}
    out = {
        "data": {
            "n": int(len(data.outcome)),
            "n_features": int(data.X.shape[1]),
            "response_rate": float(data.outcome.mean()),
            "mean_true_probability": float(data.truth.mean()),
            "mean_best_probability": float(data.truth.max(axis=1).mean()),
            "tied_best_fraction": float(np.mean((data.truth == data.truth.max(axis=1, keepdims=True)).sum(axis=1) > 1)),
        },
        "summary": _summary(folds),
        "tests": tests,
        "where": _where(data, result.oof),
        "n_splits": n_splits,
        "n_repeats": repeats,
        "seed": seed,
        "config": asdict(config),
        "dpnn_settings": asdict(dpnn),
        "paper": PAPER_FIGURES,
    }
    if {"dpnn", "tlearner", "random"} <= set(methods):
        out["bar"] = _bar(folds)
    out["seconds"] = time.perf_counter() - start
    if outdir is not None:
        write_tsv(Path(outdir) / "dpnn_synthetic_folds.tsv", folds)
        write_json(Path(outdir) / "dpnn_synthetic.json", out)
    return out


def _bar(folds: pd.DataFrame) -> dict:
    """DPNN's RPL below random (one-sided Wilcoxon) and not worse than the T-learner."""
    wide = folds.pivot_table(index=["repeat", "fold"], columns="method", values="rpl")
    vs_random = wilcoxon_p(wide["dpnn"], wide["random"], "less")
    worse_than_t = wilcoxon_p(wide["dpnn"], wide["tlearner"], "greater")
    return {
        "n_blocks": int(len(wide)),
        "rpl_dpnn_minus_random_median": float(np.median(wide["dpnn"] - wide["random"])),
        "p_dpnn_below_random": vs_random,
        "rpl_dpnn_minus_tlearner_median": float(np.median(wide["dpnn"] - wide["tlearner"])),
        "p_dpnn_worse_than_tlearner": worse_than_t,
        "p_dpnn_different_from_tlearner": wilcoxon_p(wide["dpnn"], wide["tlearner"]),
        "passed": bool(vs_random < 0.05 and worse_than_t >= 0.05 and len(wide) >= 20),
    }
