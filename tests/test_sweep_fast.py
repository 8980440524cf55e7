"""The incremental (frontier) sweep, the cached prefix and the `max_cache_mb` streaming must give
exactly the full protocol's counts for every k, including on exact ties and non-finite values."""
import pytest
import torch
from conftest import assert_same_curve, labels_near_model
from torch import nn

from fineprune.defense.cut import cut_at
from fineprune.defense.head_plan import plan_head
from fineprune.defense.layer import find_prune_layer
from fineprune.defense.sweep import cached_sweep, full_sweep
from fineprune.evaluation.metrics import TriggeredSet
from fineprune.models.face import DeepIDFace
from fineprune.models.small import AudioCNN1d, SmallCNN
from fineprune.models.traffic import TrafficVGG

CASES = [
    ("traffic", lambda: TrafficVGG(width=8), (3, 32, 32), 43, 32),
    ("face", lambda: DeepIDFace(), (1, 64, 56), 38, 16),
    ("audio", lambda: AudioCNN1d(), (1, 2000), 10, 40),
]


@pytest.mark.parametrize("name,build,shape,classes,n", CASES, ids=[c[0] for c in CASES])
def test_fast_path_equals_full_every_k(name, build, shape, classes, n):
    torch.manual_seed(3)
    m = build().eval()
    x = torch.rand(n, *shape)
    y = labels_near_model(m, x, classes)
    trig = TriggeredSet(x[: n // 2].clone(), y[: n // 2], (y[: n // 2] + 1) % classes)
    layer = find_prune_layer(m, x[:2]).name
    assert plan_head(cut_at(m, layer)).fast is not None  # the incremental path is what is tested
    a = cached_sweep(m, layer, x, y, trig, batch_size=32)
    assert a.extra["fast_path"]
    b = full_sweep(m, layer, x, y, trig, batch_size=32)
    assert_same_curve(a, b)
    exact = cached_sweep(m, layer, x, y, trig, batch_size=32, fast=False)
    assert_same_curve(exact, b)


def test_streaming_under_max_cache_equals_unbounded():
    torch.manual_seed(4)
    m = SmallCNN().eval()
    x = torch.rand(200, 1, 28, 28)
    y = labels_near_model(m, x)
    trig = TriggeredSet(x[:90].clone(), y[:90], (y[:90] + 1) % 10)
    a = cached_sweep(m, "features.7", x, y, trig, batch_size=32)
    per_sample_mb = 64 * 3 * 3 * 4 / 2**20  # the max-pooled cache of one input
    b = cached_sweep(m, "features.7", x, y, trig, batch_size=32, max_cache_mb=70 * per_sample_mb)
    assert b.extra["streamed_samples"] > 0 and b.extra["cache_mb"] <= 70 * per_sample_mb + 1e-9
    assert_same_curve(a, b)
    assert a.channel_means == b.channel_means and a.triggered_means == b.triggered_means


class _TiedHead(nn.Module):
    """Classes 0 and 1 have identical weights: their logits tie exactly for every input and k."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 4)
        with torch.no_grad():
            self.out.weight[1] = self.out.weight[0]
            self.out.bias[1] = self.out.bias[0]
            self.out.bias[0] += 10.0  # make the tied pair the winner
            self.out.bias[1] += 10.0

    def forward(self, x):
        return self.out(self.act(self.fc(self.relu(self.conv(x)).flatten(1))))


def test_exact_ties_are_recomputed_not_guessed():
    torch.manual_seed(5)
    m = _TiedHead().eval()
    x = torch.rand(40, 1, 8, 8)
    y = torch.randint(0, 2, (40,))
    a = cached_sweep(m, "relu", x, y)
    assert a.extra["fast_path"] and a.extra["recomputed"] > 0
    assert_same_curve(a, full_sweep(m, "relu", x, y))


class _InfChannel(nn.Module):
    """Channel 2 of the pruned tensor is +inf: unpruned, the logits are not finite."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6 * 6 * 6, 5)
        self.register_buffer("scale", torch.tensor([1.0, 1, float("inf"), 1, 1, 1]).view(1, 6, 1, 1))

    def forward(self, x):
        h = self.relu(self.conv(x) * self.scale + 1.0)
        return self.fc(h.flatten(1))


def test_non_finite_activations_match_full_passes():
    torch.manual_seed(6)
    m = _InfChannel().eval()
    x = torch.rand(30, 1, 8, 8)
    y = torch.randint(0, 5, (30,))
    assert_same_curve(cached_sweep(m, "relu", x, y), full_sweep(m, "relu", x, y))


def test_falls_back_to_exact_head_when_the_bound_certifies_little(monkeypatch):
    from fineprune.defense import error_bounds

    monkeypatch.setattr(error_bounds, "unit_roundoff", lambda dtype: 1e-2)  # a hopeless bound
    torch.manual_seed(7)
    m = SmallCNN().eval()
    x = torch.rand(64, 1, 28, 28)
    y = labels_near_model(m, x)
    a = cached_sweep(m, "features.7", x, y, budget_mb=0.5)  # small budget: many step chunks
    assert a.extra["fast_path"] and a.extra["recomputed"] < a.extra["evaluated"] / 3
    assert_same_curve(a, full_sweep(m, "features.7", x, y))


def test_streaming_sweep_killed_midway_resumes_to_the_same_curve(tmp_path, monkeypatch):
    from fineprune.defense import counting
    from fineprune.errors import BadInputError

    torch.manual_seed(5)
    m = SmallCNN().eval()
    x = torch.rand(300, 1, 28, 28)
    y = labels_near_model(m, x)
    trig = TriggeredSet(x[:120].clone(), y[:120], (y[:120] + 1) % 10)
    limit = 64 * 64 * 3 * 3 * 4 / 2**20  # 64 samples fit: the rest streams in groups of 64
    ref = cached_sweep(m, "features.7", x, y, trig, batch_size=32, max_cache_mb=limit)
    ckpt = tmp_path / "sweep.ckpt"

    real_add, calls = counting.Counter.add, {"n": 0}

    def dying_add(self, values, labels):
        calls["n"] += 1
        if calls["n"] == 5:  # the stored groups counted, then a few streamed ones: "SIGKILL"
            raise KeyboardInterrupt
        return real_add(self, values, labels)

    monkeypatch.setattr(counting.Counter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        cached_sweep(m, "features.7", x, y, trig, batch_size=32, max_cache_mb=limit, checkpoint_path=ckpt)
    monkeypatch.setattr(counting.Counter, "add", real_add)
    state = torch.load(ckpt, weights_only=True)
    assert 0 < sum(state["done"]) < 300 + 120  # stopped mid-way, with progress saved

    res = cached_sweep(m, "features.7", x, y, trig, batch_size=32, max_cache_mb=limit, checkpoint_path=ckpt,
                       resume=True)
    assert res.extra["resumed"] and not ref.extra["resumed"]
    assert_same_curve(ref, res)
    assert ref.order == res.order and ref.channel_means == res.channel_means
    assert ref.triggered_means == pytest.approx(res.triggered_means, rel=1e-6)

    # A checkpoint of other data (or a damaged file) is refused, never silently used.
    with pytest.raises(BadInputError, match="different run"):
        cached_sweep(m, "features.7", x[:290], y[:290], trig, batch_size=32, max_cache_mb=limit,
                     checkpoint_path=ckpt, resume=True)
    ckpt.write_bytes(b"torn")
    with pytest.raises(BadInputError, match="cannot resume"):
        cached_sweep(m, "features.7", x, y, trig, batch_size=32, max_cache_mb=limit, checkpoint_path=ckpt,
                     resume=True)
