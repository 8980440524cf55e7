"""Channel masks that live on the output tensor of a module.

The mask is a forward hook on the chosen module plus a non-persistent buffer on it, so the model's
state_dict keys (its "architecture") do not change, the mask follows `.to(device)`, and a pruned
channel is exactly zero for every input whatever the weights become during fine-tuning (its
gradient is zero too). `masked_fill` rather than a multiply keeps zeros exact even for Inf/NaN.

Channels are dim 1 of a conv map (N, C, ...). A transformer MLP's hidden units are the LAST dim of
its (N, T, H) output; the module then carries the annotation `fineprune_channel_dim = -1` (a plain
attribute set by `layer.find_prune_layer` or `set_pruned(channel_dim=-1)`, kept by deepcopy and
saved with the masks by `persist`), which the hook and every channel statistic read.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_BUFFER = "fineprune_keep"
CHANNEL_DIM_ATTR = "fineprune_channel_dim"


def keep_shape(num_channels: int, ndim: int, channel_dim: int = 1) -> tuple[int, ...]:
    """Broadcast shape of a per-channel mask for a tensor of `ndim` dims with channels at
    `channel_dim` (1 for (N, C, ...), -1 for channels last)."""
    shape = [1] * ndim
    shape[channel_dim] = num_channels
    return tuple(shape)


def apply_keep(t: torch.Tensor, keep: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Zero the channels (dim `channel_dim`) where `keep` is False."""
    return t.masked_fill(~keep.view(keep_shape(keep.shape[0], t.dim(), channel_dim)), 0.0)


def module_channel_dim(module: nn.Module) -> int:
    """The channel dimension annotated on `module` (1 when none: channels first)."""
    return int(getattr(module, CHANNEL_DIM_ATTR, 1))


def _hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    keep = getattr(module, _BUFFER)
    if keep.device != output.device:
        keep = keep.to(output.device)
    return apply_keep(output, keep, module_channel_dim(module))


def set_pruned(model: nn.Module, layer: str, channels: Sequence[int], num_channels: int,
               channel_dim: int | None = None) -> None:
    """Mask `channels` of `layer`'s output (replacing any previous mask on it). `channel_dim`
    (1, or -1 for channels last) is annotated on the module; None keeps its annotation."""
    module = model.get_submodule(layer)
    if channel_dim is not None:
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (channels first) or -1 (channels last), not {channel_dim}")
        setattr(module, CHANNEL_DIM_ATTR, channel_dim)
    keep = torch.ones(num_channels, dtype=torch.bool, device=_device_of(module, model))
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_channels):
        raise ValueError(f"channel index out of range 0..{num_channels - 1}")
    keep[idx.to(keep.device)] = False
    if hasattr(module, _BUFFER) and _BUFFER in module._buffers:
        module._buffers[_BUFFER] = keep
    else:
        module.register_buffer(_BUFFER, keep, persistent=False)
    if not _hooked(module):
        module.register_forward_hook(_hook)


def clear_mask(model: nn.Module, layer: str) -> None:
    """Remove the mask (the channels come back)."""
    module = model.get_submodule(layer)
    for key, fn in list(module._forward_hooks.items()):
        if fn is _hook:
            del module._forward_hooks[key]
    module._buffers.pop(_BUFFER, None)


def keep_mask(model: nn.Module, layer: str) -> torch.Tensor | None:
    """The boolean keep mask on `layer`'s output (True = channel kept), or None when unmasked."""
    module = model.get_submodule(layer)
    keep = module._buffers.get(_BUFFER)
    return keep if keep is not None and _hooked(module) else None


def pruned_channels(model: nn.Module, layer: str) -> list[int]:
    """Indices currently masked on `layer` (empty if none)."""
    module = model.get_submodule(layer)
    keep = module._buffers.get(_BUFFER)
    if keep is None or not _hooked(module):
        return []
    return torch.nonzero(~keep).flatten().tolist()


def masked_layers(model: nn.Module) -> dict[str, list[int]]:
    """Every masked layer of the model and its pruned channels (for saving)."""
    out = {}
    for name, module in model.named_modules():
        if _hooked(module) and _BUFFER in module._buffers:
            out[name] = pruned_channels(model, name)
    return out


def _hooked(module: nn.Module) -> bool:
    # Found by identity rather than a stored handle, so deep copies of a masked model work.
    return any(fn is _hook for fn in module._forward_hooks.values())


def _device_of(module: nn.Module, model: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()) + list(model.parameters()):
        return t.device
    return torch.device("cpu")
