"""Widen the pruned layer: the pruning-aware attack's "add neurons" (the paper's step 5).

The attacker who finds the pruned network too small to hold both the task and the backdoor adds
channels to the pruned layer. `widen_layer` adds `extra` channels at the end of the producing
convolution (and of any BatchNorm between it and the ReLU), and matching zero input weights to
every layer that reads those channels (a convolution, or a Linear after a flatten), so the network
computes exactly what it computed before; training then grows the new channels. The network no
longer matches its architecture's constructor: whoever loads it rebuilds it with the same call on a
freshly built model (see `experiment.setup.TaskSetup.builder`): in Python,
`widen_layer(build_arch("demo-cnn", 10), "features.7", 16, example)` then `load_pruned`; for
`fineprune defend`, a factory of one's own doing the same, passed as `--arch package.module:function`.

Only the plain layout is handled: conv -> [BatchNorm] -> ReLU -> [pooling, dropout, flatten] ->
Conv / Linear consumers. Anything else (a residual add, a concatenation, grouped convolutions) is
refused with the reason, rather than widened into a network that computes something else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from ..defense.layer import CONV_TYPES, producer_chain
from ..defense.mask import masked_layers, pruned_channels, set_pruned

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules between the producer and its consumers that keep one output channel per input channel.
_PASS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.Identity, nn.ReLU, nn.ReLU6,
)
_PASS_METHODS = ("contiguous", "relu")
_PASS_FUNCTIONS = (torch.relu, nn.functional.relu, nn.functional.max_pool1d, nn.functional.max_pool2d,
                   nn.functional.avg_pool1d, nn.functional.avg_pool2d, nn.functional.dropout,
                   nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d)


class WidenError(ValueError):
    """The pruned layer of this architecture cannot be widened without changing what it computes."""


@dataclass
class WidenInfo:
    """What was widened: recorded in the model's info so a loader can rebuild the same network."""

    layer: str
    extra: int
    channels_before: int
    channels_after: int
    producer: str
    batchnorms: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _consumers(model: nn.Module, layer: str) -> list[tuple[str, bool]]:
    """(module name, reached after a flatten) of every Conv / Linear reading `layer`'s channels."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - fx raises many types; the message is what matters
        raise WidenError(f"cannot widen: the model does not trace with torch.fx ({type(exc).__name__}: {exc}), "
                         "so the layers reading the pruned channels cannot be found") from None
    modules = dict(model.named_modules())
    start = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(start) != 1:
        raise WidenError(f"cannot widen {layer!r}: it is not one call of a leaf module in the traced graph "
                         f"(found {len(start)}; a whole block or stage, or a reused ReLU?); only a plain "
                         "conv -> [BatchNorm] -> ReLU layer can be widened")
    found: list[tuple[str, bool]] = []
    todo = [(start[0], False)]
    seen = set()
    while todo:
        node, flat = todo.pop()
        for user in node.users:
            if (user, flat) in seen:
                continue
            seen.add((user, flat))
            mod = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(mod, (*CONV_TYPES, nn.Linear)):
                if isinstance(mod, nn.Linear) != flat:
                    raise WidenError(f"cannot widen: {user.target!r} ({type(mod).__name__}) reads the pruned "
                                     f"channels {'after' if flat else 'without'} a flatten")
                found.append((user.target, flat))
            elif isinstance(mod, _PASS_MODULES):
                todo.append((user, flat))
            elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1 and not flat:
                todo.append((user, True))
            elif user.op == "call_method" and user.target in _PASS_METHODS:
                todo.append((user, flat))
            elif user.op == "call_function" and user.target in _PASS_FUNCTIONS:
                todo.append((user, flat))
            elif not flat and _is_flatten1(user):
                todo.append((user, True))
            else:
                what = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", user.target)
                raise WidenError(f"cannot widen {layer!r}: its channels reach {what!r} ({user.op}), which is not "
                                 "a pooling / dropout / flatten on the way to a Conv or Linear layer")
    if not found:
        raise WidenError(f"cannot widen {layer!r}: no Conv or Linear layer reads its channels")
    return found


def _is_flatten1(node: fx.Node) -> bool:
    """x.flatten(1) / torch.flatten(x, 1): keeps the batch, channel-major (new channels go last)."""
    if not ((node.op == "call_method" and node.target == "flatten")
            or (node.op == "call_function" and node.target is torch.flatten)):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _grow(t: torch.Tensor, dim: int, extra: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, extra.to(dtype=t.dtype, device=t.device)], dim=dim)


def widen_layer(model: nn.Module, layer: str, extra: int, example: torch.Tensor,
                seed: int = 0) -> WidenInfo:
    """Add `extra` channels to `layer` (a ReLU output) in place, leaving the function unchanged.

    New filters are drawn like a fresh convolution's (seeded), new BatchNorm channels are the
    identity, and every consumer gets zero weights for them: the outputs are unchanged, and the
    consumers' new weights still receive gradients (the new channels are active), so training
    grows them. A mask on `layer` is carried over (the new channels are kept). Checked on
    `example`: raises `WidenError` if the outputs moved.
    """
    if extra < 1:
        raise ValueError(f"extra must be at least 1, got {extra}")
    chain = producer_chain(model, example, layer)
    if not chain or not isinstance(chain[0][1], CONV_TYPES) or not isinstance(chain[-1][1], (nn.ReLU, nn.ReLU6)):
        raise WidenError(f"cannot widen {layer!r}: it must be a ReLU output fed by a convolution; found "
                         f"{[type(m).__name__ for _, m in chain]}")
    conv_name, conv = chain[0]
    if conv.groups != 1:
        raise WidenError(f"cannot widen {layer!r}: its convolution {conv_name!r} is grouped (groups={conv.groups})")
    for name, module in chain[1:-1]:
        if not isinstance(module, (*BN_TYPES, nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6)):
            raise WidenError(f"cannot widen {layer!r}: {name!r} ({type(module).__name__}) lies between the "
                             "convolution and the ReLU")
    consumers = _consumers(model, layer)
    channels = conv.out_channels
    for name, flat in consumers:  # every check before the first change: a refusal leaves the model as it was
        mod = model.get_submodule(name)
        if flat and mod.in_features % channels:
            raise WidenError(f"cannot widen: {name!r} reads {mod.in_features} features, not a multiple "
                             f"of the {channels} channels")
        if not flat and (mod.groups != 1 or mod.in_channels != channels):
            raise WidenError(f"cannot widen: {name!r} reads {mod.in_channels} channels in "
                             f"{mod.groups} groups, not the layer's {channels}")
    masked = layer in masked_layers(model)
    pruned = pruned_channels(model, layer)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(example)

        # The producer: new filters (and biases) drawn as a fresh convolution draws them
        # (PyTorch's default: uniform within 1/sqrt(fan_in)), from a seeded generator.
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / conv.weight[0].numel() ** 0.5
        new_w = (torch.rand((extra, *conv.weight.shape[1:]), generator=g) * 2 - 1) * bound
        conv.weight = nn.Parameter(_grow(conv.weight, 0, new_w))
        if conv.bias is not None:
            conv.bias = nn.Parameter(_grow(conv.bias, 0, (torch.rand(extra, generator=g) * 2 - 1) * bound))
        conv.out_channels = channels + extra

        bns = []
        for name, module in chain[1:-1]:
            if isinstance(module, BN_TYPES):
                if module.affine:
                    module.weight = nn.Parameter(_grow(module.weight, 0, torch.ones(extra)))
                    module.bias = nn.Parameter(_grow(module.bias, 0, torch.zeros(extra)))
                if module.track_running_stats:
                    module.running_mean = _grow(module.running_mean, 0, torch.zeros(extra))
                    module.running_var = _grow(module.running_var, 0, torch.ones(extra))
                module.num_features = channels + extra
                bns.append(name)

        for name, flat in consumers:
            mod = model.get_submodule(name)
            if flat:  # Linear after flatten: columns are channel-major, `per` values per channel
                per = mod.in_features // channels
                w = mod.weight.view(mod.out_features, channels, per)
                w = _grow(w, 1, torch.zeros(mod.out_features, extra, per)).reshape(mod.out_features, -1)
                mod.weight = nn.Parameter(w.contiguous())
                mod.in_features = (channels + extra) * per
            else:
                shape = (mod.out_channels, extra, *mod.weight.shape[2:])
                mod.weight = nn.Parameter(_grow(mod.weight, 1, torch.zeros(shape)))
                mod.in_channels = channels + extra

        if masked:  # the new channels are kept
            set_pruned(model, layer, pruned, channels + extra)
        after = model(example)
    model.train(was_training)
    if after.shape != before.shape or not torch.allclose(after, before, rtol=1e-5, atol=1e-5):
        raise WidenError(f"widening {layer!r} changed the network's outputs (max difference "
                         f"{(after - before).abs().max().item() if after.shape == before.shape else 'shape'}); "
                         "this architecture cannot be widened this way")
    return WidenInfo(layer=layer, extra=extra, channels_before=channels, channels_after=channels + extra,
                     producer=conv_name, batchnorms=bns, consumers=[n for n, _ in consumers])


__all__ = ["WidenError", "WidenInfo", "widen_layer"]
