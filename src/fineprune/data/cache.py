"""Decode-once cache for the real datasets.

Decoding ~50k images out of an xz archive takes seconds to tens of seconds; every experiment
reloads the data, so the decoded integer arrays (uint8 pixels, int16 samples: before any float
conversion, so the cache stays 4x smaller than float32) are stored once as an uncompressed `.npz`
and memory-read afterwards. Splits are not cached: they are recomputed from the arrays and the seed.

The cache file name is a hash of (loader name, format version, source fingerprint, decoding
parameters), so a changed archive, a changed directory or a different `size` never hits a stale
entry. `.npz` is read with `allow_pickle=False`: a cache directory shared with others can never make
us unpickle (= run) anything.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fineprune.progress import current
from fineprune.runtime import atomic_path

log = logging.getLogger(__name__)

#: Bump when the layout of cached arrays changes, so old files are ignored rather than misread.
CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """`$FINEPRUNE_CACHE` if set, else `~/.cache/fineprune` (overridable per call)."""
    env = os.environ.get("FINEPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fineprune"


def cache_file(
    loader: str, fingerprint: str, params: Mapping[str, Any], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the decoded arrays for this (loader, source, parameters) live."""
    blob = json.dumps(
        {"loader": loader, "version": CACHE_FORMAT_VERSION, "source": fingerprint, "params": dict(params)},
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{loader}-{digest}.npz"


def read_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays in a cache file, or None if it is missing or unreadable (then we re-decode)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("ignoring unreadable cache file %s (%s); decoding again", path, exc)
        return None


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write atomically (a crash never leaves a half file that later loads look up)."""
    for k, v in arrays.items():
        if v.dtype == object:
            raise TypeError(f"refusing to cache object array {k!r}: it would need pickle")
    with atomic_path(path) as tmp:
        # A file handle, not a name: np.savez would append ".npz" to the temporary name.
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def cached_arrays(
    loader: str,
    fingerprint: str,
    params: Mapping[str, Any],
    decode: Callable[[], dict[str, np.ndarray]],
    cache_dir: str | os.PathLike[str] | None = None,
    required: Iterable[str] = (),
) -> tuple[dict[str, np.ndarray], Path, bool]:
    """Cached arrays if present (and holding every `required` key), else `decode()` and store them.

    Returns (arrays, cache path, hit). A cache directory that cannot be written (read-only home,
    full disk) only costs speed: the decoded arrays are still returned.
    """
    path = cache_file(loader, fingerprint, params, cache_dir)
    arrays = read_arrays(path)
    if arrays is not None:
        missing = set(required) - set(arrays)
        if not missing:
            return arrays, path, True
        log.warning("cache file %s lacks %s (older format); decoding again", path, sorted(missing))
    say = current().log  # the caller's channel (the CLI: stderr, like the bars; stdout stays the results)
    say(f"fineprune: first load of the {loader} data: decoding it once (later loads read {path})")
    t0 = time.perf_counter()
    arrays = decode()
    # Every loader stores its labels as `y` or `y_<split>`: one per sample.
    samples = sum(len(v) for k, v in arrays.items() if (k == "y" or k.startswith("y_")) and v.ndim)
    say(f"fineprune: decoded the {loader} data ({samples} samples) in {time.perf_counter() - t0:.0f}s")
    try:
        write_arrays(path, arrays)
    except OSError as exc:
        log.warning("could not write cache file %s (%s); the next load will decode again", path, exc)
    return arrays, path, False
