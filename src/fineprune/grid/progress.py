"""Progress lines for a running grid: cells done / running / failed / queued and time left."""
from __future__ import annotations

import time
from collections.abc import Callable


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class GridProgress:
    """Counts of this run's cells; a line goes to `log` as each cell finishes.

    Time left = time so far / cells finished in this run x cells still to finish (cells finished
    by an earlier run are counted as done but not in the rate)."""

    def __init__(self, total: int, already_done: int, log: Callable[[str], None]) -> None:
        self.total = total
        self.already_done = already_done
        self.to_run = total - already_done
        self.ok = 0
        self.failed = 0
        self.running = 0
        self.log = log
        self.t0 = time.monotonic()
        self._pending: list[str] = []

    @property
    def finished(self) -> int:
        return self.ok + self.failed

    def eta(self) -> float | None:
        if self.finished == 0:
            return None
        left = self.to_run - self.finished
        return (time.monotonic() - self.t0) / self.finished * left

    def counts(self) -> str:
        queued = self.to_run - self.finished - self.running
        eta = self.eta()
        left = "?" if eta is None else _clock(eta)
        return (f"done {self.already_done + self.ok}/{self.total}, running {self.running}, "
                f"failed {self.failed}, queued {queued} | {_clock(time.monotonic() - self.t0)} elapsed, "
                f"~{left} left")

    def cell_finished(self, ok: bool, what: str) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        n = self.already_done + self.finished
        self._pending.append(f"[{n:>{len(str(self.total))}}/{self.total}] {what}")

    def flush(self) -> None:
        """Print the cells finished since the last flush, with the counts as they are now (call it
        after refilling the cluster, so "running" counts the cells that replaced them)."""
        for line in self._pending:
            self.log(f"{line} | {self.counts()}")
        self._pending.clear()

    def note(self, what: str) -> None:
        self.log(f"  {what}")
