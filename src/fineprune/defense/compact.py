"""Compact export: physically remove the pruned channels, so the model gets smaller and faster.

The masked model keeps its architecture (pruned channels are zeroed by a hook). Here the channels
are cut out of the weights with Torch-Pruning's dependency graph, which follows the couplings a
channel has: the producer's output channels (conv/linear), the BatchNorm after it, the consumers'
input channels (the next conv, or the Linear after a flatten), and, in a ResNet stage, every block
that shares the residual channel.

Removal is only exact when every tensor that loses the channel was zero there in the masked
model. That holds for a plain CNN (mask after the last conv's ReLU), for a layer inside a
residual branch and for a transformer MLP's hidden units (fc1's rows and bias and fc2's input
columns go; the channels are the last dimension there), but not for a ResNet stage's output: the mask zeroes the channel at the stage
output only, while inside the stage the same channel still feeds the next block. So every export
is checked numerically against the masked model (float64, random and real inputs); when the
outputs differ by more than `tol`, nothing is exported and the note says why.

The compact file is safetensors with the cut recorded in its metadata (`fineprune.compact`: the
anchor module, the removed channel indices, the example input shape). `load_compact` rebuilds the
compact architecture from the plain one by replaying the same cut, then loads the weights.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError
from ..io.model_files import load_into, load_weights, save_weights
from .layer import anchor_of
from .mask import clear_mask, keep_mask, pruned_channels

COMPACT_KEY = "fineprune.compact"


@dataclass
class CompactResult:
    """Outcome of a compaction attempt; `model` is set only when it was exported."""

    exported: bool
    note: str
    layer: str
    anchor: str | None = None
    removed: list[int] = field(default_factory=list)
    channels_before: int = 0
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    max_abs_diff: float | None = None  # float64 logits, masked vs compact
    max_abs_diff_float32: float | None = None
    input_shape: list[int] = field(default_factory=list)
    coupled_modules: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "model"}
        d["channels_after"] = self.channels_before - len(self.removed) if self.exported else None
        return d

    def spec(self) -> dict[str, Any]:
        """What `load_compact` needs to rebuild the compact architecture from the plain one."""
        return {"layer": self.layer, "anchor": self.anchor, "removed": self.removed,
                "input_shape": self.input_shape}


def _tp():
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise RuntimeError("compact export needs torch-pruning (pip install 'torch-pruning>=1.5')") from exc
    return tp


def _cut(model: nn.Module, anchor: str, removed: list[int], example: torch.Tensor) -> list[str]:
    """Remove `removed` output channels of `anchor` and everything coupled to them, in place.
    Returns the names of the modules that changed shape."""
    tp = _tp()
    was_training = model.training
    model.eval()  # tracing runs a forward pass: BatchNorm statistics must not move
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        module = model.get_submodule(anchor)
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=list(removed))
        if not graph.check_pruning_group(group):
            raise ValueError("the cut would remove every channel of a coupled layer")
        names = {m: n for n, m in model.named_modules()}
        touched = sorted({names[dep.target.module] for dep, _ in group
                          if dep.target.module in names})
        group.prune()
    finally:
        model.train(was_training)
    return touched


def _count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    macs, params = _tp().utils.count_ops_and_params(model, example)
    return int(macs), int(params)


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits in float32 and in float64 (the model is returned to float32)."""
    out32 = model(x)
    try:
        out64 = model.double()(x.double())
    finally:
        model.float()
    return out32, out64


def compact_model(
    model: nn.Module, layer: str, example: torch.Tensor, *, real_inputs: torch.Tensor | None = None,
    tol: float = 1e-5, seed: int = 0,
) -> CompactResult:
    """Try to remove the channels masked on `layer` from a copy of `model` (see module docstring).

    `example` is one input batch (its shape fixes the traced graph); `real_inputs`, if given, join
    random inputs in the equivalence check. Never raises for an unsupported architecture: the
    result's `note` says why it was skipped.
    """
    t0 = time.perf_counter()
    removed = pruned_channels(model, layer)
    keep = keep_mask(model, layer)
    channels = int(keep.numel()) if keep is not None else 0
    example = example[:1].detach().cpu().float()
    res = CompactResult(exported=False, note="", layer=layer, removed=removed, channels_before=channels,
                        input_shape=list(example.shape))

    def skip(note: str) -> CompactResult:
        res.note, res.seconds = note, time.perf_counter() - t0
        return res

    if not removed:
        return skip("no channel was pruned, so there is nothing to remove")
    if len(removed) >= channels:
        return skip("every channel of the layer was pruned; a layer cannot be removed entirely")
    g = torch.Generator().manual_seed(seed)
    checks = [torch.randn((8, *example.shape[1:]), generator=g)]
    if real_inputs is not None and real_inputs.shape[0]:
        checks.append(real_inputs[:16].detach().cpu().float())
    x = torch.cat(checks)
    # One working copy: outputs of the masked model first, then the mask is cleared and the copy
    # is cut in place. float32 -> float64 -> float32 is exact, so switching dtypes loses nothing.
    work = copy.deepcopy(model).cpu().float().eval()
    try:
        ref32, ref64 = _outputs(work, x)
    except Exception as exc:
        return skip(f"the model does not run on CPU inputs of shape {tuple(x.shape)} ({exc})")
    clear_mask(work, layer)
    try:
        res.macs_before, res.params_before = _count(work, example)
        res.anchor = anchor_of(work, layer, example, channels)
        res.coupled_modules = _cut(work, res.anchor, removed, example)
        out32, out64 = _outputs(work, x)
    except Exception as exc:  # tracing arbitrary models fails in many ways; report, do not crash
        first = str(exc).splitlines()[0] if str(exc) else ""
        return skip(f"Torch-Pruning could not cut this architecture ({type(exc).__name__}: {first})")
    res.max_abs_diff_float32 = float((ref32 - out32).abs().max())
    res.max_abs_diff = float((ref64 - out64).abs().max())
    if not res.max_abs_diff <= tol:
        return skip(
            f"removing these channels would change the outputs (max |logit difference| "
            f"{res.max_abs_diff:.3g} > {tol:g}): the channels are zeroed only at the output of {layer} "
            f"but are still used elsewhere (e.g. a ResNet stage's residual stream, which runs "
            f"through every block of the stage). The masked model.safetensors is exact; "
            f"choose a layer inside a block (`layer`) to get a compact export")
    compact = work
    res.macs_after, res.params_after = _count(compact, example)
    res.exported, res.model = True, compact
    return skip(f"removed {len(removed)} of {channels} channels starting at {res.anchor!r}; "
                f"outputs match the masked model (max |diff| {res.max_abs_diff:.1e})")


def save_compact(result: CompactResult, path: str | os.PathLike[str],
                 metadata: dict[str, str] | None = None) -> None:
    """Write the compact weights (atomically) with the cut spec in the safetensors metadata."""
    if not result.exported or result.model is None:
        raise ValueError("no compact model to save")
    meta = dict(metadata or {})
    meta[COMPACT_KEY] = json.dumps(result.spec())
    save_weights(result.model, path, meta)


def load_compact(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a compact export: `model` is the plain architecture (as built for the original
    weights); the saved cut is replayed on it, then the weights are loaded. Returns the model."""
    loaded = load_weights(path)
    try:
        spec = json.loads(loaded.metadata[COMPACT_KEY])
        anchor, removed = str(spec["anchor"]), [int(i) for i in spec["removed"]]
        example = torch.zeros([int(s) for s in spec["input_shape"]])
    except (KeyError, ValueError, TypeError) as exc:
        raise BadInputError(f"{path} has no valid {COMPACT_KEY} metadata ({exc}); "
                            "is it a fineprune compact export?") from None
    try:
        _cut(model, anchor, removed, example)
    except Exception as exc:
        raise BadInputError(f"{path}: cannot replay the compact cut on this architecture ({exc}); "
                            "build the same architecture the original model used") from None
    return load_into(model, loaded)
