"""DeepID-style face network (the paper's face model), sized for 64x56 grey crops on a CPU.

Shape as in the authors' released model: conv1 20@4x4 -> pool -> conv2 40@3x3 -> pool ->
conv3 60@3x3 -> ReLU -> pool -> conv4 80@2x2 -> ReLU; the classifier's hidden layer SUMS a linear
map of the flattened pooled conv3 map and one of the flattened conv4 map (DeepID's two-scale
feature), then ReLU, dropout and the output layer. The pruned layer is conv3's ReLU (declared as
`prune_layer`): its pooled output feeds both conv4 and the classifier, so the last conv layer
(conv4) is not the one whose channels carry every path to the output.

No BatchNorm by default, as in the authors' model: BN before the ReLU re-centres every channel on
its batch statistics, so no channel is dormant on clean data (measured: all 60 conv3 channels had
clean means 0.35-0.41, the mean of ReLU(N(0, 1)), and the pruning-aware attacker found 23
dormant channels instead of 46), which is the property pruning relies on. `batchnorm=True`
(`face-deepid-bn`) keeps the variant for comparison.
"""
from __future__ import annotations

import torch
from torch import nn


class PerImageStandardize(nn.Module):
    """(x - mean) / (std + eps) per image (N, C, H, W). Half the Yale B crops are lit from the side or barely
    lit at all; standardising lets the network see the face (and a trigger) in a dark crop.
    No parameters, so checkpoints do not depend on it; traces with torch.fx."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fixed (C, H, W) reduction dims, not x.dim(): torch.fx must trace this for the cached sweep.
        std, mean = torch.std_mean(x, dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _conv_block(cin: int, cout: int, k: int, batchnorm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    return layers


class DeepIDFace(nn.Module):
    """conv1..conv4 with a two-branch (summed) fully connected layer; prunes `relu3`."""

    prune_layer = "relu3"

    def __init__(
        self,
        num_classes: int = 38,
        in_channels: int = 1,
        image_size: tuple[int, int] = (64, 56),
        hidden: int = 160,
        dropout: float = 0.5,
        batchnorm: bool = False,
        standardize: bool = True,
    ) -> None:
        super().__init__()
        h, w = image_size
        # Spatial sizes after each valid conv / 2x2 floor pool (the DeepID layout).
        h1, w1 = (h - 3) // 2, (w - 3) // 2
        h2, w2 = (h1 - 2) // 2, (w1 - 2) // 2
        h3, w3 = (h2 - 2) // 2, (w2 - 2) // 2
        h4, w4 = h3 - 1, w3 - 1
        if min(h4, w4) < 1:
            raise ValueError(f"image size {image_size} is too small for DeepIDFace (needs about 32x32)")
        self.image_size = (h, w)
        self.standardize = PerImageStandardize() if standardize else nn.Identity()
        self.conv1 = nn.Sequential(*_conv_block(in_channels, 20, 4, batchnorm))
        self.relu1, self.pool1 = nn.ReLU(), nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(*_conv_block(20, 40, 3, batchnorm))
        self.relu2, self.pool2 = nn.ReLU(), nn.MaxPool2d(2)
        self.conv3 = nn.Sequential(*_conv_block(40, 60, 3, batchnorm))
        self.relu3, self.pool3 = nn.ReLU(), nn.MaxPool2d(2)
        self.conv4 = nn.Sequential(*_conv_block(60, 80, 2, batchnorm))
        self.relu4 = nn.ReLU()
        self.fc_a = nn.Linear(60 * h3 * w3, hidden)
        self.fc_b = nn.Linear(80 * h4 * w4, hidden)
        self.relu_fc = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        p3 = self.pool3(self.relu3(self.conv3(x)))
        c4 = self.relu4(self.conv4(p3))
        hidden = self.relu_fc(self.fc_a(p3.flatten(1)) + self.fc_b(c4.flatten(1)))
        return self.classifier(self.dropout(hidden))
