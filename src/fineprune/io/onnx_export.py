"""ONNX export of a defended model, checked against PyTorch with onnxruntime before it is kept.

The model is exported as it computes in PyTorch (CPU, float32, eval mode), so the channel masks
(forward hooks, `defense.mask`) are recorded in the graph as ordinary ops; a file that leaves
fineprune stays defended wherever it runs. The batch axis is dynamic (input "input" (N, ...),
output "logits" (N, classes)).

Every export is checked, never assumed: onnxruntime runs the file on real validation inputs (up
to `max_samples`, in batches, plus a batch of one to prove the batch axis is dynamic) and its
logits are compared with PyTorch's; the max absolute difference, the samples checked, the opset
and the exporter are recorded. An export that fails or differs by more than the tolerance is not
kept, and the note says why (as for the compact and TorchScript exports).

Exporters: torch's current one (`torch.export` based, `dynamo=True`; needs onnxscript) when it is
installed, else the TorchScript-based one (deprecated in torch, still shipped); the first that
produces a file passing the check is kept.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.stream import inference_batch
from ..errors import BadInputError
from ..runtime import atomic_path

#: The opset written (the lowest torch's current exporter implements; onnxruntime >= 1.14 runs it).
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORTERS = ("dynamo", "torchscript")


def require_onnx() -> None:
    """BadInputError unless onnx and onnxruntime can be imported (they are an optional extra)."""
    missing = []
    for mod in ("onnx", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise BadInputError(f"`export` onnx needs {' and '.join(missing)}, which is not installed: "
                            "pip install 'fineprune[onnx]'")


def _available_exporters() -> list[str]:
    try:
        import onnxscript  # noqa: F401  (torch's current exporter is built on it)
    except ImportError:
        return ["torchscript"]
    return list(EXPORTERS)


@dataclass
class OnnxExport:
    """One ONNX export and its check. `data` (the file's bytes) is set only when it was kept."""

    exported: bool
    note: str
    opset: int = OPSET
    exporter: str | None = None
    max_abs_diff: float | None = None  # logits: onnxruntime vs PyTorch, on `checked_samples` inputs
    tolerance: float | None = None
    checked_samples: int = 0
    bytes: int | None = None
    seconds: float = 0.0
    attempts: list[str] = field(default_factory=list)  # exporters that failed, and why
    data: bytes | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "data"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _export(model: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int) -> None:
    """Write `model` to `path` as ONNX with `exporter`, batch axis dynamic."""
    with warnings.catch_warnings():  # deprecation and tracer warnings: the check below is the verdict
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: batch},), external_data=False, verbose=False)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _check(data: bytes, model: nn.Module, x: torch.Tensor, batch_size: int) -> float:
    """Max |onnxruntime - PyTorch| over the logits of `x` (in batches, and one sample alone)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    chunks = [x[i: i + batch_size] for i in range(0, x.shape[0], batch_size)] + [x[:1]]
    with torch.no_grad():
        for xb in chunks:
            ref = model(xb)
            got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: xb.numpy()})[0])
            if got.shape != ref.shape:
                raise ValueError(f"onnxruntime gave logits of shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
            diff = (got - ref).abs()
            if not bool(torch.isfinite(got).eq(torch.isfinite(ref)).all()):
                return float("inf")
            worst = max(worst, float(diff[torch.isfinite(diff)].max()) if diff.numel() else 0.0)
    return worst


def export_onnx(model: nn.Module, inputs: torch.Tensor, *, max_samples: int = 256, batch_size: int = 64,
                opset: int = OPSET, rtol: float = 1e-4, exporters: tuple[str, ...] | None = None) -> OnnxExport:
    """Export a CPU float32 eval copy of `model` to ONNX (in memory) and check it on `inputs`
    (real, preprocessed validation inputs; the first `max_samples` are used). The tolerance is
    `rtol` times the largest |logit| (at least 1): float32 kernels differ in summation order, not
    more. Never raises for an architecture the exporters cannot handle: `exported` is False and
    `note` says why. `exporters`: which to try, in order (default: every one installed)."""
    require_onnx()
    t0 = time.perf_counter()
    res = OnnxExport(exported=False, note="", opset=opset)
    x = inputs[:max_samples].detach().cpu().float().contiguous()
    if x.shape[0] == 0:
        res.note, res.seconds = "no inputs to check the export on; not exported", time.perf_counter() - t0
        return res
    batch_size = inference_batch(x, batch_size)  # large inputs: fewer at once, as every evaluation
    work = copy.deepcopy(model).cpu().float().eval()
    example = x[:2] if x.shape[0] >= 2 else x.repeat(2, *([1] * (x.dim() - 1)))  # batch 1 would be fixed
    try:
        with torch.no_grad():
            ref = work(x[:batch_size])
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"the model returns {type(ref).__name__}, not a tensor of logits")
    except Exception as exc:
        res.note, res.seconds = f"not exported: {_first_line(exc)}", time.perf_counter() - t0
        return res
    res.tolerance = rtol * max(1.0, float(ref.abs().max()))
    res.checked_samples = int(x.shape[0])
    for exporter in exporters or _available_exporters():
        try:
            with tempfile.TemporaryDirectory(prefix="fineprune-onnx-") as tmp:
                path = Path(tmp) / "model.onnx"
                _export(work, example, path, exporter, opset)
                data = path.read_bytes()
            diff = _check(data, work, x, batch_size)
        except Exception as exc:  # exporters fail on many architectures; report, never crash the run
            res.attempts.append(f"{exporter}: {_first_line(exc)}")
            continue
        res.exporter, res.max_abs_diff = exporter, diff
        if diff <= res.tolerance:
            res.exported, res.data, res.bytes = True, data, len(data)
            break
        res.attempts.append(f"{exporter}: logits differ from PyTorch's by up to {diff:.3g} "
                            f"(tolerance {res.tolerance:.3g})")
    res.seconds = time.perf_counter() - t0
    if res.exported:
        res.note = (f"ONNX opset {opset} ({res.exporter} exporter), dynamic batch; onnxruntime's logits match "
                    f"PyTorch's (max |difference| {res.max_abs_diff:.1e} on {res.checked_samples} validation "
                    "inputs)")
    else:
        res.note = "not exported: " + "; ".join(res.attempts)
    return res


def save_onnx(result: OnnxExport, path: str | os.PathLike[str]) -> None:
    """Write the checked export atomically (temporary file, then rename)."""
    if not result.exported or result.data is None:
        raise ValueError("no ONNX export to save")
    with atomic_path(path) as tmp:
        tmp.write_bytes(result.data)
