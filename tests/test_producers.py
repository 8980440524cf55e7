"""`layer.producer_calls`: the one walk from a layer back to the module that makes its channels,
used by layer choice, CLP, the compact export and bake."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fineprune.defense.bake import bake_masks
from fineprune.defense.layer import PRODUCER_LINKS, anchor_of, producer_calls, trace_calls
from fineprune.defense.mask import CHANNEL_DIM_ATTR, set_pruned
from fineprune.purify.criteria import _producer

pytestmark = pytest.mark.usefixtures("one_thread")


def chain(model: nn.Module, x: torch.Tensor, layer: str, dim: int = 1) -> list[str]:
    calls = trace_calls(model, x)
    out = next(c.output for c in calls if c.name == layer)
    return [c.name for c in producer_calls(calls, out, *PRODUCER_LINKS[dim])]


def test_conv_bn_relu_chain_and_anchor():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(36, 2)).eval()
    x = torch.rand(1, 1, 8, 8)
    assert chain(model, x, "3") == ["0", "1", "2", "3"]
    assert anchor_of(model, "3", x, 4) == "1"  # the BatchNorm's affine parameters make the channels


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Dropout(), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def test_linear_gelu_hidden_units():
    model = Mlp().eval()
    x = torch.rand(1, 5, 8)  # (batch, tokens, features)
    assert chain(model, x, "drop", dim=-1) == ["fc1", "act", "drop"]
    setattr(model.act, CHANNEL_DIM_ATTR, -1)
    assert anchor_of(model, "act", x, 16) == "fc1"


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)) + x)


def test_residual_sum_ends_the_chain_and_clp_refuses():
    model = Residual().eval()
    x = torch.rand(1, 4, 6, 6)
    assert chain(model, x, "relu") == ["relu"]  # the sum is no module: no conv is reached
    with pytest.raises(ValueError, match="cannot find the conv producing 'relu'"):
        _producer(model, "relu", x)
    assert anchor_of(model, "relu", x, 4) == "bn"  # the exports fall back to the last such module run


class Parallel(nn.Module):
    """A second branch runs between the producer and the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.relu, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.b1(self.c1(x))
        b = self.c2(x)
        return self.fc((self.relu(a) + b).mean((2, 3)))


def test_anchor_follows_the_data_not_the_call_order():
    torch.manual_seed(0)
    model = Parallel().eval()
    x = torch.rand(1, 1, 6, 6)
    assert anchor_of(model, "relu", x, 4) == "b1"  # c2 ran later but does not feed the layer
    set_pruned(model, "relu", [1, 2], 4)
    res = bake_masks(model, x)
    assert res.baked and res.anchors == {"relu": "b1"}, res.note
