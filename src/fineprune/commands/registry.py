"""The subcommand registry: each module in `commands/` declares its flags and its run function
here; `cli.py` builds the parser from it. Kept apart from `cli.py` so that the commands never
import the entry point (no cli <-> commands import cycle)."""
from __future__ import annotations

import argparse
from collections.abc import Callable

from ..errors import as_flags
from ..progress import Progress

Command = Callable[[argparse.Namespace], int]
AddArgs = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[AddArgs, Command]] = {}


def command(name: str, add_args: AddArgs) -> Callable[[Command], Command]:
    """Register a subcommand: `add_args` declares its flags, the decorated function runs it."""

    def deco(fn: Command) -> Command:
        COMMANDS[name] = (add_args, fn)
        return fn

    return deco


class FlagProgress(Progress):
    """The CLI's progress channel: lines as the library wrote them, with option names (`lr`) shown
    as the flags that set them (--lr)."""

    def log(self, message: str) -> None:
        super().log(as_flags(message))


def add_threads(p: argparse.ArgumentParser) -> None:
    """`--threads N` (checked and applied by cli.py before the command runs)."""
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: min(physical cores, CPUs this process may use), or "
                        "$OMP_NUM_THREADS when set: never more threads than cores, and the same count on every "
                        "run of a machine, since models trained with another count differ slightly (run.json "
                        "records it); on a busy machine fewer is faster, and a note in the terminal says so)")
