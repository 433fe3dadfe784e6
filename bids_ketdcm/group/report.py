"""Group HTML report: summary table, label counts, and figures per target and network.

Figures (embedded PNG): confusion matrix and ROC curves (label schemes) or predicted vs
observed (continuous targets), per-fold bars of the headline metric for every model,
permutation null histograms (ketamine and placebo), the A-matrix weights of the best
model, and (when run) the ketamine-vs-placebo treatment selection: its table and figure, or
the reason it was skipped. One self-contained file; figures are drawn in parallel over
``nprocs`` processes.
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from bids_ketdcm.group.feature_sets import compare_feature_sets
from bids_ketdcm.group.metrics import confusion
from bids_ketdcm.group.models import HEADLINE_METRIC, HEADLINE_MODEL, ResultKey, Task
from bids_ketdcm.group.suite import SuiteResult
from bids_ketdcm.io import write_text
from bids_ketdcm.provenance import command_line, software_versions
from bids_ketdcm.report.methods import group_methods_paragraph
from bids_ketdcm.report.render import figure_png, png_file, render_page


def _target_figure(ctx: dict) -> str:
    """One row of panels for one analysis target and network (runs in a worker)."""
    kind, classes = ctx["kind"], ctx["classes"]
    fig = Figure(figsize=(18, 3.8))
    axes = fig.subplots(1, 4)
    pred = ctx["pred"]
    head = pred[pred.model == ctx["model"]]
    if kind == "classification":
        y = head.observed.map(classes.index).to_numpy()
        yhat = head.predicted.map(classes.index).to_numpy()
        cm = confusion(y, yhat, len(classes))
        ax = axes[0]
        ax.imshow(cm, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(cm):  # white on the dark cells, black on the light ones
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=30, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("observed")
        ax.set_title(f"confusion: {ctx['model']} ({ctx['protocol']})", fontsize=9)
        ax = axes[1]
        if len(classes) == 2:
            for model, grp in pred.groupby("model", sort=False):
                obs = (grp.observed == classes[1]).to_numpy()
                score = grp[f"score_{classes[1]}"].to_numpy(float)
                if obs.all() or not obs.any() or not np.isfinite(score).all():
                    continue
                fpr, tpr, _ = roc_curve(obs, score)
                ax.plot(fpr, tpr, label=model)
            ax.set_title("ROC (pooled out-of-fold)", fontsize=9)
        else:
            for c in classes:
                obs = (head.observed == c).to_numpy()
                if obs.all() or not obs.any():
                    continue
                fpr, tpr, _ = roc_curve(obs, head[f"score_{c}"].to_numpy(float))
                ax.plot(fpr, tpr, label=c)
            ax.set_title(f"ROC one-vs-rest: {ctx['model']}", fontsize=9)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(fontsize=6)
    else:
        ax = axes[0]
        ax.scatter(head.observed, head.predicted, s=14)
        lo = float(min(head.observed.min(), head.predicted.min()))
        hi = float(max(head.observed.max(), head.predicted.max()))
        ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
        ax.set_xlabel("observed")
        ax.set_ylabel("predicted (out-of-fold)")
        ax.set_title(f"{ctx['model']} ({ctx['protocol']})", fontsize=9)
        axes[1].axis("off")
        axes[1].text(0, 0.5, ctx["text"], fontsize=8, va="center", family="monospace")
    ax = axes[2]
    folds = ctx["folds"]
    models = list(dict.fromkeys(folds.model))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        vals = folds[folds.model == model][ctx["metric"]].to_numpy(float)
        ax.bar(np.arange(len(vals)) + i * width, vals, width, label=model)
    ax.set_xlabel(f"fold ({ctx['protocol']})")
    ax.set_ylabel(ctx["metric"].replace("_", " "))
    ax.set_title("per-fold headline metric", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[3]
    for label, (null, obs) in ctx["nulls"].items():
        color = "C0" if label == "ketamine" else "C1"
        ax.hist(null, bins=30, alpha=0.5, color=color, label=f"{label} null")
        ax.axvline(obs, color=color, lw=2, label=f"{label} observed")
    ax.set_xlabel(ctx["metric"].replace("_", " ") + " (permuted labels)")
    ax.set_title(f"permutation null: {ctx['model']}", fontsize=9)
    if ctx["nulls"]:
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "no permutation test", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{ctx['target']} / seg-{ctx['network']}", fontsize=11)
    return figure_png(fig, dpi=80, bbox_inches="tight")


def _weights_figure(best: dict) -> str:
    w = np.asarray(best["weights"], dtype=float)
    n = len(best["regions"])
    fig = Figure(figsize=(3 + 0.35 * n, 2.5 + 0.3 * n))
    ax = fig.subplots()
    lim = np.nanmax(np.abs(w)) if np.isfinite(w).any() else 1.0
    cmap = "viridis" if best["kind"] == "importance" else "RdBu_r"
    im = ax.imshow(w, cmap=cmap, vmin=0 if best["kind"] == "importance" else -lim, vmax=lim)
    ax.set_xticks(range(n), best["regions"], rotation=90, fontsize=7)
    ax.set_yticks(range(n), best["regions"], fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    fig.colorbar(im, ax=ax, label=best["kind"])
    ax.set_title(f"{best['model']} on {best['target']} (seg-{best['network']})", fontsize=9)
    return figure_png(fig, dpi=80, bbox_inches="tight")


def peb_section(record: dict) -> str:
    """The PEB leave-one-out section (the record :func:`bids_ketdcm.group.peb_analysis.run_peb` returns)."""
    tables = {network: pd.DataFrame(res["top_effects"]).to_html(index=False, float_format=lambda v: f"{v:.3g}",
                                                                 border=0, classes="data")
              for network, res in record["networks"].items() if "skipped" not in res}
    return render_page("peb_section.html", record=record, tables=tables)


def _table(frame: pd.DataFrame) -> str:
    """A table with readable headers (``n_permutations`` -> ``N permutations``), empty columns left out."""
    empty = [c for c in frame.columns if frame[c].isna().all() or frame[c].astype(str).str.strip().eq("").all()]
    shown = frame.drop(columns=empty).rename(columns=_header)
    return shown.to_html(index=False, na_rep="n/a", float_format=lambda v: f"{v:.3f}", border=0, classes="data")


#: Words a header shows in capitals.
_ACRONYMS = {"dcm": "DCM", "gmv": "GMV", "auc": "AUC", "roc": "ROC", "madrs": "MADRS", "bh": "BH", "fd": "FD",
             "ci95": "95 % CI", "rpl": "RPL", "mrr": "MRR", "r2": "R²",
             "eb": "EB", "peb": "PEB"}


def _header(column: object) -> str:
    """``n_permutations`` -> ``N permutations``; ``dcm+gmv`` -> ``DCM+GMV``."""
    words = [re.sub(r"[a-z0-9]+", lambda m: _ACRONYMS.get(m.group(0), m.group(0)), w)
             for w in str(column).split("_")]
    text = " ".join(words)
    return text if text.startswith("p ") else text[:1].upper() + text[1:]  # p-values keep their small p


def write_report(path: str | Path, info: dict, suite: SuiteResult, tasks: list[Task],
                 best: dict | None, summary: pd.DataFrame, nprocs: int = 1,
                 treatment: dict | None = None, qc: dict[str, pd.DataFrame] | None = None) -> None:
    """Write the group report.

    Parameters
    ----------
    path
        Output HTML file.
    info
        The results.json content (options, definitions, counts, exclusions).
    suite
        Suite tables.
    tasks
        The tasks run (ketamine ones get figures).
    best
        Best model's weights (see ``run._best_weights``) or None.
    summary
        Plain-language summary table.
    nprocs
        Processes drawing figures.
    treatment
        Result of the group level's treatment selection (``run._treatment_selection``), or
        None when it was not asked for.
    qc
        Per network, the participants' QC table (:func:`bids_ketdcm.group.qc.qc_table`).
    """
    from joblib import Parallel, delayed

    protocol = info["headline"]["permutation_protocol"]
    res, pred, folds = suite.results, suite.predictions, suite.folds
    contexts = []
    for task in tasks:
        if task.treatment != "ketamine":
            continue
        model = HEADLINE_MODEL[task.kind]
        sel = (pred.treatment == "ketamine") & (pred.network == task.network) & (pred.target == task.target)
        fsel = (folds.treatment == "ketamine") & (folds.network == task.network) & (folds.target == task.target)
        nulls = {}
        for arm in ("ketamine", "placebo"):  # not `treatment`: that is the treatment-selection result
            key = ResultKey(arm, task.network, task.target, model, protocol)
            row = res[(res.treatment == arm) & (res.network == task.network) & (res.target == task.target)
                      & (res.model == model) & (res.protocol == protocol)]
            if key in suite.nulls and len(row):
                nulls[arm] = (suite.nulls[key], float(row.headline.iloc[0]))
        r = res[(res.treatment == "ketamine") & (res.network == task.network) & (res.target == task.target)
                & (res.protocol == protocol)]
        text = ""
        if task.kind == "regression":
            rows = zip(r.model, r.headline, r.pearson_r, strict=True)
            text = "\n".join(f"{m:15s} R2 {h:+.3f}  r {pr:+.3f}" for m, h, pr in rows)
        contexts.append({
            "kind": task.kind, "classes": list(task.classes), "target": task.target, "network": task.network,
            "model": model, "protocol": protocol, "metric": HEADLINE_METRIC[task.kind], "text": text,
            "pred": pred[sel & (pred.protocol == protocol)].dropna(axis=1, how="all"),
            "folds": folds[fsel & (folds.protocol == protocol)], "nulls": nulls,
        })
    # starting workers (importing matplotlib) costs about as much as ten figures
    jobs = max(1, nprocs) if len(contexts) > 12 else 1
    images = Parallel(n_jobs=jobs)(delayed(_target_figure)(c) for c in contexts)
    primary = "\n".join(["<section id='primary'>", *primary_section(info["primary"], info["participant_flow"]),
                         "</section>"])
    parts = [
        "<section id='results'>",
        "<h2>Exploratory analyses (not pre-specified)</h2>",
        "<p class='note'><b>Exploratory</b>: every other network, target, model and protocol. Judge them by "
        "the adjusted p-values: p_holm (Holm, family-wise error over all "
        f"{int(res.p_value.notna().sum()) if len(res) else 0} permutation tests), p_bh (Benjamini-Hochberg, "
        "false discovery rate); the verdict uses p_holm. Headline model per target (logistic regression for "
        f"label schemes, elastic net for continuous targets) under {html.escape(protocol)}; "
        f"p from {_n_perm(res)} permutations "
        "(feature rows shuffled against the labels, folds fixed). "
        f"Headline metric: {html.escape(info['headline']['definition']['classification'])} (schemes); "
        f"{html.escape(info['headline']['definition']['regression'])} (continuous). "
        "'chance_model' is the majority-class / mean comparator, 'baseline_score_only' the model "
        "using the baseline score alone; 'placebo' is the same model on placebo response labels.</p>",
        _table(summary) if len(summary) else "<p>No analysis ran.</p>",
        *_feature_set_section(res, protocol),
        *_peb_suite_section(res, protocol),
        "<h2>Participants and labels</h2>",
        _table(pd.DataFrame([{"analysis": a, "participants": n} for a, n in info["participants"].items()])),
        _table(pd.DataFrame([{"analysis": a, "scheme": s, **{k: v for k, v in c.items()}}
                             for a, by in info["label_counts"].items() for s, c in by.items()])
               .fillna(0).convert_dtypes()),  # counts as integers (absent classes: 0)
    ]
    if info["skipped"]:
        parts += ["<h3>Skipped analyses</h3>", _table(pd.DataFrame(info["skipped"]))]
    parts += ["<details><summary>Excluded participants</summary>", _table(pd.DataFrame(info["excluded"])), "</details>"]
    if best is not None:
        parts += [
            "<h2>Weights of the best model</h2>",
            f"<p class='note'>{html.escape(best['model'])} on ketamine {html.escape(best['target'])}, "
            f"seg-{html.escape(best['network'])}: {best['headline_metric']} {best['headline']:.3f} "
            f"({best['protocol']}; chosen as the {html.escape(best['selection'])}: raw p {best['p_value']:.3g}, "
            f"max-statistic p {best['p_maxstat']:.3g} over the {best['grid_size']} models it was chosen from), "
            "refitted on all "
            f"participants with {best['params']}. "
            + {"coefficient": "Coefficients on standardised A entries"
               + (f" for class {best['class']}" if best["class"] else ""),
               "importance": "Impurity importances",
               "PEB effect": "PEB effects of the standardised target (class index for label schemes) on each "
               "connection (Hz per SD; self-connections: log scaling per SD)"}[best["kind"]]
            + f"; rows = targets, columns = sources. Other features: {best['extra_weights'] or 'none'}.</p>",
            f"<img src='data:image/png;base64,{_weights_figure(best)}'>",
        ]
    if treatment is not None:
        parts += _treatment_section(treatment)
    if info.get("peb"):
        parts.append(peb_section(info["peb"]))
    parts.append("<h2>Figures per target and network (ketamine)</h2>")
    for ctx, img in zip(contexts, images, strict=True):
        parts.append(f"<h3>{html.escape(ctx['target'])} / seg-{html.escape(ctx['network'])}</h3>")
        parts.append(f"<img src='data:image/png;base64,{img}'>")
    parts.append("<h2>All results (headline metric)</h2>")
    if len(res):
        wide = res.pivot_table(index=["treatment", "network", "target", "model"], columns="protocol",
                               values="headline", sort=False).reset_index()
        parts.append(_table(wide))
    parts.append("<h2>Definitions</h2><ul>")
    parts += [f"<li><b>{html.escape(m)}</b>: {html.escape(d)}</li>" for m, d in info["models"].items()]
    parts.append("</ul></section>")
    qc = qc or {}
    page = render_page(
        "group.html", title="group report",
        nav=[("primary", "Primary analysis"), ("methods", "Methods"), ("qc", "Participant QC"),
             ("results", "Exploratory"), ("software", "Software")], primary=primary,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command_line=command_line(),
        versions=software_versions(), methods=group_methods_paragraph(info, qc),
        qc={n: t.to_dict(orient="records") for n, t in qc.items()}, sections=["\n".join(parts)])
    write_text(path, page)


def _ci(est: dict) -> str:
    lo, hi = est["ci95"]
    return f"{est['estimate']:.3f} [{lo:.3f}, {hi:.3f}]"


def primary_section(primary: dict, flow: list[dict]) -> list[str]:
    """HTML of the primary analysis: the result in plain words, comparators, calibration,
    crossover and placebo checks, and the participant flow."""
    parts = ["<h2>Primary analysis (pre-specified)</h2>"]
    if primary.get("skipped"):
        parts.append(f"<p><b>Not run</b>: {html.escape(primary['skipped'])}.</p>")
    else:
        parts.append(f"<p><b>{html.escape(primary['statement'])}</b></p>")
        parts.append(f"<p class='note'>Folds: {html.escape(primary['folds'])}; p from {primary['n_permutations']} "
                     "permutations (feature rows shuffled, folds fixed, every repeat refitted); 95 % intervals: "
                     "participant bootstrap of the out-of-fold predictions. Clinical model: "
                     f"{html.escape(', '.join(primary['clinical_features']))}.</p>")
        parts.append(_table(pd.DataFrame([
            {"model": m, "balanced accuracy [95 % CI]": _ci(v["balanced_accuracy"]), "AUC [95 % CI]": _ci(v["roc_auc"])}
            for m, v in primary["models"].items()])))
        parts.append("<p>Paired differences on the same folds (bootstrap interval; p: paired swap test):</p>")
        parts.append(_table(pd.DataFrame([
            {"comparison": c, "balanced accuracy difference": _ci(v["balanced_accuracy"]),
             "p (BA)": round(v["balanced_accuracy"]["p_value"], 4), "AUC difference": _ci(v["roc_auc"]),
             "p (AUC)": round(v["roc_auc"]["p_value"], 4)} for c, v in primary["comparisons"].items()])))
        cal = primary["calibration"]
        parts.append(
            f"<p>Calibration (probabilities without class reweighting, prior-corrected inside each training "
            f"fold): intercept {cal['intercept']:.2f} (ideal 0), slope {cal['slope']:.2f} (ideal 1); Brier "
            f"{cal['brier']:.3f} against {cal['brier_prevalence']:.3f} for the prevalence alone (balanced-weight "
            f"probabilities: {cal['brier_balanced_weights']:.3f}); mean probability {cal['mean_probability']:.3f}, "
            f"prevalence {cal['prevalence']:.3f}.</p>")
        parts.append(_table(pd.DataFrame(cal["decision_curve"]).rename(columns={"model": "net benefit (model)"})))
        cross = primary["crossover"]
        if cross.get("available"):
            by = ", ".join(f"{k.replace('_', ' ')}: {v['responders']}/{v['n']}"
                           for k, v in cross["response_by_order"].items())
            first = cross["first_period"]
            text = (f"first-period only (ketamine first, n = {first['n']}): balanced accuracy "
                    f"{_ci(first['balanced_accuracy'])}, p = {first['p_value']:.3g}"
                    if "skipped" not in first else f"first-period analysis not run: {first['skipped']}")
            parts.append(f"<p>Crossover: responders by infusion order {html.escape(by)}; order used as "
                         f"{html.escape(cross['order_as'])}; sensitivity analysis, {html.escape(text)}.</p>")
        else:
            parts.append(f"<p>Crossover: {html.escape(cross['note'])}.</p>")
        plc = primary["placebo"]
        if not plc.get("available"):
            parts.append(f"<p>Drug specificity: {html.escape(plc['note'])}.</p>")
        elif not plc["powered"]:
            parts.append(f"<p>Drug specificity: <b>no power</b>. {html.escape(plc['note'])}.</p>")
        else:
            d = plc["auc_difference"]
            parts.append(
                f"<p>Drug specificity ({plc['n']} participants, {plc['placebo_responders']} placebo responders): "
                f"AUC against ketamine outcomes {_ci(plc['ketamine']['roc_auc'])}, against placebo outcomes "
                f"{_ci(plc['placebo']['roc_auc'])}; difference {_ci(d)}, p = {d['p_value']:.3g}. "
                f"{html.escape(plc['note'])}.</p>")
    parts.append("<h3>Participant flow</h3>")
    parts.append(_table(pd.DataFrame([
        {"step": f["step"], "participants": f["n"],
         "left out (why)": "; ".join(f"{r}: {n}" for r, n in f["excluded"].items())} for f in flow])))
    return parts


def _treatment_section(treatment: dict) -> list[str]:
    """HTML of the treatment-selection section: reason for a skip, or table + figure."""
    parts = ["<h2>Treatment selection: ketamine or placebo</h2>"]
    if treatment["skipped"] is not None:
        return parts + [f"<p>Not run: {html.escape(treatment['skipped'])}.</p>"]
    counts = ", ".join(f"{k} {v}" for k, v in treatment["first_treatment_counts"].items())
    rates = ", ".join(f"{k} {v:.2f}" for k, v in treatment["response_rates"].items())
    parts.append(
        f"<p class='note'>Features: seg-{html.escape(treatment['feature_set'])}. "
        f"{treatment['n_participants']} participants (first infusion: {counts}; response rate under "
        f"{rates}); {treatment['n_splits']}-fold CV repeated {treatment['n_repeats']} times. Each method "
        "learns from the first-period outcome and recommends the infusion of higher predicted response "
        "probability; the second period supplies the counterfactual. RPL: response lost against the best "
        "infusion (lower is better); MRR: reciprocal rank of the recommendation, ties averaged "
        "(mrr_column: ties broken by column order); RR: response rate of participants whose first "
        "infusion matches the recommendation, against the base rate. Means and SDs over repeats of the "
        "pooled out-of-fold metrics. " + " ".join(html.escape(n) for n in treatment["notes"]) + "</p>"
    )
    info = treatment["informative"]
    parts.append(
        f"<p><b>Informative participants</b> (response under one infusion only): {info['informative']} of "
        f"{treatment['n_participants']} ({info['ketamine_only']} ketamine only, {info['placebo_only']} placebo "
        f"only; {info['both']} respond to both, {info['neither']} to neither). Only informative participants "
        "can separate a policy from another.</p>")
    parts.append(_table(pd.DataFrame(treatment["summary"])))
    reference = treatment["reference_policy"]
    tests = (treatment["tests"] or {}).get("rpl", {}).get("versus_reference", {})
    if treatment["tests"] is None:
        parts.append("<p class='note'>No p-values: with no informative participant every policy scores the "
                     "same.</p>")
    elif tests:
        parts.append(f"<p class='note'>RPL lower than the best fixed policy, {html.escape(reference)} "
                     "(one-sided Wilcoxon over fold-repeats; descriptive, the folds share participants): "
                     + ", ".join(f"{html.escape(m)} p = {p:.3g}" for m, p in tests.items()) + ".</p>")
    diff = treatment.get("difference")
    if diff:
        loss = ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in diff["improvement_loss"].items())
        parts.append(f"<p class='note'>Continuous target ({html.escape(diff['target'])}, "
                     f"{html.escape(diff['model'])}): "
                     f"out-of-fold R^2 {diff['r2']:.3f}; improvement lost against each participant's better arm: "
                     f"{loss}; versus {html.escape(diff['reference_policy'])}: p = {diff['p_versus_reference']:.3g} "
                     f"({html.escape(diff['note'])}).</p>")
    figure = Path(treatment["files"]["figure"])
    image = png_file(figure)
    return parts + [f"<img src='data:image/png;base64,{image}'>"]


def _feature_set_section(res: pd.DataFrame, protocol: str) -> list[str]:
    """Feature sets (dcm, gmv, dcm+gmv) side by side with the baseline-score-only model."""
    table = compare_feature_sets(res, protocol)
    if table.empty:
        return []
    return [
        "<h2>Feature sets compared</h2>",
        ("<p class='note'>Ketamine, headline model and metric per target under "
         f"{html.escape(protocol)} (p: permutation p-value; _nested: nested-CV mean) for each feature set: "
         "dcm (effective connectivity A), gmv (regional gray-matter volume / TIV), dcm+gmv (both), eb (the A "
         "matrices' empirical-Bayes estimates: an intercept-only PEB of each training fold's DCMs, the held-out "
         "participants reduced to its empirical prior); "
         "'baseline_score_only' uses the baseline MADRS alone, 'chance_model' is the majority / mean model. "
         "An imaging feature set is worth having only where it beats baseline_score_only.</p>"),
        _table(table),
    ]


def _peb_suite_section(res: pd.DataFrame, protocol: str) -> list[str]:
    """The PEB predictor's rows (model ``peb``) beside the headline model of the same task."""
    if res.empty or not (res.model == "peb").any():
        return []
    rows = []
    ket = res[res.treatment == "ketamine"]
    for (network, target), grp in ket[ket.model == "peb"].groupby(["network", "target"], sort=False):
        task = ket[(ket.network == network) & (ket.target == target)]
        head_model = HEADLINE_MODEL[grp.task.iloc[0]]
        extra = "pearson_r" if grp.task.iloc[0] == "regression" else "roc_auc"

        def pick(model: str, proto: str, column: str, frame: pd.DataFrame = task) -> float:
            sel = frame[(frame.model == model) & (frame.protocol == proto)]
            return float(sel[column].iloc[0]) if len(sel) else float("nan")

        rows.append({"network": network, "target": target, "metric": grp.headline_metric.iloc[0],
                     "peb": pick("peb", protocol, "headline"), "peb_p": pick("peb", protocol, "p_value"),
                     "peb_r_or_auc": pick("peb", protocol, extra), "peb_nested": pick("peb", "nested", "headline"),
                     "headline_model": head_model, "headline_model_value": pick(head_model, protocol, "headline"),
                     "headline_model_p": pick(head_model, protocol, "p_value"),
                     "headline_model_r_or_auc": pick(head_model, protocol, extra)})
    return [
        "<h2>PEB predictor in the suite</h2>",
        ("<p class='note'>Ketamine, model peb (SPM's spm_dcm_loo with the suite's folds: a PEB of the training "
         "participants' DCM posteriors with the design [1, standardised target] in each fold, each held-out "
         "participant's target predicted from its own DCM; label schemes: the class index as the covariate and "
         "its predictive probabilities as class scores) under "
         f"{html.escape(protocol)}, beside the headline model of the same target; r or AUC: Pearson r (continuous "
         "targets) or ROC AUC (label schemes); p: the same permutation test (the PEB refitted on the shuffled "
         "participants of every fold).</p>"),
        _table(pd.DataFrame(rows)),
    ]


def _n_perm(res: pd.DataFrame) -> int:
    return int(res.n_permutations.max()) if len(res) else 0
