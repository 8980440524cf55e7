"""Log-magnitude spectrogram as the first layer of the speech model.

Keeping the front end inside the model means the model consumes raw waveforms, so audio triggers
are mixed into the waveform (as an attacker would play them) and every tool sees one input format.
It has no parameters, only a non-persistent window buffer: checkpoints stay free of it and it
follows `.to(device)`. It traces with torch.fx (needed by the pruning code's graph analysis).
"""
from __future__ import annotations

import torch
from torch import nn


class LogSpectrogram(nn.Module):
    """(N, C, L) waveform -> (N, C, n_fft // 2 + 1, L // hop_length + 1) log1p STFT magnitude.

    log1p rather than log(x + eps): it is 0 for silence (the zero padding) instead of a large
    negative constant, and still compresses the dynamic range like a log.
    """

    def __init__(self, n_fft: int = 256, hop_length: int = 64) -> None:
        super().__init__()
        if n_fft < 2 or hop_length < 1:
            raise ValueError(f"need n_fft >= 2 and hop_length >= 1, got {n_fft}, {hop_length}")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(0, 1)  # stft takes (batch, L); fold channels into the batch
        spec = torch.stft(
            flat,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        return torch.log1p(spec.abs()).unflatten(0, x.shape[:2])

    def output_shape(self, length: int) -> tuple[int, int]:
        """(frequency bins, frames) for a waveform of `length` samples (to size the next layer)."""
        return self.n_fft // 2 + 1, length // self.hop_length + 1

    def extra_repr(self) -> str:
        return f"n_fft={self.n_fft}, hop_length={self.hop_length}"
