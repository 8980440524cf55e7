"""The one spec syntax, `NAME[,key=value...]`, split in one place.

Used for every named, configurable thing a user writes as text: `--arch timm:NAME,key=value`,
`--recipe ft-sam,rho=8`, `--criterion anp,eps=0.3`, grid axes and config files. Values are Python
literals (`ast.literal_eval`: numbers, strings, tuples, True/False/None, also lower-case true /
false / none); anything else stays a string. Nothing is ever evaluated as code.
"""
from __future__ import annotations

import ast
import difflib
from collections.abc import Iterable
from typing import Any

from .errors import BadInputError

_WORDS = {"true": True, "false": False, "none": None}


def literal(raw: str) -> Any:
    """The value a spec's `key=value` text stands for (a literal, else the text itself)."""
    raw = raw.strip()
    if raw.lower() in _WORDS:
        return _WORDS[raw.lower()]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def split_spec(text: str, what: str = "spec") -> tuple[str, dict[str, Any]]:
    """"ft-sam,rho=8,adaptive=false" -> ("ft-sam", {"rho": 8, "adaptive": False}).

    `what` names the option in errors (e.g. "`recipe`"). A key may appear once."""
    if not isinstance(text, str) or not text.strip():
        raise BadInputError(f"{what}: empty spec; expected NAME[,key=value...]")
    name, *parts = (p.strip() for p in text.split(","))
    if not name:
        raise BadInputError(f"{what}: malformed spec {text!r}: no name before the first comma")
    options: dict[str, Any] = {}
    for part in parts:
        key, eq, raw = (t.strip() for t in part.partition("="))
        if not eq or not key.isidentifier():
            raise BadInputError(f"{what}: malformed spec {text!r}: {part!r} is not key=value; "
                                "expected NAME[,key=value...]")
        if key in options:
            raise BadInputError(f"{what}: spec {text!r} sets {key} twice")
        options[key] = literal(raw)
    return name, options


def format_value(value: Any) -> str:
    """A value as a spec writes it, so that `literal(format_value(v)) == v` (floats keep every
    digit; 2.0 is written 2, which reads back as the same number)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        text = repr(value)
        return text.removesuffix(".0")
    return str(value)


def suggest(word: str, known: Iterable[str]) -> str:
    """" (did you mean X?)" for the closest known words, or ""."""
    close = difflib.get_close_matches(str(word), list(known), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""
