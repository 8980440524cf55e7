"""Safetensors files from an untrusted author: the JSON header is validated by hand first, so a
truncated or lying file is refused before any large allocation; then the library reads the data."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from fineprune.errors import BadInputError

from .messages import ACCEPTED_FORMATS, clean_text, first_line

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit

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


def read_safetensors(p: Path, name: str, size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate the header by hand, then let the safetensors library read the data."""
    try:
        metadata = _validate_safetensors_header(p, name, size)
    except BadInputError as e:
        raise BadInputError(f"{e}; {ACCEPTED_FORMATS}") from None
    try:
        sd = safetensors.torch.load_file(str(p), device="cpu")
    except Exception as e:  # the library's own checks; our validation should catch these first
        raise BadInputError(f"{name}: invalid safetensors file ({first_line(e)}); {ACCEPTED_FORMATS}") from e
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
            raise BadInputError(f"{bad}: header repeats the key {clean_text(dup)!r}")
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
        k = clean_text(key)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise BadInputError(f"{bad}: entry {k!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES or _ST_DTYPES[dtype][1] is None:
            raise BadInputError(f"{bad}: tensor {k!r} has unsupported dtype {clean_text(dtype)!r}")
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
                f"{bad}: tensor {k!r} of dtype {dtype} and shape {clean_text(shape)} does not match its "
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
