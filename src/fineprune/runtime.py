"""Device choice, seeding and atomic file writes: the small things every phase needs."""
from __future__ import annotations

import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CPU by default, the GPU automatically when one is present."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; outputs are meant to be shared, so honour the umask.
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (models and archives can be large)."""
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_digest(settings: dict, tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of JSON `settings` and the dtype, shape and bytes of `tensors`: what a checkpoint
    must match to be resumed (same data, same weights, same options)."""
    import hashlib

    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], key: str, state: dict) -> None:
    """Write `state` (plain data and tensors) with its run `key`, atomically."""
    with atomic_path(path) as tmp:
        torch.save({**state, "key": key}, tmp)


def load_checkpoint(path: str | os.PathLike[str], key: str, what: str = "checkpoint") -> dict:
    """A checkpoint written by `save_checkpoint` for the run `key` (`run_digest`), read with
    `weights_only=True`. A damaged file or one of another run is refused, never guessed at."""
    from .errors import BadInputError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(state, dict) and state.get("key") == key
    except Exception as exc:  # a torn or foreign file
        raise BadInputError(f"cannot resume from {path} ({type(exc).__name__}); delete it or run "
                            "without --resume") from None
    if not ok:
        raise BadInputError(f"{path} is a {what} of a different run (other data, settings or model); "
                            "delete it or run without --resume")
    return state
