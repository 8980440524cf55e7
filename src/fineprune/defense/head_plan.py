"""What of the head must run once per pruning step k, and what can run once for all k.

Two facts about the head (the network after the masked tensor h) make the sweep cheap:

* Channel-wise operations that map a zero channel to a zero channel (ReLU, max/average pooling,
  eval-mode dropout) commute with the mask *bit for bit*: f(mask(h)) == mask(f(h)). Those that
  follow h directly form the *prefix*; it runs once on the cached h, and the (often pooled,
  smaller) result is cached instead.
* When every use of the prefix's output is a Linear (after flatten) or a convolution -- the
  *frontier* -- each frontier output with k channels pruned is that with k+1 pruned plus the
  share of channel order[k]. All k then cost about one pass of the frontier layers, plus the
  rest of the head (the *tail*: ReLU, the next layers) per k. Float sums in another order differ
  in the last bits, so each prediction comes with a rigorous rounding bound covering *both* this
  path and any full forward pass whose dot products obey the standard rounding model, in any
  summation order and batch size (`error_bounds`); predictions whose top-2 logit margin is within
  it are recomputed with the exact head. Certified predictions equal every such full pass's;
  recomputed ones equal a full pass's up to last-bit ties, which two batch sizes of the full
  protocol also resolve differently (see `sweep`'s docstring for the whole guarantee).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import error_bounds as eb
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


_CONV_FNS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@dataclass
class Frontier:
    """A first linear layer after the prefix: its output is affine in the cached tensor p.

    The sweep builds the output for k pruned channels as bias + the shares of the kept channels
    order[k:], adding channels from k = C (bias only) down to k = 0. Rounding then scales with
    T_k = |b| + sum over kept channels of |W||x| (also kept per k), not with the unpruned sum.
    """

    module: nn.Module  # nn.Linear (on flatten(p)) or nn.ConvNd (on p)
    flattened: bool = True  # whether the Linear's input went through flatten(1)

    def full(self, p: torch.Tensor) -> torch.Tensor:
        """Output with no channel pruned."""
        return self.module(p.flatten(1) if isinstance(self.module, nn.Linear) else p)

    def empty(self, like: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        """Output with every channel pruned (the bias, or |bias|), shaped like `like` (m, *out)."""
        b = self.module.bias
        if b is None:
            return torch.zeros_like(like)
        b = b.abs() if absolute else b
        return b.view(-1, *([1] * (like.dim() - 2))).expand_as(like).clone()

    def contributions(self, p: torch.Tensor, idx: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        """(K, m, *out): what channel idx[j] of p adds to the output (no bias); with `absolute`,
        the same with |p| and |W| (the channel's share of T_k)."""
        mod, m, c = self.module, p.shape[0], p.shape[1]
        weight = mod.weight.abs() if absolute else mod.weight
        if isinstance(mod, nn.Linear):
            x = p.reshape(m, c, -1).transpose(0, 1)[idx]  # (K, m, s)
            w = weight.view(mod.out_features, c, -1)[:, idx].permute(1, 2, 0)  # (K, s, out)
            return torch.bmm(x.abs() if absolute else x, w)
        k = idx.numel()
        w = weight[:, idx].transpose(0, 1).reshape(k * mod.out_channels, 1, *weight.shape[2:])
        x = p[:, idx]
        y = _CONV_FNS[type(mod)](x.abs() if absolute else x, w, None, mod.stride, mod.padding,
                                 mod.dilation, k)
        return y.view(m, k, mod.out_channels, *y.shape[2:]).transpose(0, 1)

    def terms(self) -> int:
        """Products per output element (C * s for a Linear on C x s inputs)."""
        return self.module.weight[0].numel()

    def coefficient(self, num_channels: int, u: float) -> float:
        """D <= coefficient * T_k: the full pass's dot product (n terms, in any order) plus the
        fast path's channel shares (n / C terms each) and its at most 2C + 2 additions."""
        n = self.terms()
        s = max(1, n // max(num_channels, 1))
        return eb.gamma(n + 1, u) + eb.gamma(s, u) + eb.gamma(2 * num_channels + 2, u)

    def bound(self, p: torch.Tensor, num_channels: int, u: float) -> eb.Bound:
        """(M, D) valid for every k, from the unpruned T_0 >= T_k."""
        mod = self.module
        wa = mod.weight.abs()
        if isinstance(mod, nn.Linear):
            x, apply = p.abs().flatten(1), (lambda v: F.linear(v, wa))
        else:
            conv = _CONV_FNS[type(mod)]
            x, apply = p.abs(), (lambda v: conv(v, wa, None, mod.stride, mod.padding, mod.dilation))
        t, _ = eb.linear_bound(x, torch.zeros_like(x), apply, mod.bias, self.terms(), u)
        return t, self.coefficient(num_channels, u) * t

    def deviation_at(self, t_k: torch.Tensor, num_channels: int, u: float) -> torch.Tensor:
        """D for one k from its T_k as the sweep computed it (float sums, hence the slack)."""
        t = t_k * (1 + eb.gamma(self.terms() + 2 * num_channels + 2, u))
        return self.coefficient(num_channels, u) * t


@dataclass
class FastPath:
    """`tail(*frontier outputs) -> logits`; the frontier is kept per k incrementally."""

    frontier: list[Frontier]
    tail: fx.GraphModule
    tail_in_place: bool = True  # whether the tail may modify its inputs (then they are copied)

    def applies_to(self, p: torch.Tensor) -> bool:
        """Shape checks that tracing cannot make (a Linear must read exactly flatten(p))."""
        for f in self.frontier:
            if isinstance(f.module, nn.Linear) and (f.module.in_features != p[0].numel()
                                                    or not (f.flattened or p.dim() == 2)):
                return False
            if not isinstance(f.module, nn.Linear) and (f.module.groups != 1 or p.dim() < 3):
                return False
        if p.is_cuda and any(not isinstance(f.module, nn.Linear) for f in self.frontier):
            return False  # cuDNN may pick Winograd/FFT convolutions, outside the dot-product bound
        return True

    def logit_bound(self, p: torch.Tensor) -> torch.Tensor:
        """(m, classes): bound on |fast logit - full-pass logit| for these samples, for every k."""
        u = eb.unit_roundoff(p.dtype)
        _, d = eb.propagate(self.tail, [f.bound(p, p.shape[1], u) for f in self.frontier], u)
        return d.flatten(1)

    def logits_with_bound(self, z_k: list[torch.Tensor], t_k: list[torch.Tensor],
                          num_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and their (q, classes) bound for q (k, sample) pairs from their own frontier
        values z_k and sums T_k, the tail's rounding bounded by its actual values (tighter)."""
        u = eb.unit_roundoff(t_k[0].dtype)
        inputs = [(z, f.deviation_at(t, num_channels, u)) for f, z, t in zip(self.frontier, z_k, t_k)]
        logits, d = eb.propagate(self.tail, inputs, u, values=True)
        return logits, d.flatten(1)


@dataclass
class HeadPlan:
    """`prefix(h)` once per input; `body(prefix(h), *other_boundary)` per k; `fast` when the
    incremental path applies to `body`."""

    prefix: fx.GraphModule
    body: fx.GraphModule
    fast: FastPath | None
    prefix_ops: int


def _copy_graph(nodes: list[fx.Node], inputs: dict[fx.Node, str], result: fx.Node | tuple) -> fx.Graph:
    """A graph with `inputs` as placeholders (in order), then `nodes` copied."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: g.placeholder(name) for n, name in inputs.items()}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(fx.node.map_arg(result, lambda a: env[a]))
    return g


def plan_head(cut: NetworkCut, tokens: bool = True) -> HeadPlan:
    """Split the head into the zero-preserving channel-wise prefix and the rest (the body): the
    head on the token-sliced boundary when the cut found class-token pooling (`cut.tokens`) and
    `tokens` is on, else `cut.head`."""
    head = cut.tokens.head if tokens and cut.tokens is not None else cut.head
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
    fast = _fast_path(body_gm) if len(placeholders) == 1 else None
    return HeadPlan(prefix=prefix_gm, body=body_gm, fast=fast, prefix_ops=len(prefix))


def _fast_path(body: fx.GraphModule) -> FastPath | None:
    """Find the frontier: every path from p passes through identities / flatten(1) into a Linear
    (flattened input) or a ConvNd (unflattened input). The tail is the rest of the graph."""
    mods = _modules(body)
    nodes = list(body.graph.nodes)
    p = nodes[0]
    flat: dict[fx.Node, bool] = {p: False}  # nodes on the way to the frontier: flattened yet?
    frontier: list[tuple[fx.Node, bool]] = []
    queue = [p]
    while queue:
        n = queue.pop()
        for user in n.users:
            if user in flat or any(user is f for f, _ in frontier):
                continue
            if user.op == "output" or user.args[:1] != (n,) or not _other_args_constant(user):
                return None
            m = mods.get(user.target) if user.op == "call_module" else None
            if _is_flatten_from_1(user, mods):
                flat[user] = True
                queue.append(user)
            elif isinstance(m, _IDENTITIES):
                flat[user] = flat[n]
                queue.append(user)
            elif isinstance(m, nn.Linear) or (isinstance(m, tuple(_CONV_FNS)) and not flat[n]
                                              and m.padding_mode == "zeros"):
                frontier.append((user, flat[n]))
            else:
                return None
    # Linear reads the flattened p (or p itself when p is 2-D: checked at run time).
    skip = set(flat) | {f for f, _ in frontier}
    rest = [n for n in nodes if n not in skip and n.op != "output"]
    if any(not eb.supported(n, mods) for n in rest):
        return None
    output = next(n for n in nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        return None
    tail_g = _copy_graph(rest, {f: f"frontier_{i}" for i, (f, _) in enumerate(frontier)}, output.args[0])
    tail = fx.GraphModule(body, tail_g)
    tail.graph.eliminate_dead_code()
    tail.recompile()
    return FastPath(frontier=[Frontier(mods[f.target], fl) for f, fl in frontier], tail=tail,
                    tail_in_place=_may_work_in_place(tail))


def _may_work_in_place(gm: fx.GraphModule) -> bool:
    mods = _modules(gm)
    for n in gm.graph.nodes:
        if n.op == "call_module" and getattr(mods.get(n.target), "inplace", False):
            return True
        if n.op in ("call_function", "call_method") and (n.kwargs.get("inplace") or (
                isinstance(n.target, str) and n.target.endswith("_"))):
            return True
        if n.op == "call_function" and getattr(n.target, "__name__", "").endswith("_"):
            return True
    return False


