"""Load and save model weights without ever running code from the file's author.

Model files given to fineprune come from an untrusted trainer (the suspected
attacker). Unpickling an arbitrary object runs code chosen by whoever wrote the
file, so this module only accepts formats that can be read as plain data:

* **safetensors** (preferred): the JSON header is validated by hand first so a
  truncated or lying file is refused before any large allocation.
* **PyTorch state dicts** (``torch.save(model.state_dict())``, zip or legacy
  format): read with ``torch.load(..., weights_only=True)``; anything that needs
  other globals (a pickled ``nn.Module``, a ``__reduce__`` payload) raises
  :class:`UnsafeModelError`. There is deliberately no flag to bypass this.
* **TorchScript archives**: *not* loaded with ``torch.jit.load``. Loading a
  TorchScript archive compiles and runs the author's TorchScript (``__setstate__``
  methods run during the load, and TorchScript can open and write files through
  ``torch.from_file``), so it is attacker code too. Instead the archive's
  ``data.pkl`` is read with a restricted unpickler that only rebuilds tensors and
  inert placeholders, which yields the weights; they must then be loaded into an
  architecture named by the user (``--arch``) with :func:`load_into`.
  Consequently :attr:`LoadedModel.scripted` is always ``None``.

Every error is a :class:`BadInputError` (or its subclass :class:`UnsafeModelError`)
with a single-line message that says what was wrong and what is accepted.

This module sniffs the format and checks the tensors; each reader lives in its own module
(`safetensors_reader`, `torch_pickle`, `torchscript_reader`), writing in `saving`, and the
wording every refusal shares in `messages`.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fineprune.errors import BadInputError
from fineprune.runtime import sha256_file

from .messages import ACCEPTED_FORMATS, clean_text, first_line, format_list
from .safetensors_reader import read_safetensors
from .saving import save_weights
from .torch_pickle import read_state_dict
from .torchscript_reader import read_torchscript_weights

__all__ = ["LoadedModel", "load_weights", "save_weights", "load_into", "ACCEPTED_FORMATS"]

_ZIP_SLACK = 64 * 1024 * 1024  # uncompressed bytes an archive may claim beyond twice its size


@dataclass
class LoadedModel:
    """Weights read from a model file, plus where they came from.

    ``state_dict`` maps parameter/buffer names to CPU tensors. ``scripted`` is kept for
    API stability but is always ``None``: TorchScript is never executed (see module doc).
    ``format`` is "safetensors", "state_dict" or "torchscript"; ``metadata`` is the
    safetensors ``__metadata__`` (empty for other formats); ``sha256`` hashes the file
    bytes so reports can identify exactly which model was examined.
    """

    state_dict: dict[str, torch.Tensor] | None
    scripted: torch.jit.ScriptModule | None
    format: str
    metadata: dict[str, str]
    sha256: str
    source: str = field(default="")


# --------------------------------------------------------------------------- loading


def load_weights(path: str | os.PathLike[str]) -> LoadedModel:
    """Read model weights from `path`, detecting the format from the file content.

    Never unpickles arbitrary objects and never runs TorchScript; refuses files that
    are empty, truncated, unsafe, contain NaN/Inf weights, or are in no accepted format.
    """
    p = Path(path)
    name = clean_text(p.name or str(p))
    if not p.exists():
        raise BadInputError(f"model file {clean_text(p)} does not exist")
    if not p.is_file():
        raise BadInputError(f"model path {clean_text(p)} is not a regular file; {ACCEPTED_FORMATS}")
    size = p.stat().st_size
    if size == 0:
        raise BadInputError(f"{name}: the model file is empty; {ACCEPTED_FORMATS}")
    with p.open("rb") as f:
        head = f.read(16)

    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        fmt, sd = _load_zip(p, name, size)
        metadata: dict[str, str] = {}
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        fmt, sd = "state_dict", read_state_dict(p, name, size)
        metadata = {}
    elif p.suffix.lower() == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        sd, metadata = read_safetensors(p, name, size)
        fmt = "safetensors"
    else:
        raise BadInputError(
            f"{name}: not a recognised model file (neither safetensors, a PyTorch zip/legacy file "
            f"nor a TorchScript archive; it may be corrupt or the wrong file); {ACCEPTED_FORMATS}"
        )

    _check_tensors(sd, name, size)
    return LoadedModel(
        state_dict=sd, scripted=None, format=fmt, metadata=metadata, sha256=sha256_file(p), source=str(p)
    )


def _check_tensors(sd: dict[str, torch.Tensor], name: str, file_size: int) -> None:
    """Refuse tensors that cannot be real weights: non-dense, meta, oversized, NaN/Inf."""
    if not sd:
        raise BadInputError(f"{name}: the file contains no tensors; {ACCEPTED_FORMATS}")
    for key, t in sd.items():
        k = clean_text(key)
        if t.layout != torch.strided:
            raise BadInputError(f"{name}: tensor {k!r} has layout {t.layout}; only dense weights are supported")
        if t.is_meta or t.device.type != "cpu":
            raise BadInputError(f"{name}: tensor {k!r} holds no data (device {t.device}); the file is incomplete")
        # Dense weights live in the file; a bigger tensor is a broadcast trick (memory bomb).
        if t.numel() * t.element_size() > file_size:
            raise BadInputError(
                f"{name}: tensor {k!r} claims {t.numel()} elements, more data than the file holds; "
                "the file is corrupt or hostile"
            )
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            if not _all_finite(t):
                raise BadInputError(
                    f"{name}: tensor {k!r} contains NaN or Inf values; the weights are corrupt "
                    "(or were saved after training diverged) and cannot be pruned meaningfully"
                )


def _all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check; min/max propagate NaN and expose Inf in one cheap pass."""
    try:
        lo, hi = torch.aminmax(t)
        return bool(torch.isfinite(lo) & torch.isfinite(hi))
    except (RuntimeError, NotImplementedError, TypeError):  # complex, float8 kernels
        if t.is_complex():
            return bool(torch.isfinite(t).all())
        return bool(torch.isfinite(t.float()).all())


# ---- zip (torch.save zip format or TorchScript)


def _load_zip(p: Path, name: str, size: int) -> tuple[str, dict[str, torch.Tensor]]:
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BadInputError(
            f"{name}: the zip archive is truncated or corrupt ({first_line(e)}); {ACCEPTED_FORMATS}"
        ) from e
    total = sum(i.file_size for i in infos)
    if total > 2 * size + _ZIP_SLACK:
        raise BadInputError(
            f"{name}: the archive claims {total} uncompressed bytes from a {size}-byte file "
            "(a zip bomb or corrupt file); refused"
        )
    names = [i.filename for i in infos]
    tails = [n.split("/", 1)[1] if "/" in n else n for n in names]
    if any(t.startswith("code/") or t == "constants.pkl" for t in tails):
        return "torchscript", read_torchscript_weights(p, name, infos)
    return "state_dict", read_state_dict(p, name, size)


# --------------------------------------------------------------------------- into a model


def load_into(model: nn.Module | None, loaded: LoadedModel, strict: bool = True) -> nn.Module:
    """Copy `loaded`'s weights into `model` and return it; explain mismatches clearly.

    TorchScript input works the same way: its weights were extracted at load time and go
    into the architecture named with ``--arch`` (a scripted module is never returned,
    since running it would run the file author's code and it cannot be masked with hooks).
    Shape mismatches always fail; missing/unexpected keys fail when ``strict``.
    """
    label = clean_text(Path(loaded.source).name) if loaded.source else "model file"
    if model is None or loaded.state_dict is None:
        raise BadInputError(
            f"{label}: an architecture is needed to use these {loaded.format} weights; name it with `arch` "
            "(a built-in name, torchvision:NAME, timm:NAME or package.module:function)"
        )
    sd = loaded.state_dict
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sd
        if k in expected and sd[k].shape != expected[k].shape
    ]
    # Half precision is a legitimate way to ship float weights; integers, bools or complex numbers
    # where the model holds floats are not weights at all (they would be silently cast).
    wrong_dtype = [
        f"{k} file {str(sd[k].dtype).replace('torch.', '')} vs model {str(expected[k].dtype).replace('torch.', '')}"
        for k in sd
        if k in expected and expected[k].is_floating_point() and not sd[k].is_floating_point()
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {format_list(mismatched, 4)}")
    if wrong_dtype:
        problems.append(f"dtype mismatches: {format_list(wrong_dtype, 4)}")
    if strict and missing:
        problems.append(f"missing from the file: {format_list(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected in the file: {format_list(unexpected)}")
    hint = "the architecture (`arch`) or `num_classes` may be wrong"
    if problems:
        raise BadInputError(f"{label}: the weights do not fit the model ({'; '.join(problems)}); {hint}")
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise BadInputError(f"{label}: the weights do not fit the model ({first_line(e)}); {hint}") from None
    return model
