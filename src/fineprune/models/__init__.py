"""Model architectures. Importing this package registers the built-in names with `build_arch`."""
from . import registry  # noqa: F401
