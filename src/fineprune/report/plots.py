"""Figures: the pruning curve, the activations of the pruned layer, and the fine-tuning curve.

Each figure has a `*_figure` builder returning a matplotlib Figure, so the same drawing can be
saved as a PNG file or embedded in the HTML report (`figure_png`).
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..defense.sweep import SweepCurve  # noqa: E402
from ..runtime import atomic_path  # noqa: E402
from ..training import TrainHistory  # noqa: E402

CLEAN = "#1f77b4"
ASR = "#d62728"
ROBUST = "#2ca02c"
PRUNED = "#ff7f0e"
KEPT = "#8fa8c8"
TRIGGERED = "#6a3d9a"


def figure_png(fig: Figure, dpi: int = 120) -> bytes:
    """The figure as PNG bytes (and close it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> bytes:
    """Write the figure atomically as a PNG; returns the bytes written (for embedding)."""
    data = figure_png(fig, dpi)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return data


def _pct(values: Sequence[float]) -> list[float]:
    return [100 * v for v in values]


def _legend_below(ax, ncol: int, handles=None, labels=None) -> None:
    """Legend under the plot, where it never hides a curve."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol,
              fontsize=8, frameon=False)


def pruning_curve_figure(curve: SweepCurve, stop_k: int | None = None, title: str = "Pruning curve",
                         threshold: float | None = None) -> Figure:
    """Clean accuracy, ASR and robust accuracy (when measured) against the fraction pruned."""
    frac = curve.fractions()
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120, layout="constrained")
    ax.plot(frac, _pct(curve.clean_acc), label="clean accuracy (validation)", color=CLEAN, lw=2)
    if curve.asr is not None:
        ax.plot(frac, _pct(curve.asr), label="attack success rate", color=ASR, lw=2)
    if curve.robust_acc is not None:
        ax.plot(frac, _pct(curve.robust_acc), label="robust accuracy (triggered)", color=ROBUST,
                lw=1.2, ls="--")
    if threshold is not None:
        ax.axhline(100 * curve.clean_acc[0] - threshold, color=CLEAN, lw=0.8, ls=":",
                   label=f"stop rule: {threshold:g} points below the start")
    if stop_k is not None:
        ax.axvline(stop_k / curve.num_channels, color="#444", ls="--", lw=1.2,
                   label=f"stop: {stop_k}/{curve.num_channels} pruned")
    ax.set_xlabel(f"fraction of channels pruned ({curve.layer})")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    _legend_below(ax, ncol=3)
    return fig


def plot_pruning_curve(curve: SweepCurve, path: str | os.PathLike[str], stop_k: int | None = None,
                       title: str = "Pruning curve", threshold: float | None = None) -> None:
    """CA (and ASR when measured) vs fraction of channels pruned, with the stop point marked."""
    save_png(pruning_curve_figure(curve, stop_k, title, threshold), path)


def activation_figure(curve: SweepCurve, stop_k: int) -> Figure:
    """The pruned layer's channels: mean activation per channel on clean inputs, in pruning order
    (pruned ones highlighted; triggered means beside them when measured), and their histogram."""
    order = curve.order
    clean = [curve.channel_means[c] for c in order]
    ranks = list(range(len(order)))
    pruned = set(order[:stop_k])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.0, 3.9), dpi=120, layout="constrained",
                                   gridspec_kw={"width_ratios": [1.6, 1]})
    colors = [PRUNED if c in pruned else KEPT for c in order]
    ax1.bar(ranks, clean, width=1.0, color=colors, linewidth=0)
    if curve.triggered_means is not None:
        trig = [curve.triggered_means[c] for c in order]
        ax1.plot(ranks, trig, ".", ms=3 if len(order) > 128 else 5, color=TRIGGERED,
                 label="mean on triggered inputs")
    if stop_k:
        ax1.axvline(stop_k - 0.5, color="#444", ls="--", lw=1)
    handles, labels = ax1.get_legend_handles_labels()
    handles += [Patch(color=PRUNED), Patch(color=KEPT)]
    labels += [f"pruned ({stop_k})", f"kept ({len(order) - stop_k})"]
    ax1.set_xlim(-0.5, len(order) - 0.5)
    ax1.set_xlabel("channel, in pruning order (" + ("lowest clean activation first" if curve.criterion == "activation"
                                                    else f"{curve.criterion} criterion") + ")")
    ax1.set_ylabel("mean activation")
    ax1.set_title(f"Channels of {curve.layer}", fontsize=10)
    ax1.grid(alpha=0.3, axis="y")
    ax1.legend(handles, labels, fontsize=8, loc="upper left")

    bins = min(40, max(10, len(order) // 4))
    lo = min(clean + (curve.triggered_means or []))
    hi = max(clean + (curve.triggered_means or []))
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
    kept_vals = [m for c, m in zip(order, clean) if c not in pruned]
    pruned_vals = [m for c, m in zip(order, clean) if c in pruned]
    ax2.hist([pruned_vals, kept_vals], bins=edges, stacked=True, color=[PRUNED, KEPT],
             label=["clean, pruned", "clean, kept"])
    if curve.triggered_means is not None:
        ax2.hist(curve.triggered_means, bins=edges, histtype="step", color=TRIGGERED, lw=1.5,
                 label="triggered")
    ax2.set_xlabel("mean activation")
    ax2.set_ylabel("channels")
    ax2.set_title("Histogram of channel means", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    return fig


def finetune_figure(history: TrainHistory, start_acc: float | None = None,
                    start_asr: float | None = None) -> Figure:
    """Validation accuracy (and ASR when measured) per fine-tuning epoch, best epoch marked.
    Epoch 0 is the model fine-tuning started from (after pruning, for fine-pruning)."""
    epochs = [r.epoch for r in history.epochs]
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120, layout="constrained")
    acc = [r.val_acc for r in history.epochs]
    asr = [r.asr for r in history.epochs]
    x_acc, y_acc = ([0] if start_acc is not None else []) + epochs, \
        ([start_acc] if start_acc is not None else []) + acc
    if all(v is not None for v in acc):
        ax.plot(x_acc, _pct(y_acc), "o-", color=CLEAN, lw=2, ms=4, label="clean accuracy (validation)")
    if all(v is not None for v in asr) and asr:
        x_asr = ([0] if start_asr is not None else []) + epochs
        y_asr = ([start_asr] if start_asr is not None else []) + asr
        ax.plot(x_asr, _pct(y_asr), "s-", color=ASR, lw=2, ms=4, label="attack success rate")
    if history.best_epoch is not None:
        # Epoch 0 is kept only when the defense's accuracy guard discarded every run (see api._finetune).
        ax.axvline(history.best_epoch, color="#444", ls="--", lw=1.2,
                   label="kept: epoch 0 (every run discarded by the accuracy guard)" if history.best_epoch == 0
                   else f"kept: epoch {history.best_epoch} (best validation accuracy)")
    loss_ax = ax.twinx()
    loss_ax.plot(epochs, [r.train_loss for r in history.epochs], color="#999", lw=1, ls=":",
                 label="training loss")
    loss_ax.set_ylabel("training loss", color="#777")
    loss_ax.tick_params(axis="y", colors="#777")
    ax.set_xlabel("fine-tuning epoch (0 = before fine-tuning)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    if len(epochs) <= 20:
        ax.set_xticks(([0] if start_acc is not None else []) + epochs)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    extra = loss_ax.get_legend_handles_labels()
    _legend_below(ax, 2, lines[0] + extra[0], lines[1] + extra[1])
    return fig
