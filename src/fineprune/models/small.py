"""Small CPU-sized networks for the demo and tests: a plain image CNN and a Conv1d audio model."""
from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Three conv layers (ReLU after each), max-pooling, then two fully connected layers.
    The pruned layer is the ReLU after conv3 (`features.7`)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 image_size: int = 28) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class AudioCNN1d(nn.Module):
    """A Conv1d network over raw or framed audio (N, C, L); global average pooling, then a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, w, 9, stride=4, padding=4), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Conv1d(w, 2 * w, 5, stride=2, padding=2), nn.BatchNorm1d(2 * w), nn.ReLU(),
            nn.Conv1d(2 * w, 4 * w, 5, stride=2, padding=2), nn.BatchNorm1d(4 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
