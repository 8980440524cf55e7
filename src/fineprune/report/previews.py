"""PNG previews of a trigger: a few clean inputs above their triggered copies, so a person can
see what the attacker stamps (images) or hears (audio, shown as log spectrograms)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..attack.triggers import Trigger  # noqa: E402
from ..runtime import atomic_path  # noqa: E402


def _image(ax, x: torch.Tensor) -> None:
    x = x.detach().float().clamp(0, 1).cpu()
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(x[:3].permute(1, 2, 0).numpy(), interpolation="nearest")


def plot_trigger_preview(
    clean: torch.Tensor,
    trigger: Trigger,
    path: str | os.PathLike[str],
    *,
    input_kind: str = "image",
    spectrogram: torch.nn.Module | None = None,
    labels: list[str] | None = None,
    title: str | None = None,
) -> None:
    """Write a 2-row grid (clean, triggered) for up to 8 inputs of `clean`.

    Audio inputs (N, 1, L) are drawn as spectrograms made by `spectrogram` (a module mapping the
    waveforms to (N, 1, F, T)), with clean and triggered on one colour scale per column.
    """
    clean = clean[:8]
    triggered = trigger.apply(clean)
    n = clean.shape[0]
    if n == 0:
        raise ValueError("need at least one input to preview")
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n + 0.6, 4.2), dpi=110, squeeze=False)
    if input_kind == "audio":
        if spectrogram is None:
            raise ValueError("audio previews need a spectrogram module")
        with torch.no_grad():
            specs = spectrogram(torch.cat([clean, triggered]).float().cpu())[:, 0]
        for j in range(n):
            hi = float(torch.maximum(specs[j].max(), specs[n + j].max()))
            for i in range(2):
                axes[i, j].imshow(specs[i * n + j].numpy(), origin="lower", aspect="auto", cmap="magma",
                                  vmin=0, vmax=hi)
    else:
        for j in range(n):
            _image(axes[0, j], clean[j])
            _image(axes[1, j], triggered[j])
    for j in range(n):
        for i in range(2):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        if labels is not None and j < len(labels):
            axes[0, j].set_title(labels[j], fontsize=8)
    axes[0, 0].set_ylabel("clean")
    axes[1, 0].set_ylabel("triggered")
    if input_kind == "audio":
        axes[1, 0].set_xlabel("time")
        axes[1, 0].set_ylabel("triggered\nfrequency")
    fig.suptitle(title or f"trigger: {trigger.name}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
