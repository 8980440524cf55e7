"""Device choice, seeding and atomic file writes: the small things every phase needs."""
from __future__ import annotations

import hashlib
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


def fingerprint(obj: Any, n: int = 16) -> str:
    """First `n` hex digits of the SHA-256 of `obj` as canonical JSON: names stored models and
    grid cells by what made them."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (models and archives can be large)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_digest(settings: dict, tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of JSON `settings` and the dtype, shape and bytes of `tensors`: what a checkpoint
    must match to be resumed (same data, same weights, same options)."""
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
                            "without `resume`") from None
    if not ok:
        raise BadInputError(f"{path} is a {what} of a different run (other data, settings or model); "
                            "delete it or run without `resume`")
    return state


def physical_cores() -> int | None:
    """Physical cores from /proc/cpuinfo (Linux), or None where it cannot tell. Hyper-threads
    share one core's arithmetic units, so counting them only adds contention."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (containers), as `os.cpu_count()` reports the whole machine."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_threads() -> int:
    """The default torch thread count: min(physical cores, usable CPUs). It never oversubscribes
    the CPUs we may use, and it depends on the machine only, never on its momentary load, so the
    same command on the same machine trains the same model (results depend slightly on the
    thread count: float summation order)."""
    phys = physical_cores()
    usable = usable_cpus()
    return max(1, min(usable, phys) if phys else usable)


def busy_hint(threads: int, how: str = "set_threads({n})") -> str | None:
    """A one-line suggestion when the 1-minute load average says other work already holds CPUs
    that `threads` threads would compete for (on a busy 2-core machine 2 threads ran 3.6x slower
    than 1); None when the machine looks free. Only a hint: the thread count is never changed by
    load, as that would make results depend on what else happened to be running. `how` says how
    to ask for `{n}` threads (the CLI names its command's way)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    free = usable_cpus() - load
    suggest = max(1, int(free + 0.5))
    if load < 1.0 or suggest >= threads:
        return None
    return (f"the machine is busy (load {load:.1f} on {usable_cpus()} CPUs): {how.format(n=suggest)} may be "
            f"much faster than {threads} threads (models trained with another thread count differ slightly)")


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads` when given, else `default_threads()` unless
    OMP_NUM_THREADS is set (then torch's own choice, which follows it). Returns the count in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()
