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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

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
class NetworkCut:
    """`pre(x) -> boundary tuple` (h first, channels at dim 1) and `head(*boundary) -> logits`;
    `channel_dim` is where the layer itself keeps its channels (-1: moved to dim 1 at the cut)."""

    pre: fx.GraphModule
    head: fx.GraphModule
    num_boundary: int
    channel_dim: int = 1


def cut_at(model: nn.Module, layer: str, example: torch.Tensor | None = None) -> NetworkCut:
    """Split `model` at the output of module `layer`; raises if the model cannot be traced.
    The layer's channel dimension is its annotation (`mask.module_channel_dim`); with `example`
    (one input on the model's device) an unannotated layer's layout is detected first."""
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
    return NetworkCut(pre=pre, head=head, num_boundary=len(boundary), channel_dim=channel_dim)
