"""Model files crafted by an attacker: nothing in them may run, and errors must be clear.

Every payload here would create a marker file if executed; each test checks the load is
refused with the right exception type, a one-line message, and that the marker is absent.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import random
import resource
import struct
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fineprune.errors import BadInputError, UnsafeModelError
from fineprune.io.model_files import load_weights


class TouchPayload:
    """Unpickling this calls pathlib.Path.touch(marker): stands in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class SystemPayload:
    """The classic: os.system at unpickling time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def refused(path: Path, exc: type[BadInputError]) -> str:
    """Load must fail with exactly `exc` (UnsafeModelError is a BadInputError) and one clean line."""
    with pytest.raises(BadInputError) as ei:
        load_weights(path)
    assert isinstance(ei.value, exc), f"{type(ei.value).__name__}: {ei.value}"
    if exc is BadInputError:
        assert not isinstance(ei.value, UnsafeModelError)
    msg = str(ei.value)
    assert msg and "\n" not in msg and "\r" not in msg and "\x1b" not in msg and msg == msg.strip()
    assert len(msg) < 600
    return msg


# ----------------------------------------------------------------- pickles that run code


def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """Control: the payload really does run under plain unpickling, so the tests mean something."""
    marker = tmp_path / "pwned"
    torch.save(TouchPayload(marker), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload", [TouchPayload, SystemPayload])
def test_reduce_payload_refused(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    torch.save(payload(marker), tmp_path / "evil.pt")
    msg = refused(tmp_path / "evil.pt", UnsafeModelError)
    assert "arbitrary unpickling" in msg and "state_dict()" in msg and "safetensors" in msg
    assert not marker.exists()


def test_payload_nested_in_state_dict(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    sd: dict[str, Any] = dict(Net().state_dict())
    sd["fc.extra"] = SystemPayload(marker)
    torch.save(sd, tmp_path / "model.pth")
    refused(tmp_path / "model.pth", UnsafeModelError)
    assert not marker.exists()


def test_payload_in_wrapped_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Net().state_dict(), "hook": TouchPayload(marker)}, tmp_path / "ckpt.pt")
    refused(tmp_path / "ckpt.pt", UnsafeModelError)
    assert not marker.exists()


def test_payload_in_legacy_format(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    sd: dict[str, Any] = dict(Net().state_dict())
    sd["x"] = TouchPayload(marker)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    refused(tmp_path / "legacy.pt", UnsafeModelError)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_whole_pickled_module_refused(tmp_path: Path, legacy: bool) -> None:
    torch.save(Net(), tmp_path / "net.pt", _use_new_zipfile_serialization=not legacy)
    assert "Net" in refused(tmp_path / "net.pt", UnsafeModelError)
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "seq.pt")
    refused(tmp_path / "seq.pt", UnsafeModelError)


def test_broadcast_tensor_memory_bomb(tmp_path: Path) -> None:
    """A 1-element storage viewed as 10^10 elements must not be expanded (or NaN-scanned)."""
    torch.save({"w": torch.zeros(1).expand(10**10)}, tmp_path / "bomb.pt")
    assert "more data than the file holds" in refused(tmp_path / "bomb.pt", BadInputError)


# ----------------------------------------------------------------- TorchScript


class SetStateTrap(nn.Module):
    """TorchScript whose __setstate__ writes a file: jit.load would run it during the load."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 2))
        self.marker = marker
        self.tag = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool, torch.Tensor]:
        return (self.marker, self.training, self.weight)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool, torch.Tensor]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.weight = state[2]
        t = torch.from_file(self.marker, shared=True, size=4, dtype=torch.uint8)
        t.fill_(65)
        self.tag = int(t.sum())


def test_torchscript_setstate_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(SetStateTrap(str(marker))).save(str(tmp_path / "trap.pt"))
        assert not marker.exists()
        torch.jit.load(str(tmp_path / "trap.pt"))  # control: jit.load executes it
    assert marker.exists()
    marker.unlink()
    msg = refused(tmp_path / "trap.pt", BadInputError)
    assert "__setstate__" in msg
    assert not marker.exists()


def test_torchscript_archive_with_pickle_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "evil.torchscript", "w") as zf:
        zf.writestr("archive/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
        zf.writestr("archive/data.pkl", pickle.dumps(SystemPayload(marker), protocol=2))
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    assert "posix.system" in refused(tmp_path / "evil.torchscript", UnsafeModelError) or os.name != "posix"
    assert not marker.exists()


def test_torchscript_archive_with_garbage_data(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "model.torchscript", "w") as zf:
        zf.writestr("archive/code/__torch__.py", "")
        zf.writestr("archive/data.pkl", random.Random(0).randbytes(500))
    refused(tmp_path / "model.torchscript", BadInputError)


# ----------------------------------------------------------------- damaged safetensors


def _valid_safetensors(tmp_path: Path) -> bytes:
    save_file({"a": torch.randn(64, 64), "b": torch.randn(10)}, str(tmp_path / "ok.safetensors"))
    return (tmp_path / "ok.safetensors").read_bytes()


def _header(data: bytes) -> tuple[int, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8 : 8 + n]


def _quick_and_small(path: Path, exc: type[BadInputError] = BadInputError) -> str:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    msg = refused(path, exc)
    assert time.perf_counter() - start < 2.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 * 1024  # no big allocation
    return msg


def test_truncated_safetensors(tmp_path: Path) -> None:
    data = _valid_safetensors(tmp_path)
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        _quick_and_small(tmp_path / "cut.safetensors")


def test_bit_flipped_header(tmp_path: Path) -> None:
    data = bytearray(_valid_safetensors(tmp_path))
    n, header = _header(bytes(data))
    broken = bytearray(data)
    broken[8] ^= 0x01  # '{' -> 'z': no longer JSON
    (tmp_path / "flip.safetensors").write_bytes(bytes(broken))
    _quick_and_small(tmp_path / "flip.safetensors")
    # a flipped digit inside data_offsets: still JSON, but inconsistent with dtype x shape
    digit = header.index(b"data_offsets") + len(b'data_offsets":[') + 2
    lying = bytearray(data)
    while not chr(lying[8 + digit]).isdigit():
        digit += 1
    lying[8 + digit] = ord("7") if lying[8 + digit] != ord("7") else ord("3")
    (tmp_path / "lie.safetensors").write_bytes(bytes(lying))
    _quick_and_small(tmp_path / "lie.safetensors")


def test_header_claiming_huge_tensor(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}
    raw = json.dumps(header).encode()
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    assert "truncated" in _quick_and_small(tmp_path / "huge.safetensors")
    # offsets that fit the file but a shape that does not match them
    header = {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 64]}}
    raw = json.dumps(header).encode()
    (tmp_path / "shape.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    _quick_and_small(tmp_path / "shape.safetensors")


@pytest.mark.parametrize("claimed", [10_000, 50 * 1024 * 1024, 2**63 + 5])
def test_header_length_beyond_file(tmp_path: Path, claimed: int) -> None:
    data = _valid_safetensors(tmp_path)
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", claimed) + data[8:])
    _quick_and_small(tmp_path / "long.safetensors")


# ----------------------------------------------------------------- NaN / junk / empty


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(tmp_path: Path, bad: float) -> None:
    sd = Net().state_dict()
    sd["fc.weight"][1, 2] = bad
    save_file(dict(sd), str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        msg = refused(tmp_path / name, BadInputError)
        assert "fc.weight" in msg and "NaN or Inf" in msg


@pytest.mark.parametrize("name", ["model.pt", "model.torchscript", "model.safetensors", "weights"])
def test_random_bytes(tmp_path: Path, name: str) -> None:
    rng = random.Random(1234)
    data = bytes([0x17]) + rng.randbytes(4095)  # first byte is neither 'P', 0x80 nor safetensors-like
    (tmp_path / name).write_bytes(data)
    msg = refused(tmp_path / name, BadInputError)
    assert "safetensors" in msg and "state_dict" in msg


def test_truncated_pt_files(tmp_path: Path) -> None:
    torch.save(Net().state_dict(), tmp_path / "full.pt")
    torch.save(Net().state_dict(), tmp_path / "full_legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("full.pt", "full_legacy.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
        refused(tmp_path / "cut.pt", BadInputError)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in refused(tmp_path / "empty.pt", BadInputError)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    refused(tmp_path / "nope.pt", BadInputError)
    refused(tmp_path, BadInputError)
