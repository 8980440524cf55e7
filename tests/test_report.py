"""The HTML report is one self-contained file that says plainly what was not measured."""
from __future__ import annotations

import re

from fineprune.report.html import FigureBlock, MetricRow, ReportData, render_report, write_report
from fineprune.report.plots import figure_png

import matplotlib.pyplot as plt


def _png() -> bytes:
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    return figure_png(fig, dpi=30)


def _data(asr_before=None, asr_after=None) -> ReportData:
    return ReportData(
        title="Fine-Pruning report: <script>alert(1)</script>.pt", subtitle="s", verdict="v",
        summary=[("layer", "features.7")],
        metrics=[MetricRow("Clean accuracy", 0.95, 0.94),
                 MetricRow("Attack success rate (ASR)", asr_before, asr_after, "lower",
                           "not measured: no triggered set given")],
        figures=[FigureBlock("Pruning curve", _png(), "cap"), FigureBlock("Fine-tuning", None, "", "No fine-tuning.")],
        compact_table=[("parameters", "100", "80", "-20.0%")], provenance=[("model SHA-256", "ab" * 32)],
        command="fineprune defend --model m.pt", how_to_load=[("load", "model = ...")])


def test_report_is_self_contained_and_escapes(tmp_path):
    path = tmp_path / "report.html"
    write_report(_data(), path)
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1
    assert "No fine-tuning." in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    # No external resources: nothing fetched by src/href, no external scripts or stylesheets.
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", page)
    assert "<link" not in page and "@import" not in page


def test_metrics_table_without_and_with_asr():
    page = render_report(_data())
    assert "95.0%" in page and "94.0%" in page and "-1.0 pts" in page
    assert "not measured: no triggered set given" in page
    page = render_report(_data(0.98, 0.02))
    assert "98.0%" in page and "2.0%" in page and "class='num good'>-96.0 pts" in page
