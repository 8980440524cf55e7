"""One channel for progress: the library reports lines and bars here and never prints itself.

Training, the sweep, dataset decoding, the grid driver and `defend_files` all take a `Progress`
(or the old `progress: bool`, mapped by `as_progress`), so the caller decides how progress shows:
the CLI renders it on the terminal (or drops it with --quiet), a notebook gets tqdm.auto's widgets,
a Ray worker or a test passes `QUIET` or its own subclass that records what was reported.

Lines go through `tqdm.write`, so they land above any open bar instead of through it; bars are
tqdm.auto bars (on stderr). Code deep inside a call chain (dataset decoding) reads the `current()`
channel, which the caller sets for a block with `using(...)`; it is `QUIET` unless set.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO

from tqdm.auto import tqdm


class Progress:
    """Visible progress: `log` writes a line to `stream` (default: stderr, looked up when writing),
    `bar` opens a tqdm bar (a context manager with `update(n)`)."""

    enabled = True

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def log(self, message: str) -> None:
        stream = self.stream or sys.stderr
        tqdm.write(message, file=stream)
        stream.flush()

    def bar(self, total: float | None, desc: str, unit: str = "it", **kwargs) -> tqdm:
        """A bar over `total` units; keyword arguments go to tqdm. Disabled (a no-op) when quiet."""
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.enabled, **kwargs)


class _Quiet(Progress):
    """Drops every line; its bars are disabled tqdm bars (updates cost nothing)."""

    enabled = False

    def log(self, message: str) -> None:
        pass


QUIET: Progress = _Quiet()


def as_progress(progress: bool | Progress | None) -> Progress:
    """`progress` as a channel: a Progress as is, True a visible one (stderr), False / None QUIET."""
    if isinstance(progress, Progress):
        return progress
    return Progress() if progress else QUIET


_CURRENT: ContextVar[Progress] = ContextVar("fineprune_progress", default=QUIET)


def current() -> Progress:
    """The channel set by the innermost `using` block (QUIET outside any)."""
    return _CURRENT.get()


@contextmanager
def using(progress: bool | Progress | None) -> Iterator[Progress]:
    """Within the block, `current()` is `as_progress(progress)` (the CLI sets it for a whole command)."""
    token = _CURRENT.set(as_progress(progress))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
