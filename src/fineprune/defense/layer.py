"""Find the layer the paper prunes: the last convolutional feature map before the classifier.

We run the model once on an example input with hooks on every module, then follow the output of
the last convolution through the channel-wise operations that come straight after it (BatchNorm,
activation, dropout, a residual add done in place). The chosen module is the outermost one that
returns exactly that tensor and is called once per forward, so that ranking and masking act on the
same tensor: in a ResNet this is the last residual stage (output after its ReLU), in a plain CNN the
ReLU after the last conv.

Transformers (ViT, DeiT, MLP-Mixer) have no such layer: their only convolution is the patch
embedding at the *start*. When the last conv is followed by transformer blocks (attention modules
and token MLPs, or several token MLPs as in a Mixer) the hidden units of the LAST block's MLP are
chosen instead (the activation right after its first Linear, `blocks[-1].mlp.act` in timm): like
the paper's last conv channels they are the network's last wide layer of learned features, and a
backdoor that needs dedicated neurons can hide there. Their channels are the LAST dimension of the
(batch, tokens, hidden) output; `LayerChoice.channel_dim` says so and the module is annotated
(`channel_dim_of`), so masks, statistics, the cached sweep and the exports all use that dimension.

Which modules produce a layer's channels is answered here once, by `producer_calls` on the traced
calls: layer choice, CLP (`purify.criteria`), the exports (`anchor_of`) and the attacks use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerNotFoundError
from .mask import CHANNEL_DIM_ATTR, module_channel_dim

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules that keep the channel layout of their input (so the channels stay "the conv's channels").
CHANNELWISE_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)


# Element-wise modules allowed between an MLP's two Linears (a norm over the hidden units is not).
_MLP_INNER_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Identity,
)
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
# Pooling keeps channels apart, so CLP and the exports look through it (layer choice does not).
POOL_TYPES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
# By channel dimension: (producer types, types allowed between producer and layer). Channels last
# are a Linear's units: a norm or pooling there would act on the tokens, so only element-wise ones.
PRODUCER_LINKS = {1: (CONV_TYPES, CHANNELWISE_TYPES + POOL_TYPES), -1: ((nn.Linear,), _MLP_INNER_TYPES)}
# Modules with per-channel parameters: where the exports cut (compact) or zero (bake) a channel.
ANCHOR_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
# Why the module was chosen: a plain attribute (not in the state_dict, kept by deepcopy), so the
# report can say it; the channel dimension is annotated likewise (`mask.CHANNEL_DIM_ATTR`).
REASON_ATTR = "fineprune_layer_reason"


@dataclass
class LayerChoice:
    """The module whose output is ranked and masked, the shape of that output, which dimension
    holds its channels (1 for conv maps, -1 for a transformer MLP's (B, T, hidden) units) and why
    it was chosen (shown in the report)."""

    name: str
    module: nn.Module
    output_shape: tuple[int, ...]
    channel_dim: int = 1
    reason: str = ""

    @property
    def channels(self) -> int:
        return self.output_shape[self.channel_dim]


def channel_dim_of(model: nn.Module, layer: str, example: torch.Tensor | None = None) -> int:
    """The dimension of `layer`'s output that holds its channels: the module's annotation (set by
    `find_prune_layer` or `set_pruned(channel_dim=...)`); else, with `example`, detected from the
    structure (`_layout`) and annotated; else 1 (channels first, as in a CNN)."""
    module = model.get_submodule(layer)
    dim = getattr(module, CHANNEL_DIM_ATTR, None)
    if dim is not None:
        return int(dim)
    if example is None:
        return 1
    calls = trace_calls(model, example)
    mine = [c for c in calls if c.name == layer]
    dim = _layout(calls, mine[-1]) if mine else 1
    setattr(module, CHANNEL_DIM_ATTR, dim)
    return dim


def layer_reason(model: nn.Module, layer: str | None) -> str | None:
    """Why `find_prune_layer` chose `layer` (None when unknown, e.g. a model loaded from a file)."""
    if layer is None:
        return None
    try:
        return getattr(model.get_submodule(layer), REASON_ATTR, None)
    except AttributeError:
        return None


@dataclass
class _Call:
    name: str
    module: nn.Module
    inputs: tuple
    output: object
    leaf: bool  # no child modules: its output is made by its own code


def trace_calls(model: nn.Module, example: torch.Tensor) -> list[_Call]:
    """Every module call (name, module, inputs, output) of one eval-mode pass, children before parents."""
    calls: list[_Call] = []
    handles = []
    for name, module in model.named_modules():
        if name == "":
            continue
        leaf = not list(module.children())
        handles.append(
            module.register_forward_hook(
                lambda m, i, o, name=name, leaf=leaf: calls.append(_Call(name, m, i, o, leaf))
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
    The chosen module is annotated with its channel dimension and the reason (see module docstring).
    """
    choice = _find(model, example, name)
    setattr(choice.module, CHANNEL_DIM_ATTR, choice.channel_dim)
    setattr(choice.module, REASON_ATTR, choice.reason)
    return choice


def _find(model: nn.Module, example: torch.Tensor, name: str | None) -> LayerChoice:
    declared = name is None and isinstance(getattr(model, "prune_layer", None), str)
    if declared:
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
        dim = _layout(calls, mine[0])
        why = ("declared by the model (its `prune_layer` attribute)" if declared
               else "named by the user (`layer`)")
        if dim != 1:
            why += "; its channels are the last dimension (units of a Linear applied to tokens)"
        return LayerChoice(name, modules[name], tuple(out.shape), dim, why)

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
    mlp = _transformer_mlp(calls, start, counts)
    if mlp is not None:
        return mlp
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
    why = f"last convolutional feature map: output of {calls[start].name}"
    if chosen.name != calls[start].name:
        why += " after its channel-wise operations"
    return LayerChoice(chosen.name, chosen.module, tuple(current.shape), 1,
                       why + ", as in the paper")


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def _mlp_hidden(calls: list[_Call], j: int) -> _Call | None:
    """If call j is the second Linear of an MLP on a token tensor (>= 3-D, features last) --
    Linear -> activation (-> dropout / identity) -> Linear -- the call whose output is the hidden
    units: the last activation module on that path."""
    fc2 = calls[j]
    x = fc2.inputs[0] if fc2.inputs else None
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        return None
    chain = producer_calls(calls, x, *PRODUCER_LINKS[-1], end=j)
    if not chain or not isinstance(chain[0].module, nn.Linear) \
            or chain[0].output.shape[-1] != fc2.module.in_features:
        return None
    acts = [c for c in chain[1:] if not isinstance(c.module, _PASS_THROUGH)]
    return acts[-1] if acts else None


def _transformer_mlp(calls: list[_Call], start: int, counts: dict[str, int]) -> LayerChoice | None:
    """The last block's MLP hidden units when transformer blocks follow the last conv (call index
    `start`): an attention module and a token MLP run after it, or at least two token MLPs (an
    MLP-Mixer's token and channel MLPs). A CNN's classifier MLP runs on (B, C) vectors, and a
    ConvNeXt block's MLP comes after a conv inside the same block with no attention, so neither
    counts. None when the model is not such a transformer."""
    after = range(start + 1, len(calls))
    attention = any(_is_attention(calls[j].module) for j in after)
    mlps = [(j, c) for j in after if isinstance(calls[j].module, nn.Linear) and calls[j].leaf
            and (c := _mlp_hidden(calls, j)) is not None]
    if not mlps or (not attention and len(mlps) < 2):
        return None
    for j, c in reversed(mlps):
        if counts[c.name] != 1:
            continue
        fc2 = calls[j].name
        why = (f"last transformer block's MLP hidden units (the activation before {fc2}): the only "
               f"convolution, {calls[start].name}, embeds the input at the start, so no convolution "
               "ends the feature extractor; channels are the last dimension (one per hidden unit, "
               "over all tokens)")
        return LayerChoice(c.name, c.module, tuple(c.output.shape), -1, why)
    raise LayerNotFoundError(
        "transformer blocks follow the last convolution, but their MLP activations run several times "
        f"per forward; name the layer to prune (`layer`=NAME). Candidates: {_describe(calls)}")


def _layout(calls: list[_Call], call: _Call) -> int:
    """-1 when `call`'s output is a >= 3-D tensor whose values come from a Linear (through
    element-wise modules): a Linear acts on the last dimension, so that is where the units are."""
    out = call.output
    if not isinstance(out, torch.Tensor) or out.dim() < 3:
        return 1
    if isinstance(call.module, nn.Linear):
        return -1
    chain = producer_calls(calls, out, *PRODUCER_LINKS[-1])
    return -1 if chain and isinstance(chain[0].module, nn.Linear) else 1


def producer_calls(calls: list[_Call], tensor: object, producers: tuple[type, ...],
                   through: tuple[type, ...], end: int | None = None) -> list[_Call]:
    """The leaf calls that made `tensor`, in forward order, found by tensor identity in `calls`
    (`trace_calls`): from the last leaf call before index `end` that returned it, back to the call
    that returned its first input, while the module is of a `through` type. The walk stops at a
    `producers` module, at a module of neither kind (either one is kept, first in the list) or at
    an input no leaf module returned (a functional op, a residual sum, the model input): callers
    check `chain[0]`. Empty when no leaf module returned `tensor`. An in-place module after it
    (ReLU(inplace=True)) returns the same tensor, so it is part of the chain."""
    stop = len(calls) if end is None else end
    chain: list[_Call] = []
    while True:
        idx = max((i for i in range(stop) if calls[i].leaf and calls[i].output is tensor), default=None)
        if idx is None:
            break
        call = calls[idx]
        chain.append(call)
        if isinstance(call.module, producers) or not isinstance(call.module, through) or not call.inputs:
            break
        tensor, stop = call.inputs[0], idx
    chain.reverse()
    return chain


def producer_chain(model: nn.Module, example: torch.Tensor, layer: str) -> list[tuple[str, nn.Module]]:
    """The leaf modules that produced `layer`'s output, from the last conv (or the first
    non-channel-wise module) to the output itself, in forward order.

    Used to find where a channel can be switched off by its weights (e.g. the bias before a ReLU).
    """
    calls = trace_calls(model, example)
    mine = [c for c in calls if c.name == layer]
    if len(mine) != 1:
        raise LayerNotFoundError(f"module {layer!r} must run exactly once per forward")
    chain = producer_calls(calls, mine[0].output, CONV_TYPES, CHANNELWISE_TYPES)
    return [(c.name, c.module) for c in chain]


def anchor_of(model: nn.Module, layer: str, example: torch.Tensor, channels: int) -> str:
    """The module whose output channels are `layer`'s (dim 1 of size `channels`, or the last dim
    for a channels-last layer such as a transformer MLP's hidden units, whose anchor is the MLP's
    first Linear): where the compact export's cut starts and whose per-channel parameters
    `bake.bake_masks` zeroes. It is the last conv/linear/norm on the `producer_calls` chain; where
    that chain does not reach a conv or Linear (a functional op in between), the last such module
    run at or before `layer` with that many channels. Both exports check the result numerically.
    Raises ValueError if none."""
    cdim = module_channel_dim(model.get_submodule(layer))
    calls = trace_calls(model, example)
    end = next((i for i, c in enumerate(calls) if c.name == layer), None)
    if end is None:
        raise ValueError(f"layer {layer!r} did not run on the example input")

    def fits(c: _Call) -> bool:
        out = c.output
        return isinstance(c.module, ANCHOR_TYPES) and isinstance(out, torch.Tensor) \
            and out.dim() >= 2 and out.shape[cdim] == channels

    links = PRODUCER_LINKS.get(cdim)
    chain = producer_calls(calls, calls[end].output, *links, end=end + 1) if links else []
    if chain and isinstance(chain[0].module, links[0]):
        found = [c for c in chain if fits(c)]
        if found:
            return found[-1].name
    for c in reversed(calls[: end + 1]):
        if fits(c):
            return c.name
    raise ValueError(f"no convolution, linear or normalisation layer produces the {channels} channels "
                     f"of {layer!r}")
