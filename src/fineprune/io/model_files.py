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
"""
from __future__ import annotations

import ast
import collections
import io
import json
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from torch import nn

from fineprune.errors import BadInputError, UnsafeModelError
from fineprune.runtime import atomic_path, sha256_file

__all__ = ["LoadedModel", "load_weights", "save_weights", "load_into", "ACCEPTED_FORMATS"]

ACCEPTED_FORMATS = (
    "accepted formats: a safetensors file, a state dict saved with torch.save(model.state_dict(), path) "
    "(.pt/.pth/.bin, zip or legacy format), or a TorchScript archive (weights only, used with --arch)"
)
_SAFE_ALTERNATIVE = (
    "save the weights with torch.save(model.state_dict(), path) or as a safetensors file "
    "(safetensors.torch.save_file(model.state_dict(), path)) and pass that instead"
)

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit
MAX_PICKLE_RECORD = 256 * 1024 * 1024  # TorchScript data.pkl holds structure, not weights
_ZIP_SLACK = 64 * 1024 * 1024
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile

# safetensors dtype -> (bits per element, torch dtype or None if this torch lacks it)
_ST_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (8, torch.bool),
    "U8": (8, torch.uint8),
    "I8": (8, torch.int8),
    "I16": (16, torch.int16),
    "U16": (16, getattr(torch, "uint16", None)),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "I32": (32, torch.int32),
    "U32": (32, getattr(torch, "uint32", None)),
    "F32": (32, torch.float32),
    "F64": (64, torch.float64),
    "C64": (64, torch.complex64),
    "I64": (64, torch.int64),
    "U64": (64, getattr(torch, "uint64", None)),
    "F8_E4M3": (8, getattr(torch, "float8_e4m3fn", None)),
    "F8_E4M3FNUZ": (8, getattr(torch, "float8_e4m3fnuz", None)),
    "F8_E5M2": (8, getattr(torch, "float8_e5m2", None)),
    "F8_E5M2FNUZ": (8, getattr(torch, "float8_e5m2fnuz", None)),
    "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
}


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


# --------------------------------------------------------------------------- helpers


def _clean(text: object, limit: int = 80) -> str:
    """Render attacker-controlled text (key names, class names) safely on one line."""
    s = str(text)
    s = "".join(ch if ch.isprintable() else "?" for ch in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _first_line(exc: BaseException, limit: int = 200) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return _clean(line.strip(), limit)
    return type(exc).__name__


def _fmt_list(items: list[str], n: int = 5) -> str:
    shown = ", ".join(_clean(i, 60) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------- loading


def load_weights(path: str | os.PathLike[str]) -> LoadedModel:
    """Read model weights from `path`, detecting the format from the file content.

    Never unpickles arbitrary objects and never runs TorchScript; refuses files that
    are empty, truncated, unsafe, contain NaN/Inf weights, or are in no accepted format.
    """
    p = Path(path)
    name = _clean(p.name or str(p))
    if not p.exists():
        raise BadInputError(f"model file {_clean(p)} does not exist")
    if not p.is_file():
        raise BadInputError(f"model path {_clean(p)} is not a regular file; {ACCEPTED_FORMATS}")
    size = p.stat().st_size
    if size == 0:
        raise BadInputError(f"{name}: the model file is empty; {ACCEPTED_FORMATS}")
    with p.open("rb") as f:
        head = f.read(16)

    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        fmt, sd = _load_zip(p, name, size)
        metadata: dict[str, str] = {}
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        fmt, sd = "state_dict", _torch_load(p, name, size)
        metadata = {}
    elif p.suffix.lower() == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        sd, metadata = _load_safetensors(p, name, size)
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
        k = _clean(key)
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


# ---- safetensors


def _load_safetensors(p: Path, name: str, size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate the header by hand, then let the safetensors library read the data."""
    try:
        metadata = _validate_safetensors_header(p, name, size)
    except BadInputError as e:
        raise BadInputError(f"{e}; {ACCEPTED_FORMATS}") from None
    try:
        sd = safetensors.torch.load_file(str(p), device="cpu")
    except Exception as e:  # the library's own checks; our validation should catch these first
        raise BadInputError(f"{name}: invalid safetensors file ({_first_line(e)}); {ACCEPTED_FORMATS}") from e
    return dict(sd), metadata


def _validate_safetensors_header(p: Path, name: str, size: int) -> dict[str, str]:
    bad = f"{name}: invalid safetensors file"
    if size < 8:
        raise BadInputError(f"{bad}: only {size} bytes, truncated before the header length")
    with p.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_SAFETENSORS_HEADER:
            raise BadInputError(f"{bad}: header length {n} exceeds the 100 MB limit (corrupt or hostile)")
        if n > size - 8:
            raise BadInputError(
                f"{bad}: header length {n} is larger than the rest of the file ({size - 8} bytes); "
                "the file is truncated or corrupt"
            )
        raw = f.read(n)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise BadInputError(f"{bad}: header repeats the key {_clean(dup)!r}")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"{bad}: the header is not valid JSON (corrupt file)") from e
    if not isinstance(header, dict):
        raise BadInputError(f"{bad}: the header is not a JSON object")

    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadInputError(f"{bad}: __metadata__ must map strings to strings")

    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        k = _clean(key)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise BadInputError(f"{bad}: entry {k!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES or _ST_DTYPES[dtype][1] is None:
            raise BadInputError(f"{bad}: tensor {k!r} has unsupported dtype {_clean(dtype)!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > 64
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise BadInputError(f"{bad}: tensor {k!r} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise BadInputError(f"{bad}: tensor {k!r} has invalid data_offsets")
        begin, end = offsets
        if end > data_len:
            raise BadInputError(
                f"{bad}: tensor {k!r} claims bytes {begin}..{end} but the file holds only {data_len} "
                "bytes of data; the file is truncated or its header lies"
            )
        nbits = 0 if 0 in shape else _ST_DTYPES[dtype][0]
        for d in shape:  # bail out early so absurd shapes never build giant integers
            nbits *= d
            if nbits > 8 * data_len:
                break
        if nbits % 8 or nbits // 8 != end - begin:
            raise BadInputError(
                f"{bad}: tensor {k!r} of dtype {dtype} and shape {_clean(shape)} does not match its "
                f"data_offsets span of {end - begin} bytes; the header is corrupt or claims more data than the file holds"
            )
        spans.append((begin, end, k))
    spans.sort()
    pos = 0
    for begin, end, k in spans:
        if begin != pos:
            raise BadInputError(f"{bad}: tensor data overlaps or leaves gaps (at {k!r}); the header is corrupt")
        pos = end
    if pos != data_len:
        raise BadInputError(
            f"{bad}: the header describes {pos} bytes of tensor data but the file holds {data_len}; "
            "the file is truncated or corrupt"
        )
    return dict(metadata)


# ---- zip (torch.save zip format or TorchScript)


def _load_zip(p: Path, name: str, size: int) -> tuple[str, dict[str, torch.Tensor]]:
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BadInputError(
            f"{name}: the zip archive is truncated or corrupt ({_first_line(e)}); {ACCEPTED_FORMATS}"
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
        return "torchscript", _read_torchscript_weights(p, name, infos)
    return "state_dict", _torch_load(p, name, size)


def _torch_load(p: Path, name: str, size: int) -> dict[str, torch.Tensor]:
    """torch.load restricted to weights; map its failures to our errors."""
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        # torch < 2.6 had a code-execution hole in weights_only loading (CVE-2025-32434).
        raise UnsafeModelError(
            f"{name}: PyTorch {torch.__version__} cannot load .pt files safely (weights_only loading "
            "is exploitable before 2.6); upgrade torch to >= 2.6 or convert the model to safetensors"
        )
    try:
        # A file object, not the path: torch.load dispatches on a ".safetensors" suffix,
        # and the content (already sniffed) must decide the format, not the name.
        with p.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL (\S+)", msg)
        if m or re.search(r"Unsupported operand|Can only (create|build)|persistent", msg):
            why = f" (it references {_clean(m.group(1), 100)})" if m else ""
            raise UnsafeModelError(
                f"{name}: refused, the file needs arbitrary unpickling{why}, which would run code from "
                f"the file's author; {_SAFE_ALTERNATIVE}"
            ) from None
        raise BadInputError(f"{name}: corrupt PyTorch file ({_first_line(e)}); {ACCEPTED_FORMATS}") from None
    except EOFError:
        raise BadInputError(f"{name}: the PyTorch file is truncated; {ACCEPTED_FORMATS}") from None
    except Exception as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UnsafeModelError(
                f"{name}: refused, the file needs arbitrary unpickling, which would run code from the "
                f"file's author; {_SAFE_ALTERNATIVE}"
            ) from None
        raise BadInputError(
            f"{name}: could not read the PyTorch file, it is truncated or corrupt ({_first_line(e)}); "
            f"{ACCEPTED_FORMATS}"
        ) from None
    return _find_state_dict(obj, name)


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one wrapped in a training checkpoint dict."""
    found: Mapping[str, torch.Tensor] | None = None
    if _is_tensor_dict(obj):
        found = obj  # type: ignore[assignment]
    elif isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if _is_tensor_dict(inner):
                found = inner
                break
        if found is None:
            keys = [_clean(repr(k), 40) for k in list(obj.keys())[:12]]
            more = f" (+{len(obj) - 12} more)" if len(obj) > 12 else ""
            raise BadInputError(
                f"{name}: no state dict found; top-level keys are [{', '.join(keys)}]{more}; expected a "
                f"dict of tensors, or one stored under {', '.join(repr(k) for k in _WRAPPER_KEYS)}"
            )
    else:
        what = "a single tensor" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"
        raise BadInputError(f"{name}: the file holds {what}, not a state dict; {_SAFE_ALTERNATIVE}")

    sd = {k: v.detach() for k, v in found.items()}
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


# ---- TorchScript: read the weights without executing anything

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


class _ScriptObject:
    """Inert stand-in for a TorchScript class instance: it only records its state."""

    qualname = "?"
    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.state = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageRef:
    def __init__(self, dtype: torch.dtype, data: torch.Tensor) -> None:
        self.dtype, self.data = dtype, data


def _ts_rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    if not isinstance(storage, _StorageRef):
        raise BadInputError("tensor without storage")
    if type(offset) is not int or not isinstance(size, tuple) or not isinstance(stride, tuple):
        raise BadInputError("malformed tensor record")
    if len(size) != len(stride) or len(size) > 64 or not all(type(x) is int and x >= 0 for x in size + stride):
        raise BadInputError("malformed tensor shape")
    if math.prod(size) > storage.data.numel():
        raise BadInputError("tensor larger than its storage")
    return torch.as_strided(storage.data, size, stride, offset).clone()


def _identity_list(data: Any) -> Any:
    return list(data) if isinstance(data, (list, tuple)) else data


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    return value


def _ordered_dict(*args: Any) -> collections.OrderedDict[Any, Any]:
    if args and not isinstance(args[0], (list, tuple, dict)):
        raise BadInputError("malformed OrderedDict")
    return collections.OrderedDict(*args[:1])


_TS_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _ts_rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _ts_rebuild_tensor,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Python's documented "restricting globals" pattern: nothing but our own callables."""

    def __init__(self, data: bytes, read_record: Callable[[str], bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._classes: dict[str, type] = {}
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TS_FUNCTIONS:
            fn = _TS_FUNCTIONS[(module, name)]
            # A fresh closure per lookup: a BUILD opcode aimed at it cannot alter our functions.
            return lambda *args: fn(*args)
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("storage_type", _STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self._classes:
                self._classes[qual] = type("ScriptObject", (_ScriptObject,), {"qualname": qual})
            return self._classes[qual]
        raise UnsafeModelError(f"unsupported global {_clean(module, 60)}.{_clean(name, 40)}")

    def persistent_load(self, pid: Any) -> Any:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], tuple)
            and pid[1][:1] == ("storage_type",)
            and isinstance(pid[2], str)
            and re.fullmatch(r"[A-Za-z0-9_]{1,64}", pid[2])
            and type(pid[4]) is int
        ):
            raise BadInputError("unsupported persistent id")
        dtype: torch.dtype = pid[1][1]
        key, numel = pid[2], pid[4]
        if key in self._storages:
            return self._storages[key]
        raw = self._read_record(f"data/{key}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if numel < 0 or len(raw) < numel * itemsize:
            raise BadInputError(f"storage {key} is shorter than declared")
        data = torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        ref = _StorageRef(dtype, data)
        self._storages[key] = ref
        return ref


_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t]+.*\n|\n)*)", re.M)
_LIST_RE = re.compile(r"^[ \t]+(__parameters__|__buffers__) = (\[[^\]\n]*\])", re.M)


def _declared_tensors(code: dict[str, str]) -> dict[str, set[str]]:
    """Map TorchScript class qualname -> names of its parameters and buffers, read as text.

    The archive's ``code/`` files declare ``__parameters__`` and ``__buffers__`` per module
    class; they are parsed with ``ast.literal_eval`` (literals only), never compiled.
    """
    out: dict[str, set[str]] = {}
    for path, text in code.items():
        module = path[: -len(".py")].replace("/", ".")
        for m in _CLASS_RE.finditer(text):
            names: set[str] = set()
            for lm in _LIST_RE.finditer(m.group(2)):
                try:
                    value = ast.literal_eval(lm.group(2))
                except (ValueError, SyntaxError):
                    continue
                if isinstance(value, list):
                    names.update(v for v in value if isinstance(v, str))
            out[f"{module}.{m.group(1)}"] = names
    return out


def _read_torchscript_weights(p: Path, name: str, infos: list[zipfile.ZipInfo]) -> dict[str, torch.Tensor]:
    """Extract parameters and buffers from a TorchScript archive as a flat state dict."""
    prefix = infos[0].filename.split("/", 1)[0] + "/" if "/" in infos[0].filename else ""
    by_name = {i.filename: i for i in infos}
    try:
        with zipfile.ZipFile(p) as zf:

            def read(rel: str, limit: int | None = None) -> bytes:
                info = by_name.get(prefix + rel)
                if info is None:
                    raise BadInputError(f"missing record {_clean(rel)}")
                if limit is not None and info.file_size > limit:
                    raise BadInputError(f"record {_clean(rel)} is implausibly large")
                return zf.read(info)

            if prefix + "byteorder" in by_name and read("byteorder", 64).strip() not in (b"little", b""):
                raise BadInputError("big-endian archives are not supported")
            code = {
                n[len(prefix) + len("code/"):]: zf.read(i).decode("utf-8", "replace")
                for n, i in by_name.items()
                if n.startswith(prefix + "code/") and n.endswith(".py") and i.file_size <= MAX_PICKLE_RECORD
            }
            root = _TorchScriptUnpickler(read("data.pkl", MAX_PICKLE_RECORD), read).load()
    except UnsafeModelError as e:
        raise UnsafeModelError(
            f"{name}: refused, the TorchScript archive's data needs {e} which could run code from the "
            f"file's author; {_SAFE_ALTERNATIVE}"
        ) from None
    except BadInputError as e:
        raise BadInputError(f"{name}: invalid TorchScript archive ({e}); {ACCEPTED_FORMATS}") from None
    except Exception as e:  # corrupt zip members, malformed pickle opcodes, bad tensor records
        raise BadInputError(
            f"{name}: invalid or corrupt TorchScript archive ({_first_line(e)}); {ACCEPTED_FORMATS}"
        ) from None

    declared = _declared_tensors(code)
    sd: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str, depth: int, stack: set[int]) -> None:
        if depth > 200 or id(obj) in stack:
            raise BadInputError(f"{name}: invalid TorchScript archive (module tree too deep or cyclic)")
        state = obj.state
        if not isinstance(state, dict):
            if _contains_tensor(state):
                raise BadInputError(
                    f"{name}: TorchScript object {_clean(obj.qualname)} stores weights through custom "
                    f"__setstate__ code, which fineprune will not run; {_SAFE_ALTERNATIVE}"
                )
            return
        keep = declared.get(obj.qualname)
        for attr, value in state.items():
            if not isinstance(attr, str):
                continue
            key = f"{path}{attr}"
            if isinstance(value, torch.Tensor):
                if keep is None or attr in keep:
                    sd[key] = value
            elif isinstance(value, _ScriptObject):
                walk(value, key + ".", depth + 1, stack | {id(obj)})

    if not isinstance(root, _ScriptObject):
        raise BadInputError(f"{name}: invalid TorchScript archive (no module at its root); {ACCEPTED_FORMATS}")
    walk(root, "", 0, set())
    return sd


def _contains_tensor(obj: Any, depth: int = 0) -> bool:
    if depth > 50:
        return False
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_contains_tensor(x, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return any(_contains_tensor(x, depth + 1) for x in obj.values())
    if isinstance(obj, _ScriptObject):
        return _contains_tensor(obj.state, depth + 1)
    return False


# --------------------------------------------------------------------------- saving


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


# --------------------------------------------------------------------------- into a model


def load_into(model: nn.Module | None, loaded: LoadedModel, strict: bool = True) -> nn.Module:
    """Copy `loaded`'s weights into `model` and return it; explain mismatches clearly.

    TorchScript input works the same way: its weights were extracted at load time and go
    into the architecture named with ``--arch`` (a scripted module is never returned,
    since running it would run the file author's code and it cannot be masked with hooks).
    Shape mismatches always fail; missing/unexpected keys fail when ``strict``.
    """
    label = _clean(Path(loaded.source).name) if loaded.source else "model file"
    if model is None or loaded.state_dict is None:
        raise BadInputError(
            f"{label}: an architecture is needed to use these {loaded.format} weights; name it with --arch "
            "(a built-in name, torchvision:NAME or package.module:function)"
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
        problems.append(f"shape mismatches: {_fmt_list(mismatched, 4)}")
    if wrong_dtype:
        problems.append(f"dtype mismatches: {_fmt_list(wrong_dtype, 4)}")
    if strict and missing:
        problems.append(f"missing from the file: {_fmt_list(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected in the file: {_fmt_list(unexpected)}")
    hint = "the architecture (--arch) or --num-classes may be wrong"
    if problems:
        raise BadInputError(f"{label}: the weights do not fit the model ({'; '.join(problems)}); {hint}")
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise BadInputError(f"{label}: the weights do not fit the model ({_first_line(e)}); {hint}") from None
    return model
