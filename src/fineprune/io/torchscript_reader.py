"""TorchScript archives, read without `torch.jit.load`.

Loading a TorchScript archive compiles and runs the author's TorchScript (`__setstate__` methods
run during the load, and TorchScript can open and write files through `torch.from_file`), so it is
attacker code. Instead the archive's `data.pkl` is read with a restricted unpickler that only
rebuilds tensors and inert placeholders, which yields the weights; they must then be loaded into
an architecture named by the user (`--arch`)."""
from __future__ import annotations

import ast
import collections
import io
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from fineprune.errors import BadInputError, UnsafeModelError

from .messages import ACCEPTED_FORMATS, SAFE_ALTERNATIVE, clean_text, first_line

MAX_PICKLE_RECORD = 256 * 1024 * 1024  # TorchScript data.pkl holds structure, not weights

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
        raise UnsafeModelError(f"unsupported global {clean_text(module, 60)}.{clean_text(name, 40)}")

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


def read_torchscript_weights(p: Path, name: str, infos: list[zipfile.ZipInfo]) -> dict[str, torch.Tensor]:
    """Extract parameters and buffers from a TorchScript archive as a flat state dict."""
    prefix = infos[0].filename.split("/", 1)[0] + "/" if "/" in infos[0].filename else ""
    by_name = {i.filename: i for i in infos}
    try:
        with zipfile.ZipFile(p) as zf:

            def read(rel: str, limit: int | None = None) -> bytes:
                info = by_name.get(prefix + rel)
                if info is None:
                    raise BadInputError(f"missing record {clean_text(rel)}")
                if limit is not None and info.file_size > limit:
                    raise BadInputError(f"record {clean_text(rel)} is implausibly large")
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
            f"file's author; {SAFE_ALTERNATIVE}"
        ) from None
    except BadInputError as e:
        raise BadInputError(f"{name}: invalid TorchScript archive ({e}); {ACCEPTED_FORMATS}") from None
    except Exception as e:  # corrupt zip members, malformed pickle opcodes, bad tensor records
        raise BadInputError(
            f"{name}: invalid or corrupt TorchScript archive ({first_line(e)}); {ACCEPTED_FORMATS}"
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
                    f"{name}: TorchScript object {clean_text(obj.qualname)} stores weights through custom "
                    f"__setstate__ code, which fineprune will not run; {SAFE_ALTERNATIVE}"
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
