"""Subcommands of the `fineprune` CLI (importing this package registers them)."""
from . import demo  # noqa: F401
