"""Auto-generated methods paragraph and citations for the participant report.

The paragraph describes what the participant level actually did (network, ROI extraction,
spectral DCM settings, software versions) in prose a researcher can paste into a paper;
:func:`citations_bibtex` gives the cited works as BibTeX (``references.bib``, the package's
bibliography, read as data).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from bids_ketdcm.provenance import distribution_versions

#: Distribution names whose versions the methods paragraph reports, in citation order.
SOFTWARE = ("bids-ketdcm", "torch", "nilearn", "nibabel", "pybids")

#: SPM12's spectral-DCM settings reproduced by the engine (DESIGN.md section 7).
DEFAULT_DCM_SETTINGS = {
    "mar_order": 8,
    "n_freqs": 32,
    "max_iterations": 128,
    "spm_release": "SPM12",
    "space": "MNI152NLin2009cAsym",
}

_ROI_SUMMARIES = {
    "eigenvariate": "the first principal eigenvariate of its voxels",
    "mean": "the mean over its voxels",
}


@dataclass(frozen=True)
class Reference:
    """One cited work of ``references.bib``: its key and BibTeX fields."""

    key: str
    fields: Mapping[str, str]

    @property
    def authors(self) -> list[str]:
        """``"Last, First M."`` each."""
        return self.fields["author"].split(" and ")

    @property
    def cite(self) -> str:
        """In-text citation, e.g. ``Friston et al., 2014`` (every cited work has 3+ authors)."""
        return f"{self.authors[0].split(',')[0]} et al., {self.fields['year']}"

    def formatted(self, max_authors: int = 6) -> str:
        """A plain-text reference: ``Friston KJ, Kahan J, ... (2014). Title. Venue 94:396-407.``"""
        f = self.fields
        names = [_short_name(a) for a in self.authors]
        if len(names) > max_authors:
            names = names[:max_authors] + ["et al."]
        where = f"{f.get('journal') or f['booktitle']} {f['volume']}"
        if f.get("number"):
            where += f"({f['number']})"
        where += f":{f['pages'].replace('--', '-')}"
        text = f"{', '.join(names)} ({f['year']}). {f['title'].strip('{}')}. {where}."
        if f.get("doi"):
            text += f" doi:{f['doi']}"
        return text


def _short_name(author: str) -> str:
    """``"Friston, Karl J."`` -> ``"Friston KJ"``."""
    last, _, given = author.partition(",")
    initials = "".join(part[0] for part in given.replace("-", " ").split() if part[0].isalpha())
    return f"{last.strip()} {initials}".strip()


def _braced(text: str, start: int) -> tuple[str, int]:
    """The text inside the balanced braces opening at ``text[start]``, and the index after them."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i], i + 1
    raise ValueError(f"references.bib: unbalanced braces from character {start}")


def _parse_bibtex(text: str) -> tuple[Reference, ...]:
    """The entries of the package's own ``references.bib`` (``field = {value}`` fields only)."""
    references = []
    for entry in re.finditer(r"^@\w+\{([^,\s]+),", text, flags=re.M):
        body, _ = _braced(text, entry.end() - len(entry.group(1)) - 2)
        fields, pos = {}, body.index(",") + 1
        for field in re.finditer(r"(\w+)\s*=\s*\{", body):
            if field.start() < pos:
                continue
            value, pos = _braced(body, field.end() - 1)
            fields[field.group(1)] = value
        references.append(Reference(entry.group(1), fields))
    return tuple(references)


_BIBTEX = resources.files("bids_ketdcm.report").joinpath("references.bib").read_text(encoding="utf-8")
#: The cited works, in the order of ``references.bib``.
REFERENCES: tuple[Reference, ...] = _parse_bibtex(_BIBTEX)

_BY_KEY = {ref.key: ref for ref in REFERENCES}


def cited_software_versions() -> dict[str, str]:
    """Installed versions of the software the methods paragraph names.

    Returns
    -------
    dict
        Distribution name (:data:`SOFTWARE`) -> version string, ``"not installed"`` when the
        distribution is absent.
    """
    return distribution_versions(SOFTWARE, missing="not installed")


def citations_bibtex() -> str:
    """All works the methods paragraph cites, as BibTeX (entries separated by a blank line).

    Returns
    -------
    str
        BibTeX, UTF-8, ending with a newline; save it as e.g. ``citations.bib``.
    """
    return _BIBTEX


def methods_paragraph(settings: Mapping[str, Any]) -> str:
    """An auto-generated methods paragraph describing the participant-level analysis.

    Parameters
    ----------
    settings
        Required keys: ``network`` (str, name of the ROI set), ``n_rois`` (int), ``tr``
        (float, repetition time in seconds). Optional keys: ``radius_mm`` (float, ROI sphere
        radius), ``space`` (default ``MNI152NLin2009cAsym``), ``denoise_strategy`` (str),
        ``denoise_description`` (str, free text appended in parentheses), ``roi_summary``
        (``"eigenvariate"`` or ``"mean"``), ``n_volumes`` (int, sets the lowest frequency
        as SPM does), ``mar_order`` (8), ``n_freqs`` (32), ``max_iterations`` (128),
        ``spm_release`` (``"SPM12"``), ``csd_model`` (``"spm12"`` or ``"direct"``),
        ``device`` (str, e.g. ``"cpu"``),
        ``fmriprep_version`` (str), ``versions`` (dict: distribution name -> version,
        overriding the installed versions of :data:`SOFTWARE`).

    Returns
    -------
    str
        One paragraph of plain text with in-text citations (author, year) of the works in
        :func:`citations_bibtex`.

    Raises
    ------
    ValueError
        When a required key is missing or a value is out of range; the message names the key.
    """
    s = {**DEFAULT_DCM_SETTINGS, **settings}
    missing = [key for key in ("network", "n_rois", "tr") if s.get(key) is None]
    if missing:
        raise ValueError(f"methods settings lack required key(s): {', '.join(missing)}")
    n_rois, tr = int(s["n_rois"]), float(s["tr"])
    if n_rois < 1:
        raise ValueError(f"methods settings: n_rois must be >= 1, got {s['n_rois']!r}")
    if not tr > 0:
        raise ValueError(
            f"methods settings: tr must be a positive number of seconds, got {s['tr']!r}"
        )
    summary = s.get("roi_summary")
    if summary is not None and summary not in _ROI_SUMMARIES:
        raise ValueError(
            f"methods settings: roi_summary must be one of {sorted(_ROI_SUMMARIES)}, "
            f"got {summary!r}"
        )
    versions = {**cited_software_versions(), **dict(s.get("versions") or {})}
    cite = {key: ref.cite for key, ref in _BY_KEY.items()}

    fmriprep = "fMRIPrep"
    if s.get("fmriprep_version"):
        fmriprep += f" {s['fmriprep_version']}"
    sentences = [
        f"Effective connectivity was estimated with bids-ketdcm {versions['bids-ketdcm']}, "
        f"a BIDS-App built on PyTorch {versions['torch']} ({cite['paszke2019pytorch']}), "
        f"nilearn {versions['nilearn']} ({cite['abraham2014nilearn']}), "
        f"NiBabel {versions['nibabel']} and PyBIDS {versions['pybids']} "
        f"({cite['yarkoni2019pybids']}), from functional MRI data preprocessed with "
        f"{fmriprep} ({cite['esteban2019fmriprep']})."
    ]

    roi = (
        f"For each resting-state run, BOLD time series were extracted in {s['space']} space "
        f"from the {n_rois} regions of interest of the '{s['network']}' network"
    )
    if s.get("radius_mm") is not None:
        roi += f" (spheres of {float(s['radius_mm']):g} mm radius around their MNI coordinates)"
    if s.get("denoise_strategy"):
        roi += f", after confound regression with the '{s['denoise_strategy']}' denoising strategy"
        if s.get("denoise_description"):
            roi += f" ({s['denoise_description']})"
    roi += "."
    if summary is not None:
        roi += f" Each region was summarised by {_ROI_SUMMARIES[summary]}."
    sentences.append(roi)

    f_low, f_high = _frequency_bounds(tr, s.get("n_volumes"))
    sentences.append(
        f"Spectral dynamic causal modelling (DCM; {cite['friston2014dcm']}; "
        f"{cite['razi2015construct']}) was applied with an implementation that reproduces "
        f"{s['spm_release']}'s spm_dcm_fmri_csd: the data features were the cross-spectral "
        f"densities (CSD) of a multivariate autoregressive model of order {int(s['mar_order'])}, "
        f"fitted by variational Bayes, at {int(s['n_freqs'])} frequencies linearly spaced "
        f"from {f_low} to {f_high} of the repetition time (TR = {tr:g} s)."
    )
    inversion = (
        f"A fully connected model ({n_rois} x {n_rois} effective connectivity matrix A) with "
        f"{s['spm_release']}-equivalent priors was inverted by variational Laplace "
        f"(Gauss-Newton ascent of the free energy, with Jacobians by automatic "
        f"differentiation), with one log-precision hyperparameter per CSD element and at "
        f"most {int(s['max_iterations'])} iterations"
    )
    if n_rois > 8:
        inversion += (
            "; because the network has more than eight regions, the prior covariance of A was "
            f"projected onto the eight principal modes of the data, as in {s['spm_release']}"
        )
    if s.get("csd_model") == "direct":
        inversion += (
            f"; unlike {s['spm_release']}, the predicted CSD was compared with the data without "
            "its autoregressive (order 7) round trip"
        )
    inversion += "."
    if s.get("device"):
        inversion += f" Computations ran on {_device_text(str(s['device']))}."
    sentences.append(inversion)
    sentences.append(
        "The reported effective connectivity is the posterior expectation of A in Hz (rows: "
        "target regions; columns: source regions); convergence, the number of iterations and "
        "the free-energy trajectory were recorded for every run."
    )
    return " ".join(sentences)


def formatted_references() -> list[str]:
    """The cited works as plain-text references, in the order of :data:`REFERENCES`."""
    return [ref.formatted() for ref in REFERENCES]


def _device_text(device: str) -> str:
    """``"cpu"`` -> ``"the CPU"``; ``"cuda:0"`` -> ``"a GPU (cuda:0)"``; anything else as is."""
    if device.lower() == "cpu":
        return "the CPU"
    if device.lower().startswith(("cuda", "mps", "xpu")):
        return f"a GPU ({device})"
    return device


def _frequency_bounds(tr: float, n_volumes: Any) -> tuple[str, str]:
    """SPM's frequency range as text: 1/min(128, T TR) to 1/max(8, 2 TR) Hz."""
    high = f"{1.0 / max(8.0, 2.0 * tr):.4g} Hz, the lower of 1/8 Hz and the Nyquist frequency"
    if n_volumes is None:
        low = (
            f"{1.0 / 128.0:.4g} Hz (1/128 Hz, or the inverse of the run duration when the "
            "run is shorter than 128 s)"
        )
    else:
        duration = int(n_volumes) * tr
        low = f"{1.0 / min(128.0, duration):.4g} Hz (1/{min(128.0, duration):g} Hz)"
    return low, high


def group_methods_paragraph(info: Mapping[str, Any], qc: Mapping[str, Any] | None = None) -> str:
    """An auto-generated methods paragraph of the group level, from its ``results.json`` content.

    Parameters
    ----------
    info
        What the group level records in ``results.json``: ``sessions``, ``participants``
        (per analysis), ``networks`` (regions and participants per network), ``suite``
        (``models``, ``k_values``, ``nested_outer_k``, ``nested_repeats``, ``inner_k``,
        ``n_permutations``), ``headline`` (``definition`` and ``permutation_protocol``) and
        ``options`` (``score_column``, ``schemes``).
    qc
        Per network, the QC table of :func:`bids_ketdcm.group.qc.qc_table` (its
        ``converged`` column is summarised).

    Returns
    -------
    str
        One paragraph of plain text.
    """
    suite, sessions, options = info["suite"], info["sessions"], info.get("options", {})
    score = options.get("score_column") or "MADRS"
    networks = info.get("networks", {})
    net_text = "; ".join(f"'{name}' ({len(n['regions'])} regions, {n['participants']} participants)"
                         for name, n in networks.items()) or "none"
    sentences = [
        f"At the group level, the posterior effective connectivity matrices A of the participant level "
        f"(spectral DCM of the baseline session, ses-{sessions.get('baseline')}) were the features of "
        f"each network: {net_text}."
    ]
    for network, table in (qc or {}).items():
        converged = table["converged"].astype("boolean")
        sentences.append(
            f"Of the {len(table)} inversions of '{network}', {int(converged.sum())} converged (median "
            f"{float(table['iterations'].median()):.0f} iterations; median variance explained "
            f"{100 * float(table['variance_explained'].median()):.1f} %; median mean framewise displacement "
            f"{float(table['mean_fd_mm'].median()):.3f} mm)."
        )
    post = sessions.get("ketamine")
    placebo = f" and, as the specificity check, after placebo (ses-{sessions['placebo']})" \
        if sessions.get("placebo") else ""
    schemes = options.get("schemes") or []
    sentences.append(
        f"Response labels were the percentage improvement of the {score} from ses-{sessions.get('baseline')} "
        f"to the day after ketamine (ses-{post}){placebo}"
        + (f", in the schemes {', '.join(schemes)}" if schemes else "")
        + f"; {', '.join(f'{k} {v}' for k, v in info.get('participants', {}).items())} participants were labelled."
    )
    sentences.append(
        f"The models ({', '.join(suite['models'])}) were evaluated by stratified k-fold cross-validation "
        f"(k = {', '.join(str(k) for k in suite['k_values'])}) and by repeated nested cross-validation "
        f"({suite['nested_repeats']} repeats of {suite['nested_outer_k']} outer folds, {suite['inner_k']} inner "
        "folds tuning the hyper-parameters), with scaling and tuning inside the training folds only."
    )
    if "peb" in suite["models"]:
        sentences.append(
            "The PEB predictor (peb) was SPM12's spm_dcm_loo with the same folds: in each training fold a parametric "
            "empirical Bayes model of the participants' DCM posteriors (A parameters; design: intercept and the "
            "standardised target, for label schemes the class index) predicted each held-out participant's target "
            "from its own DCM.")
    if "eb" in (options.get("feature_sets") or ()):
        sentences.append(
            "The eb feature sets were the empirical-Bayes estimates of A: in each training fold an intercept-only "
            "PEB of the training participants' DCM posteriors, their empirical-Bayes posterior means, and each "
            "held-out participant's posterior reduced to that empirical prior (Bayesian model reduction).")
    headline = info["headline"]
    sentences.append(
        f"The headline metrics were {headline['definition']['classification']} (label schemes) and "
        f"{headline['definition']['regression']} (continuous targets); their p-values come from "
        f"{suite['n_permutations']} label permutations under {headline['permutation_protocol']}."
    )
    return " ".join(sentences)
