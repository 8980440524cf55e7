"""Outputs of `fineprune reproduce`: the paper-style table, the figures and one HTML page."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..defense.api import DefenseResult  # noqa: E402
from ..runtime import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402
from .channels import channel_findings  # noqa: E402
from .plots import plot_pruning_curve  # noqa: E402


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table_markdown(rows: list[dict], paper: dict) -> str:
    """Rows task x attack, columns defenses (in the order the rows ran them); each cell
    `CA / ASR` (%), the paper's beside ours."""
    by = {(r["task"], r["attack"], r["defense"]): r for r in rows}
    keys = list(dict.fromkeys((r["task"], r["attack"]) for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    head = "| task | attack | " + " | ".join(defenses) + " |"
    lines = [
        "Clean accuracy / attack success rate on the test split, in %. "
        "*paper:* figures are the paper's Table 1 as recalled in shared/docs/paper-notes.md "
        "(unverified there; the paper gives no pruning-only column).",
        "",
        head,
        "|" + "---|" * (2 + len(defenses)),
    ]
    for task, attack in keys:
        cells = []
        for d in defenses:
            r = by.get((task, attack, d))
            cell = "n/a" if r is None else f"{_pct(r['clean_acc'])} / {_pct(r['asr'])}"
            if r is not None and d in ("pruning", "fine-pruning"):
                cell += f" ({100 * r['pruned_fraction']:.0f}% pruned)"
            if (task, attack, d) in paper:
                ca, asr = paper[(task, attack, d)]
                cell += f"<br>*paper: {100 * ca:.1f} / {100 * asr:.1f}*"
            cells.append(cell)
        lines.append(f"| {task} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_channel_activity(res: DefenseResult, path: Path, title: str) -> None:
    """Each channel's mean activation on clean vs triggered validation inputs, in pruning order:
    shows whether the backdoor lives in channels dormant on clean data (prunable) or not."""
    curve = res.sweep
    order = curve.order
    clean = [curve.channel_means[c] for c in order]
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=120)
    ax.bar(range(len(order)), clean, color="#1f77b4", alpha=0.7, label="clean inputs")
    if curve.triggered_means is not None:
        trig = [curve.triggered_means[c] for c in order]
        ax.plot(range(len(order)), trig, color="#d62728", lw=1.2, marker=".", ms=3, label="triggered inputs")
    k = res.stop_k
    if k is not None:
        ax.axvline(k - 0.5, color="#444", ls="--", lw=1, label=f"stop ({k} pruned)")
    ax.set_xlabel("channel, in pruning order (" + ("increasing clean activation" if curve.criterion == "activation"
                                                   else f"{curve.criterion} criterion") + ")")
    ax.set_ylabel("mean activation")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _findings_line(f: dict) -> str:
    line = (f"{f['layer']}: {f['dormant_clean']} of {f['num_channels']} channels dormant on clean inputs; "
            f"{f['stop_k']} pruned.")
    share = f.get("trigger_gap_pruned_share")
    if share is not None:
        top = ", ".join(f"#{t['channel']} (rank {t['prune_rank']}{', pruned' if t['pruned'] else ''})"
                        for t in f["top_trigger_channels"])
        line += (f" The pruned channels hold {100 * share:.0f}% of the extra activation the trigger causes; "
                 f"most trigger-excited channels: {top}.")
    return line


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def write_reproduce_outputs(out: Path, rows: list[dict], curves: dict[tuple[str, str], DefenseResult],
                            paper: dict, cfg) -> None:
    md = table_markdown(rows, paper)
    write_text_atomic(out / "table.md", md)
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    sections, findings = [], []
    for (task, attack), res in curves.items():
        f = channel_findings(res.sweep, res.stop_k)
        findings.append({"task": task, "attack": attack, **f})
        curve_png = figs / f"{task}-{attack}-pruning.png"
        act_png = figs / f"{task}-{attack}-channels.png"
        plot_pruning_curve(res.sweep, curve_png, res.stop_k,
                           title=f"{task}, {attack}: pruning {res.layer} (validation data)")
        plot_channel_activity(res, act_png, f"{task}, {attack}: channel activity ({res.layer})")
        sections.append(f"<h3>{html.escape(task)} &middot; {html.escape(attack)}</h3>"
                        f"<p class='note'>{html.escape(_findings_line(f))}</p>"
                        f"<div class='figs'>{_img(curve_png)}{_img(act_png)}</div>")
    write_json_atomic(out / "channels.json", findings)
    table_rows = []
    for r in rows:
        table_rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                r["task"], r["attack"], r["defense"], _pct(r["clean_acc"]), _pct(r["asr"]),
                _pct(r["robust_acc"]), f"{100 * r['pruned_fraction']:.0f}%",
                "-" if r["seconds"] is None else f"{r['seconds']:.1f}")) + "</tr>")
    md_html = html.escape(md)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fineprune reproduce</title>
<style>body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:nth-child(-n+3){{text-align:left}}th{{background:#f3f3f3}}img{{max-width:49%;margin:0.3%}}
pre{{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:12px}}.note{{color:#555}}</style></head><body>
<h1>Fine-Pruning: the paper's experiment, reproduced</h1>
<p class="note">seed {cfg.seed}, threshold {cfg.threshold} points, subsample {cfg.subsample}.
The defender's clean validation split chose every ranking, stop point and fine-tuning epoch;
the test split only measured. CA = clean accuracy, ASR = attack success rate, RA = robust accuracy (%).</p>
<h2>Results</h2>
<table><tr><th>task</th><th>attack</th><th>defense</th><th>CA</th><th>ASR</th><th>RA</th><th>pruned</th><th>seconds</th></tr>
{''.join(table_rows)}</table>
<h2>Paper-style table</h2><pre>{md_html}</pre>
<h2>Pruning curves and channel activity</h2>
<p class="note">Left: clean accuracy and ASR (validation) against the fraction of channels pruned, stop point
marked. Right: each channel's mean activation on clean vs triggered inputs in pruning order: a backdoor in
channels dormant on clean data is pruned early; one in clean-active channels survives pruning.</p>
{''.join(sections)}
</body></html>"""
    write_text_atomic(out / "report.html", page)
