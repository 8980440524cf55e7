"""Grid outputs: `results.jsonl` (one row per finished cell), `summary.md` / `summary.json` (mean and
standard deviation over seeds) and `threshold.png` (ASR and clean accuracy against the threshold).

Only the driver writes `results.jsonl`, one whole line per `write` on a file opened for appending,
flushed and fsync'ed as each cell finishes; a line torn by a crash is skipped when read back (and
the next append starts on a fresh line). A cell may have several rows (a failure, then a success
after a resume): the last one counts.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..runtime import write_json_atomic, write_text_atomic
from .config import AXES, Cell

METRICS = ("clean_acc", "asr", "robust_acc", "pruned_fraction")


class ResultsLog:
    """Append-only JSON-lines results file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.skipped_lines = 0

    def read(self) -> list[dict]:
        rows: list[dict] = []
        self.skipped_lines = 0
        if not self.path.exists():
            return rows
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                self.skipped_lines += 1  # torn by a crash mid-write: that cell simply runs again
                continue
            if isinstance(row, dict) and "cell" in row:
                rows.append(row)
        return rows

    def latest(self) -> dict[str, dict]:
        """The last row of every cell."""
        return {r["cell"]: r for r in self.read()}

    def append(self, row: dict) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":  # a torn last line: start ours on a fresh one
                        os.write(self._fd, b"\n")
        data = (json.dumps(row, sort_keys=False, default=str) + "\n").encode()
        written = 0
        while written < len(data):  # one write in practice; loop only on a short write
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---- summary -------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": mean, "std": std, "n": len(vals)}


GROUP_AXES = tuple(a for a in AXES if a != "seed")
# The defense's own axes: one panel of the threshold figure draws a line per value of these.
_LINE_AXES = ("defense", "threshold", "finetune_epochs", "recipe", "lr_factors", "criterion", "stop_rule",
              "defender_val_fraction")


def summarize(cells: list[Cell], latest: dict[str, dict]) -> dict:
    """Mean and sample standard deviation over seeds for every setting of the other axes."""
    groups: dict[str, dict] = {}
    failed, missing = [], []
    for cell in cells:
        key_params = {a: cell.params[a] for a in GROUP_AXES}
        key = json.dumps(key_params, sort_keys=True, default=str)
        g = groups.setdefault(key, {"params": key_params, "rows": [], "seeds": [], "failed_seeds": [],
                                    "missing_seeds": []})
        row = latest.get(cell.id)
        if row is None:
            g["missing_seeds"].append(cell.params["seed"])
            missing.append(cell.id)
        elif row.get("status") == "ok":
            g["rows"].append(row)
            g["seeds"].append(cell.params["seed"])
        else:
            g["failed_seeds"].append(cell.params["seed"])
            failed.append({"cell": cell.id, "label": cell.label(), "error": row.get("error"),
                           "attempts": row.get("attempts")})
    out_groups = []
    for g in groups.values():
        entry = {**g["params"], "n": len(g["rows"]), "seeds": sorted(g["seeds"]),
                 "failed_seeds": sorted(g["failed_seeds"]), "missing_seeds": sorted(g["missing_seeds"])}
        for m in METRICS:
            entry[m] = _stats([r.get(m) for r in g["rows"]])
        out_groups.append(entry)
    ok = sum(1 for c in cells if latest.get(c.id, {}).get("status") == "ok")
    return {"cells": len(cells), "ok": ok, "failed": len(failed), "missing": len(missing),
            "groups": out_groups, "failed_cells": failed}


def _pct(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    s = f"{100 * stat['mean']:.1f}"
    if stat["std"] is not None:
        s += f" ± {100 * stat['std']:.1f}"
    return s


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def summary_markdown(summary: dict, title: str = "grid") -> str:
    groups = summary["groups"]
    # Show task / attack / defense / threshold always, other axes only where they vary.
    always = ("task", "attack", "defense", "threshold")
    shown = [a for a in GROUP_AXES
             if a in always or len({json.dumps(g[a]) for g in groups if g[a] is not None}) > 1]
    lines = [f"# {title}: {summary['ok']} of {summary['cells']} cells done, {summary['failed']} failed, "
             f"{summary['missing']} not run", "",
             "Mean ± sample standard deviation over seeds, in % (clean accuracy and attack success rate on "
             "the test split). `n`: seeds that finished; `-`: does not apply.", "",
             "| " + " | ".join(shown) + " | n | clean acc | ASR | robust acc | pruned |",
             "|" + "---|" * (len(shown) + 5)]
    for g in groups:
        n = f"{g['n']}" + (f" ({len(g['failed_seeds'])} failed)" if g["failed_seeds"] else "")
        lines.append("| " + " | ".join(_fmt(g[a]) for a in shown) + f" | {n} | {_pct(g['clean_acc'])} | "
                     f"{_pct(g['asr'])} | {_pct(g['robust_acc'])} | {_pct(g['pruned_fraction'])} |")
    if summary["failed_cells"]:
        lines += ["", "## Failed cells", "", "| cell | attempts | error |", "|---|---|---|"]
        for f in summary["failed_cells"]:
            err = str(f["error"] or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {f['label']} (`{f['cell']}`) | {f['attempts']} | {err[:300]} |")
    return "\n".join(lines) + "\n"


def threshold_figure(summary: dict):
    """ASR and clean accuracy against the threshold, one panel per (task, attack, other axes);
    defenses without a threshold ("none", "fine-tuning") are horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[dict]] = {}
    for g in summary["groups"]:
        if g["n"] == 0:
            continue
        other = {a: g[a] for a in GROUP_AXES if a not in _LINE_AXES}
        key = json.dumps(other, sort_keys=True, default=str)
        panels.setdefault(key, []).append(g)
    n = max(1, len(panels))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    colours = {"none": "0.4", "fine-tuning": "tab:green", "pruning": "tab:orange", "fine-pruning": "tab:blue"}
    for ax in axes.flat[n:]:
        ax.axis("off")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no finished cells", ha="center", va="center")
        axes[0][0].axis("off")
    for ax, (key, gs) in zip(axes.flat, panels.items()):
        other = json.loads(key)
        thresholds = sorted({g["threshold"] for g in gs if g["threshold"] is not None})
        span = (min(thresholds), max(thresholds)) if thresholds else (0.0, 10.0)
        by_line: dict[tuple, list[dict]] = {}
        for g in gs:
            variant = tuple((a, g[a]) for a in _LINE_AXES[2:]
                            if len({json.dumps(x[a]) for x in gs if x["defense"] == g["defense"]}) > 1)
            by_line.setdefault((g["defense"], variant), []).append(g)
        for (defense, variant), pts in by_line.items():
            label = defense + "".join(f" {a}={_fmt(v)}" for a, v in variant)
            c = colours.get(defense, None)
            for metric, style in (("clean_acc", "-"), ("asr", "--")):
                if pts[0]["threshold"] is None:  # no threshold: a reference line
                    st = pts[0][metric]
                    if st["mean"] is not None:
                        ax.hlines(100 * st["mean"], *span, colors=c, linestyles=":" if metric == "asr" else "-.",
                                  linewidth=1, label=f"{label} {'ASR' if metric == 'asr' else 'CA'}")
                    continue
                pts_sorted = sorted(pts, key=lambda g: g["threshold"])
                xs = [g["threshold"] for g in pts_sorted if g[metric]["mean"] is not None]
                ys = [100 * g[metric]["mean"] for g in pts_sorted if g[metric]["mean"] is not None]
                es = [100 * (g[metric]["std"] or 0.0) for g in pts_sorted if g[metric]["mean"] is not None]
                if xs:
                    ax.errorbar(xs, ys, yerr=es, fmt=style + "o", color=c, markersize=3, capsize=2,
                                label=f"{label} {'ASR' if metric == 'asr' else 'CA'}")
        title = f"{other['task']} / {other['attack']}"
        extra = [f"{a}={_fmt(v)}" for a, v in other.items() if a not in ("task", "attack") and v is not None
                 and len({json.dumps(json.loads(k).get(a)) for k in panels if json.loads(k).get(a) is not None}) > 1]
        if extra:
            title += "\n" + ", ".join(extra)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("threshold (accuracy points)")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle("Clean accuracy (solid) and attack success rate (dashed) against the pruning threshold; "
                 "mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    return fig


def write_outputs(out: str | Path, cells: list[Cell], latest: dict[str, dict], title: str = "grid") -> dict:
    """Write summary.md, summary.json and threshold.png; returns the summary."""
    import matplotlib.pyplot as plt

    out = Path(out)
    summary = summarize(cells, latest)
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", summary_markdown(summary, title))
    fig = threshold_figure(summary)
    tmp = out / ".threshold.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out / "threshold.png")
    return summary
