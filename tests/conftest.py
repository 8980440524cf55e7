import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("FINEPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set FINEPRUNE_DATA or place ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_default_scan(request, monkeypatch):
    """`fineprune defend` scans for backdoor evidence before and after the defense by default
    (seconds to minutes per scan). Tests that are not about scanning turn that default off; a test
    marked `default_scan`, or one that passes `--scan SPEC`, scans."""
    if "default_scan" not in request.keywords:
        from fineprune.pipeline import job

        monkeypatch.setattr(job, "SCAN_BY_DEFAULT", False)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (its tiny models run far faster so on 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def labels_near_model(model, x, classes: int = 10, every: int = 3, shift: int = 1) -> torch.Tensor:
    """Labels equal to the model's own predictions (in eval mode), with every `every`-th moved by
    `shift` classes, so accuracy moves with the number of channels pruned. `from conftest import ...`"""
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[::every] = (y[::every] + shift) % classes
    return y


def assert_same_curve(a, b) -> None:
    """Two pruning sweeps (say a cached and a full one) agree exactly: same pruning order and the
    same clean, attack and robust counts at every k."""
    assert a.order == b.order
    assert a.clean_correct == b.clean_correct
    assert a.asr_hits == b.asr_hits and a.robust_hits == b.robust_hits


@pytest.fixture
def sigkill_when():
    """`sigkill_when(cmd, ready, env)`: start `cmd`, SIGKILL it as soon as `ready()` is true (polled
    every 5 ms), and return its exit code; fails if the process ended before it could be killed."""
    import signal
    import subprocess
    import time

    def run(cmd: list[str], ready, env: dict, timeout: float = 300) -> int:
        victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while not ready() and victim.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert victim.poll() is None, "the run ended before it could be killed"
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=60)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
        assert victim.returncode == -signal.SIGKILL
        return victim.returncode

    return run


@contextmanager
def on_sys_path(root: Path, module: str):
    """`root` importable for the block (an `--arch module:factory` written there), and `module`
    forgotten afterwards, so the next workspace's file of the same name is read afresh."""
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(module, None)
