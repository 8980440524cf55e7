"""Writing weights: safetensors only (plain data, safe for others to load), atomically."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch
from torch import nn

from fineprune.errors import BadInputError
from fineprune.runtime import atomic_path


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write weights as safetensors, atomically, so outputs are safe for others to load.

    Tensors are moved to CPU and made contiguous; tensors sharing memory (tied weights,
    views) are cloned because safetensors refuses shared storage. ``metadata`` is stored
    as the ``__metadata__`` header (``"format": "pt"`` is added unless given, as the
    Hugging Face loaders expect it).
    """
    if isinstance(model_or_state_dict, nn.Module):
        source: Mapping[str, Any] = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        source = model_or_state_dict
    else:
        raise TypeError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadInputError("safetensors metadata must map strings to strings")
    meta.setdefault("format", "pt")

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in source.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is not a str -> Tensor pair")
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.numel() == 0:
            tensors[key] = t.contiguous()
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
        if ptr in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(ptr)
        tensors[key] = t
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
