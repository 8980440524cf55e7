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


def add_preprocessing(p: argparse.ArgumentParser) -> None:
    """The input preprocessing flags `defend` and `scan` share (DefendJob / Preprocessing fields)."""
    pre = p.add_argument_group("preprocessing (inputs become floats in [0, 1], channels first)")
    pre.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalisation mean, per channel")
    pre.add_argument("--std", type=float, nargs="+", metavar="S", help="normalisation std, per channel")
    pre.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="resize images to H x W")
    pre.add_argument("--image-mode", choices=("rgb", "grey"), help="read image folders as colour or "
                     "greyscale (default: what the model's first convolution takes)")
    pre.add_argument("--image-check", choices=("decode", "headers", "none"),
                     help="how image folders are checked when listed: decode (default: every image once, "
                          "unreadable ones skipped and counted in model.json, as an eager load would), headers "
                          "(each file's header only; a file failing later stops the run, naming it) or none (no "
                          "file opened, for network folders; needs --image-mode, and --input-size for mixed sizes)")
    pre.add_argument("--audio-length", type=int, metavar="N", help="samples per waveform (wav folders)")
    pre.add_argument("--sample-rate", type=int, metavar="HZ", help="expected wav sample rate")
