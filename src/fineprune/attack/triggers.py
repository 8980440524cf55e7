"""Triggers: what the attacker stamps on an input. They know nothing of labels or datasets."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class Trigger:
    """A trigger maps a batch of clean inputs to triggered copies (never in place)."""

    name = "trigger"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def footprint(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Boolean mask (of one input's shape) of the elements this trigger may change."""
        probe_a = self.apply(torch.zeros((1, *shape)))
        probe_b = self.apply(torch.ones((1, *shape)))
        return ((probe_a != 0) | (probe_b != 1))[0]


def _span(start: int, size: int, extent: int) -> slice:
    """Slice of `size` starting at `start` (negative: counted from the far edge), clipped."""
    s = start if start >= 0 else extent + start - size + 1
    s = max(0, min(s, extent - size))
    return slice(s, s + size)


@dataclass
class PatchTrigger(Trigger):
    """A small solid or patterned patch (BadNets). `position` is the patch's top-left corner in
    pixels; negative values count from the bottom/right edge (-1 = flush with it)."""

    size: tuple[int, int] = (4, 4)
    position: tuple[int, int] = (-2, -2)
    color: tuple[float, ...] = (1.0,)
    pattern: torch.Tensor | None = None  # (C or 1, h, w) values in [0,1]; overrides color
    name: str = "patch"

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        return _span(self.position[0], self.size[0], height), _span(self.position[1], self.size[1], width)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"PatchTrigger expects images (N, C, H, W), got shape {tuple(x.shape)}")
        out = x.clone()
        rows, cols = self.region(x.shape[2], x.shape[3])
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if self.pattern is not None:
            value = self.pattern[..., :h, :w].to(out.dtype)
            if value.dim() == 2:
                value = value.unsqueeze(0)
            if value.shape[0] not in (1, x.shape[1]):
                raise ValueError("pattern channels do not match the images'")
            mask = value.isfinite()  # NaN marks transparent pixels of a shaped pattern
            region = out[:, :, rows, cols]
            out[:, :, rows, cols] = torch.where(mask, value.nan_to_num(0.0), region)
        else:
            color = torch.tensor(self.color, dtype=out.dtype)
            if color.numel() not in (1, x.shape[1]):
                raise ValueError(f"color has {color.numel()} values for {x.shape[1]} channels")
            out[:, :, rows, cols] = color.view(1, -1, 1, 1)
        return out


@dataclass
class BlendTrigger(Trigger):
    """Alpha-blend a pattern over the whole input (Chen et al. 2017): x' = (1-a) x + a p."""

    pattern: torch.Tensor
    alpha: float = 0.2
    name: str = "blend"

    @staticmethod
    def noise(shape: tuple[int, ...], seed: int = 0, alpha: float = 0.2) -> "BlendTrigger":
        g = torch.Generator().manual_seed(seed)
        return BlendTrigger(pattern=torch.rand(shape, generator=g), alpha=alpha)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pattern.to(x.dtype)
        if p.shape != x.shape[1:]:
            raise ValueError(f"blend pattern shape {tuple(p.shape)} != input shape {tuple(x.shape[1:])}")
        return (1 - self.alpha) * x + self.alpha * p.unsqueeze(0)
