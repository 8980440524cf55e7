import torch
import torchvision
from conftest import assert_same_curve, labels_near_model
from torch import nn

from fineprune.defense.cut import cut_at
from fineprune.defense.sweep import cached_sweep, full_sweep, sweep
from fineprune.evaluation.metrics import TriggeredSet
from fineprune.models.small import SmallCNN


def test_cut_reproduces_forward_resnet18():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    cut = cut_at(m, "layer4")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(cut.head(*cut.pre(x)), m(x), atol=1e-6)


def test_cached_equals_full_plain_cnn():
    torch.manual_seed(1)
    m = SmallCNN().eval()
    x = torch.rand(96, 1, 28, 28)
    y = labels_near_model(m, x)
    trig = TriggeredSet(x[:40].clone(), y[:40], (y[:40] + 1) % 10)
    a = cached_sweep(m, "features.7", x, y, trig)
    b = full_sweep(m, "features.7", x, y, trig)
    assert_same_curve(a, b)
    assert len(set(a.clean_correct)) > 3  # the curve really moves
    assert torch.allclose(torch.tensor(a.channel_means), torch.tensor(b.channel_means), atol=1e-6)


def test_cached_equals_full_resnet18_every_k():
    torch.manual_seed(2)
    m = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(12, 3, 32, 32)
    y = labels_near_model(m, x)
    a = cached_sweep(m, "layer4", x, y)
    b = full_sweep(m, "layer4", x, y, batch_size=12)
    assert len(a.clean_correct) == 513
    assert a.clean_correct == b.clean_correct
    # every channel of layer4 pruned: the head sees zeros, so every sample gets argmax(fc.bias)
    assert a.clean_correct[-1] == int((y == m.fc.bias.argmax()).sum())
    assert len(set(a.clean_correct)) > 1  # the curve really moves


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.relu(self.conv(x))
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            h = h * 1.0
        return self.fc(h.mean(dim=(2, 3)))


def test_untraceable_model_falls_back_to_full_passes():
    torch.manual_seed(0)
    m = _Untraceable().eval()
    x = torch.rand(10, 1, 8, 8)
    y = torch.randint(0, 10, (10,))
    curve = sweep(m, "relu", x, y)
    assert curve.mode == "full" and len(curve.clean_correct) == 5
