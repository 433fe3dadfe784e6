"""Participant HTML report: structure, figures, warnings, methods text and citations."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.image import imread

from bids_ketdcm.report import (
    RunResult,
    citations_bibtex,
    figures,
    methods_paragraph,
    run_warnings,
    write_participant_report,
)

NAMES = ["PCC&Prec", "mPFC", "LIPC", "RIPC"]  # '&' checks HTML escaping
COORDS = np.array([[0, -52, 26], [2, 54, -2], [-46, -66, 30], [50, -62, 32]], dtype=float)
TR = 2.5
# Posterior A (Hz, rows = targets) and variances: with sd = 1/8, an off-diagonal entry is
# starred (Pp = Phi(|A| / sd) > 0.95) when |A| > 1.645 / 8 = 0.206: three entries here.
A_HZ = np.array(
    [
        [-0.50, 0.30, 0.10, 0.00],
        [0.25, -0.45, 0.05, -0.21],
        [0.02, 0.15, -0.55, 0.08],
        [0.10, -0.12, 0.20, -0.40],
    ]
)
A_VAR = np.full((4, 4), 1.0 / 64.0)
N_STARRED = 3
SKIP_REASON = "confounds file <missing> & no 'mask'"
VERSIONS = {
    "bids-ketdcm": "7.7.7", "torch": "8.8.8", "nilearn": "0.99.1", "nibabel": "6.6.6",
    "pybids": "0.55.5",
}


def _var1_csd(phi: np.ndarray, sigma: np.ndarray, freqs: np.ndarray, tr: float) -> np.ndarray:
    """Spectral density of x_t = phi x_{t-1} + e_t: 2 TR H Sigma H^H, H = (I - phi e^{-iw})^-1."""
    n = phi.shape[0]
    out = np.empty((freqs.size, n, n), dtype=complex)
    for k, f in enumerate(freqs):
        H = np.linalg.inv(np.eye(n) - phi * np.exp(-2j * np.pi * f * tr))
        out[k] = 2 * tr * H @ sigma @ H.conj().T
    return out


def _run(label: str, seed: int, *, converged: bool = True, qc: dict | None = None) -> RunResult:
    """A realistic run: a VAR(1) series, its fitted (observed) and true (predicted) CSD."""
    rng = np.random.default_rng(seed)
    coupling = np.array([[0, 1, 0, 0], [1, 0, 0, -1], [0, 1, 0, 0], [0, 0, 1, 0]])
    phi = 0.6 * np.eye(4) + 0.1 * coupling
    T = 180
    y = np.zeros((T, 4))
    for t in range(1, T):
        y[t] = phi @ y[t - 1] + rng.standard_normal(4)
    phi_hat = np.linalg.lstsq(y[:-1], y[1:], rcond=None)[0].T
    resid = y[1:] - y[:-1] @ phi_hat.T
    freqs = np.linspace(1 / 128, 1 / 8, 32)
    F_history = list(-400 + 300 * (1 - np.exp(-np.arange(12) / 3.0)))
    return RunResult(
        run_label=label,
        network="dmn4",
        roi_names=list(NAMES),
        roi_coords=COORDS,
        timeseries=y,
        tr=TR,
        freqs=freqs,
        csd_observed=_var1_csd(phi_hat, resid.T @ resid / len(resid), freqs, TR),
        csd_predicted=_var1_csd(phi, np.eye(4), freqs, TR),
        A_hz=A_HZ,
        A_var=A_VAR,
        F_history=F_history,
        free_energy=F_history[-1],
        iterations=len(F_history) + (0 if converged else 116),
        converged=converged,
        variance_explained=0.87,
        seconds=3.2,
        device="cpu",
        qc={"mean_fd": 0.12, "max_fd": 0.8, "n_scrubbed": 3, "n_volumes": T,
            "roi_voxels": [33, 33, 31, 33], "roi_tsnr": [85.0, 60.2, 71.9, 70.3], **(qc or {})},
        denoise_strategy="simple",
    )


def _skipped() -> RunResult:
    return RunResult(
        run_label="ses-b0_task-rest_run-03", network="dmn4", roi_names=list(NAMES),
        roi_coords=None, timeseries=None, tr=TR, freqs=None, csd_observed=None,
        csd_predicted=None, A_hz=None, A_var=None, F_history=[], free_energy=float("nan"),
        iterations=0, converged=False, variance_explained=float("nan"), seconds=0.0,
        device="cpu", qc={}, denoise_strategy="simple", skipped_reason=SKIP_REASON,
    )


def _runs() -> list[RunResult]:
    return [
        _run("ses-b0_task-rest_run-01", 1),
        _run("ses-b0_task-rest_run-02", 2, converged=False, qc={"mean_fd": 0.61}),
        _skipped(),
    ]


SETTINGS = {"radius_mm": 8, "roi_summary": "eigenvariate", "versions": VERSIONS}


class _Page(HTMLParser):
    """Checks nesting and collects ids, images, links and text per section."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None, str]] = []
        self.errors: list[str] = []
        self.tags: set[str] = set()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.hrefs: list[str] = []
        self.section_text: dict[str, str] = {}
        self.warnings: dict[str, list[str]] = {}

    def _section(self) -> str | None:
        return next((sid for tag, sid, _ in reversed(self.stack) if tag == "section"), None)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in {"a", "link"}:
            self.hrefs.append(attrs.get("href", ""))
        if tag == "div" and attrs.get("class") == "warning":
            self.warnings.setdefault(self._section(), []).append("")
        if tag not in self.VOID:
            self.stack.append((tag, attrs.get("id"), attrs.get("class") or ""))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"unexpected </{tag}> with open {[t for t, _, _ in self.stack]}")
            return
        self.stack.pop()

    def handle_data(self, data):
        section = self._section()
        if section is not None:
            self.section_text[section] = self.section_text.get(section, "") + data
            if any(tag == "div" and cls == "warning" for tag, _, cls in self.stack):
                self.warnings[section][-1] += data


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "sub-MOA101.html"
    written = write_participant_report(path, "sub-MOA101", _runs(), SETTINGS)
    text = path.read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(text)
    parser.close()
    return written, text, parser


def _run_ids(parser: _Page) -> list[str]:
    return [i for i in parser.ids if i.startswith("run-")]


def test_report_is_written_as_wellformed_selfcontained_html(page):
    path, text, parser = page
    assert path.is_file() and text.startswith("<!DOCTYPE html>")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert parser.errors == [] and parser.stack == []
    assert {"summary", "skipped", "methods", "about"} <= set(parser.ids)
    assert len(parser.ids) == len(set(parser.ids))
    assert _run_ids(parser) == [
        "run-1-ses-b0_task-rest_run-01-dmn4", "run-2-ses-b0_task-rest_run-02-dmn4"
    ]
    assert "script" not in parser.tags and "link" not in parser.tags
    assert all(h.startswith("#") and h[1:] in parser.ids for h in parser.hrefs)
    assert "sub-MOA101" in parser.section_text["summary"]


def test_embeds_five_png_figures_per_inverted_run(page):
    _, _, parser = page
    assert len(parser.images) == 5 * 2
    for src in parser.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix):], validate=True)
        image = imread(io.BytesIO(png), format="png")
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # not a blank canvas


def test_region_names_are_shown_and_escaped(page):
    _, text, parser = page
    for run_id in _run_ids(parser):
        for name in NAMES:
            assert name in parser.section_text[run_id]
    assert "PCC&amp;Prec" in text and "PCC&Prec" not in text


def test_skipped_run_listed_with_its_reason(page):
    _, text, parser = page
    assert SKIP_REASON in parser.section_text["skipped"]
    assert "ses-b0_task-rest_run-03" in parser.section_text["skipped"]
    assert "&lt;missing&gt; &amp; no &#x27;mask&#x27;" in text
    assert not any("run-03" in i for i in _run_ids(parser))


def test_nonconverged_and_high_motion_runs_show_visible_warnings(page):
    _, _, parser = page
    good, bad = _run_ids(parser)
    assert good not in parser.warnings
    joined = " ".join(parser.warnings[bad])
    assert "did not converge within 128 iterations" in joined
    assert "mean FD 0.610 mm" in joined
    summary = parser.section_text["summary"]
    assert "NO" in summary and "did not converge" in summary and "skipped" in summary


def test_summary_and_methods_sections_carry_the_numbers(page):
    _, _, parser = page
    summary = parser.section_text["summary"]
    assert "3 (2 inverted, 1 skipped)" in summary
    final_F = -400 + 300 * (1 - np.exp(-11 / 3))  # last of the 12 entries of F_history
    assert "87.0 %" in summary and f"{final_F:.2f}" in summary
    methods = parser.section_text["methods"]
    # network, ROI count, TR and device come from the runs; versions and radius from settings
    assert "'dmn4' network" in methods and "4 regions of interest" in methods
    assert "TR = 2.5 s" in methods and "ran on the CPU" in methods
    assert "8 mm radius" in methods and "bids-ketdcm 7.7.7" in methods
    assert "@article{friston2014dcm" in methods


def test_report_is_deterministic(tmp_path, page):
    path, text, _ = page
    again = write_participant_report(tmp_path / "again.html", "MOA101", _runs(), SETTINGS)
    assert again.read_text(encoding="utf-8") == text


def test_inconsistent_run_raises_and_writes_nothing(tmp_path):
    run = _run("ses-b0_task-rest", 3)
    run.A_hz = np.zeros((3, 3))
    target = tmp_path / "sub-X.html"
    expected = r"ses-b0_task-rest.*A_hz has shape \(3, 3\), expected \(4, 4\)"
    with pytest.raises(ValueError, match=expected):
        write_participant_report(target, "X", [run], {})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no runs"):
        write_participant_report(target, "X", [], {})
    run = _run("ses-b0_task-rest", 3)
    run.variance_explained = 87.0
    with pytest.raises(ValueError, match="variance_explained must be a fraction"):
        write_participant_report(target, "X", [run], {})


def test_methods_paragraph_reports_settings_and_spm_frequency_grid():
    text = methods_paragraph(
        {"network": "ket21", "n_rois": 21, "tr": 2.0, "radius_mm": 6, "denoise_strategy":
         "scrubbing", "roi_summary": "mean", "versions": VERSIONS, "device": "cuda:0",
         "n_volumes": 50}
    )
    assert "'ket21' network" in text and "21 regions of interest" in text
    assert "21 x 21 effective connectivity" in text and "TR = 2 s" in text
    for name, ver in VERSIONS.items():
        assert ver in text, name
    assert "6 mm radius" in text and "'scrubbing' denoising" in text
    assert "mean over its voxels" in text and "ran on a GPU (cuda:0)" in text
    # SPM's grid: 1/min(128, T TR) = 1/100 Hz to 1/max(8, 2 TR) = 1/8 Hz; order 8, 32 points
    assert "from 0.01 Hz (1/100 Hz) to 0.125 Hz" in text
    assert "order 8" in text and "32 frequencies" in text and "at most 128 iterations" in text
    assert "eight principal modes" in text  # n > 8 prior projection
    small = methods_paragraph({"network": "dmn4", "n_rois": 4, "tr": 2.5})
    assert "eight principal modes" not in small and "0.007812 Hz (1/128 Hz" in small
    assert "0.125 Hz" in small and "round trip" not in small
    direct = methods_paragraph({"network": "dmn4", "n_rois": 4, "tr": 2.5, "csd_model": "direct"})
    assert "without its autoregressive (order 7) round trip" in direct
    with pytest.raises(ValueError, match="n_rois, tr"):
        methods_paragraph({"network": "dmn4"})
    with pytest.raises(ValueError, match="roi_summary"):
        methods_paragraph({"network": "dmn4", "n_rois": 4, "tr": 2.5, "roi_summary": "median"})


def test_citations_bibtex_entries_match_the_in_text_citations():
    bib = citations_bibtex()
    keys = re.findall(r"^@(\w+)\{([^,]+),", bib, flags=re.M)
    assert [k for _, k in keys] == [
        "friston2014dcm", "razi2015construct", "esteban2019fmriprep",
        "abraham2014nilearn", "yarkoni2019pybids", "paszke2019pytorch",
    ]
    assert bib.count("{") == bib.count("}")
    for doi in ["10.1016/j.neuroimage.2013.12.009", "10.1016/j.neuroimage.2014.11.027",
                "10.1038/s41592-018-0235-4", "10.21105/joss.01294"]:
        assert doi in bib
    assert "pages = {396--407}" in bib and "volume = {106}" in bib
    text = methods_paragraph({"network": "dmn4", "n_rois": 4, "tr": 2.5})
    for cite in ["Friston et al., 2014", "Razi et al., 2015", "Esteban et al., 2019",
                 "Abraham et al., 2014", "Yarkoni et al., 2019", "Paszke et al., 2019"]:
        assert cite in text


def test_connectivity_heatmap_is_centred_and_stars_probable_connections():
    fig = figures.connectivity_matrix_figure(A_HZ, A_VAR, NAMES)
    ax = fig.axes[0]
    image = ax.images[0]
    data = image.get_array()
    assert np.array_equal(np.ma.getmaskarray(data), np.eye(4, dtype=bool))
    off = ~np.eye(4, dtype=bool)
    assert np.allclose(data[off], A_HZ[off])
    assert image.get_clim() == (-0.30, 0.30)
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES  # rows = targets
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 16 and sum(t.endswith("*") for t in texts) == N_STARRED


def test_posterior_probability_closed_form():
    p = figures.posterior_probability(np.array([0.0, 1.6448536269514722, -2.0, 1.0]),
                                      np.array([1.0, 1.0, 0.25, 0.0]))
    assert p[0] == pytest.approx(0.5) and p[1] == pytest.approx(0.95)
    assert p[2] == pytest.approx(0.9999683287581669) and np.isnan(p[3])


def test_csd_figure_panels_and_strongest_pairs():
    # strengths |A_ij| + |A_ji|: (0,1) .55, (1,3) .33, (2,3) .28, (0,3) .10, (0,2) .12, (1,2) .20
    assert figures.strongest_pairs(A_HZ) == [(0, 1), (1, 3), (2, 3), (1, 2), (0, 2), (0, 3)]
    assert figures.strongest_pairs(A_HZ, max_pairs=2) == [(0, 1), (1, 3)]
    run = _run("r", 5)
    fig = figures.csd_figure(run.freqs, run.csd_observed, run.csd_predicted, NAMES, A_HZ)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4 + 6
    assert visible[0].get_title() == "PCC&Prec (auto, real part)"
    assert visible[4].get_title() == "PCC&Prec - mPFC (|cross|)"
    observed_line = visible[4].lines[0].get_ydata()
    assert np.allclose(observed_line, np.abs(run.csd_observed[:, 0, 1]))


def test_run_warnings_thresholds():
    run = _run("r", 6, qc={"n_scrubbed": 50, "roi_voxels": [33, 0, 31, 33],
                           "roi_tsnr": [85.0, 12.5, 71.9, 70.3], "max_fd": 6.2})
    warns = run_warnings(run)
    assert any("50 of 180 volumes censored (28 % > 20 %)" in w for w in warns)
    assert any("ROI mPFC has no voxels" in w for w in warns)
    assert any("ROI mPFC has low temporal SNR (12.5 < 20)" in w for w in warns)
    assert any("maximum FD 6.20 mm" in w for w in warns)
    assert len(warns) == 4
    relaxed = run_warnings(run, {"scrubbed_fraction": 0.5, "min_tsnr": 10, "max_fd": 10})
    assert relaxed == ["ROI mPFC has no voxels inside the brain mask."]
    assert run_warnings(_run("ok", 7)) == []


def _arrows_and_nodes(fig):
    """Per glass-brain view: the arrows' polygons and the projected node positions."""
    from matplotlib.patches import FancyArrow

    views = []
    for ax in fig.axes:
        arrows = [p.get_xy() for p in ax.patches if isinstance(p, FancyArrow)]
        nodes = [np.asarray(c.get_offsets()) for c in ax.collections if len(c.get_offsets()) > 1]
        if arrows:
            views.append((arrows, nodes[0]))
    return views


def test_glass_brain_arrows_point_from_source_to_target():
    A = np.array([[-0.5, 0.0], [0.2, -0.5]])  # row = target: region 0 drives region 1
    coords = np.array([[-50.0, -60.0, 20.0], [50.0, 40.0, 20.0]])
    views = _arrows_and_nodes(figures.glass_brain_figure(A, coords, ["src", "tgt"]))
    assert len(views) == 3
    for arrows, nodes in views:
        assert len(arrows) == 1
        # the arrow head (most of the polygon's vertices) sits at the target's end
        centre = arrows[0].mean(axis=0)
        assert np.linalg.norm(centre - nodes[1]) < np.linalg.norm(centre - nodes[0])


def test_glass_brain_draws_every_connection_or_the_strongest():
    views = _arrows_and_nodes(figures.glass_brain_figure(A_HZ, COORDS, NAMES))
    assert [len(arrows) for arrows, _ in views] == [11] * 3  # 12 off-diagonal, one is 0
    rng = np.random.default_rng(0)
    A = rng.normal(0, 0.1, (21, 21))
    fig = figures.glass_brain_figure(A, rng.uniform(-60, 60, (21, 3)), [f"r{k}" for k in range(21)])
    assert [len(arrows) for arrows, _ in _arrows_and_nodes(fig)] == [figures.MAX_GLASS_EDGES] * 3
    assert fig.get_suptitle() == f"the {figures.MAX_GLASS_EDGES} strongest of 420 connections"


def test_all_runs_skipped_still_gives_a_report(tmp_path):
    path = write_participant_report(tmp_path / "sub-MOA105.html", "MOA105", [_skipped()], {})
    parser = _Page()
    parser.feed(path.read_text(encoding="utf-8"))
    assert parser.errors == [] and parser.images == [] and _run_ids(parser) == []
    assert SKIP_REASON in parser.section_text["skipped"]
    assert "1 (0 inverted, 1 skipped)" in parser.section_text["summary"]
    assert "'dmn4' network" in parser.section_text["methods"]  # from the skipped run
    assert "TR = 2.5 s" in parser.section_text["methods"]
