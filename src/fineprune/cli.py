"""The `fineprune` command line. Each subcommand lives in its own module; this file only routes.

Exit codes: 0 done; 2 bad input (one line saying what and how to fix it); 1 unexpected error.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from .commands.registry import COMMANDS
from .errors import BadInputError, as_flags


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 already; keep it to one line
        self.print_usage(sys.stderr)
        raise SystemExit(f"fineprune: error: {message}") from None


def build_parser() -> argparse.ArgumentParser:
    from . import commands  # noqa: F401  (registers the subcommands)

    parser = _Parser(prog="fineprune", description="Fine-Pruning: remove backdoors from neural networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"fineprune {package_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
        add_args(p)
        p.set_defaults(_run=fn)
    return parser


def package_version() -> str:
    """The installed distribution's version (what pip installed), or the source tree's when the
    package runs uninstalled (e.g. PYTHONPATH=src)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fineprune")
    except PackageNotFoundError:
        from . import __version__

        return __version__


#: How each command lets the user choose the thread count (for the busy-machine hint).
_THREADS_HOW = {"train": "--threads {n}", "reproduce": "--threads {n}", "demo": "OMP_NUM_THREADS={n}",
                "defend": "OMP_NUM_THREADS={n}"}


def _quiet(args: argparse.Namespace) -> bool:
    """--quiet or --silent: no progress (what each still prints is the command's business)."""
    return bool(getattr(args, "quiet", False) or getattr(args, "silent", False))


def _interactive() -> bool:
    return sys.stderr.isatty()


def _threads(args: argparse.Namespace) -> None:
    """Apply the command's --threads, or else the default thread count (see
    `runtime.default_threads`), and hint when the machine is busy."""
    from .runtime import busy_hint, set_threads

    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise BadInputError(f"`threads` must be at least 1, got {args.threads}")
        set_threads(args.threads)
        return
    n = set_threads(None)
    how = _THREADS_HOW.get(args.command)
    chosen = bool(os.environ.get("OMP_NUM_THREADS"))  # the user already picked a count
    # For someone watching a terminal only: scripts and tests get the same stderr on any machine.
    wanted = how and not chosen and not _quiet(args) and _interactive()
    hint = busy_hint(n, how) if wanted else None
    if hint:
        print(f"fineprune: note: {hint}", file=sys.stderr, flush=True)


def _one_line(message: str) -> str:
    """Control characters (newlines, carriage returns...) from user values escaped, so an error
    is always exactly one line on the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


#: OSErrors about a path the user gave (too long, missing, a folder, no permission): bad input.
_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                errno.ELOOP}


#: OSErrors of the machine rather than the input (disk full, quota, read-only or failing disk).
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(_one_line(exc.code), file=sys.stderr)
            return 2
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        from .progress import using

        _threads(args)
        # The channel library code deep in a command reports on (dataset decoding): stderr unless
        # --quiet or --silent.
        with using(not _quiet(args)):
            return int(args._run(args) or 0)
    except BadInputError as exc:
        print(_one_line(f"fineprune: error: {as_flags(str(exc))}"), file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno in _ENV_ERRNOS:
            where = f" writing {exc.filename}" if exc.filename else ""
            print(_one_line(f"fineprune: error{where}: {exc.strerror or exc}; nothing half-written was left "
                            "as a result (outputs are written atomically); fix the disk and rerun "
                            "(--resume continues from the last checkpoint where the command has it)"),
                  file=sys.stderr)
            return 1
        if exc.errno not in _PATH_ERRNOS or exc.filename is None:
            traceback.print_exc()
            return 1
        print(_one_line(f"fineprune: error: cannot use {exc.filename}: {exc.strerror}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fineprune: interrupted", file=sys.stderr)
        return 130
    except Exception:  # unexpected: show the traceback, it is a bug
        traceback.print_exc()
        return 1


if __name__ == "__main__":  # pragma: no cover
    # `python -m fineprune.cli`: the subcommands register on the imported module, not on __main__.
    from fineprune.cli import main as _main

    sys.exit(_main())
