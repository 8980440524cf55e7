"""Errors that mean "the user gave us something we cannot use" (CLI exit code 2). Messages name
options in the Python API's words, in backticks (`num_classes`, `layer`=NAME); the CLI shows flags."""
import re


def as_flags(message: str) -> str:
    """`message` with its options (`val_fraction`, `layer`=NAME) written as flags (--val-fraction, --layer NAME)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`(=?)", lambda m: "--" + m[1].replace("_", "-") + " " * len(m[2]), message)


class FinepruneError(Exception):
    """Base class for fineprune's own errors."""


class BadInputError(FinepruneError, ValueError):
    """An input (file, argument, dataset) is unusable; the message says what and how to fix it."""


class UnsafeModelError(BadInputError):
    """A model file would need arbitrary unpickling (attacker code could run) and is refused."""


class LayerNotFoundError(BadInputError):
    """No suitable layer to prune; the message lists the candidates."""
