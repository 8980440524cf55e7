"""Sunglasses trigger for aligned face crops (the paper's face attack, after Chen et al. 2017).

Two dark elliptical lenses joined by a bridge, drawn over the eye band. The Yale B crops are
aligned, so the eyes sit at the same fractions of the image in every crop and the shape is defined
in fractions: it fits any resize. Everything drawn is clipped to the eye band, so the trigger never
touches pixels outside it (tests check this).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..data.faces import EYE_BAND, EYE_CENTER_COLS, EYE_CENTER_ROW
from .triggers import Trigger


@dataclass
class SunglassesTrigger(Trigger):
    """Defaults match the faces loader's measured eye positions (pupils at row 0.23, columns 0.18
    and 0.80; band 0.17-0.31 of the height).

    lens_height / lens_width: the lens ellipse's full size as fractions of the image height / width
    (0.13 x 0.30: each lens covers an eye and its lid). bridge: thickness of the bridge as a fraction
    of the height. value: grey level of the glasses (0 = black). opacity: 1 paints the glasses
    solid; below 1 blends them (x' = (1-a) x + a value), a fainter, less visible trigger.
    """

    eye_band: tuple[float, float] = EYE_BAND
    center_row: float = EYE_CENTER_ROW
    center_cols: tuple[float, float] = EYE_CENTER_COLS
    lens_height: float = 0.13
    lens_width: float = 0.30
    bridge: float = 0.04
    value: float = 0.0
    opacity: float = 1.0
    name: str = "sunglasses"

    @classmethod
    def from_info(cls, info: dict, **overrides) -> "SunglassesTrigger":
        """Use the eye band a loader recorded in `TaskData.info` (falls back to the defaults)."""
        kw: dict = {}
        if "eye_band" in info:
            kw["eye_band"] = tuple(float(v) for v in info["eye_band"])
        if "eye_center_row" in info:
            kw["center_row"] = float(info["eye_center_row"])
        if "eye_center_cols" in info:
            kw["center_cols"] = tuple(float(v) for v in info["eye_center_cols"])
        kw.update(overrides)
        return cls(**kw)

    def band_rows(self, height: int) -> slice:
        """Rows of the eye band (the same rounding the faces loader records in `eye_band_rows`)."""
        top = int(torch.floor(torch.tensor(self.eye_band[0] * height)))
        bottom = int(torch.ceil(torch.tensor(self.eye_band[1] * height)))
        return slice(max(0, top), min(height, bottom))

    def mask(self, height: int, width: int) -> torch.Tensor:
        """(H, W) bool: the pixels the glasses cover."""
        rows = (torch.arange(height, dtype=torch.float32) + 0.5) / height
        cols = (torch.arange(width, dtype=torch.float32) + 0.5) / width
        r, c = rows.view(-1, 1), cols.view(1, -1)
        ry, rx = self.lens_height / 2, self.lens_width / 2
        lenses = torch.zeros(height, width, dtype=torch.bool)
        for cc in self.center_cols:
            lenses |= ((r - self.center_row) / ry) ** 2 + ((c - cc) / rx) ** 2 <= 1.0
        left, right = min(self.center_cols), max(self.center_cols)
        # At least one pixel row thick at any size, so the lenses stay joined.
        half = max(self.bridge / 2, 0.5 / height)
        bridge = ((r - self.center_row).abs() <= half) & (c >= left) & (c <= right)
        band = torch.zeros(height, 1, dtype=torch.bool)
        band[self.band_rows(height)] = True
        return (lenses | bridge) & band

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SunglassesTrigger expects images (N, C, H, W), got shape {tuple(x.shape)}")
        m = self.mask(x.shape[2], x.shape[3]).to(x.device)
        painted = (1 - self.opacity) * x + self.opacity * self.value
        return torch.where(m, painted, x)

    def describe(self) -> dict:
        return asdict(self)
