"""What of the head must run once per pruning step k, and what can run once for all k.

Two facts about the head (the network after the masked tensor h) make the sweep cheap:

* Channel-wise operations that map a zero channel to a zero channel (ReLU, max/average pooling,
  eval-mode dropout) commute with the mask *bit for bit*: f(mask(h)) == mask(f(h)). Those that
  follow h directly form the *prefix*; it runs once on the cached h, and the (often pooled,
  smaller) result is cached instead.
* When what follows the prefix is `[flatten] -> Linear -> tail` (the tail a chain of ReLU, dropout
  and Linear layers), the Linear's output after pruning k channels is that of k-1 channels minus
  the contribution of channel order[k-1]. All k then cost about one pass of that Linear, plus the
  small tail per k. Float sums in another order differ in the last bits, so each prediction comes
  with a rigorous per-sample rounding bound covering *both* this path and a full forward pass
  (see `LinearPath.tolerance`); predictions whose top-2 logit margin is within it are recomputed
  with the exact head, so the result equals the full passes' predictions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .cut import NetworkCut

# f(0) == 0 exactly, channel c of the output depends on channel c of the input only.
_ZERO_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ZERO_CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_ZERO_CHANNELWISE_METHODS = {"relu"}
# Tail steps with a known rounding behaviour (1-Lipschitz elementwise, or Linear).
_LIPSCHITZ_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def _other_args_constant(node: fx.Node) -> bool:
    rest = list(node.args[1:]) + list(node.kwargs.values())
    flat: list = []
    fx.node.map_aggregate(rest, flat.append)
    return not any(isinstance(a, fx.Node) for a in flat)


def _is_zero_channelwise(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = mods.get(node.target)
        if not isinstance(m, _ZERO_CHANNELWISE_MODULES):
            return False
        if getattr(m, "return_indices", False):
            return False
        return not isinstance(m, nn.LeakyReLU) or 0.0 <= m.negative_slope
    if node.op == "call_function":
        if node.target not in _ZERO_CHANNELWISE_FUNCTIONS or not _other_args_constant(node):
            return False
        return not node.kwargs.get("return_indices", False)
    if node.op == "call_method":
        return node.target in _ZERO_CHANNELWISE_METHODS and _other_args_constant(node)
    return False


def _is_flatten_from_1(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """flatten(x, 1) in its module, function and method forms."""
    if node.op == "call_module":
        m = mods.get(node.target)
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    args = list(node.args[1:]) + [node.kwargs.get("start_dim", None)]
    start = next((a for a in args if a is not None), 0)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    if node.op == "call_function" and node.target is torch.flatten:
        return start == 1 and end == -1
    if node.op == "call_method" and node.target == "flatten":
        return start == 1 and end == -1
    return False


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


@dataclass
class LinearPath:
    """The head after the prefix is `[flatten] -> linear -> tail`; `tail` is a list of modules."""

    linear: nn.Linear
    tail: list[nn.Module]

    def tail_forward(self, z: torch.Tensor) -> torch.Tensor:
        for m in self.tail:
            z = m(z)
        return z

    def tolerance(self, x_abs: torch.Tensor, num_channels: int) -> torch.Tensor:
        """Per-sample bound B such that, for every k, |fast logit - full-pass logit| summed over
        any two classes is at most B (so a top-2 margin above B means both pick the same class).

        Standard float error bounds (any summation order, FMA or not): a dot product of n terms
        plus bias is off by at most gamma(n+1) * (|b| + sum |w||x|). Pruning only removes terms,
        so T = |b| + |W||x| (unpruned x) bounds every k's sums. The incremental update adds at
        most 2C roundings of numbers no larger than T. The tail is propagated with
        |value| <= M and |difference| <= D: 1-Lipschitz steps keep D, a Linear maps D -> |W| D
        plus both paths' own rounding.
        """
        u = _unit_roundoff(x_abs.dtype)
        d = x_abs.shape[1]
        s = max(1, d // max(num_channels, 1))
        w, b = self.linear.weight, self.linear.bias
        b_abs = b.abs() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        t = F.linear(x_abs, w.abs(), b_abs)
        t = t * (1 + _gamma(d + 1, u))  # the bound itself is computed in float
        m = t
        dev = (2 * _gamma(d + 1, u) + _gamma(s, u) + _gamma(2 * num_channels + 2, u)) * t
        for mod in self.tail:
            if isinstance(mod, nn.Linear):
                n = mod.in_features
                wa = mod.weight.abs()
                ba = mod.bias.abs() if mod.bias is not None else 0.0
                mag_in = m + dev
                m = F.linear(m, wa) + ba
                dev = F.linear(dev, wa) + 2 * _gamma(n + 1, u) * (F.linear(mag_in, wa) + ba)
                dev = dev * (1 + _gamma(n + 1, u))
                m = m * (1 + _gamma(n + 1, u))
            elif isinstance(mod, nn.LeakyReLU):
                dev = dev + 2 * u * (m + dev)
        # Two classes, times a safety factor for the float evaluation of the bound and underflow.
        tiny = torch.finfo(x_abs.dtype).tiny * (d + 2)
        return 4 * dev.amax(dim=1) + tiny


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u) if n * u < 0.5 else float("inf")


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the matmuls actually used (TF32 / bfloat16 modes round much coarser)."""
    if dtype == torch.float64:
        return 2.0**-53
    if dtype != torch.float32:
        return float("inf")
    precise = torch.get_float32_matmul_precision() == "highest"
    if torch.cuda.is_available():
        precise = precise and not torch.backends.cuda.matmul.allow_tf32
    return 2.0**-24 if precise else 2.0**-8


@dataclass
class HeadPlan:
    """`prefix(h)` once per input; `body(prefix(h), *other_boundary)` per k; `linear` when the
    incremental fast path applies to `body`."""

    prefix: fx.GraphModule
    body: fx.GraphModule
    linear: LinearPath | None
    prefix_ops: int


def _copy_graph(nodes: list[fx.Node], inputs: dict[fx.Node, str], result: fx.Node | tuple) -> fx.Graph:
    """A graph with `inputs` as placeholders (in order), then `nodes` copied."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: g.placeholder(name) for n, name in inputs.items()}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(fx.node.map_arg(result, lambda a: env[a]))
    return g


def plan_head(cut: NetworkCut) -> HeadPlan:
    """Split `cut.head` into the zero-preserving channel-wise prefix and the rest (the body)."""
    head = cut.head
    mods = _modules(head)
    nodes = list(head.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    h = placeholders[0]
    prefix: list[fx.Node] = []
    cur = h
    while (u := _only_user(cur)) is not None and u.op != "output" and u.args and u.args[0] is cur \
            and _is_zero_channelwise(u, mods):
        prefix.append(u)
        cur = u
    pre_g = _copy_graph(prefix, {h: "h"}, cur)
    skip = set(prefix) | {h}
    body_nodes = [n for n in nodes if n not in skip and n.op not in ("placeholder", "output")]
    inputs = {cur: "p", **{p: p.name for p in placeholders[1:]}}
    body_g = _copy_graph(body_nodes, inputs, output.args[0])
    prefix_gm, body_gm = fx.GraphModule(head, pre_g), fx.GraphModule(head, body_g)
    for gm in (prefix_gm, body_gm):
        gm.graph.eliminate_dead_code()
        gm.recompile()
    linear = _linear_path(body_gm) if len(placeholders) == 1 else None
    return HeadPlan(prefix=prefix_gm, body=body_gm, linear=linear, prefix_ops=len(prefix))


def _linear_path(body: fx.GraphModule) -> LinearPath | None:
    """Recognise `p -> [flatten(1)] -> Linear -> chain of ReLU/dropout/Linear -> output`."""
    mods = _modules(body)
    nodes = list(body.graph.nodes)
    p = nodes[0]
    n = _only_user(p)
    if n is not None and _is_flatten_from_1(n, mods):
        n = _only_user(n)
    if n is None or n.op != "call_module" or not isinstance(mods.get(n.target), nn.Linear):
        return None
    linear = mods[n.target]
    tail: list[nn.Module] = []
    while True:
        nxt = _only_user(n)
        if nxt is None:
            return None
        if nxt.op == "output":
            break
        if nxt.args[:1] != (n,) or not _other_args_constant(nxt):
            return None
        m = _tail_module(nxt, mods)
        if m is None:
            return None
        tail.append(m)
        n = nxt
    return LinearPath(linear=linear, tail=tail)


def _tail_module(node: fx.Node, mods: dict[str, nn.Module]) -> nn.Module | None:
    if node.op == "call_module":
        m = mods.get(node.target)
        if isinstance(m, (nn.Linear, *_LIPSCHITZ_MODULES)):
            return m
        if isinstance(m, nn.LeakyReLU) and 0.0 <= m.negative_slope <= 1.0:
            return m
        if isinstance(m, nn.Flatten) and m.start_dim == 1:
            return nn.Identity()  # the tail works on (N, features): flatten is a no-op
        return None
    if node.op == "call_function" and node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace"):
        return nn.ReLU()
    if node.op == "call_method" and node.target == "relu":
        return nn.ReLU()
    return None


__all__ = ["HeadPlan", "LinearPath", "plan_head"]
