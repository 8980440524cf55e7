"""Options from a small config file (TOML; YAML when PyYAML is installed).

Keys are the command's long flags without dashes (`num_classes` or `num-classes`); tables such as
`[finetune]` or `[preprocessing]` only group keys and are flattened. Relative paths are taken
relative to the config file, so a config can travel with its data.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from .inputs import task_ref
from .job import DefendJob

PATH_KEYS = ("model", "data", "val", "triggered", "out", "data_root")
FIELDS = {f.name for f in dataclasses.fields(DefendJob)}


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if isinstance(value, dict) and k not in FIELDS:
            out.update(_flatten(value))
        else:
            out[k] = value
    return out


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options in `path`, keyed by DefendJob field; unknown keys are an error (typos)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"`config` {p} does not exist or is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"`config` {p} is not UTF-8 text; write it as a TOML (or YAML) file") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise BadInputError(f"{p} is YAML but PyYAML is not installed; pip install pyyaml, "
                                "or write the config as TOML") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise BadInputError(f"{p} is not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BadInputError(f"{p} is not valid TOML ({exc})") from None
    if not isinstance(raw, dict):
        raise BadInputError(f"{p} must hold key = value options")
    options = _flatten(raw)
    unknown = sorted(set(options) - FIELDS)
    if unknown:
        raise BadInputError(f"{p}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    for key in PATH_KEYS:
        value = options.get(key)
        if isinstance(value, str) and task_ref(value) is None and not Path(value).expanduser().is_absolute():
            options[key] = str(p.parent / value)
    plugins = options.get("plugins")
    if plugins is not None:
        plugins = [plugins] if isinstance(plugins, str) else list(plugins)
        options["plugins"] = [str(pl if Path(pl).expanduser().is_absolute() else p.parent / pl) for pl in plugins]
    return options
