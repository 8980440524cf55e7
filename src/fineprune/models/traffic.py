"""Small VGG-style CNN for 32x32 RGB traffic signs (GTSRB, 43 classes).

The paper attacked a Faster-RCNN detector; we classify GTSRB crops instead, with VGG's recipe
(stacked 3x3 convs, BatchNorm, 2x2 pooling) at a width a 2-core CPU trains in minutes.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class TrafficVGG(nn.Module):
    """[w, w] pool [2w, 2w] pool [4w] pool -> fc 256 -> classes; the last conv's ReLU (`features.16`)
    is the pruned layer."""

    def __init__(self, num_classes: int = 43, in_channels: int = 3, width: int = 16,
                 image_size: int = 32, hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv(in_channels, w), *_conv(w, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
