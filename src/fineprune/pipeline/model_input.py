"""The received model: weights read safely, then put into the architecture the user named.

The file's own code never runs (see `fineprune.io.model_files`); the architecture comes from
`--arch`. Before any data is loaded, the weights also say how many input channels the model's
first convolution takes, so image folders can be read as greyscale or colour to match, and a
mismatch is reported as such rather than as a confusing shape error.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BadInputError
from ..io.arch import build_arch
from ..io.model_files import LoadedModel, load_into

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def first_conv_channels(arch: str, loaded: LoadedModel) -> int | None:
    """Input channels of the architecture's first convolution according to the weights file
    (None when the architecture has no convolution or the file lacks its weight)."""
    try:
        probe = build_arch(arch, 2)  # the class count only changes the last layer
    except BadInputError:
        raise
    except Exception:  # a user factory that insists on its own class count: no hint, no harm
        return None
    first = next(((n, m) for n, m in probe.named_modules() if isinstance(m, _CONVS)), None)
    if first is None or loaded.state_dict is None:
        return None
    weight = loaded.state_dict.get(f"{first[0]}.weight")
    if weight is None or weight.dim() < 2:
        return None
    return int(weight.shape[1]) * first[1].groups


def build_model(arch: str, num_classes: int, in_channels: int, loaded: LoadedModel,
                expected_channels: int | None) -> nn.Module:
    """The architecture with the file's weights, in eval mode."""
    if expected_channels is not None and expected_channels != in_channels:
        raise BadInputError(
            f"the model's first convolution takes {expected_channels} input channel(s) but the data "
            f"has {in_channels}; convert the data (`image_mode` grey|rgb for image folders) or check `arch`")
    model = build_arch(arch, num_classes, in_channels=in_channels)
    load_into(model, loaded)
    return model.eval()


@torch.no_grad()
def check_outputs(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """The model must map a batch to (N, num_classes) class scores."""
    n = min(2, x.shape[0])
    try:
        logits = model(x[:n])
    except RuntimeError as exc:
        raise BadInputError(f"the model cannot run on inputs of shape {tuple(x.shape[1:])} "
                            f"({str(exc).splitlines()[0]}); check `input_size` and the data") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise BadInputError(f"the model outputs {shape} for {n} inputs; expected ({n}, {num_classes}) "
                            "class scores (check `num_classes` and `arch`)")
