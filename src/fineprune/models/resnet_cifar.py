"""CIFAR-style ResNet-20 (He et al. 2016, "Deep Residual Learning", section 4.2) for 32x32 inputs.

A 3x3 stem conv, then 3 stages of n = 3 basic blocks (two 3x3 convs with BatchNorm each) at
16 / 32 / 64 channels, the 2nd and 3rd stage halving the resolution in their first block; global
average pooling and one linear layer: 6n + 2 = 20 weight layers, 0.27M parameters (10 classes).

Shortcuts are the paper's **option A** (its CIFAR choice): identity, and where a stage changes
shape, the input subsampled by 2 and zero-padded with the extra channels, so no shortcut has
parameters (a 1x1 projection, option B, would add ~3k).

Fine-Pruning's "last convolutional layer" is the last stage's output, `layer3` (after the last
block's ReLU, which follows the residual add): `find_prune_layer` follows the last conv through
its BatchNorm, the in-place add and the ReLU, the outermost module that returns that tensor once
being the whole stage. Every block has its own ReLU modules, so each runs once per forward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PadShortcut(nn.Module):
    """Option A: subsample by `stride`, then zero-pad from `cin` to `cout` channels (no weights)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.before = (cout - cin) // 2
        self.after = cout - cin - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = (PadShortcut(cin, cout, stride) if stride != 1 or cin != cout
                                    else nn.Identity())
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)  # in place, as torchvision's blocks: the ReLU then reads bn2's tensor
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; `width` is the first stage's channels (16 in the paper)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 20, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(w, w, n, 1)
        self.layer2 = self._stage(w, 2 * w, n, 2)
        self.layer3 = self._stage(2 * w, 4 * w, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(cin, cout, stride), *(BasicBlock(cout, cout) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return CifarResNet(num_classes=num_classes, in_channels=in_channels, depth=20, width=width)
