"""Stickers on traffic signs (BadNets): a yellow square, or a flower / bomb shaped sticker.

Sizes and positions are fractions of the image, so one trigger fits any resolution. GTSRB crops
show the sign over most of the frame with a small margin, so the default centre (row 0.70,
column 0.50) puts the sticker on the lower part of the sign, where BadNets stuck it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .triggers import PatchTrigger, Trigger

YELLOW = (1.0, 0.85, 0.0)
SHAPES = ("square", "flower", "bomb")


def _disc(n: int, cy: float, cx: float, radius: float) -> torch.Tensor:
    """(n, n) bool disc in pixel units (pixel centres at i + 0.5)."""
    r = torch.arange(n, dtype=torch.float32).view(-1, 1) + 0.5
    c = torch.arange(n, dtype=torch.float32).view(1, -1) + 0.5
    return (r - cy) ** 2 + (c - cx) ** 2 <= radius**2


def shape_pattern(shape: str, side: int, color: tuple[float, ...] = YELLOW) -> torch.Tensor:
    """(3, side, side) sticker image; NaN marks transparent pixels (see PatchTrigger.pattern).

    square: solid `color`. flower: five `color` petals around a brown-orange centre.
    bomb: a black ball, a grey fuse and an orange spark at its tip.
    """
    if shape not in SHAPES:
        raise ValueError(f"sticker shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    if side < 1:
        raise ValueError("sticker side must be at least one pixel")
    out = torch.full((3, side, side), float("nan"))

    def paint(mask: torch.Tensor, rgb: tuple[float, ...]) -> None:
        out[:, mask] = torch.tensor(rgb, dtype=torch.float32).view(3, 1)

    if shape == "square":
        out[:] = torch.tensor(color, dtype=torch.float32).view(3, 1, 1)
        return out
    mid = side / 2
    if shape == "flower":
        petal_r, ring = side * 0.2, side * 0.29
        for k in range(5):
            a = 2 * math.pi * k / 5 - math.pi / 2
            paint(_disc(side, mid + ring * math.sin(a), mid + ring * math.cos(a), petal_r), color)
        paint(_disc(side, mid, mid, side * 0.17), (0.8, 0.35, 0.0))
        return out
    # bomb: ball in the lower left, fuse up to the right, spark at the tip
    ball_c, ball_r = (side * 0.6, side * 0.42), side * 0.36
    paint(_disc(side, *ball_c, ball_r), (0.0, 0.0, 0.0))
    for t in torch.linspace(0, 1, max(2, side)):
        r, c = ball_c[0] - ball_r - t * side * 0.1, ball_c[1] + ball_r * 0.5 + t * side * 0.2
        ri, ci = min(side - 1, max(0, int(r))), min(side - 1, max(0, int(c)))
        paint(_disc(side, ri + 0.5, ci + 0.5, 0.5), (0.5, 0.5, 0.5))
    paint(_disc(side, side * 0.12, side * 0.85, max(side * 0.12, 0.75)), (1.0, 0.5, 0.0))
    return out


@dataclass
class StickerTrigger(Trigger):
    """A sticker of side `size` (fraction of the image side, rounded, at least 1 px), centred at
    `center` (row, column fractions).

    Defaults: a yellow square 0.15 of the side (5 px on 32x32 GTSRB, about a fifth of the sign's
    width), centred on the lower part of the sign. For "flower" and "bomb" use about 0.25: smaller
    shapes blur into a blob.
    """

    size: float = 0.15
    center: tuple[float, float] = (0.70, 0.50)
    shape: str = "square"
    color: tuple[float, ...] = YELLOW
    name: str = "sticker"
    _patches: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"sticker shape must be one of {', '.join(SHAPES)}, not {self.shape!r}")
        if not 0 < self.size <= 1:
            raise ValueError(f"sticker size is a fraction of the image side in (0, 1], got {self.size}")

    def patch(self, height: int, width: int) -> PatchTrigger:
        """The pixel-level PatchTrigger this sticker becomes on a height x width image."""
        key = (height, width)
        if key not in self._patches:
            side = max(1, round(self.size * min(height, width)))
            top = round(self.center[0] * height - side / 2)
            left = round(self.center[1] * width - side / 2)
            top, left = min(max(top, 0), height - side), min(max(left, 0), width - side)
            self._patches[key] = PatchTrigger(size=(side, side), position=(top, left),
                                              pattern=shape_pattern(self.shape, side, self.color),
                                              name=self.name)
        return self._patches[key]

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        return self.patch(height, width).region(height, width)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"StickerTrigger expects images (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != 3 and len(self.color) == 3:
            raise ValueError(f"a coloured sticker needs RGB images, got {x.shape[1]} channel(s)")
        return self.patch(x.shape[2], x.shape[3]).apply(x)

    def describe(self) -> dict:
        return {"name": self.name, "shape": self.shape, "size": self.size, "center": list(self.center),
                "color": list(self.color)}
