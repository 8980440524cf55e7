import os
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


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (its tiny models run far faster so on 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
