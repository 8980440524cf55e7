"""Saving and loading pruned models: weights in safetensors, masks in its metadata.

The masks travel as `{"layer": {"pruned": [...], "channels": C}, ...}` JSON (plus `"channel_dim": -1`
for channels-last layers such as a transformer MLP's hidden units) under the metadata key
`fineprune.masks`, so the file loads into the plain architecture (same keys) and fineprune puts
the masks back; pruned channels stay exactly zero after a round trip.
"""
from __future__ import annotations

import json
import os

from torch import nn

from ..errors import BadInputError
from ..io.model_files import load_into, load_weights, save_weights
from .mask import keep_mask, masked_layers, module_channel_dim, set_pruned

MASK_KEY = "fineprune.masks"


def save_pruned(model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    """Write weights + masks atomically (the mask metadata also records channel counts)."""
    masks = {}
    for layer, pruned in masked_layers(model).items():
        masks[layer] = {"pruned": pruned, "channels": int(keep_mask(model, layer).numel())}
        dim = module_channel_dim(model.get_submodule(layer))
        if dim != 1:  # channels last (a transformer MLP's hidden units); absent = 1, as before
            masks[layer]["channel_dim"] = dim
    meta = dict(metadata or {})
    meta[MASK_KEY] = json.dumps(masks)
    save_weights(model, path, meta)


def load_pruned(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load weights into `model` (in place) and re-apply the saved masks; returns the model."""
    loaded = load_weights(path)
    if loaded.state_dict is None:
        raise BadInputError(f"{path} is not a weights file fineprune can re-mask (use safetensors)")
    load_into(model, loaded)
    try:
        masks = json.loads(loaded.metadata.get(MASK_KEY, "{}"))
        for layer, spec in masks.items():
            dim = spec.get("channel_dim")
            set_pruned(model, layer, spec["pruned"], int(spec["channels"]),
                       None if dim is None else int(dim))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInputError(f"{path}: the saved channel masks are malformed ({exc})") from None
    return model


