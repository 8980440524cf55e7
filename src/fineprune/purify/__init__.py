"""The defender's methods, one registry for every family (`registry`): fine-tuning recipes
(`recipes`), pruning criteria (`criteria`) and stop rules (`stop_rules`). A method is a typed
dataclass with its paper's defaults, picked by a spec `NAME[,key=value...]`."""
from .registry import Method, canonical, default, load_plugins, methods, names, resolve

__all__ = ["Method", "canonical", "default", "load_plugins", "methods", "names", "resolve"]
