"""Errors that mean "the user gave us something we cannot use" (CLI exit code 2)."""


class FinepruneError(Exception):
    """Base class for fineprune's own errors."""


class BadInputError(FinepruneError, ValueError):
    """An input (file, argument, dataset) is unusable; the message says what and how to fix it."""


class UnsafeModelError(BadInputError):
    """A model file would need arbitrary unpickling (attacker code could run) and is refused."""


class LayerNotFoundError(BadInputError):
    """No suitable layer to prune; the message lists the candidates."""
