"""Figures of the participant report, rendered with matplotlib (Agg) and embedded as PNG.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global
state, no display needed); :func:`bids_ketdcm.report.render.figure_png` turns it into the
text of a ``data:`` URI and releases it.
"""

from __future__ import annotations

import warnings

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy.special import ndtr

#: Off-diagonal connections whose posterior probability of being non-zero exceeds this
#: threshold are starred in the connectivity heat map (SPM's usual Pp > 0.95).
POSTERIOR_PROBABILITY_THRESHOLD = 0.95
#: Cross-spectra shown besides the auto-spectra: the pairs with the strongest coupling.
MAX_CROSS_PAIRS = 6
#: The glass brain draws at most this many connections (the strongest by |A|).
MAX_GLASS_EDGES = 30
#: Connectivity values are printed in the heat-map cells up to this many regions.
MAX_ANNOTATED_REGIONS = 12

_CSD_COLUMNS = 4


def roi_colors(n: int) -> np.ndarray:
    """One distinct RGBA colour per region (tab10, tab20, then a sampled spectral map)."""
    if n <= 10:
        return colormaps["tab10"](np.arange(n))
    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    return colormaps["nipy_spectral"](np.linspace(0.05, 0.95, n))


def posterior_probability(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Posterior probability that a Gaussian parameter differs from zero, ``Phi(|mu| / sd)``.

    Entries with a non-positive or non-finite variance get probability NaN.
    """
    mean = np.asarray(mean, dtype=float)
    variance = np.asarray(variance, dtype=float)
    valid = np.isfinite(variance) & (variance > 0)
    sd = np.sqrt(np.where(valid, variance, 1.0))
    return np.where(valid, ndtr(np.abs(mean) / sd), np.nan)


def strongest_pairs(A_hz: np.ndarray, max_pairs: int = MAX_CROSS_PAIRS) -> list[tuple[int, int]]:
    """Region pairs ``(i, j)``, ``i < j``, ranked by coupling strength ``|A_ij| + |A_ji|``.

    Ties keep index order. At most ``max_pairs`` pairs are returned.
    """
    A = np.asarray(A_hz, dtype=float)
    rows, cols = np.triu_indices(A.shape[0], k=1)
    strength = np.abs(A[rows, cols]) + np.abs(A[cols, rows])
    order = np.argsort(-strength, kind="stable")[:max_pairs]
    return [(int(rows[k]), int(cols[k])) for k in order]


def glass_brain_figure(
    A_hz: np.ndarray, coords: np.ndarray, names: list[str], max_edges: int = MAX_GLASS_EDGES
) -> Figure:
    """ROI positions on a glass brain with the directed connections of A as arrows.

    Arrows point from source (column) to target (row); self-connections are not drawn, and
    of the other connections only the ``max_edges`` strongest (by |A|; the title says so
    when some are left out). Nodes are coloured as in the time-series figure and named in
    a legend.
    """
    from nilearn import plotting  # imported here: nilearn takes seconds to import

    n = len(names)
    edges = np.array(A_hz, dtype=float).T  # nilearn draws an arrow from row to column
    np.fill_diagonal(edges, 0.0)
    vmax = float(np.abs(edges).max())
    n_edges = int(np.count_nonzero(edges))
    if n_edges > max_edges:
        keep = np.argsort(-np.abs(edges).ravel(), kind="stable")[:max_edges]
        pruned = np.zeros(edges.size)
        pruned[keep] = edges.ravel()[keep]
        edges = pruned.reshape(edges.shape)
    legend_rows = int(np.ceil(n / 6))
    legend_height = 0.3 * legend_rows + 0.2
    height = 3.6 + legend_height
    fig = Figure(figsize=(10, height))
    colors = roi_colors(n)
    with warnings.catch_warnings():
        # A directed (non-symmetric) graph is what we want; nilearn warns about it.
        warnings.simplefilter("ignore", UserWarning)
        display = plotting.plot_connectome(
            edges,
            np.asarray(coords, dtype=float),
            node_color=colors,
            node_size=60,
            edge_cmap="RdBu_r",
            edge_vmin=-vmax if vmax > 0 else None,
            edge_vmax=vmax if vmax > 0 else None,
            display_mode="ortho",
            colorbar=vmax > 0,
            figure=fig,
            axes=(0.0, legend_height / height, 1.0, 1.0 - legend_height / height),
        )
    if getattr(display, "_cbar", None) is not None:
        display._cbar.set_label("effective connectivity (Hz)", fontsize=9)
        display._cbar.ax.yaxis.set_label_position("left")
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=8, color=colors[k]) for k in range(n)
    ]
    fig.legend(handles, names, loc="lower center", ncol=min(n, 6), frameon=False, fontsize=9)
    if n_edges > max_edges:
        fig.suptitle(f"the {max_edges} strongest of {n_edges} connections", fontsize=10)
    return fig


def timeseries_figure(timeseries: np.ndarray, tr: float, names: list[str]) -> Figure:
    """The ROI time series, each standardised (z-score) and stacked with a vertical offset."""
    y = np.asarray(timeseries, dtype=float)
    T, n = y.shape
    sd = y.std(axis=0)
    z = (y - y.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    fig = Figure(figsize=(10, max(2.5, 0.45 * n + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    time = np.arange(T) * tr
    offsets = 4.0 * np.arange(n)[::-1]  # first region on top
    colors = roi_colors(n)
    for k in range(n):
        ax.plot(time, z[:, k] + offsets[k], color=colors[k], linewidth=0.9)
    ax.set_yticks(offsets, names)
    ax.set_xlim(time[0], time[-1] if T > 1 else tr)
    ax.set_xlabel("time of the kept volumes (s)")
    ax.set_ylabel("z-score (offset per ROI)")
    ax.set_title(f"ROI time series (z-scored for display; {T} volumes, TR = {tr:g} s)")
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.tick_params(axis="y", length=0)
    return fig


def csd_figure(
    freqs: np.ndarray,
    observed: np.ndarray,
    predicted: np.ndarray,
    names: list[str],
    A_hz: np.ndarray,
) -> Figure:
    """Observed vs predicted cross-spectral density.

    One panel per region with the real part of its auto-spectrum, then the magnitude of the
    cross-spectrum for the :func:`strongest_pairs` of A.
    """
    freqs = np.asarray(freqs, dtype=float)
    n = len(names)
    panels = [(k, k) for k in range(n)] + strongest_pairs(A_hz)
    rows = int(np.ceil(len(panels) / _CSD_COLUMNS))
    cols = min(_CSD_COLUMNS, len(panels))
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (i, j) in zip(axes.flat, panels, strict=False):
        if i == j:
            obs, pred = observed[:, i, i].real, predicted[:, i, i].real
            title = f"{names[i]} (auto, real part)"
        else:
            obs, pred = np.abs(observed[:, i, j]), np.abs(predicted[:, i, j])
            title = f"{names[i]} - {names[j]} (|cross|)"
        ax.plot(freqs, obs, color="black", linewidth=1.4, label="observed")
        ax.plot(freqs, pred, color="tab:red", linestyle="--", linewidth=1.4, label="predicted")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("frequency (Hz)", fontsize=8)
        ax.set_ylabel("power (a.u.)" if i == j else "|cross-spectrum| (a.u.)", fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=2, frameon=False)
    return fig


def connectivity_matrix_figure(A_hz: np.ndarray, A_var: np.ndarray, names: list[str]) -> Figure:
    """Heat map of the posterior effective connectivity (rows = targets, columns = sources).

    The diverging colour scale is centred at 0 and spans the off-diagonal range; the
    self-connections (always negative, a different kind of parameter) are drawn grey with
    their value printed. Off-diagonal cells with posterior probability above
    :data:`POSTERIOR_PROBABILITY_THRESHOLD` are starred.
    """
    A = np.asarray(A_hz, dtype=float)
    n = A.shape[0]
    off_diagonal = ~np.eye(n, dtype=bool)
    vmax = float(np.abs(A[off_diagonal]).max()) if n > 1 else 0.0
    vmax = vmax if vmax > 0 else 1.0
    size = min(11.0, 2.5 + 0.55 * n)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    image = ax.imshow(
        np.ma.masked_array(A, mask=~off_diagonal), cmap=cmap, vmin=-vmax, vmax=vmax
    )
    fig.colorbar(image, ax=ax, label="effective connectivity (Hz)", shrink=0.8)
    ax.set_xticks(np.arange(n), names, rotation=45, ha="right")
    ax.set_yticks(np.arange(n), names)
    ax.set_xlabel("source (from)")
    ax.set_ylabel("target (to)")
    significant = off_diagonal & (posterior_probability(A, A_var) > POSTERIOR_PROBABILITY_THRESHOLD)
    if n <= MAX_ANNOTATED_REGIONS:
        for i in range(n):
            for j in range(n):
                light = off_diagonal[i, j] and abs(A[i, j]) > 0.6 * vmax
                ax.text(
                    j, i, f"{A[i, j]:.3f}" + ("*" if significant[i, j] else ""),
                    ha="center", va="center", fontsize=8, color="white" if light else "black",
                )
    else:
        rows, cols = np.nonzero(significant)
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            ax.text(j, i, "*", ha="center", va="center", fontsize=9)
    ax.set_title(
        f"Posterior A (Hz); * Pp > {POSTERIOR_PROBABILITY_THRESHOLD:g}; diagonal: self-inhibition",
        fontsize=10,
    )
    return fig


def convergence_figure(F_history: list[float], converged: bool, iterations: int) -> Figure:
    """Free energy per accepted Gauss-Newton iteration, with the convergence verdict."""
    F = np.asarray(F_history, dtype=float)
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.arange(1, F.size + 1), F, marker="o", markersize=3, color="tab:blue")
    ax.set_xlabel("accepted iteration")
    ax.set_ylabel("free energy F (nats)")
    verdict = "converged" if converged else "did NOT converge"
    ax.set_title(
        f"{verdict} after {iterations} iterations; final F = {F[-1]:.2f}",
        color="black" if converged else "tab:red",
    )
    ax.grid(alpha=0.3)
    return fig


def motion_figure(fd: np.ndarray, kept_volumes: np.ndarray, tr: float, threshold: float) -> Figure:
    """Framewise displacement over the run, with the removed volumes shaded.

    Parameters
    ----------
    fd
        FD (mm) of every volume of the run (NaN where fMRIPrep gives none, e.g. the first).
    kept_volumes
        Indices of the volumes the denoising kept; the others are shaded.
    tr
        Repetition time (s).
    threshold
        Mean-FD threshold of the QC (mm), drawn as a dashed line.
    """
    fd = np.asarray(fd, dtype=float)
    time = np.arange(fd.size) * tr
    removed = np.setdiff1d(np.arange(fd.size), np.asarray(kept_volumes, dtype=int))
    fig = Figure(figsize=(10, 2.6), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(time, fd, color="tab:blue", linewidth=1.0, label="framewise displacement")
    for k in removed:
        ax.axvspan(time[k] - tr / 2, time[k] + tr / 2, color="tab:red", alpha=0.25, linewidth=0)
    ax.axhline(threshold, color="0.3", linestyle="--", linewidth=0.9, label=f"QC threshold {threshold:g} mm")
    if np.isfinite(fd).any():
        ax.axhline(float(np.nanmean(fd)), color="tab:blue", linestyle=":", linewidth=0.9,
                   label=f"mean {np.nanmean(fd):.3f} mm")
    ax.set_xlim(0, max(time[-1], tr) if fd.size else tr)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("FD (mm)")
    ax.set_title(f"head motion: {removed.size} of {fd.size} volumes removed (shaded)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False, ncol=3)
    return fig


def roi_overlay_figure(mean_bold, coords: np.ndarray, names: list[str]) -> Figure:
    """Each ROI centre on an axial slice of the participant's own mean BOLD image.

    One panel per region: the slice of the mean BOLD (template space, millimetre axes,
    neurological view: left is left) through the region's centre, the centre marked in
    the region's colour (as in the other figures).

    Parameters
    ----------
    mean_bold
        The run's mean BOLD image (a nibabel image).
    coords
        (n, 3) ROI centres (mm).
    names
        ROI names.
    """
    from nilearn.image import reorder_img  # imported here: nilearn takes seconds to import

    img = reorder_img(mean_bold, resample="continuous")  # RAS axes, diagonal affine
    data = np.asarray(img.dataobj, dtype=float)
    affine = img.affine
    coords = np.asarray(coords, dtype=float)
    n = len(names)
    columns = min(n, 6)
    rows = int(np.ceil(n / columns))
    fig = Figure(figsize=(2.2 * columns, 2.4 * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    colors = roi_colors(n)
    scale = np.diag(affine)[:3]
    origin = affine[:3, 3]
    extent = (origin[0] - scale[0] / 2, origin[0] + scale[0] * (data.shape[0] - 0.5),
              origin[1] - scale[1] / 2, origin[1] + scale[1] * (data.shape[1] - 0.5))
    vmax = float(np.percentile(data[data > 0], 99)) if (data > 0).any() else 1.0
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_visible(False)
            continue
        z = int(np.clip(round((coords[k, 2] - origin[2]) / scale[2]), 0, data.shape[2] - 1))
        ax.imshow(data[:, :, z].T, cmap="gray", origin="lower", extent=extent, vmin=0, vmax=vmax)
        ax.scatter([coords[k, 0]], [coords[k, 1]], s=60, color=colors[k], edgecolors="white", linewidths=1.0)
        ax.set_title(f"{names[k]} (z = {coords[k, 2]:g} mm)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("x (mm)", fontsize=7)
        if k % columns == 0:
            ax.set_ylabel("y (mm)", fontsize=7)
    return fig
