"""One registry for the defender's methods: every family (fine-tuning recipes, pruning criteria,
stop rules, scans, unlearning) is a base class here, every method a dataclass subclass that
registers itself by defining `name`.

A method is written and read as a spec, `NAME[,key=value...]` (`fineprune.specs`): the CLI, config
files, grid axes, `reproduce` and `defend()` all resolve it here (`resolve`), so a name or option
is checked in one place, with close-name suggestions. Records keep `options()` (every field,
resolved); ids and command lines keep `spec()` (only the options that differ from the defaults, so
a default method is spelled by its name alone, as before options existed).

Adding a method is one file: subclass the family's base, set `name`, give the options as fields
with the paper's defaults, implement the family's verb. If the file is not one of fineprune's own
modules, load it with `--plugin FILE` (config key `plugins`, also a grid setting).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..errors import BadInputError
from ..specs import format_value, split_spec, suggest

# family -> name -> class. Filled by `Method.__init_subclass__` as modules are imported.
_REGISTRY: dict[str, dict[str, type[Method]]] = {}
_BASES: dict[str, type[Method]] = {}
# The modules that define each family's built-in methods, imported on first use (so that
# importing the registry stays cheap and free of cycles).
_BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "recipe": ("fineprune.purify.recipes", "fineprune.purify.unlearning", "fineprune.purify.reversed_trigger"),
    "criterion": ("fineprune.purify.criteria", "fineprune.purify.reversed_trigger"),
    "stop_rule": ("fineprune.purify.stop_rules",),
    "scan": ("fineprune.purify.scan",),
}
# How each family is named in messages and where its option lives.
LABELS: dict[str, str] = {"recipe": "fine-tuning recipe", "criterion": "pruning criterion",
                          "stop_rule": "stop rule", "scan": "backdoor scan"}


class Method:
    """Base of every registered method. Subclasses are dataclasses; their init fields are the
    method's options, with its paper's defaults."""

    family: ClassVar[str] = ""
    name: ClassVar[str] = ""
    # On a family's base: the method a run uses when none is given (a spec). Defined once there,
    # with a comment saying what chose it.
    default_spec: ClassVar[str] = ""
    # On a family's base: the paper's method (Liu et al., RAID 2018), which stays available by name
    # whatever the default becomes. Records and grid ids leave a method out where it is the
    # paper's, so results from before a family existed keep their fields and ids.
    paper_spec: ClassVar[str] = ""

    def __init_subclass__(cls, family: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if family is not None:
            cls.family = family
            _BASES[family] = cls
            _REGISTRY.setdefault(family, {})
        if "name" in cls.__dict__ and cls.name:
            _register(cls)

    # -- what a record keeps -------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The name and every option, resolved (for records and checkpoint keys)."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in _options(type(self))}}

    def spec(self) -> str:
        """The canonical spec: the name, then the options that differ from the defaults, in field
        order (so the default method reads as its bare name)."""
        parts = [self.name]
        for f in _options(type(self)):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                parts.append(f"{f.name}={format_value(value)}")
        return ",".join(parts)

    def __str__(self) -> str:
        return self.spec()


def _options(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []


def _register(cls: type[Method]) -> None:
    for option in cls.__dict__.get("__annotations__", {}):
        if any(callable(base.__dict__.get(option)) for base in cls.__mro__[1:]):
            raise TypeError(f"{cls.__qualname__}: option {option!r} would hide the method {option}() of its "
                            "family's base; name the option otherwise")
    if not cls.family:
        raise TypeError(f"{cls.__qualname__} names a method ({cls.name!r}) but belongs to no family")
    known = _REGISTRY[cls.family]
    old = known.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"{LABELS.get(cls.family, cls.family)} {cls.name!r} is already registered by "
                         f"{old.__module__}.{old.__qualname__}")
    known[cls.name] = cls


def _load(family: str) -> dict[str, type[Method]]:
    if family not in _BUILTIN_MODULES and family not in _REGISTRY:
        raise ValueError(f"unknown method family {family!r}; known: {', '.join(families())}")
    for module in _BUILTIN_MODULES.get(family, ()):
        importlib.import_module(module)
    return _REGISTRY[family]


def families() -> list[str]:
    return list(dict.fromkeys([*_BUILTIN_MODULES, *_REGISTRY]))


def methods(family: str) -> dict[str, type[Method]]:
    """The registered methods of `family`, by name (built-ins first, in definition order)."""
    return dict(_load(family))


def names(family: str) -> tuple[str, ...]:
    return tuple(methods(family))


def base(family: str) -> type[Method]:
    _load(family)
    return _BASES[family]


def default(family: str) -> Method:
    """The family's default method (its base's `default_spec`)."""
    return resolve(family, None)


def paper(family: str) -> Method:
    """The paper's method of `family` (its base's `paper_spec`)."""
    return resolve(family, base(family).paper_spec)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: values are taken as written
        return {}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field's type says: ints become floats for float fields; strings, bools and
    numbers are not confused."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise BadInputError(f"{where} cannot be none")
    if bool in allowed:
        if isinstance(value, bool):
            return value
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if str in allowed and isinstance(value, str):
        return value
    if not any(t in (bool, int, float, str) for t in allowed):
        return value  # a type the spec syntax does not know: passed as written
    want = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise BadInputError(f"{where} must be {want}, got {value!r}")


def resolve(family: str, spec: str | Mapping[str, Any] | Method | None = None, *,
            what: str | None = None) -> Method:
    """A method of `family` from a spec: `"NAME[,key=value...]"`, a mapping `{"name": NAME,
    key: value...}` (config files), a method instance (copied: a method may hold state from the
    model it prepared), or None (the family's default). `what` names the option in errors
    (default: the family, e.g. `recipe`). Raises BadInputError with close-name suggestions."""
    what = what or f"`{family}`"
    known = _load(family)
    if spec is None:
        spec = _BASES[family].default_spec
    if isinstance(spec, Method):
        if spec.family != family:
            raise BadInputError(f"{what}: {type(spec).__name__} is a {LABELS.get(spec.family, spec.family)}, "
                                f"not a {LABELS.get(family, family)}")
        return copy.deepcopy(spec)
    if isinstance(spec, Mapping):
        opts = dict(spec)
        name = opts.pop("name", None)
        if not isinstance(name, str):
            raise BadInputError(f"{what}: a mapping needs `name`, got {dict(spec)!r}")
        name = name.strip()
    elif isinstance(spec, str):
        name, opts = split_spec(spec, what)
    else:
        raise BadInputError(f"{what} must be a spec NAME[,key=value...], got {spec!r}")
    cls = known.get(name) or known.get(name.lower())
    if cls is None:
        raise BadInputError(f"{what}: unknown {LABELS.get(family, family)} {name!r}{suggest(name, known)}; "
                            f"choose one of {', '.join(known)}")
    fields = {f.name: f for f in _options(cls)}
    bad = [k for k in opts if k not in fields]
    if bad:
        raise BadInputError(f"{what}: {cls.name} has no option {bad[0]!r}{suggest(bad[0], fields)}; "
                            f"its options: {', '.join(fields) or 'none'}")
    hints = _hints(cls)
    values = {k: _coerce(v, hints.get(k, Any), f"{what} {cls.name} option {k}") for k, v in opts.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{what} {cls.name}: {exc}") from None


def canonical(family: str, spec: str | Mapping[str, Any] | Method | None, *, what: str | None = None) -> str:
    """The canonical spec text of `spec` (see `Method.spec`): one spelling per setting."""
    return resolve(family, spec, what=what).spec()


def summary(cls: type[Method]) -> str:
    """The first sentence of a method's docstring (help tables)."""
    doc = " ".join((cls.__doc__ or "").split())
    for m in re.finditer(r"\.\s", doc):  # the first full stop that is not an abbreviation's
        if not re.search(r"(\be\.g|\bi\.e|\bal|\bcf|\bvs)$", doc[:m.start()]):
            return doc[:m.start()]
    return doc.rstrip(".")


def option_text(cls: type[Method]) -> str:
    """"rho=2, adaptive=true": a method's options with their defaults."""
    return ", ".join(f"{f.name}={format_value(f.default)}" for f in _options(cls)
                     if f.default is not dataclasses.MISSING)


def help_line(family: str) -> str:
    """One line for a flag's help: the names, the default marked, and the option syntax."""
    default_name = split_spec(base(family).default_spec)[0]
    listed = ", ".join(n + (" (default)" if n == default_name else "") for n in names(family))
    return f"{listed}; NAME,key=value sets an option (`fineprune methods` lists them)"


def help_table(family: str, *, builtin: bool = False) -> str:
    """A markdown table of the family's methods (README and `fineprune methods`); `builtin`: only
    fineprune's own, not those plugins registered."""
    rows = [f"| `{n}` | {summary(c)} | {option_text(c) or '-'} |" for n, c in methods(family).items()
            if not builtin or c.__module__.startswith("fineprune.")]
    return "\n".join(["| name | what it is | options (defaults) |", "|---|---|---|", *rows])


_LOADED_PLUGINS: set[str] = set()


def load_plugins(paths: list[str] | tuple[str, ...]) -> None:
    """Import each plugin file once per process. A plugin registers methods (a subclass of a
    family's base with a `name`) or tasks (`fineprune.tasks.register_task`)."""
    from ..runtime import fingerprint

    for path in paths:
        path = str(Path(path).resolve())
        if path in _LOADED_PLUGINS:
            continue
        if not Path(path).is_file():
            raise BadInputError(f"plugin {path} does not exist")
        name = f"fineprune_plugin_{fingerprint(path, 8)}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise BadInputError(f"plugin {path} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _LOADED_PLUGINS.add(path)
