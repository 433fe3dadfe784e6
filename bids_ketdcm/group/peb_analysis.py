"""PEB leave-one-out prediction of the ketamine response: the DCM field's own predictor.

For each network, the participants' full DCM posteriors (means, covariances, priors, free
energies; read from the derivatives) enter a PEB model of the A parameters with the design
``[1, z]``, ``z`` the standardised continuous target (default: percentage improvement); each
participant's ``z`` is then predicted from its own DCM and the PEB of the others
(:func:`bids_ketdcm.dcm.loo.leave_one_out`, SPM's ``spm_dcm_loo``). The statistic is the
Pearson r of predicted and observed target, with SPM's one-sided parametric p-value and a
permutation p-value: the target is shuffled across participants and the whole
leave-one-out redone, ``(1 + #{null >= observed}) / (1 + permutations)`` as the suite's.
Leave-one-out is the protocol SPM defines for this model; the same predictor runs under the
suite's protocols as the model ``peb`` (:mod:`bids_ketdcm.group.hierarchical`). The
full-sample PEB and its model reduction give the posterior probability that each
connection's effect on the target is present.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bids_ketdcm.bids.derivatives import read_posterior
from bids_ketdcm.bids.features import FeatureSet
from bids_ketdcm.config import split_key
from bids_ketdcm.dcm.bmr import search_reduced
from bids_ketdcm.dcm.csd import scale_timeseries, validate_timeseries
from bids_ketdcm.dcm.loo import leave_one_out
from bids_ketdcm.dcm.peb import SubjectPosteriors, a_parameter_index, fit_peb
from bids_ketdcm.dcm.priors import ParamLayout, prior_covariance, prior_mean
from bids_ketdcm.errors import InputError
from bids_ketdcm.group.labels import LabelSet
from bids_ketdcm.io import write_tsv

log = logging.getLogger(__name__)


def subject_posteriors(fs: FeatureSet, option: str = "--peb") -> SubjectPosteriors:
    """The DCM posteriors behind a feature set's A matrices (same participants, same order).

    Parameters
    ----------
    fs
        A ``dcm`` feature set (its connectivity files locate the posteriors).
    option
        The option that needs them, named in error messages.

    Raises
    ------
    InputError
        A posterior file is missing or unreadable, or its regions differ from the
        feature set's (the message names the file).
    """
    n = len(fs.regions)
    layout = ParamLayout(n)
    Ep, Cp, pC, F = [], [], [], []
    for path in fs.files:
        try:
            rec = read_posterior(Path(path))
        except ValueError as exc:
            raise InputError(f"{option}: {exc}") from None
        if rec["names"] != list(fs.regions):
            raise InputError(f"{option}: {path}: regions {rec['names']} differ from seg-{fs.network}'s {fs.regions}")
        Ep.append(layout.pack(rec["params"]))
        Cp.append(rec["cov"])
        pC.append(prior_covariance(n, scale_timeseries(validate_timeseries(rec["timeseries"]))[0]))
        F.append(rec["F"])
    return SubjectPosteriors(Ep=np.stack(Ep), Cp=np.stack(Cp), pE=np.tile(prior_mean(n), (len(Ep), 1)),
                             pC=np.stack(pC), F=np.asarray(F), names=list(fs.participants))


def peb_loo(posteriors: SubjectPosteriors, target: np.ndarray, n_permutations: int, seed: int,
            regions: list[str]) -> dict:
    """PEB leave-one-out prediction of one target, its permutation test, and model reduction.

    Parameters
    ----------
    posteriors
        First-level posteriors of the participants (A block modelled).
    target
        (N,) continuous target of the same participants.
    n_permutations
        Shuffles of the target for the permutation p-value (0: none).
    seed
        Seed of the shuffles.
    regions
        Region names (for the connection labels).

    Returns
    -------
    dict
        ``r``, ``p_parametric``, ``p_permutation``, ``predictions`` (DataFrame),
        ``effects`` (DataFrame, most probable first, then by ``|z|``: connection, whether
        it is a self-connection, effect per SD of the target (Hz between regions; log
        scaling of the self-inhibition for self-connections), its posterior SD and z, the
        model-averaged effect and the posterior probability that it is present),
        ``seconds``.
    """
    start = time.perf_counter()
    y = np.asarray(target, dtype=float)
    if np.std(y) == 0:
        raise InputError("--peb: the target has the same value for every participant")
    z = (y - y.mean()) / y.std()
    X = np.column_stack([np.ones(len(z)), z])
    n = len(regions)
    index = a_parameter_index(n)
    loo = leave_one_out(posteriors, X, index)
    rng = np.random.default_rng(seed)
    null = np.array([leave_one_out(posteriors, X[rng.permutation(len(z))], index).r
                     for _ in range(n_permutations)])
    p_perm = float((1 + np.sum(null >= loo.r)) / (1 + n_permutations)) if n_permutations else None
    peb = fit_peb(posteriors, X, index, subject_posteriors=False)
    bma = search_reduced(peb)
    names = [f"{regions[s]}->{regions[t]}" for s in range(n) for t in range(n)]  # column-major: A[t, s]
    sd = np.sqrt(np.diag(peb.Cp)[len(index):])
    effects = pd.DataFrame({"connection": names, "self": [s == t for s in range(n) for t in range(n)],
                            "effect_per_sd": peb.Ep[:, 1], "posterior_sd": sd, "z": peb.Ep[:, 1] / sd,
                            "bma_effect": bma.Ep[:, 1], "probability_present": bma.Pp[:, 1]})
    order = np.lexsort((-np.abs(effects["z"].to_numpy()), -effects["probability_present"].to_numpy()))
    predictions = pd.DataFrame({"participant_id": posteriors.names, "observed": y,
                                "predicted": loo.mean * y.std() + y.mean(),
                                "predicted_sd": np.sqrt(loo.variance) * y.std()})
    return {"r": loo.r, "p_parametric": loo.p, "p_permutation": p_perm, "n_permutations": n_permutations,
            "participants": len(y), "predictions": predictions,
            "effects": effects.iloc[order].reset_index(drop=True),
            "seconds": round(time.perf_counter() - start, 2)}


def run_peb(features: dict[str, FeatureSet], labels: LabelSet, group_dir: Path, target: str,
            n_permutations: int, seed: int) -> dict:
    """PEB leave-one-out of the ketamine ``target`` for every DCM network; writes its tables.

    Writes ``group_dir/peb_seg-<network>_predictions.tsv`` (observed and out-of-sample
    predicted target per participant) and ``..._effects.tsv`` (each connection's effect on
    the target, after model reduction, and its posterior probability).

    Returns
    -------
    dict
        Per network: r, p-values, participants, seconds, the 5 most probable effects and
        the files written.
    """
    values = labels.target("ketamine", target)
    out: dict = {"target": target, "networks": {}}
    for key, fs in features.items():
        kind, network = split_key(key)
        if kind not in ("dcm", "eb") or network in out["networks"]:  # eb: the same A matrices' DCMs
            continue
        key = network
        keep = [p for p in fs.participants if p in values.index]
        if len(keep) < 4:
            out["networks"][key] = {"skipped": f"{len(keep)} participants with a {target} value (4 needed)"}
            continue
        sub = fs.subset(keep)
        res = peb_loo(subject_posteriors(sub), values.loc[keep].to_numpy(float), n_permutations, seed, sub.regions)
        files = {"predictions": group_dir / f"peb_seg-{key}_predictions.tsv",
                 "effects": group_dir / f"peb_seg-{key}_effects.tsv"}
        write_tsv(files["predictions"], res["predictions"])
        write_tsv(files["effects"], res["effects"])
        log.info("PEB leave-one-out seg-%s: r %.3f, p %.3g (%.1f s)", key, res["r"], res["p_parametric"],
                 res["seconds"])
        out["networks"][key] = {
            **{k: res[k] for k in ("r", "p_parametric", "p_permutation", "n_permutations", "participants",
                                   "seconds")},
            "top_effects": res["effects"].head(5).to_dict(orient="records"),
            "files": {k: str(v) for k, v in files.items()},
        }
    return out
