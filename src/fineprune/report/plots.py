"""Figures: the pruning curve (clean accuracy and ASR against the fraction pruned)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..defense.sweep import SweepCurve  # noqa: E402
from ..runtime import atomic_path  # noqa: E402


def plot_pruning_curve(curve: SweepCurve, path: str | os.PathLike[str], stop_k: int | None = None,
                       title: str = "Pruning curve") -> None:
    """CA (and ASR when measured) vs fraction of channels pruned, with the stop point marked."""
    frac = curve.fractions()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(frac, [100 * a for a in curve.clean_acc], label="clean accuracy (validation)", color="#1f77b4", lw=2)
    if curve.asr is not None:
        ax.plot(frac, [100 * a for a in curve.asr], label="attack success rate", color="#d62728", lw=2)
    if stop_k is not None:
        ax.axvline(stop_k / curve.num_channels, color="#444", ls="--", lw=1.2,
                   label=f"stop: {stop_k}/{curve.num_channels} pruned")
    ax.set_xlabel(f"fraction of channels pruned ({curve.layer})")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
