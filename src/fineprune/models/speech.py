"""AlexNet-style spectrogram CNN for spoken digits (the paper's speech model, CPU-sized).

The first module is `LogSpectrogram`, so the model reads raw waveforms (N, 1, L): an audio trigger
is mixed into the sound, as an attacker would play it, and every tool sees one input format.
Five conv layers (the fifth is the pruned one, as in the paper), then fc -> 128 -> classes.
"""
from __future__ import annotations

import torch
from torch import nn

from .spectrogram import LogSpectrogram


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SpeechAlexNet(nn.Module):
    """Waveform -> log spectrogram -> 5 conv layers -> 4x4 pooled map -> 128 -> classes.

    `features` holds the convs; its last ReLU (`features.16`) is the pruned layer, found
    automatically as the last conv's ReLU. `width` scales every conv. Defaults (width 24, hop 128:
    129 frequencies x 65 frames for 8192 samples) were chosen on validation data: as accurate as
    width 32 / hop 64 and about three times cheaper to train.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 24,
        n_fft: int = 256,
        hop_length: int = 128,
        hidden: int = 128,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        w = width
        self.spectrogram = LogSpectrogram(n_fft=n_fft, hop_length=hop_length)
        # Spectrogram magnitudes depend on recording level; BN on the single input channel learns
        # one scale/shift for all inputs (no per-input normalisation that could hide a trigger).
        self.input_norm = nn.BatchNorm2d(in_channels)
        self.features = nn.Sequential(
            *_conv(in_channels, w, 5, stride=2), nn.MaxPool2d(2),
            *_conv(w, 2 * w, 3), nn.MaxPool2d(2),
            *_conv(2 * w, 3 * w, 3),
            *_conv(3 * w, 3 * w, 3),
            *_conv(3 * w, 2 * w, 3), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * 16, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(self.input_norm(self.spectrogram(x)))))
