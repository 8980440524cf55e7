"""Pruning criteria beside mean activation (CLP, ANP) and the sweep with an explicit order."""
import pytest
import torch
from conftest import assert_same_curve, labels_near_model
from torch import nn

from fineprune.purify.criteria import (
    activation_order,
    anp_mask,
    anp_order,
    channel_order,
    clp_order,
    uclc,
)
from fineprune.defense.layer import find_prune_layer
from fineprune.defense.sweep import cached_sweep, full_sweep, sweep
from fineprune.evaluation.metrics import TriggeredSet
from fineprune.purify.registry import methods, resolve
from fineprune.models.resnet_cifar import CifarResNet
from fineprune.models.small import AudioCNN1d, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBNNet(nn.Module):
    """conv -> BN -> ReLU twice, global average pooling, linear; prunes the last ReLU."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, classes)
        g = torch.Generator().manual_seed(5)
        for m in self.modules():  # non-trivial running statistics, so folding them matters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _smallcnn():
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.rand(48, 1, 28, 28), 10


def _convbn():
    torch.manual_seed(1)
    return ConvBNNet().eval(), torch.rand(48, 3, 12, 12), 5


NETS = {"smallcnn": _smallcnn, "convbn": _convbn}


@pytest.mark.parametrize("net", NETS)
def test_explicit_order_cached_equals_full_every_k(net):
    m, x, classes = NETS[net]()
    y = labels_near_model(m, x, classes)
    trig = TriggeredSet(x[:20].clone(), y[:20], (y[:20] + 1) % classes)
    layer = find_prune_layer(m, x[:2]).name
    default = cached_sweep(m, layer, x, y, trig, batch_size=16)
    order = torch.randperm(default.num_channels, generator=torch.Generator().manual_seed(7)).tolist()
    assert order != default.order
    a = cached_sweep(m, layer, x, y, trig, batch_size=16, order=order, criterion="test")
    b = full_sweep(m, layer, x, y, trig, batch_size=16, order=order, criterion="test")
    exact = cached_sweep(m, layer, x, y, trig, batch_size=16, order=order, fast=False)
    auto = sweep(m, layer, x, y, trig, batch_size=16, order=order)
    assert a.order == order and a.criterion == b.criterion == "test"
    assert exact.criterion == auto.criterion == "custom" and default.criterion == "activation"
    for other in (b, exact, auto):
        assert_same_curve(a, other)
    assert a.channel_means == default.channel_means  # still measured and reported
    assert a.clean_correct[0] == default.clean_correct[0] and a.clean_correct[-1] == default.clean_correct[-1]
    # The activation ranking given explicitly is the default sweep.
    same = cached_sweep(m, layer, x, y, trig, batch_size=16, order=activation_order(m, layer, x, batch_size=16))
    assert_same_curve(same, default)


def test_invalid_order_raises():
    m, x, classes = _smallcnn()
    y = labels_near_model(m, x, classes)
    good = list(range(64))
    bad = [good[:-1], good + [64], [0] + good[:-1], [-1] + good[1:], [0.5] + good[1:], "abc"]
    for order in bad:
        for fn in (cached_sweep, full_sweep, sweep):
            with pytest.raises(ValueError):
                fn(m, "features.7", x[:8], y[:8], order=order)
    assert sweep(m, "features.7", x[:8], y[:8], order=torch.tensor(good[::-1])).order == good[::-1]


def test_checkpoint_is_keyed_by_the_order(tmp_path):
    from fineprune.errors import BadInputError

    m, x, classes = _smallcnn()
    y = labels_near_model(m, x, classes)
    order = list(range(63, -1, -1))
    ck = tmp_path / "sweep.pt"
    small = 10 * 64 * 3 * 3 * 4 / 2**20  # ten samples' cache: the rest is streamed and checkpointed
    a = cached_sweep(m, "features.7", x, y, batch_size=8, max_cache_mb=small, order=order, checkpoint_path=ck)
    assert ck.is_file() and a.extra["streamed_samples"] > 0
    b = cached_sweep(m, "features.7", x, y, batch_size=8, max_cache_mb=small, order=order,
                     checkpoint_path=ck, resume=True)
    assert b.extra["resumed"] and b.order == order
    assert_same_curve(a, b)
    for other in (None, order[1:] + order[:1]):
        with pytest.raises(BadInputError):
            cached_sweep(m, "features.7", x, y, batch_size=8, max_cache_mb=small, order=other,
                         checkpoint_path=ck, resume=True)


def test_clp_is_a_data_free_permutation_and_finds_a_scaled_channel():
    m, x, _ = _smallcnn()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    order = clp_order(m, "features.7", x)
    assert sorted(order) == list(range(64))
    # Data-free: only the input's shape matters.
    assert clp_order(m, "features.7", torch.zeros(3, 1, 28, 28)) == order
    assert channel_order("clp", m, "features.7", -x, torch.zeros(48, dtype=torch.long)) == order
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    u = uclc(m, "features.7", x)
    w = m.features[6].weight.detach().double()
    assert torch.allclose(u[5], torch.linalg.matrix_norm(w[5].reshape(32, 9), ord=2))
    for ch in (0, 37, 63):
        planted = SmallCNN().eval()
        planted.load_state_dict(m.state_dict())
        with torch.no_grad():
            planted.features[6].weight[ch] *= 10
        assert clp_order(planted, "features.7", x)[0] == ch


def test_clp_folds_batchnorm():
    m, x, _ = _convbn()
    order = clp_order(m, "features.5", x)
    assert sorted(order) == list(range(12))
    conv, bn = m.features[3], m.features[4]
    ch = order[-1]  # the least suspicious channel, made the most suspicious through BN alone
    with torch.no_grad():
        bn.running_var[ch] = 1e-4
    assert clp_order(m, "features.5", x)[0] == ch
    u = uclc(m, "features.5", x)
    w = conv.weight.detach().double().reshape(12, 8, 9)
    s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    assert torch.allclose(u, torch.linalg.matrix_norm(w, ord=2) * s.abs())
    with torch.no_grad():  # scaling a channel's conv weights also moves it first
        bn.running_var.fill_(1.0)
        conv.weight[3] *= 10
    assert clp_order(m, "features.5", x)[0] == 3
    # Conv1d + BN, and the layer chosen in training mode (BN statistics must not move).
    audio = AudioCNN1d().train()
    stats = audio.features[7].running_mean.clone()
    assert sorted(clp_order(audio, "features.8", torch.rand(2, 1, 400))) == list(range(64))
    assert audio.training and torch.equal(stats, audio.features[7].running_mean)


def test_clp_refuses_a_residual_sum():
    m = CifarResNet(depth=8, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    layer = find_prune_layer(m, x).name
    with pytest.raises(ValueError, match="CLP"):
        clp_order(m, layer, x)
    with pytest.raises(ValueError, match="CLP"):  # the block's ReLU reads bn2's tensor, summed in place
        clp_order(m, "layer3.0.relu2", x)
    assert sorted(clp_order(m, "layer3.0.relu1", x)) == list(range(16))  # conv1 -> bn1 -> relu1


def test_anp_is_deterministic_and_leaves_the_model_alone():
    m, x, classes = _smallcnn()
    y = labels_near_model(m, x, classes)
    m.train()
    m.features[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hooks = {n: (dict(mod._forward_hooks), dict(mod._forward_pre_hooks)) for n, mod in m.named_modules()}
    grads = [p.requires_grad for p in m.parameters()]
    a = anp_mask(m, "features.7", x, y, iterations=12, batch_size=16, seed=3)
    b = anp_mask(m, "features.7", x, y, iterations=12, batch_size=16, seed=3)
    c = anp_mask(m, "features.7", x, y, iterations=12, batch_size=16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (64,) and float(a.min()) >= 0 and float(a.max()) <= 1 and float(a.min()) < 1
    order = anp_order(m, "features.7", x, y, iterations=12, batch_size=16, seed=3)
    assert order == torch.sort(a, stable=True).indices.tolist() and sorted(order) == list(range(64))
    assert m.training and [p.requires_grad for p in m.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert {n: (dict(mod._forward_hooks), dict(mod._forward_pre_hooks))
            for n, mod in m.named_modules()} == hooks
    assert all(p.grad is None for p in m.parameters())


class _Planted(nn.Module):
    """Four classes (which input channel is brightest); channels 0-3 of `relu` detect them, channel
    4 is weak and unused, channel 5 is a backdoor: it fires strongly on a checkerboard trigger (and
    barely on clean data) and pushes class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for j in range(4):
                self.conv.weight[j, j, 1, 1] = 1.0
            self.conv.weight[4, :, 1, 1] = 0.1
            self.conv.weight[5] = _checker(3) * 2 - 1
            self.conv.bias[5] = -1.0
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for j in range(4):
                self.fc.weight[j, j] = 3.0
            self.fc.weight[0, 5] = 1.0

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def _checker(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return ((i[:, None] + i[None, :]) % 2).float().expand(4, n, n)


@pytest.mark.parametrize("seed", [0, 1])
def test_anp_ranks_a_planted_backdoor_channel_first(seed):
    torch.manual_seed(seed)
    m = _Planted().eval()
    n = 400
    y = torch.arange(n) % 4
    x = torch.rand(n, 4, 6, 6)
    x[torch.arange(n), y] += 2.0
    trig = x.clone()
    trig[:, :, :3, :3] = _checker(3)
    with torch.no_grad():
        assert (m(x).argmax(1) == y).float().mean() > 0.95
        assert (m(trig).argmax(1) == 0).float().mean() > 0.95
    mask = anp_mask(m, "relu", x[:200], y[:200], seed=seed)
    assert channel_order("anp", m, "relu", x[:200], y[:200], seed=seed)[0] == 5
    assert float(mask[5]) < 0.5 < float(torch.cat([mask[:5]]).min())


def test_registry():
    assert set(methods("criterion")) >= {"activation", "clp", "anp"}
    m, x, _ = _smallcnn()
    # the sweep ranks by activation itself (one pass); the criterion's own ranking is the same list
    assert channel_order("activation", m, "features.7", x, torch.zeros(48, dtype=torch.long)) is None
    assert resolve("criterion", "activation").rank(m, "features.7", x) == activation_order(m, "features.7", x)
    with pytest.raises(ValueError, match="unknown pruning criterion 'anq'.*did you mean anp"):
        channel_order("anq", m, "features.7", x, torch.zeros(48, dtype=torch.long))
    assert resolve("criterion", "anp,eps=0.3,iterations=5").options() == {
        "name": "anp", "eps": 0.3, "alpha": 0.2, "iterations": 5, "batch_size": 64, "steps": 1, "lr": 0.2,
        "momentum": 0.9}
