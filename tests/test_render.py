"""The shared report renderer: base page, stylesheet, filters, figure encoding."""

from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bids_ketdcm.report.render import environment, figure_png, format_number, format_percent  # noqa: E402


def test_base_page_inlines_the_stylesheet_and_escapes_text():
    html = environment().from_string(
        '{% extends "base.html" %}{% block content %}<p>{{ text }}</p>{% endblock %}'
    ).render(title="sub-01", nav=[("summary", "Summary")], text="<b>A & B</b>")
    assert "<title>bids-ketdcm: sub-01</title>" in html
    assert 'href="#summary"' in html
    assert "table.data thead th" in html  # the stylesheet, inlined
    assert "&lt;b&gt;A &amp; B&lt;/b&gt;" in html


def test_number_filters_never_print_nan():
    assert format_number(float("nan")) == "n/a"
    assert format_number(None) == "n/a"
    assert format_number(0.012345) == "0.0123"
    assert format_percent(0.1234) == "12.3 %"
    assert format_percent(float("inf")) == "n/a"


def test_identical_figures_give_identical_png_bytes():
    def draw() -> str:
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        data = figure_png(fig)
        plt.close(fig)
        return data

    first, second = draw(), draw()
    assert first == second
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
