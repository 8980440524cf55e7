"""How fine-tuning's arithmetic runs: fp32 (the paper's, the default), or mixed precision.

Mixed precision (`torch.autocast`) runs the forward pass and the loss in bf16 or fp16 where
PyTorch deems it safe, while the weights, their gradients and the optimizer stay fp32: a faster
step for the same recipe, not a smaller model. Only fine-tuning uses it; the pruning sweep and
every accuracy that chooses something (stop point, best epoch, accuracy guard) stay exact fp32.

- bf16 has fp32's exponent range, so gradients cannot underflow: no loss scaling. It runs on
  CUDA GPUs that support it and on CPUs (fast where the CPU has bf16 instructions, e.g.
  AVX512-BF16/AMX; measure with bench/finetune_throughput.py --precision bf16).
- fp16 has a narrow range: small gradients underflow to zero unless the loss is scaled
  (`torch.amp.GradScaler`, which also skips a step whose gradients overflowed). CUDA only: on
  CPU, fp16 autocast ran about 9x slower than fp32 (the CPU has no fast fp16 matmul), so it is
  refused there with a pointer to bf16.

The channel masks are untouched by any of this: `masked_fill` writes an exact 0 in every dtype.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import BadInputError

if TYPE_CHECKING:
    from .purify.recipes import Recipe

PRECISIONS = ("fp32", "bf16", "fp16")
# fp32: exact, the paper's arithmetic. What chose it: exactness (bf16 is opt-in, BENCHMARKS).
DEFAULT_PRECISION = "fp32"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision_name(name: object) -> str:
    """`name` if it is one of PRECISIONS; BadInputError otherwise."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise BadInputError(f"`precision` must be one of {', '.join(PRECISIONS)}, not {name!r}")
    return name


def check_precision(name: str, device: torch.device | str, recipe: Recipe | None = None) -> None:
    """Refuse (BadInputError) a precision this device or recipe cannot use well, before any work."""
    check_precision_name(name)
    if name == "fp32":
        return
    dev = torch.device(device)
    if name == "fp16":
        if dev.type != "cuda":
            raise BadInputError(f"`precision` fp16 needs a CUDA device, not {dev.type} (fp16 has no fast kernels "
                                "on a CPU: it ran about 9x slower than fp32); use `precision` bf16")
        if recipe is not None and not recipe.grad_scaler:
            raise BadInputError(
                f"`precision` fp16 cannot be used with `recipe` {recipe.name}: fp16 needs loss scaling, and "
                f"{recipe.name} uses the raw gradients between its two passes (an overflow there would "
                "corrupt the weights before the scaler could skip the step); use `precision` bf16")
        return
    if dev.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise BadInputError("`precision` bf16 is not supported by this GPU; use `precision` fp16 or fp32")
    elif dev.type != "cpu" and not torch.amp.is_autocast_available(dev.type):
        raise BadInputError(f"`precision` bf16 is not available on {dev.type}; use `precision` fp32")


class _ScaledOptimizer:
    """The optimizer as a recipe's `step` sees it under fp16: `step()` goes through the GradScaler
    (unscale, skip the step if a gradient overflowed, adapt the scale); all else is the optimizer's."""

    def __init__(self, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self._opt, self._scaler = opt, scaler

    def step(self) -> None:
        self._scaler.step(self._opt)
        self._scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._opt.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._opt, name)


@dataclass
class Precision:
    """The per-batch arithmetic settings of one training run: autocast dtype (None: fp32), the
    loss scaler (fp16 only) and whether 4-D batches and weights use the channels-last memory
    format (a layout, not a precision, but likewise only a matter of speed)."""

    name: str = "fp32"
    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Where the forward pass and the loss run (a no-op in fp32: bit for bit the plain loop)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`opt`, or under fp16 a view of it whose `step` is the scaler's."""
        return opt if self.scaler is None else _ScaledOptimizer(opt, self.scaler)  # type: ignore[return-value]

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def set_layout(self, model: nn.Module) -> None:
        """Channels-last weights for training (no-op unless `channels_last`)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    def reset_layout(self, model: nn.Module) -> None:
        """The ordinary layout again after training: safetensors and most consumers want
        contiguous tensors."""
        if self.channels_last:
            model.to(memory_format=torch.contiguous_format)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def make_precision(name: str, device: torch.device | str, recipe: Recipe | None = None, *,
                   channels_last: bool = False) -> Precision:
    """The `Precision` for a run (checked by `check_precision`). `channels_last` changes only 4-D
    tensors: image batches and convolution weights (other inputs pass unchanged)."""
    check_precision(name, device, recipe)
    dev = torch.device(device)
    if name == "fp32":
        return Precision(device_type=dev.type, channels_last=bool(channels_last))
    scaler = torch.amp.GradScaler(dev.type) if name == "fp16" else None
    return Precision(name=name, device_type=dev.type, dtype=_DTYPES[name], scaler=scaler,
                     channels_last=bool(channels_last))
