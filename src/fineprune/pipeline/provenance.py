"""Where a result came from: file hashes and software versions, for model.json and the report."""
from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

from ..runtime import sha256_file


def sha256_path(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes; for a folder, of its sorted manifest: one line
    `<relative path>\\t<sha256 of the file>\\n` per file (hidden entries included), so renaming,
    adding or changing any file changes the hash."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for name in sorted(filenames):
            f = Path(dirpath) / name
            rel = f.relative_to(p).as_posix()
            h.update(f"{rel}\t{sha256_file(f)}\n".encode())
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    out = {"python": platform.python_version()}
    for dist in ("fineprune", "torch", "torchvision", "torch-pruning", "numpy", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
