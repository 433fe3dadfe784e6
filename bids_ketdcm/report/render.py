"""Rendering of the HTML reports: one jinja2 environment, one stylesheet, one figure encoder.

Every page extends ``templates/base.html`` (navigation bar, the stylesheet inlined so a
page is one self-contained file). Figures are embedded as base64 PNG data.
"""

from __future__ import annotations

import base64
import io
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from matplotlib.figure import Figure


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The package's jinja2 environment (templates of ``bids_ketdcm/report/templates``, autoescaped)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bids_ketdcm.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["num"] = format_number
    env.filters["percent"] = format_percent
    return env


def render_page(template: str, **context: Any) -> str:
    """Render one page.

    Parameters
    ----------
    template
        File name under ``templates/``, e.g. ``"participant.html"``.
    **context
        Template variables; ``title`` and ``nav`` (list of (anchor, text)) are used by the base page.

    Returns
    -------
    str
        The HTML text.
    """
    context.setdefault("nav", [])
    return environment().get_template(template).render(**context)


def figure_png(fig: Figure, dpi: int = 100, bbox_inches: str | None = None) -> str:
    """Render ``fig`` as PNG, base64-encoded (ASCII), for an ``<img src="data:image/png;base64,...">``.

    The figure is cleared. The PNG carries no software or time stamp, so identical figures give
    identical bytes.

    Parameters
    ----------
    fig
        A figure built without pyplot (``matplotlib.figure.Figure``).
    dpi
        Resolution.
    bbox_inches
        ``"tight"`` crops the canvas to the drawn artists (labels included).
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches=bbox_inches, metadata={"Software": None})
    fig.clear()
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_file(path: str | Path) -> str:
    """A PNG file written earlier (e.g. a figure saved beside the derivatives), base64-encoded
    (ASCII) like :func:`figure_png`, for embedding."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def format_number(value: Any, spec: str = ".3g") -> str:
    """A number for a table cell: ``spec`` format, "n/a" for missing or non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a" if value is None else str(value)
    return format(number, spec) if math.isfinite(number) else "n/a"


def format_percent(fraction: Any, digits: int = 1) -> str:
    """A fraction as a percentage (``0.123`` -> ``"12.3 %"``); "n/a" when missing."""
    text = format_number(fraction * 100 if isinstance(fraction, (int, float)) else fraction, f".{digits}f")
    return text if text == "n/a" else f"{text} %"
