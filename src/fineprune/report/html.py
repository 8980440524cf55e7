"""One self-contained HTML report: inline CSS, figures embedded as base64 PNG, no external resources,
so it can be mailed or archived as a single file and opened offline.

`ReportData` holds what the page shows (already formatted by the caller); `render_report` turns it
into HTML, escaping every string (paths and class names come from the user's files).
"""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field

from ..runtime import write_text_atomic


@dataclass
class MetricRow:
    """One row of the before/after table; values are fractions, None when not measured."""

    label: str
    before: float | None
    after: float | None
    better: str = "higher"  # "higher" or "lower": which direction is good for the defender
    missing: str = "not measured"
    help: str = ""


@dataclass
class FigureBlock:
    title: str
    png: bytes | None
    caption: str
    missing: str = ""  # shown instead of the image when png is None


@dataclass
class EvidenceBlock:
    """One backdoor scan: its verdict, its per-class table and the reversed triggers as pictures
    (class -> [(what, PNG bytes)])."""

    title: str
    verdict: str
    flagged: bool
    columns: list[str]
    rows: list[list[str]]
    pictures: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)
    note: str = ""


@dataclass
class ReportData:
    title: str
    subtitle: str
    verdict: str
    summary: list[tuple[str, str]]
    metrics: list[MetricRow]
    metrics_note: str = ""
    warnings: list[str] = field(default_factory=list)
    figures: list[FigureBlock] = field(default_factory=list)
    compact_table: list[tuple[str, str, str, str]] = field(default_factory=list)  # what, before, after, change
    compact_rows: list[tuple[str, str]] = field(default_factory=list)
    compact_note: str = ""
    # Whether model.safetensors is the defended model under plain load_state_dict (None: not shown).
    plain_load_ok: bool | None = None
    plain_load_rows: list[tuple[str, str]] = field(default_factory=list)
    plain_load_note: str = ""
    provenance: list[tuple[str, str]] = field(default_factory=list)
    command: str = ""
    how_to_load: list[tuple[str, str]] = field(default_factory=list)
    evidence: list[EvidenceBlock] = field(default_factory=list)
    evidence_note: str = ""


_CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#e3e6ec; --card:#fff; --bg:#f4f5f8;
  --good:#17803d; --bad:#c0392b; --warn-bg:#fff7e0; --warn-line:#f0c14b; --accent:#1f5fa8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1060px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { font-size: 26px; margin: 0 0 2px; letter-spacing: -0.01em; }
header .sub { color: var(--muted); margin: 0 0 18px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 18px 22px; margin: 0 0 18px; }
section h2 { font-size: 17px; margin: 0 0 12px; }
.verdict { border-left: 5px solid var(--accent); font-size: 16px; }
.warn { background: var(--warn-bg); border: 1px solid var(--warn-line); }
.warn li { margin: 4px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 2px 36px; }
.kv { display: flex; justify-content: space-between; gap: 16px; padding: 6px 0;
  border-bottom: 1px solid var(--line); }
.kv span:first-child { color: var(--muted); white-space: nowrap; }
.kv span:last-child { text-align: right; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 8px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-size: 13px; color: var(--muted); font-weight: 600; text-transform: uppercase; letter-spacing: .03em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.na { color: var(--muted); font-style: italic; }
.good { color: var(--good); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
.help { color: var(--muted); font-size: 13px; }
.note { color: var(--muted); font-size: 13.5px; margin: 10px 0 0; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 8px; }
.missing { color: var(--muted); font-style: italic; padding: 14px 0; }
code, pre, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: #f3f4f7; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
  white-space: pre-wrap; overflow-wrap: anywhere; margin: 6px 0 12px; }
.prov td:first-child { color: var(--muted); white-space: nowrap; width: 1%; }
.prov td { overflow-wrap: anywhere; font-size: 14px; }
.prov td.mono { font-size: 12.5px; }
footer { color: var(--muted); font-size: 12.5px; text-align: center; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _change(row: MetricRow) -> tuple[str, str]:
    """The change in points and its CSS class (good or bad for the defender)."""
    if row.before is None or row.after is None:
        return "", ""
    d = 100 * (row.after - row.before)
    if abs(d) < 0.05:
        return "±0.0 pts", ""
    good = (d < 0) if row.better == "lower" else (d > 0)
    return f"{d:+.1f} pts", "good" if good else "bad"


def _metrics_table(rows: list[MetricRow]) -> str:
    out = ["<table><thead><tr><th>metric</th><th style='text-align:right'>before</th>"
           "<th style='text-align:right'>after</th><th style='text-align:right'>change</th></tr></thead><tbody>"]
    for r in rows:
        label = f"{_e(r.label)}" + (f"<div class='help'>{_e(r.help)}</div>" if r.help else "")
        if r.before is None and r.after is None:
            out.append(f"<tr><td>{label}</td><td class='na' colspan='3'>{_e(r.missing)}</td></tr>")
            continue
        change, cls = _change(r)
        out.append(f"<tr><td>{label}</td><td class='num'>{_pct(r.before) if r.before is not None else '–'}</td>"
                   f"<td class='num'>{_pct(r.after) if r.after is not None else '–'}</td>"
                   f"<td class='num {cls}'>{_e(change)}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_grid(rows: list[tuple[str, str]]) -> str:
    items = "".join(f"<div class='kv'><span>{_e(k)}</span><span>{_e(v)}</span></div>" for k, v in rows)
    return f"<div class='grid'>{items}</div>"


def _compact_table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("<table><thead><tr><th></th><th style='text-align:right'>masked model</th>"
            "<th style='text-align:right'>compact</th><th style='text-align:right'>change</th></tr></thead><tbody>")
    body = "".join(f"<tr><td>{_e(a)}</td><td class='num'>{_e(b)}</td><td class='num'>{_e(c)}</td>"
                   f"<td class='num good'>{_e(d)}</td></tr>" for a, b, c, d in rows)
    return head + body + "</tbody></table>"


def _figure(block: FigureBlock) -> str:
    if block.png is None:
        body = f"<div class='missing'>{_e(block.missing or 'not available')}</div>"
    else:
        data = base64.b64encode(block.png).decode("ascii")
        body = (f"<figure><img src='data:image/png;base64,{data}' alt='{_e(block.title)}'>"
                f"<figcaption>{_e(block.caption)}</figcaption></figure>")
    return f"<section><h2>{_e(block.title)}</h2>{body}</section>"


def _evidence(blocks: list[EvidenceBlock], note: str) -> str:
    """The scans before and after, side by side: verdict, table, reversed triggers."""
    cols = []
    for b in blocks:
        head = "".join(f"<th>{_e(c)}</th>" for c in b.columns)
        body = "".join("<tr>" + "".join(f"<td class='num'>{_e(v)}</td>" for v in row) + "</tr>" for row in b.rows)
        pics = ""
        for k, parts in b.pictures.items():
            imgs = "".join(f"<figure style='display:inline-block;margin:4px'><img style='width:112px' "
                           f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}' alt='{_e(what)}'>"
                           f"<figcaption>{_e(what)}</figcaption></figure>" for what, png in parts)
            pics += f"<div class='help'>class {k}</div><div>{imgs}</div>"
        cls = " bad" if b.flagged else ""
        cols.append(f"<div><h3 style='font-size:15px;margin:0 0 6px'>{_e(b.title)}</h3>"
                    f"<p class='{cls.strip()}'>{_e(b.verdict)}</p>"
                    f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{pics}"
                    + (f"<p class='note'>{_e(b.note)}</p>" if b.note else "") + "</div>")
    warn = " class='warn'" if any(b.flagged for b in blocks[1:]) else ""
    return (f"<section{warn}><h2>Backdoor evidence (trigger-free scan)</h2><div class='grid'>{''.join(cols)}</div>"
            + (f"<p class='note'>{_e(note)}</p>" if note else "") + "</section>")


def render_report(data: ReportData) -> str:
    """The whole page as one string."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(data.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>{_e(data.title)}</h1><p class='sub'>{_e(data.subtitle)}</p></header>",
        f"<section class='verdict'>{_e(data.verdict)}</section>",
    ]
    if data.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in data.warnings)
        parts.append(f"<section class='warn'><h2>Warnings</h2><ul>{items}</ul></section>")
    parts.append(f"<section><h2>Summary</h2>{_kv_grid(data.summary)}</section>")
    note = f"<p class='note'>{_e(data.metrics_note)}</p>" if data.metrics_note else ""
    parts.append(f"<section><h2>Before and after</h2>{_metrics_table(data.metrics)}{note}</section>")
    if data.evidence:
        parts.append(_evidence(data.evidence, data.evidence_note))
    parts += [_figure(f) for f in data.figures]
    compact = _compact_table(data.compact_table) if data.compact_table else ""
    if data.compact_rows:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in data.compact_rows)
        compact += f"<table class='prov' style='margin-top:10px'><tbody>{rows}</tbody></table>"
    cnote = f"<p class='note'>{_e(data.compact_note)}</p>" if data.compact_note else ""
    parts.append(f"<section><h2>Compact export</h2>{compact}{cnote}</section>")
    if data.plain_load_ok is not None:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in data.plain_load_rows)
        pnote = f"<p class='note'>{_e(data.plain_load_note)}</p>" if data.plain_load_note else ""
        cls = "" if data.plain_load_ok else " class='warn'"
        parts.append(f"<section{cls}><h2>Loading without fineprune</h2>"
                     f"<table class='prov'><tbody>{rows}</tbody></table>{pnote}</section>")
    prov = "".join(f"<tr><td>{_e(k)}</td><td class='mono'>{_e(v)}</td></tr>" for k, v in data.provenance)
    load = "".join(f"<div class='help'>{_e(k)}</div><pre>{_e(v)}</pre>" for k, v in data.how_to_load)
    parts.append(
        f"<section><h2>Provenance</h2><table class='prov'><tbody>{prov}</tbody></table>"
        + (f"<div class='help' style='margin-top:12px'>command line</div><pre>{_e(data.command)}</pre>"
           if data.command else "")
        + "</section>")
    if load:
        parts.append(f"<section><h2>Loading the results</h2>{load}</section>")
    parts.append("<footer>Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018) · report written by fineprune"
                 "</footer></main></body></html>")
    return "\n".join(parts)


def write_report(data: ReportData, path: str | os.PathLike[str]) -> None:
    """Write the report atomically."""
    write_text_atomic(path, render_report(data))
