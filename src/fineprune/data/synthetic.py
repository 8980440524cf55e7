"""Stand-in inputs shaped like each task's data, for trigger previews without a dataset.

They only need to look like the real thing well enough to show where a trigger goes: a lit oval
"face", a red octagonal "sign", a voiced "word" (harmonics under a smooth envelope).
"""
from __future__ import annotations

import math

import torch


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    c = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    return r.view(-1, 1).expand(h, w), c.view(1, -1).expand(h, w)


def synthetic_faces(n: int, size: tuple[int, int] = (64, 56), seed: int = 0) -> torch.Tensor:
    """(n, 1, H, W) grey ovals with darker eyes and mouth, lit from a random side."""
    g = torch.Generator().manual_seed(seed)
    r, c = _grid(*size)
    out = []
    for _ in range(n):
        side = float(torch.rand(1, generator=g)) * 2 - 1
        light = 0.55 + 0.35 * side * (c - 0.5) * 2
        face = (((r - 0.5) / 0.55) ** 2 + ((c - 0.5) / 0.45) ** 2 <= 1).float()
        img = 0.08 + face * light * (0.8 + 0.2 * torch.rand(size, generator=g))
        for cc in (0.3, 0.7):
            img = torch.where(((r - 0.3) / 0.05) ** 2 + ((c - cc) / 0.09) ** 2 <= 1, img * 0.4, img)
        img = torch.where(((r - 0.78) / 0.04) ** 2 + ((c - 0.5) / 0.15) ** 2 <= 1, img * 0.5, img)
        out.append(img.clamp(0, 1))
    return torch.stack(out).unsqueeze(1)


def synthetic_signs(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) red octagons with a white band on a random background."""
    g = torch.Generator().manual_seed(seed)
    r, c = _grid(size, size)
    dy, dx = (r - 0.5).abs(), (c - 0.5).abs()
    octagon = (dy <= 0.4) & (dx <= 0.4) & (dy + dx <= 0.4 * (2 - math.sqrt(2)) + 0.4 * (math.sqrt(2) - 1) + 0.17)
    band = (dy <= 0.07) & (dx <= 0.28)
    out = []
    for _ in range(n):
        bg = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2
        img = bg.expand(3, size, size).clone()
        img[:, octagon] = torch.tensor([0.75, 0.08, 0.1]).view(3, 1)
        img[:, band & octagon] = 0.95
        out.append((img + 0.03 * torch.randn(3, size, size, generator=g)).clamp(0, 1))
    return torch.stack(out)


def synthetic_words(n: int, length: int = 8192, sample_rate: int = 8000, seed: int = 0) -> torch.Tensor:
    """(n, 1, length) voiced sounds: harmonics of a random pitch under a smooth mid-window envelope."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32) / sample_rate
    dur = length / sample_rate
    out = []
    for _ in range(n):
        f0 = 100 + 120 * float(torch.rand(1, generator=g))
        env = torch.exp(-(((t - dur / 2) / (0.12 * dur)) ** 2))
        wave = sum(torch.sin(2 * math.pi * f0 * k * t) / k for k in range(1, 8))
        out.append(0.3 * env * wave / 2.6 + 0.002 * torch.randn(length, generator=g))
    return torch.stack(out).unsqueeze(1).clamp(-1, 1)
