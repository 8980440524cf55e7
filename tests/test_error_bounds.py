"""Property tests of the rounding certificate (`error_bounds`): on random tails with signed
constants, biases, scales and subtractions, the float32 value stays within the claimed bound of a
float64 reference, and values mode evaluates exactly what the tail computes."""
import pytest
import torch
from conftest import assert_same_curve, labels_near_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from fineprune.defense import error_bounds as eb
from fineprune.defense.counting import Counter
from fineprune.defense.cut import cut_at
from fineprune.defense.head_plan import plan_head
from fineprune.defense.sweep import cached_sweep, full_sweep
from fineprune.evaluation.metrics import TriggeredSet

WIDTH = 8
_number = st.floats(min_value=-6.0, max_value=6.0, allow_nan=False).filter(lambda c: abs(c) > 1e-3)
_op = st.one_of(
    st.tuples(st.just("linear"), st.integers(0, 2**16)),
    st.tuples(st.just("add"), _number),        # x + c
    st.tuples(st.just("radd"), _number),       # c + x
    st.tuples(st.just("sub"), _number),        # x - c
    st.tuples(st.just("rsub"), _number),       # c - x
    st.tuples(st.just("mul"), _number),        # x * s
    st.tuples(st.just("rmul"), _number),       # s * x
    st.tuples(st.just("div"), _number),        # x / s
    st.tuples(st.just("neg"), st.just(0)),
    st.tuples(st.just("relu"), st.just(0)),
    st.tuples(st.just("method_sub"), _number),  # x.sub(c)
    st.tuples(st.just("residual"), st.integers(0, 2**16)),  # x - linear(x)
)


class _Tail(nn.Module):
    """A head tail built from a list of (op, argument) pairs, traced by torch.fx."""

    def __init__(self, ops: list[tuple[str, float]]) -> None:
        super().__init__()
        self.ops = ops
        self.lins = nn.ModuleList()
        for op, arg in ops:
            if op in ("linear", "residual"):
                g = torch.Generator().manual_seed(int(arg))
                lin = nn.Linear(WIDTH, WIDTH)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(WIDTH, WIDTH, generator=g) / 2)
                    lin.bias.copy_(torch.randn(WIDTH, generator=g) * 2)  # signed biases
                self.lins.append(lin)

    def forward(self, x):
        j = 0
        for op, c in self.ops:
            if op == "linear":
                x = self.lins[j](x)
                j += 1
            elif op == "residual":
                x = x - self.lins[j](x)
                j += 1
            elif op == "add":
                x = x + c
            elif op == "radd":
                x = c + x
            elif op == "sub":
                x = x - c
            elif op == "rsub":
                x = c - x
            elif op in ("mul",):
                x = x * c
            elif op == "rmul":
                x = c * x
            elif op == "div":
                x = x / c
            elif op == "neg":
                x = -x
            elif op == "relu":
                x = torch.relu(x)
            elif op == "method_sub":
                x = x.sub(c)
        return x


def _case(ops, seed):
    tail = fx.symbolic_trace(_Tail(ops))
    ref_tail = fx.symbolic_trace(_Tail(ops)).double()
    ref_tail.load_state_dict({k: v.double() for k, v in tail.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(16, WIDTH, generator=g, dtype=torch.float64) * 3
    z = x64.float()
    d0 = 2 * (z.double() - x64).abs().float()  # both paths read z: each is |z - x| from exact
    return tail, ref_tail, x64, z, d0


_ops = st.lists(_op, min_size=1, max_size=6).map(lambda ops: [("linear", 1)] + ops)


@settings(max_examples=120, deadline=None)
@given(ops=_ops, seed=st.integers(0, 2**16))
def test_values_mode_is_the_tail_itself_and_within_bound(ops, seed):
    tail, ref_tail, x64, z, d0 = _case(ops, seed)
    assert all(eb.supported(n, dict(tail.named_modules())) for n in tail.graph.nodes)
    u = eb.unit_roundoff(torch.float32)
    with torch.no_grad():
        v, d = eb.propagate(tail, [(z, d0)], u, values=True)
        fast = tail(z)
        ref = ref_tail(x64)
    assert torch.equal(v, fast)  # the value is what the tail computes, signs included
    slack = 1e-12 * (1 + ref.abs())  # float64's own rounding
    assert ((fast.double() - ref).abs() <= d.double() + slack).all()


@settings(max_examples=120, deadline=None)
@given(ops=_ops, seed=st.integers(0, 2**16))
def test_magnitude_mode_bounds_value_and_error(ops, seed):
    tail, ref_tail, x64, z, d0 = _case(ops, seed)
    u = eb.unit_roundoff(torch.float32)
    with torch.no_grad():
        m, d = eb.propagate(tail, [(z.abs(), d0)], u)
        fast = tail(z)
        ref = ref_tail(x64)
    slack = 1e-12 * (1 + ref.abs())
    assert (ref.abs() <= m.double() + d.double() + slack).all()
    assert ((fast.double() - ref).abs() <= d.double() + slack).all()


def test_negative_constant_is_not_evaluated_as_positive():
    """The reviewed bug: relu(fc(h) + (-2.0)) was evaluated as relu(fc(h) + 2.0) in values mode."""
    tail = fx.symbolic_trace(_Tail([("linear", 3), ("add", -2.0), ("relu", 0)]))
    z = torch.randn(32, WIDTH)
    with torch.no_grad():
        v, _ = eb.propagate(tail, [(z, torch.zeros_like(z))], eb.unit_roundoff(torch.float32), values=True)
        assert torch.equal(v, tail(z))


def test_product_of_two_tensors_is_not_claimed():
    class TwoTensors(nn.Module):
        def forward(self, x):
            return x * x

    gm = fx.symbolic_trace(TwoTensors())
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert not eb.supported(node, {})


def test_reduced_float32_precision_is_certified_coarsely_and_turned_off_in_the_sweep():
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bfloat16 products allowed
        assert eb.unit_roundoff(torch.float32) == 2.0**-8
        with eb.exact_float32():
            assert eb.unit_roundoff(torch.float32) == 2.0**-24
        assert torch.get_float32_matmul_precision() == "medium"  # restored
    finally:
        torch.set_float32_matmul_precision(prev)
    assert eb.unit_roundoff(torch.float32) == 2.0**-24


class _ConstHead(nn.Module):
    """A CNN whose head holds signed constants, a scale and a subtraction after the first Linear."""

    def __init__(self, arithmetic: bool) -> None:
        super().__init__()
        self.arithmetic = arithmetic  # False: only relu(fc(h) + (-2.0)), the reviewed case
        self.conv = nn.Conv2d(1, 16, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = self.relu(self.conv(x))
        if not self.arithmetic:
            return self.fc2(torch.relu(self.fc1(torch.flatten(self.pool(h), 1)) + (-2.0)))
        z = self.fc1(torch.flatten(self.pool(h), 1)) - 2.0
        return self.fc2(torch.relu(z) * 0.5) + (-1.0)


@pytest.mark.parametrize("arithmetic", [False, True], ids=["negative-constant", "arithmetic"])
@pytest.mark.parametrize("force_values_mode", [False, True], ids=["auto", "values-mode"])
def test_sweep_with_constants_in_head_equals_full_passes(monkeypatch, force_values_mode, arithmetic):
    torch.manual_seed(1)
    m = _ConstHead(arithmetic).eval()
    with torch.no_grad():  # z - 2.0 straddles zero for many units; the classes depend on the input
        m.fc1.weight.mul_(30)
        m.fc2.weight.mul_(5)
        for b in (m.conv.bias, m.fc1.bias, m.fc2.bias):
            b.zero_()
    x = torch.randn(120, 1, 10, 10)
    y = labels_near_model(m, x, every=4, shift=3)
    trig = TriggeredSet(x[:40].clone(), y[:40], (y[:40] + 1) % 10)
    assert plan_head(cut_at(m, "relu")).fast is not None  # the incremental path is what is tested
    if force_values_mode:  # every chunk evaluates the tail in values mode (the mode with the bug)
        monkeypatch.setattr(Counter, "_direct", property(lambda self: True, lambda self, v: None),
                            raising=False)
    a = cached_sweep(m, "relu", x, y, trig, batch_size=32)
    b = full_sweep(m, "relu", x, y, trig, batch_size=32)
    assert a.extra["fast_path"]
    assert_same_curve(a, b)
    assert len(set(a.clean_correct)) > 3  # the curve really moves
