"""Subcommands of the `fineprune` CLI (importing this package registers them)."""
from . import demo  # noqa: F401
from . import preview  # noqa: F401
from . import train  # noqa: F401
from . import reproduce  # noqa: F401
from . import defend  # noqa: F401
from . import grid  # noqa: F401
from . import methods  # noqa: F401
from . import scan  # noqa: F401
