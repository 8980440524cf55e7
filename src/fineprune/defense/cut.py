"""Cut a network at the pruned layer's output so the part before it runs once.

With torch.fx the model becomes a graph; the chosen module is kept as one node `h`. Everything that
depends on `h` is the *head*; the values computed before the cut that the head needs (always `h`,
sometimes skip connections) are the *boundary*. `pre(x)` returns the boundary, `head(*boundary)`
finishes the forward pass, so `head(*pre(x)) == model(x)` and a masked `h` can be fed to the head
again and again without recomputing the expensive front of the network.

A channels-last layer (a transformer MLP's hidden units, (B, T, H): see `layer`) crosses the cut as
the view `h.movedim(-1, 1)` and the head moves it back first, so everything downstream (statistics,
masks of the cached values, the head plan) sees channels at dim 1 whatever the layer's layout. In a
transformer the boundary also carries the residual stream that the last block adds the MLP's
output to; the replay from the boundary is the very computation of the full model.

Class-token pooling (`TokenSlice`): where the head provably reads only a few tokens -- every
operation from the boundary to a selection `x[:, i]` of token i acts on each token on its own
(Linear, LayerNorm over the last dim, element-wise functions, sums with token-aligned values),
and nothing but those selections leaves the token-aligned part -- the boundary values are cut
down to the selected tokens once, before they are cached, and the head replays only them. A ViT
with `global_pool='token'` (timm) or torchvision's VisionTransformer then replays 1 token of 197
per pruning step; mean pooling or any operation that mixes tokens keeps the full path.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .layer import channel_dim_of
from .mask import module_channel_dim


class _LeafTracer(fx.Tracer):
    """Keeps `leaf` as one node; with `opaque_user_modules`, also every module defined outside
    torch.nn that does not contain `leaf` (their code is run, not traced)."""

    def __init__(self, leaf: str, opaque_user_modules: bool = False) -> None:
        super().__init__()
        self.leaf = leaf
        self.opaque = opaque_user_modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname == self.leaf or super().is_leaf_module(m, qualname):
            return True
        if not self.opaque or self.leaf == qualname or self.leaf.startswith(qualname + "."):
            return False
        return not type(m).__module__.startswith("torch.nn")


def _trace(model: nn.Module, layer: str) -> fx.Graph:
    """Trace through every module first (finest head graph); if some module's Python cannot be
    traced (e.g. it iterates over a shape), retry with user-defined modules off the path to
    `layer` kept opaque."""
    try:
        return _LeafTracer(layer).trace(model)
    except Exception:  # torch.fx raises many kinds of errors on untraceable code
        return _LeafTracer(layer, opaque_user_modules=True).trace(model)


@dataclass
class TokenSlice:
    """The tokens that reach the logits, and the head that replays only them.

    `tokens`: the kept token indices (sorted); `dims`: the token dimension of each boundary value
    as `pre` returns it; `head(*narrow(boundary)) == cut.head(*boundary)` (same operations on the
    kept tokens; see `token_slice` for the proof)."""

    tokens: list[int]
    dims: list[int]
    head: fx.GraphModule

    def narrow(self, boundary: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        t = self.tokens
        if t == list(range(t[0], t[0] + len(t))):
            return tuple(b.narrow(d, t[0], len(t)) for b, d in zip(boundary, self.dims))
        idx = torch.tensor(t, dtype=torch.long, device=boundary[0].device)
        return tuple(b.index_select(d, idx) for b, d in zip(boundary, self.dims))


@dataclass
class NetworkCut:
    """`pre(x) -> boundary tuple` (h first, channels at dim 1) and `head(*boundary) -> logits`;
    `channel_dim` is where the layer itself keeps its channels (-1: moved to dim 1 at the cut).
    `tokens`: set when only some tokens reach the logits (class-token pooling, see `TokenSlice`);
    then `tokens.head(*tokens.narrow(boundary)) == head(*boundary)`."""

    pre: fx.GraphModule
    head: fx.GraphModule
    num_boundary: int
    channel_dim: int = 1
    tokens: TokenSlice | None = None


def cut_at(model: nn.Module, layer: str, example: torch.Tensor | None = None) -> NetworkCut:
    """Split `model` at the output of module `layer`; raises if the model cannot be traced.
    The layer's channel dimension is its annotation (`mask.module_channel_dim`); with `example`
    (one input on the model's device) an unannotated layer's layout is detected first, and the
    head is checked for class-token pooling (`token_slice`; shapes come from the example).
    The model is traced in eval mode (the cut evaluates; code that branches on `self.training`,
    e.g. timm's DropPath, would otherwise be traced in its training form)."""
    was_training = model.training
    model.eval()
    try:
        return _cut_at(model, layer, example)
    finally:
        model.train(was_training)


def _cut_at(model: nn.Module, layer: str, example: torch.Tensor | None) -> NetworkCut:
    if example is not None:
        channel_dim_of(model, layer, example)
    channel_dim = module_channel_dim(model.get_submodule(layer))
    graph = _trace(model, layer)
    h_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(h_nodes) != 1:
        raise ValueError(f"layer {layer!r} appears {len(h_nodes)} times in the traced graph")
    h = h_nodes[0]
    nodes = list(graph.nodes)

    # Which nodes depend on the input (placeholders) and which on h.
    from_input: set[fx.Node] = set()
    after_h: set[fx.Node] = set()
    for n in nodes:
        deps = n.all_input_nodes
        if n.op == "placeholder" or any(d in from_input for d in deps):
            from_input.add(n)
        if any(d is h or d in after_h for d in deps):
            after_h.add(n)
    output = next(n for n in nodes if n.op == "output")
    if output not in after_h:
        raise ValueError(f"the model's output does not depend on layer {layer!r}")

    boundary = [h] + [
        n for n in nodes
        if n is not h and n not in after_h and n in from_input
        and any(u in after_h for u in n.users)
    ]

    # Front: everything not after h, returning the boundary values.
    pre_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in after_h or n.op == "output":
            continue
        env[n] = pre_graph.node_copy(n, lambda a: env[a])
    first = env[h]
    if channel_dim != 1:
        first = pre_graph.call_method("movedim", (first, channel_dim, 1))
    pre_graph.output((first, *(env[b] for b in boundary[1:])))

    # Head: boundary values as inputs, then what follows h (constants copied as needed).
    head_graph = fx.Graph()
    henv: dict[fx.Node, fx.Node] = {}
    for i, b in enumerate(boundary):
        henv[b] = head_graph.placeholder(f"boundary_{i}")
    if channel_dim != 1:
        henv[h] = head_graph.call_method("movedim", (henv[h], 1, channel_dim))

    def copy_needed(n: fx.Node) -> fx.Node:
        if n not in henv:
            for d in n.all_input_nodes:
                copy_needed(d)
            henv[n] = head_graph.node_copy(n, lambda a: henv[a])
        return henv[n]

    for n in nodes:
        if n in after_h:
            for d in n.all_input_nodes:
                copy_needed(d)
            henv[n] = head_graph.node_copy(n, lambda a: henv[a])
    pre = fx.GraphModule(model, pre_graph)
    head = fx.GraphModule(model, head_graph)
    for gm in (pre, head):
        gm.graph.eliminate_dead_code()
        gm.recompile()
    cut = NetworkCut(pre=pre, head=head, num_boundary=len(boundary), channel_dim=channel_dim)
    if example is not None and channel_dim != 1:
        with torch.no_grad():
            cut.tokens = token_slice(head, pre(example))
    return cut


# ---------------------------------------------------------------------------------------------
# Class-token pooling: which tokens of the boundary reach the logits.
#
# The head's boundary values are (B, C, T) for h (channels moved to dim 1 by the cut; the head
# moves them back to (B, T, C) first) and (B, T, D) for the rest (the residual stream). A node is
# *token-aligned* when it is a (B, T, ...) tensor whose token t is a function of token t of the
# boundary values alone, the same function for every t and whatever T is. By induction over the
# graph in topological order, a node is token-aligned when it is
#   * the head's own movedim of h back to (B, T, C), or another boundary value of rank 3 with h's
#     (B, T);
#   * one of the operations below applied to token-aligned inputs, every other input a constant
#     (no path from the boundary) that does not vary along the token dim:
#     - Linear (module or F.linear: acts on the last dim),
#     - LayerNorm / RMSNorm over the last dim only,
#     - element-wise functions (activations, dropout, identities),
#     - +, -, *, / of token-aligned values of equal (B, T) and constants of size 1 at dims 0 and 1
#       (after broadcasting to rank 3), or of Python numbers.
# A *selection* is `x[:, i]` (or `x[:, i, :]`, `x.select(1, i)`, `torch.select(x, 1, i)`) of a
# token-aligned x, with a constant integer i >= 0: it depends on token i of the boundary alone.
# If every user of a token-aligned node is again token-aligned or a selection, and the graph's
# output reads no token-aligned node, then the logits are a function of the selected tokens of
# the boundary only: slicing the boundary to them and re-indexing the selections (token i is now
# at its position in the kept list) computes the same operations on the same values. Anything
# else (a mean over tokens, a reshape, attention, an op not listed) makes the check fail, and the
# sweep keeps the full boundary.
# ---------------------------------------------------------------------------------------------

_ELEMENTWISE_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.PReLU,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.elu, F.celu, F.selu,
    F.softplus, F.dropout, F.alpha_dropout, torch.nn.functional.dropout1d,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv,
                     torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_NORM_MODULES = tuple(m for m in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if m is not None)
_NORM_FUNCTIONS = {F.layer_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flat_nodes(args: object) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, out.append)
    return out


def _selected_token(node: fx.Node) -> int | None:
    """i when `node` is a selection of token i (dim 1) of its first argument, else None."""
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        idx = node.args[1]
        if isinstance(idx, tuple) and len(idx) in (2, 3) and idx[0] == slice(None) \
                and all(s == slice(None) for s in idx[2:]):
            i = idx[1]
            return i if type(i) is int and i >= 0 else None
        return None
    if (node.op == "call_method" and node.target == "select") or \
            (node.op == "call_function" and node.target is torch.select):
        params = list(node.args[1:])
        dim = params[0] if len(params) > 0 else node.kwargs.get("dim")
        i = params[1] if len(params) > 1 else node.kwargs.get("index")
        return i if dim == 1 and type(i) is int and i >= 0 else None
    return None


def _constant_ok(node: object, constant: set[fx.Node]) -> bool:
    """A non-token operand of a token-aligned binary operation: a Python number, or a constant
    tensor of size 1 at dims 0 and 1 once broadcast to rank 3 (the same value for every token)."""
    if isinstance(node, (int, float, bool)):
        return True
    if not isinstance(node, fx.Node) or node not in constant:
        return False
    shape = _shape(node)
    if shape is None:
        return False
    if len(shape) > 3:
        return False
    padded = (1,) * (3 - len(shape)) + shape
    return padded[0] == 1 and padded[1] == 1


def _token_wise(node: fx.Node, mods: dict[str, nn.Module], aligned: set[fx.Node],
                constant: set[fx.Node]) -> bool:
    """Whether `node` (with at least one token-aligned input) keeps its output token-aligned."""
    first = node.args[0] if node.args else None
    rest = _flat_nodes((node.args[1:], node.kwargs))
    if node.op == "call_module":
        m = mods.get(node.target)
        if first not in aligned or rest or not type(m).__module__.startswith("torch.nn."):
            return False  # a subclass defined elsewhere may compute anything
        if isinstance(m, (nn.Linear, *_ELEMENTWISE_MODULES)):
            return not isinstance(m, nn.PReLU) or m.num_parameters == 1
        if isinstance(m, _NORM_MODULES):
            return len(m.normalized_shape) == 1
        return False
    if node.op == "call_function" and node.target in _BINARY_FUNCTIONS | _NORM_FUNCTIONS | \
            _ELEMENTWISE_FUNCTIONS | {F.linear}:
        if node.target in _BINARY_FUNCTIONS:
            return _binary_ok(node, aligned, constant)
        if first not in aligned or any(n not in constant for n in rest):
            return False
        if node.target in _NORM_FUNCTIONS:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            return isinstance(shape, (tuple, list)) and len(shape) == 1
        return True
    if node.op == "call_method":
        if node.target in _BINARY_METHODS:
            return _binary_ok(node, aligned, constant)
        return node.target in _ELEMENTWISE_METHODS and first in aligned and not rest
    return False


def _binary_ok(node: fx.Node, aligned: set[fx.Node], constant: set[fx.Node]) -> bool:
    operands = list(node.args[:2])
    if len(node.args) > 2 or any(isinstance(v, fx.Node) and v not in constant
                                 for k, v in node.kwargs.items()):
        return False
    shapes = {_shape(a)[:2] for a in operands if a in aligned}
    if len(shapes) != 1:
        return False
    return all(a in aligned or _constant_ok(a, constant) for a in operands)


def token_slice(head: fx.GraphModule, boundary: tuple[torch.Tensor, ...]) -> TokenSlice | None:
    """The tokens that reach the logits when the head provably reads only them (see the comment
    above), with the head re-indexed to the sliced boundary; None otherwise. `boundary`: an
    example of the head's inputs (shapes only matter)."""
    try:
        ShapeProp(head).propagate(*boundary)
    except Exception:  # a head ShapeProp cannot run is not analysed
        return None
    nodes = list(head.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    h = placeholders[0]
    if boundary[0].dim() != 3:
        return None
    batch, _, num_tokens = boundary[0].shape
    mods = dict(head.named_modules())
    aligned: set[fx.Node] = set()
    constant: set[fx.Node] = set()
    selected: dict[fx.Node, int] = {}
    downstream: set[fx.Node] = set()  # depends on the boundary only through selections
    for n in nodes:
        if n.op == "placeholder":
            if n is not h:
                shape = _shape(n)
                if shape is None or len(shape) != 3 or shape[:2] != (batch, num_tokens):
                    return None
                aligned.add(n)
            continue
        if n.op == "output":
            if any(d in aligned or d is h for d in _flat_nodes(n.args)):
                return None
            break
        deps = n.all_input_nodes
        if h in deps:  # h may only be moved back to (B, T, C), the cut's own first step
            if not (n.op == "call_method" and n.target == "movedim" and n.args[0] is h
                    and tuple(n.args[1:]) in ((1, -1), (1, 2)) and not n.kwargs):
                return None
            aligned.add(n)
        elif any(d in aligned for d in deps):
            i = _selected_token(n)
            if i is not None and n.args[0] in aligned and _flat_nodes((n.args[1:], n.kwargs)) == []:
                if i >= num_tokens:
                    return None
                selected[n] = i
                downstream.add(n)
            elif _token_wise(n, mods, aligned, constant) and _shape(n) is not None \
                    and len(_shape(n)) == 3 and _shape(n)[:2] == (batch, num_tokens):
                aligned.add(n)
            else:
                return None
        elif any(d in downstream for d in deps):
            downstream.add(n)
        else:
            constant.add(n)
    if not selected:
        return None
    tokens = sorted(set(selected.values()))
    if len(tokens) >= num_tokens:
        return None  # nothing to gain
    # The sliced head: the same graph, each selection re-indexed to its token's new position.
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(head.graph, env))
    position = {t: j for j, t in enumerate(tokens)}
    for old, i in selected.items():
        n, j = env[old], position[i]
        if n.target is operator.getitem:
            idx = list(n.args[1])
            idx[1] = j
            n.args = (n.args[0], tuple(idx))
        else:
            n.args, n.kwargs = (n.args[0],), {"dim": 1, "index": j}
    sliced = fx.GraphModule(head, graph)
    sliced.recompile()
    dims = [2] + [1] * (len(placeholders) - 1)  # h crosses the cut as (B, C, T)
    return TokenSlice(tokens=tokens, dims=dims, head=sliced)
