"""The subcommand registry: each module in `commands/` declares its flags and its run function
here; `cli.py` builds the parser from it. Kept apart from `cli.py` so that the commands never
import the entry point (no cli <-> commands import cycle)."""
from __future__ import annotations

import argparse
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]
AddArgs = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[AddArgs, Command]] = {}


def command(name: str, add_args: AddArgs) -> Callable[[Command], Command]:
    """Register a subcommand: `add_args` declares its flags, the decorated function runs it."""

    def deco(fn: Command) -> Command:
        COMMANDS[name] = (add_args, fn)
        return fn

    return deco
