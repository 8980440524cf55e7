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


class _TokenNet(nn.Module):
    """A one-block token MLP on (B, T, 6) inputs: tokens mix before the cut, the pruned layer is
    the MLP's hidden units (channels last), and `pool` chooses how the head reads the tokens."""

    def __init__(self, pool: str, tokens: int = 7, dim: int = 16, hidden: int = 24, classes: int = 5):
        super().__init__()
        self.pool = pool
        self.embed = nn.Linear(6, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        t = self.embed(x)
        t = t + t.mean(1, keepdim=True)  # before the cut: may mix tokens
        y = self.norm(t + self.fc2(self.act(self.fc1(t))) * self.scale)
        p = self.pool
        if p == "token":
            z = y[:, 0]
        elif p == "select":
            z = y.select(1, 2)
        elif p == "two":
            z = y[:, 0] + y[:, 3]
        elif p == "mean":
            z = y.mean(1)
        elif p == "zero-times-mean":  # only token 0 matters numerically, but the graph mixes tokens
            z = y[:, 0] + 0 * y.mean(1)
        elif p == "per-token-constant":  # a constant that differs per token
            z = (y + self.pos)[:, 0]
        elif p == "negative-index":
            z = y[:, -1]
        else:  # "reshape"
            z = y.flatten(1)[:, :16]
        return self.head(z)


# pool -> the tokens the cut may slice the boundary to (None: it must keep every token)
TOKEN_POOLS = {"token": [0], "select": [2], "two": [0, 3], "mean": None, "zero-times-mean": None,
               "per-token-constant": None, "negative-index": None, "reshape": None}


def _token_net(pool: str) -> nn.Module:
    torch.manual_seed(0)
    m = _TokenNet(pool).eval()
    with torch.no_grad():
        m.fc2.weight.mul_(5.0)  # louder hidden units, so pruning moves the predictions
    return m


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("pool", list(TOKEN_POOLS))  # tiny models: far faster on one thread
def test_token_slicing_only_where_the_graph_proves_it_and_exact_every_k(pool):
    m = _token_net(pool)
    x = torch.randn(40, 7, 6, generator=torch.Generator().manual_seed(1))
    y = labels_near_model(m, x, classes=5)
    trig = TriggeredSet(x[:15].clone(), y[:15], (y[:15] + 1) % 5)
    cut = cut_at(m, "act", x[:1])
    assert cut.channel_dim == -1
    assert (None if cut.tokens is None else cut.tokens.tokens) == TOKEN_POOLS[pool]
    a = cached_sweep(m, "act", x, y, trig, batch_size=16)
    assert a.extra["tokens"] == TOKEN_POOLS[pool]
    b = full_sweep(m, "act", x, y, trig, batch_size=16)
    assert_same_curve(a, b)
    assert a.channel_means == b.channel_means
    assert len(set(a.clean_correct)) > 1


@pytest.mark.usefixtures("one_thread")  # tiny models: far faster on one thread
def test_token_check_is_a_graph_proof_not_a_numerical_one():
    """In `zero-times-mean` the logits do not move when tokens other than 0 change, yet the head's
    graph averages every token: the check refuses to slice (it proves, it does not sample)."""
    m = _token_net("zero-times-mean")
    x = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(2))
    cut = cut_at(m, "act", x[:1])
    with torch.no_grad():
        boundary = cut.pre(x)
        moved = [b.clone() for b in boundary]
        moved[0][:, :, 1:] += 3.0  # h is (B, C, T) at the cut
        moved[1][:, 1:] -= 2.0
        assert torch.equal(cut.head(*boundary), cut.head(*moved))
    assert cut.tokens is None


@pytest.mark.usefixtures("one_thread")  # tiny models: far faster on one thread
def test_token_sliced_sweep_streams_under_max_cache_mb():
    m = _token_net("two")
    x = torch.randn(120, 7, 6, generator=torch.Generator().manual_seed(3))
    y = labels_near_model(m, x, classes=5)
    trig = TriggeredSet(x[:50].clone(), y[:50], (y[:50] + 1) % 5)
    a = cached_sweep(m, "act", x, y, trig, batch_size=16)
    per_sample_mb = (24 + 16) * 2 * 4 / 2**20  # two tokens of h and of the residual stream
    assert a.extra["tokens"] == [0, 3] and a.extra["cache_mb"] == pytest.approx(170 * per_sample_mb, abs=1e-3)
    b = cached_sweep(m, "act", x, y, trig, batch_size=16, max_cache_mb=40 * per_sample_mb)
    assert b.extra["streamed_samples"] > 0
    assert_same_curve(a, b)
    assert a.channel_means == b.channel_means and a.triggered_means == b.triggered_means
