"""Make a defended model defended without fineprune: bake the masks into the weights, or trace them.

fineprune's masks are forward hooks (mask.py); a file loaded the ordinary way
(`model.load_state_dict(safetensors.torch.load_file(path))`) has no hooks, so its pruned channels
come back and, after `--method prune`, it is exactly the backdoored model again.

`bake_masks` zeroes, on a copy, the per-channel parameters of the module that produces the masked
channels (a conv's filter and bias, a Linear's row and bias, or the affine weight and bias of the
BatchNorm/GroupNorm between the conv and the ReLU). The plain architecture then computes the masked
model whenever nothing between that module and the masked layer turns a zero into something else
(ReLU keeps 0, Sigmoid does not) and nothing else feeds the channel (a ResNet stage's output is
also fed by the shortcut). That is checked, never assumed: with the hooks removed, the layer's
output must be exactly zero on the pruned channels and the logits must equal the masked model's on
random and real inputs; otherwise nothing is baked and the note says why.

Baking is an explicit step used only for the defended output files. Everything else keeps the
pruned channels' original weights on purpose: the pruning-aware attack reinstates pruned channels
as decoys from them, and the model store of `reproduce`/`grid` must give back the very model that
was trained (a mask can be cleared later; zeroed weights cannot be restored).

Where baking is not exact, `trace_masked` gives a TorchScript module with the mask inside (the
hook's ops are recorded by the trace), checked against the masked model on the same inputs.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..runtime import atomic_path
from .layer import anchor_of
from .mask import clear_mask, keep_mask, masked_layers, module_channel_dim

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@dataclass
class BakeResult:
    """Whether the plain weights of `model` compute the masked model (`baked`), and the evidence.

    `model` is the copy to save (pruned channels' producer parameters zeroed, masks still on) when
    baked; None otherwise (save the original: its weights are unchanged)."""

    baked: bool
    note: str
    anchors: dict[str, str] = field(default_factory=dict)  # masked layer -> module whose parameters were zeroed
    zeroed: list[str] = field(default_factory=list)  # parameter names changed
    max_abs_diff: float | None = None  # logits: plain (no hooks) vs the masked model
    checked_inputs: int = 0
    seconds: float = 0.0
    model: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "model"}


@dataclass
class TraceResult:
    """A TorchScript module of the masked model (eval mode, CPU, float32) and its check."""

    exported: bool
    note: str
    max_abs_diff: float | None = None  # logits: traced vs masked model
    checked_inputs: int = 0
    seconds: float = 0.0
    module: torch.jit.ScriptModule | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "module"}


def _check_inputs(example: torch.Tensor, real_inputs: torch.Tensor | None,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(one example on CPU in float32, the check inputs: 8 random ones shaped like it plus the
    real ones)."""
    example = example[:1].detach().cpu().float()
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn((8, *example.shape[1:]), generator=g)]
    if real_inputs is not None and real_inputs.shape[0]:
        parts.append(real_inputs.detach().cpu().float())
    return example, torch.cat(parts)


def _reference(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A CPU float32 eval copy of the masked model to work on, and its logits on `x`: what every
    output must reproduce."""
    work = copy.deepcopy(model).cpu().float().eval()
    ref, _ = _capture(work, [], x)
    return work, ref


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@torch.no_grad()
def _zero_channels(module: nn.Module, idx: torch.Tensor) -> list[str]:
    """Zero the parameters that produce output channels `idx` of `module`; their local names."""
    names = []
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:  # weight is (in, out / groups, ...)
            if module.groups != 1:
                raise ValueError("a grouped transposed convolution's channels are not baked")
            module.weight[:, idx] = 0
        else:
            module.weight[idx] = 0
        names.append("weight")
    elif isinstance(module, nn.Linear):
        module.weight[idx] = 0
        names.append("weight")
    elif isinstance(module, _NORM_TYPES):
        if module.weight is None or module.bias is None:
            raise ValueError(f"{type(module).__name__} has no affine weight and bias to zero")
        module.weight[idx] = 0
        names.append("weight")
    else:
        raise ValueError(f"{type(module).__name__} has no per-channel parameters to zero")
    if getattr(module, "bias", None) is not None:
        module.bias[idx] = 0
        names.append("bias")
    return names


def _capture(model: nn.Module, layers: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's output on `x` and the outputs of `layers` (after any hooks already on them)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in layers]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model returns {type(out).__name__}, not a tensor of logits")
    return out, seen


def _live(out: torch.Tensor, pruned: list[int]) -> list[int]:
    """The pruned channels that are not exactly zero somewhere in `out` (NaN counts as not zero)."""
    nonzero = out[:, pruned].ne(0).transpose(0, 1).reshape(len(pruned), -1).any(1).tolist()
    return [c for c, bad in zip(pruned, nonzero) if bad]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b|, with NaN in either counting as infinitely different unless both are NaN."""
    if a.shape != b.shape:
        return float("inf")
    same_nan = torch.isnan(a) & torch.isnan(b)
    d = (a - b).abs().masked_fill(same_nan, 0.0)
    return float(d.max()) if d.numel() else 0.0


def bake_masks(model: nn.Module, example: torch.Tensor, *, real_inputs: torch.Tensor | None = None,
               seed: int = 0, tol: float = 0.0) -> BakeResult:
    """Zero the pruned channels' producing parameters on a copy of `model` when (and only when)
    the plain architecture then computes the masked model on the checked inputs.

    `example` is one input batch (shape only); `real_inputs` (a few; clean and triggered ones are
    best) join 8 random inputs in the check, which runs on CPU in float32 (the baked copy is a CPU
    float32 model). `tol` bounds the logit difference (default 0: bit-identical, which is what
    zeroing gives). The input model is never modified; a model without masks is returned as is.
    Never raises for an unsupported architecture: `baked` is False and `note` says why.
    """
    t0 = time.perf_counter()
    res = BakeResult(baked=False, note="")

    def done(baked: bool, note: str, baked_model: nn.Module | None = None) -> BakeResult:
        res.baked, res.note, res.model, res.seconds = baked, note, baked_model, time.perf_counter() - t0
        return res

    masks = masked_layers(model)
    if not masks:
        return done(True, "no channel is masked: the weights alone are the defended model", model)
    example, x = _check_inputs(example, real_inputs, seed)
    res.checked_inputs = int(x.shape[0])
    try:
        work, ref = _reference(model, x)
        for layer, pruned in masks.items():
            if not pruned:
                continue
            channels = int(keep_mask(work, layer).numel())
            anchor = anchor_of(work, layer, example, channels)
            idx = torch.as_tensor(pruned, dtype=torch.long)
            res.anchors[layer] = anchor
            res.zeroed += [f"{anchor}.{p}" for p in _zero_channels(work.get_submodule(anchor), idx)]
        plain = copy.deepcopy(work)
        for layer in masks:
            clear_mask(plain, layer)
        out_plain, seen = _capture(plain, list(masks), x)
        out_masked, _ = _capture(work, [], x)
        live = {layer: _live(seen[layer].movedim(module_channel_dim(work.get_submodule(layer)), 1), pruned)
                for layer, pruned in masks.items() if pruned}
    except Exception as exc:  # arbitrary models fail in many ways; report, never crash the run
        return done(False, f"the masks could not be baked into the weights ({_first_line(exc)})")
    res.max_abs_diff = max(_max_diff(ref, out_plain), _max_diff(ref, out_masked))
    live = {layer: chans for layer, chans in live.items() if chans}
    anchors = ", ".join(sorted(set(res.anchors.values()))) or "none"
    if live or not res.max_abs_diff <= tol:
        res.zeroed = []
        if live:
            why = ("with the hooks removed, pruned channels are not zero at "
                   + "; ".join(f"{layer} (channels {chans[:5]}{' ...' if len(chans) > 5 else ''})"
                               for layer, chans in live.items())
                   + ". Something other than that module also feeds these channels (e.g. a ResNet "
                     "stage's shortcut), or an operation between it and the layer does not map 0 to 0")
        else:
            why = (f"the logits differ from the masked model's by up to {res.max_abs_diff:.3g} (the zeroed "
                   "parameters also feed something the mask does not cover)")
        return done(False, f"zeroing the pruned channels' parameters of {anchors} does not reproduce the "
                           f"masked model: {why}; the weights are left unchanged")
    n = sum(len(p) for p in masks.values())
    if not n:
        return done(True, "no channel was pruned: the weights alone are the defended model", work)
    return done(True, f"zeroed {', '.join(res.zeroed)} for the {n} pruned channel(s); with the hooks "
                      f"removed the pruned channels are exactly zero and the logits equal the masked "
                      f"model's (max |difference| {res.max_abs_diff:.1e} on {res.checked_inputs} random "
                      "and real inputs)", work)


def trace_masked(model: nn.Module, example: torch.Tensor, *, real_inputs: torch.Tensor | None = None,
                 seed: int = 0, tol: float = 1e-5) -> TraceResult:
    """`torch.jit.trace` of the masked model (CPU, float32, eval mode), checked against it on 8
    random inputs plus `real_inputs` (another batch size than the trace's); `tol` bounds the logit
    difference (the same ops run, so it is 0 in practice; `max_abs_diff` records it). Never
    raises: `exported` is False and `note` says why when tracing or the check fails."""
    t0 = time.perf_counter()
    res = TraceResult(exported=False, note="")
    example, x = _check_inputs(example, real_inputs, seed)
    res.checked_inputs = int(x.shape[0])
    try:
        work, ref = _reference(model, x)
        with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(work, example, check_trace=False)
            with torch.no_grad():  # TorchScript optimises a graph after its first calls: check a later one too
                outs = [traced(x) for _ in range(3)]
    except Exception as exc:
        res.note, res.seconds = f"the masked model could not be traced ({_first_line(exc)})", time.perf_counter() - t0
        return res
    res.max_abs_diff = max(_max_diff(ref, out) for out in outs)
    res.seconds = time.perf_counter() - t0
    if not res.max_abs_diff <= tol:
        res.note = (f"the traced model differs from the masked model (max |logit difference| "
                    f"{res.max_abs_diff:.3g}); not exported")
        return res
    res.exported, res.module = True, traced
    res.note = (f"TorchScript of the masked model (mask inside); logits equal the masked model's "
                f"(max |difference| {res.max_abs_diff:.1e} on {res.checked_inputs} random and real inputs)")
    return res


def save_torchscript(result: TraceResult, path: str | os.PathLike[str]) -> None:
    """Write the traced module atomically (temporary file, then rename)."""
    if not result.exported or result.module is None:
        raise ValueError("no traced model to save")
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(result.module, str(tmp))
