"""Find the layer the paper prunes: the last convolutional feature map before the classifier.

We run the model once on an example input with hooks on every module, then follow the output of
the last convolution through the channel-wise operations that come straight after it (BatchNorm,
activation, dropout, a residual add done in place). The chosen module is the outermost one that
returns exactly that tensor and is called once per forward, so that ranking and masking act on the
same tensor: in a ResNet this is the last residual stage (output after its ReLU), in a plain CNN the
ReLU after the last conv.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerNotFoundError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules that keep the channel layout of their input (so the channels stay "the conv's channels").
CHANNELWISE_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)


@dataclass
class LayerChoice:
    """The module whose output is ranked and masked, and the shape of that output."""

    name: str
    module: nn.Module
    output_shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.output_shape[1]


@dataclass
class _Call:
    name: str
    module: nn.Module
    inputs: tuple
    output: object


def trace_calls(model: nn.Module, example: torch.Tensor) -> list[_Call]:
    """Every module call (name, module, inputs, output) of one eval-mode pass, children before parents."""
    calls: list[_Call] = []
    handles = []
    for name, module in model.named_modules():
        if name == "":
            continue
        handles.append(
            module.register_forward_hook(
                lambda m, i, o, name=name: calls.append(_Call(name, m, i, o))
            )
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def _describe(calls: list[_Call]) -> str:
    seen, rows = set(), []
    for c in calls:
        if isinstance(c.output, torch.Tensor) and c.output.dim() >= 2 and c.name not in seen:
            seen.add(c.name)
            rows.append(f"{c.name} ({type(c.module).__name__}, {tuple(c.output.shape)})")
    return ", ".join(rows[-12:]) if rows else "none"


def find_prune_layer(
    model: nn.Module, example: torch.Tensor, name: str | None = None
) -> LayerChoice:
    """Choose the layer to prune (or check the one the user named) on one example batch.

    A model may declare its paper layer with a `prune_layer` attribute (e.g. the face network
    prunes conv3, whose pooled output feeds both conv4 and the classifier); `name` overrides it.
    """
    if name is None and isinstance(getattr(model, "prune_layer", None), str):
        name = model.prune_layer
    calls = trace_calls(model, example)
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1

    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules or name == "":
            raise LayerNotFoundError(
                f"model has no module named {name!r}; modules with channel outputs: {_describe(calls)}"
            )
        mine = [c for c in calls if c.name == name]
        if len(mine) != 1:
            raise LayerNotFoundError(
                f"module {name!r} runs {len(mine)} times per forward pass; it must run exactly once "
                f"to be masked. Candidates: {_describe(calls)}"
            )
        out = mine[0].output
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise LayerNotFoundError(
                f"module {name!r} does not output a (batch, channels, ...) tensor"
            )
        return LayerChoice(name, modules[name], tuple(out.shape))

    conv_idx = [
        i for i, c in enumerate(calls)
        if isinstance(c.module, CONV_TYPES) and isinstance(c.output, torch.Tensor) and c.output.dim() >= 3
    ]
    if not conv_idx:
        raise LayerNotFoundError(
            "no convolutional layer (Conv1d/Conv2d/Conv3d) found; pass the layer to prune by name "
            f"(`layer`=NAME). Modules with channel outputs: {_describe(calls)}"
        )
    start = conv_idx[-1]
    current = calls[start].output
    best = start
    for j in range(start + 1, len(calls)):
        c = calls[j]
        if not c.inputs or c.inputs[0] is not current:
            continue
        if isinstance(c.module, CHANNELWISE_TYPES) and isinstance(c.output, torch.Tensor) \
                and c.output.shape == current.shape:
            current, best = c.output, j
        elif not isinstance(c.module, CHANNELWISE_TYPES):
            break
    # Outermost module that returns this very tensor and runs once (e.g. a whole ResNet stage).
    chosen = None
    for c in calls[best:]:
        if c.output is current and counts[c.name] == 1:
            chosen = c
    if chosen is None:
        raise LayerNotFoundError(
            f"the last conv feature map (after {calls[best].name}) is produced by a module that runs "
            f"several times per forward; name a layer explicitly. Candidates: {_describe(calls)}"
        )
    return LayerChoice(chosen.name, chosen.module, tuple(current.shape))


def producer_chain(model: nn.Module, example: torch.Tensor, layer: str) -> list[tuple[str, nn.Module]]:
    """The leaf modules that produced `layer`'s output, from the last conv (or the first
    non-channel-wise module) to the output itself, in forward order.

    Used to find where a channel can be switched off by its weights (e.g. the bias before a ReLU).
    """
    calls = trace_calls(model, example)
    mine = [c for c in calls if c.name == layer]
    if len(mine) != 1:
        raise LayerNotFoundError(f"module {layer!r} must run exactly once per forward")
    target = mine[0].output
    leaves = {n for n, m in model.named_modules() if not list(m.children())}
    # The last leaf call that returned the layer's output tensor.
    idx = max((i for i, c in enumerate(calls) if c.name in leaves and c.output is target), default=None)
    if idx is None:
        return []
    chain = [calls[idx]]
    while not isinstance(chain[-1].module, CONV_TYPES) and isinstance(chain[-1].module, CHANNELWISE_TYPES):
        src = chain[-1].inputs[0] if chain[-1].inputs else None
        prev = max((i for i, c in enumerate(calls[:idx]) if c.name in leaves and c.output is src), default=None)
        if prev is None:
            break
        idx = prev
        chain.append(calls[idx])
    return [(c.name, c.module) for c in reversed(chain)]
