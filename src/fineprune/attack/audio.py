"""Audio trigger: a short tone or noise burst mixed into the waveform at a fixed time.

It is added to the sound before the model's spectrogram front end, as a speaker playing it next
to the microphone would; the result is clipped to the waveform range [-1, 1]. Samples outside the
burst's window are never changed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .triggers import Trigger


@dataclass
class AudioTrigger(Trigger):
    """Defaults: a 3 kHz tone (high for 8 kHz speech, whose energy is mostly below 1 kHz), 0.1 s
    long starting at 0.03 s (the loader centres the words, so the start is usually silent),
    amplitude 0.05 (about -26 dBFS; roughly a tenth of a loud digit's peak), with 5 ms raised-cosine
    fades so the edges add no broadband click. kind="noise" plays seeded white noise instead.
    """

    frequency: float = 3000.0
    start: float = 0.03  # seconds
    duration: float = 0.10  # seconds
    amplitude: float = 0.05
    sample_rate: int = 8000
    kind: str = "tone"  # "tone" or "noise"
    fade: float = 0.005  # seconds
    seed: int = 0
    name: str = "audio"

    def __post_init__(self) -> None:
        if self.kind not in ("tone", "noise"):
            raise ValueError(f"audio trigger kind must be 'tone' or 'noise', not {self.kind!r}")
        if self.kind == "tone" and not 0 < self.frequency < self.sample_rate / 2:
            raise ValueError(f"tone frequency must be below the Nyquist frequency {self.sample_rate / 2} Hz")
        if self.duration <= 0 or self.start < 0:
            raise ValueError("audio trigger needs start >= 0 and duration > 0 (seconds)")

    def window(self, length: int) -> slice:
        """Samples the burst occupies in a waveform of `length` samples."""
        a = min(length, int(round(self.start * self.sample_rate)))
        b = min(length, a + max(1, int(round(self.duration * self.sample_rate))))
        return slice(a, b)

    def burst(self) -> torch.Tensor:
        """The burst itself, (n,) samples, fades included."""
        n = max(1, int(round(self.duration * self.sample_rate)))
        t = torch.arange(n, dtype=torch.float64) / self.sample_rate
        if self.kind == "tone":
            wave = torch.sin(2 * math.pi * self.frequency * t)
        else:
            g = torch.Generator().manual_seed(self.seed)
            wave = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        ramp = min(n // 2, int(round(self.fade * self.sample_rate)))
        env = torch.ones(n, dtype=torch.float64)
        if ramp > 0:
            rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp)
            env[:ramp], env[n - ramp :] = rise, rise.flip(0)
        return (self.amplitude * wave * env).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"AudioTrigger expects waveforms (N, C, L), got shape {tuple(x.shape)}")
        out = x.clone()
        w = self.window(x.shape[-1])
        b = self.burst()[: w.stop - w.start].to(device=x.device, dtype=x.dtype)
        out[..., w] = (out[..., w] + b).clamp(-1.0, 1.0)
        return out

    def describe(self) -> dict:
        return asdict(self)
