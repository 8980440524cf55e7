"""Subcommands of the `fineprune` CLI (importing this package registers them)."""
from . import (
    defend,  # noqa: F401
    demo,  # noqa: F401
    grid,  # noqa: F401
    preview,  # noqa: F401
    reproduce,  # noqa: F401
    train,  # noqa: F401
)
