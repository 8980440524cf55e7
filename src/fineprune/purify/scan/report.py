"""A scan's files: scan.json, the reversed triggers as PNG, and one self-contained report.html.

Every file is written atomically (a temporary file beside it, then renamed), so a killed run never
leaves half a file. The pictures show a reversed trigger in the clean data's own range: each
channel of the model's input is mapped from the clean inputs' [min, max] to [0, 255], which for
data in [0, 1] is the image itself and for normalised data undoes the normalisation up to that
stretch.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import torch

from ...runtime import atomic_path, write_json_atomic, write_text_atomic
from .base import ScanResult

#: What a reader must know next to any verdict (the report and the README say it).
CAVEAT = ("No evidence is not a clean bill of health. A scan of this kind misses blended or "
          "whole-image triggers, all-to-all attacks (no single target class) and physical triggers "
          "on the features the model relies on (sunglasses on faces); and a clean model can be "
          "flagged when one of its classes is naturally easy to reach.")


def pictured_classes(result: ScanResult, smallest: int = 3) -> list[int]:
    """The classes whose triggers are drawn: every flagged class, then the `smallest` smallest."""
    out = list(result.flagged)
    for k in result.smallest(smallest):
        if k not in out:
            out.append(k)
    return out


def _display(x: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(C, ...) model-space values mapped to [0, 1] per channel by the clean inputs' box."""
    if box is None:
        lo, hi = x.amin(), x.amax()
    else:
        lo, hi = box[0][0], box[1][0]
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def _png_image(img: torch.Tensor) -> bytes:
    """(C, H, W) in [0, 1] as PNG bytes (grey for 1 channel, RGB for 3, else the channel mean),
    enlarged by whole pixels to at least 112 pixels on its longer side."""
    from PIL import Image

    c, h, w = img.shape
    if c not in (1, 3):
        img = img.mean(0, keepdim=True)
        c = 1
    scale = max(1, math.ceil(112 / max(h, w)))
    arr = (img * 255).round().to(torch.uint8)
    arr = arr.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    pil = Image.fromarray(arr[0].numpy(), "L") if c == 1 else Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _png_curve(series: list[tuple[torch.Tensor, str]], title: str) -> bytes:
    """1-D inputs (audio): the series as lines on one small plot."""
    from matplotlib.figure import Figure

    from ...report.plots import figure_png

    fig = Figure(figsize=(5, 1.8))
    ax = fig.add_subplot()
    for values, label in series:
        ax.plot(values.numpy(), linewidth=0.6, label=label)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    if len(series) > 1:
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return figure_png(fig)


def trigger_pngs(result: ScanResult, k: int, example: torch.Tensor) -> dict[str, bytes] | None:
    """Class k's mask, pattern and `example` (one clean input of another class) with the trigger
    applied, as PNG bytes; None for inputs that are neither images nor 1-D signals."""
    c = result.by_class(k)
    if c.mask is None or c.pattern is None:
        return None
    m, p = c.mask.float(), c.pattern.float()
    applied = (1 - m) * example + m * p
    if example.dim() == 3:
        return {"mask": _png_image(m.clamp(0, 1)), "pattern": _png_image(_display(p, result.box)),
                "applied": _png_image(_display(applied, result.box))}
    if example.dim() == 2:
        return {"mask": _png_curve([(m[0], "mask")], f"class {k}: mask"),
                "pattern": _png_curve([(p[0], "pattern")], f"class {k}: pattern"),
                "applied": _png_curve([(example[0], "clean"), (applied[0], "with trigger")],
                                      f"class {k}: trigger applied")}
    return None


def example_for(k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    other = torch.nonzero(y != k).flatten()
    return x[int(other[0]) if other.numel() else 0]


def write_scan_outputs(out: Path, result: ScanResult, examples: tuple[torch.Tensor, torch.Tensor],
                       record: dict[str, Any] | None = None) -> list[Path]:
    """Write scan.json, the pictured classes' PNGs and report.html into `out`; returns the paths.
    `examples`: a few clean inputs and labels (one of another class is shown with each trigger);
    `record`: extra provenance for scan.json and the report (model, data, command, versions)."""
    record = dict(record or {})
    files: list[Path] = []
    pictures: dict[int, dict[str, str]] = {}
    x, y = examples
    for k in pictured_classes(result):
        pngs = trigger_pngs(result, k, example_for(k, x, y))
        if pngs is None:
            continue
        pictures[k] = {}
        for part, data in pngs.items():
            path = out / f"trigger-class{k}-{part}.png"
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            files.append(path)
            pictures[k][part] = base64.b64encode(data).decode("ascii")
    doc = {**result.to_json(), **record, "pictured": {str(k): [f"trigger-class{k}-{p}.png" for p in v]
                                                      for k, v in pictures.items()}}
    write_json_atomic(out / "scan.json", doc)
    write_text_atomic(out / "report.html", render_html(result, pictures, record))
    return [out / "scan.json", *files, out / "report.html"]


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def render_html(result: ScanResult, pictures: dict[int, dict[str, str]], record: dict[str, Any]) -> str:
    """One page: the verdict, the anomaly-index table, the pictured triggers, the caveats."""
    from ...report.html import _CSS  # the defend report's style (a private name of report.html, reused)

    css = _CSS + ("img.px { image-rendering: pixelated; width: 140px; height: auto; margin: 0 10px 0 0; }"
                  ".trig { display: flex; gap: 14px; align-items: flex-start; flex-wrap: wrap; margin: 8px 0 18px; }"
                  ".trig div { text-align: center; font-size: 13px; color: var(--muted); }")
    names = result.class_names or []
    measure = result.size_measure
    rows = []
    for c in sorted(result.classes, key=lambda c: (-c.anomaly_index, c.cls)):
        name = names[c.cls] if c.cls < len(names) and names[c.cls] != str(c.cls) else ""
        bad = " bad" if c.flagged else ""
        rows.append(f"<tr><td class='{bad.strip()}'>{c.cls}{' (' + _e(name) + ')' if name else ''}</td>"
                    f"<td class='num{bad}'>{c.anomaly_index:.2f}</td><td class='num'>{c.size:.1f}</td>"
                    f"<td class='num'>{c.kept_size:.1f}</td>"
                    f"<td class='num'>{100 * c.kept_size / result.mask_elements:.2f}%</td>"
                    f"<td class='num'>{100 * c.success:.1f}%</td><td class='num'>{c.steps}</td>"
                    f"<td>{_e(c.status)}</td><td>{'yes' if c.flagged else ''}</td></tr>")
    table = ("<table><thead><tr><th>class</th><th>anomaly index</th><th>" + _e(measure) + "</th><th>kept "
             "trigger's " + _e(measure) + "</th><th>covers</th><th>attack success</th><th>steps</th><th>status</th>"
             "<th>flagged</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    summary = [("method", result.method), ("classes", len(result.classes)),
               ("fully inverted", f"{result.completed} of {len(result.classes)}"),
               ("clean inputs used", result.samples), ("threshold", f"anomaly index > {result.threshold:g}"),
               ("seconds", f"{result.seconds:.1f}"), ("stopped", result.stopped_by)]
    kv = "".join(f"<div class='kv'><span>{_e(k)}</span><span>{_e(v)}</span></div>" for k, v in summary)
    pics = []
    for k, parts in pictures.items():
        label = "flagged" if k in result.flagged else "among the smallest"
        cells = "".join(f"<div><img class='px' src='data:image/png;base64,{b64}' alt='class {k} {p}'><br>{_e(p)}</div>"
                        for p, b64 in parts.items())
        pics.append(f"<h3>class {k} ({label})</h3><div class='trig'>{cells}</div>")
    notes = "".join(f"<li>{_e(n)}</li>" for n in result.notes)
    prov = "".join(f"<tr><td>{_e(k)}</td><td class='mono'>{_e(v)}</td></tr>" for k, v in _flat(record))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Backdoor scan</title><style>{css}</style></head><body><main>",
        f"<header><h1>Backdoor scan</h1><p class='sub'>{_e(result.method)}</p></header>",
        f"<section class='verdict'>{_e(result.verdict())}<p class='note'>{_e(CAVEAT)}</p></section>",
        f"<section><h2>Summary</h2><div class='grid'>{kv}</div></section>",
        (f"<section><h2>Reversed trigger per class</h2>{table}<p class='note'>Anomaly index: (median - size) / "
         f"(1.4826 x MAD) over the classes' {_e(measure)}; only the small side counts. Attack success: the "
         "share of the scan's clean inputs of other classes that the kept trigger sends to the class.</p></section>"),
        "<section><h2>Pictured triggers</h2>" + ("".join(pics) or "<div class='missing'>no pictures for inputs "
                                                 "of this shape</div>") + "</section>",
    ]
    if notes:
        parts.append(f"<section class='warn'><h2>Notes</h2><ul>{notes}</ul></section>")
    if prov:
        parts.append(f"<section><h2>Provenance</h2><table class='prov'><tbody>{prov}</tbody></table></section>")
    parts.append("<footer>Neural Cleanse (Wang et al., S&amp;P 2019); K-Arm (Shen et al., ICML 2021) · "
                 "report written by fineprune</footer></main></body></html>")
    return "\n".join(parts)


def _flat(record: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in record.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif v is not None:
            out.append((f"{prefix}{k}", v))
    return out
