"""The HTML report is one self-contained file that says plainly what was not measured."""
from __future__ import annotations

import re

import matplotlib.pyplot as plt
import pytest

from fineprune.report.html import FigureBlock, MetricRow, ReportData, render_report, write_report
from fineprune.report.plots import figure_png


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


def test_channel_findings_locate_the_backdoor():
    from fineprune.defense.sweep import SweepCurve
    from fineprune.report.channels import channel_findings

    clean = [0.0, 2.0, 0.001, 1.0, 3.0]  # channels 0 and 2 dormant on clean data
    trig = [5.0, 2.0, 0.0, 2.0, 3.0]  # the trigger excites channel 0 (by 5) and channel 3 (by 1)
    order = [0, 2, 3, 1, 4]  # increasing clean activation
    curve = SweepCurve(layer="l", order=order, channel_means=clean, clean_correct=[1] * 6, num_clean=1,
                       asr_hits=None, robust_hits=None, num_triggered=0, mode="cached", seconds=0.0,
                       triggered_means=trig)
    f = channel_findings(curve, stop_k=2, top=2)
    assert f["dormant_clean"] == 2 and f["num_channels"] == 5 and f["stop_k"] == 2
    assert f["trigger_gap_pruned_share"] == pytest.approx(5 / 6, abs=1e-4)  # channel 0 pruned, 3 kept
    assert [(t["channel"], t["prune_rank"], t["pruned"]) for t in f["top_trigger_channels"]] == \
        [(0, 0, True), (3, 2, False)]
    assert channel_findings(curve, stop_k=0)["trigger_gap_pruned_share"] == 0.0
    curve.triggered_means = None
    assert "trigger_gap_pruned_share" not in channel_findings(curve, stop_k=1)
