"""Grid configs: a YAML file naming the axes; the grid is their cartesian product.

```yaml
out: grid-small                  # output folder (the CLI's --out wins)
data_root: ../shared/data        # the datasets, relative to this file (every Ray node must see it;
                                 # ignored by "mnist"; left out: ../shared/data from the working folder)
resources: {num_cpus: 1, num_gpus: 0}   # per cell (one Ray task each)
train_resources: {num_cpus: 1}   # per model training task (default: `resources`)
retries: 1                       # a failed cell (or model) runs at most 1 + retries times
plugins: []                      # Python files imported first in the driver and every worker
axes:                            # a list sweeps the axis; a single value fixes it
  task: mnist
  attack: [badnets, pruning-aware]
  defense: [none, fine-tuning, pruning, fine-pruning]
  threshold: [1, 2, 4, 8]
  seed: [0, 1, 2]
  subsample: 0.2
  epochs: 2
  recipe: [plain, "ft-sam,rho=8"] # method specs NAME[,key=value...] (`fineprune methods` lists them):
  criterion: [activation, clp]   #   the fine-tuning recipe, the pruning order and the stop rule
  stop_rule: paper
exclude:                         # optional: drop the cells matching all keys of an entry
  - {attack: pruning-aware, threshold: 1}
```

Axes that do not matter for a cell are collapsed to null, so the product holds no duplicate
experiments: a clean model (attack "none") has no poison_rate / attack_threshold, defenses
"none" and "fine-tuning" have no threshold, criterion or stop_rule, "none" and "pruning" have no
finetune_epochs or recipe.

Cell ids are fingerprints of the params. The recipe, criterion and stop_rule axes came later: a
cell with the paper's method (`purify.registry.paper`) or none leaves that axis out of its
fingerprint, so grids written before keep their ids. Method axes hold canonical specs (the name,
then only the options that differ from the defaults), so "ft-sam,rho=2.0" and "ft-sam" are one cell.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..defense.api import LR_FACTORS, format_lr_factors, parse_lr_factors
from ..errors import BadInputError
from ..experiment.vocabulary import ATTACKS, DEFAULT_THRESHOLD, DEFENSES, TRIGGERS
from ..purify.registry import canonical, paper
from ..purify.registry import load_plugins as _load_plugins
from ..runtime import fingerprint
from ..tasks import DEFAULT_DATA_ROOT

# Every axis with its default (used when the config leaves it out), in the order cells print.
AXES: dict[str, Any] = {
    "task": None,  # required
    "attack": "badnets",
    "poison_rate": None,  # None: the task's own rate
    "trigger": "task",  # the BadNets trigger: the task's own, or "blend" (experiment.vocabulary.TRIGGERS)
    "attack_threshold": DEFAULT_THRESHOLD,  # the pruning-aware attacker's stop rule; "same": the defense's threshold
    "defense": "fine-pruning",
    "threshold": DEFAULT_THRESHOLD,  # the defender's stop rule, accuracy points
    "seed": 0,
    "subsample": 1.0,
    "epochs": None,  # None: the task's attacker epochs
    "finetune_epochs": None,  # None: the task's (or the default) fine-tuning epochs
    # Method specs (fineprune.purify): the paper's unless a config sweeps them, so a grid measures
    # the paper's defense whatever the tool's defaults become.
    "recipe": paper("recipe").spec(),  # the fine-tuning recipe
    "criterion": paper("criterion").spec(),  # the pruning order
    "stop_rule": paper("stop_rule").spec(),  # when pruning stops
    "lr_factors": format_lr_factors(LR_FACTORS),  # fine-tuning rates tried, strongest first (defend lr_factors)
    "defender_val_fraction": 0.3,
    "attacker_val_fraction": 0.2,  # held out of the training split: every attacker model trains on the rest
}
# The axes whose value is one of a fixed set of names.
_CHOICES: dict[str, tuple[str, ...]] = {"attack": ATTACKS, "defense": tuple(DEFENSES), "trigger": TRIGGERS}
# The axes whose value is a method spec, by family (`purify.registry`).
_METHOD_AXES = ("recipe", "criterion", "stop_rule")
# Axes added after the first grids, with the paper's value: a cell leaves them out of its id
# (and its label) where they hold that value or are collapsed to None.
LATER_AXES = {**{f: paper(f).spec() for f in _METHOD_AXES}, "trigger": "task",
              "lr_factors": format_lr_factors(LR_FACTORS)}
# The axes that pick the trained model (the rest only change the defense / measurement).
MODEL_AXES = ("task", "attack", "poison_rate", "trigger", "attack_threshold", "seed", "subsample", "epochs",
              "attacker_val_fraction")
SETTINGS = ("out", "data_root", "resources", "train_resources", "retries", "plugins", "axes", "exclude",
            "device", "name")


@dataclass
class GridConfig:
    axes: dict[str, list]
    out: str = "fineprune-grid"
    data_root: str = DEFAULT_DATA_ROOT
    resources: dict = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})
    train_resources: dict | None = None
    retries: int = 1
    plugins: list[str] = field(default_factory=list)
    exclude: list[dict] = field(default_factory=list)
    device: str | None = None
    name: str = "grid"
    source: str | None = None  # the YAML text it was read from (copied into the output folder)


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid: `params` holds every axis (irrelevant ones None)."""

    id: str
    params: dict

    def model_key(self) -> str:
        return model_key(self.params)

    def label(self) -> str:
        p = self.params
        bits = [p["task"], p["attack"], p["defense"]]
        if p["threshold"] is not None:
            bits.append(f"t={_num(p['threshold'])}")
        if p["poison_rate"] is not None:
            bits.append(f"rate={_num(p['poison_rate'])}")
        for axis, paper_value in LATER_AXES.items():
            if p.get(axis) not in (None, paper_value):
                bits.append(f"{axis}={p[axis]}")
        bits.append(f"seed={p['seed']}")
        return " ".join(bits)


def _num(v: float) -> str:
    return f"{v:g}"


def model_params(params: dict) -> dict:
    return {k: params[k] for k in MODEL_AXES}


def model_key(params: dict) -> str:
    """Identity of the model a cell defends (cells with the same key share one trained model)."""
    p = _without_paper_values(model_params(params))
    return f"{p['task']}-{'clean' if p['attack'] == 'none' else p['attack']}-{fingerprint(p, 10)}"


def clean_params(params: dict) -> dict:
    """The model params of the clean model a pruning-aware model starts from."""
    # attacker_val_fraction stays: the clean model trains on the same training data (the split
    # minus the attacker's hold-out) as the pruning-aware model built from it.
    return {**model_params(params), "attack": "none", "poison_rate": None, "trigger": None, "attack_threshold": None}


# ---- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path) -> GridConfig:
    """Read and check a grid YAML file (raises BadInputError with what to fix)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"grid config {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"grid config {path} is not UTF-8 text; write it as a YAML file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(raw, base_dir=p.parent, source=text)


def parse_config(raw: Any, base_dir: str | Path = ".", source: str | None = None) -> GridConfig:
    if not isinstance(raw, dict):
        raise BadInputError("a grid config is a mapping with at least `axes:` (see `fineprune grid --help`)")
    unknown = set(raw) - set(SETTINGS)
    if unknown:
        raise BadInputError(f"unknown grid setting(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(SETTINGS)}")
    axes_raw = raw.get("axes")
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise BadInputError("the grid config needs an `axes:` mapping (at least `task:`)")
    bad = set(axes_raw) - set(AXES)
    if bad:
        raise BadInputError(f"unknown axis/axes {', '.join(sorted(bad))}; known: {', '.join(AXES)}")
    if "task" not in axes_raw:
        raise BadInputError("axes: `task:` is required (e.g. `task: mnist`)")
    axes: dict[str, list] = {}
    for name, default in AXES.items():
        values = axes_raw.get(name, default)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise BadInputError(f"axis {name!r} is an empty list")
        axes[name] = values
    base = Path(base_dir)
    plugins = raw.get("plugins") or []
    if isinstance(plugins, str):
        plugins = [plugins]
    plugins = [str((base / pl).resolve()) if not Path(pl).is_absolute() else str(pl) for pl in plugins]
    for pl in plugins:
        if not Path(pl).is_file():
            raise BadInputError(f"plugin {pl} does not exist")
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
        raise BadInputError("`exclude:` is a list of mappings, e.g. [{attack: none, defense: pruning}]")
    for e in exclude:
        bad = set(e) - set(AXES)
        if bad:
            raise BadInputError(f"exclude: unknown axis/axes {', '.join(sorted(bad))}")
    resources = _resources(raw.get("resources"), "resources") or {"num_cpus": 1, "num_gpus": 0}
    train_resources = _resources(raw.get("train_resources"), "train_resources")
    retries = raw.get("retries", 1)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise BadInputError(f"retries must be a whole number >= 0, got {retries!r}")
    data_root = raw.get("data_root")
    if data_root is None:
        data_root = DEFAULT_DATA_ROOT  # as `fineprune reproduce`: relative to the working folder
    elif not Path(str(data_root)).is_absolute():
        data_root = str(base / str(data_root))  # written in the config: relative to the config file
    data_root = str(Path(data_root).resolve())  # workers do not share the driver's working folder
    cfg = GridConfig(axes=axes, out=str(raw.get("out", "fineprune-grid")), data_root=str(data_root),
                     resources=resources, train_resources=train_resources, retries=retries, plugins=plugins,
                     exclude=exclude, device=raw.get("device"), name=str(raw.get("name", "grid")),
                     source=source)
    load_plugins(cfg.plugins)
    expand(cfg)  # checks every value now, before any Ray task starts
    return cfg


def _resources(value: Any, what: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadInputError(f"{what} is a mapping like {{num_cpus: 1, num_gpus: 0}}")
    bad = set(value) - {"num_cpus", "num_gpus", "memory"}
    if bad:
        raise BadInputError(f"{what}: unknown key(s) {', '.join(sorted(bad))} (num_cpus, num_gpus, memory)")
    out = {"num_cpus": 1, "num_gpus": 0, **value}
    for k, v in out.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise BadInputError(f"{what}.{k} must be a number >= 0, got {v!r}")
    return out


def load_plugins(paths: list[str]) -> None:
    """Import each plugin file once per process: a plugin can register tasks with
    `fineprune.tasks.register_task(TaskSpec(...))`, and methods (`fineprune.purify`); they then
    work as grid tasks and axis values (`purify.registry.load_plugins`)."""
    _load_plugins(paths)


# ---- expansion -------------------------------------------------------------------------------


def _check(name: str, v: Any) -> Any:
    """One axis value, checked and normalised (4 and 4.0 are the same threshold)."""
    def fail(why: str) -> BadInputError:
        return BadInputError(f"axis {name}: {why}, got {v!r}")

    def number(lo: float, hi: float, lo_open: bool = False) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
            raise fail("expected a number")
        if v < lo or v > hi or (lo_open and v == lo):
            raise fail(f"must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return float(v)

    if name == "task":
        from ..tasks import get_task

        if not isinstance(v, str):
            raise fail("expected a task name")
        try:
            return get_task(v).name
        except BadInputError as exc:
            raise BadInputError(f"axis task: {exc}") from None
    if name == "lr_factors":
        try:
            return format_lr_factors(parse_lr_factors(v))
        except BadInputError as exc:
            raise fail(str(exc)) from None
    if name in _METHOD_AXES:
        return canonical(name, v, what=f"axis {name}")
    if name in _CHOICES:
        if not isinstance(v, str) or v not in _CHOICES[name]:
            raise fail(f"expected one of {', '.join(_CHOICES[name])}")
        return v
    if name == "poison_rate":
        return None if v is None else number(0.0, 1.0, lo_open=True)
    if name == "attack_threshold":
        return "same" if v == "same" else number(0.0, 100.0)
    if name == "threshold":
        return number(0.0, 100.0)
    if name == "seed":
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise fail("expected a whole number >= 0")
        return v
    if name == "subsample":
        return number(0.0, 1.0, lo_open=True)
    if name in ("epochs", "finetune_epochs"):
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "epochs" else 0):
            raise fail(f"expected a whole number >= {1 if name == 'epochs' else 0} (or null)")
        return v
    if name in ("defender_val_fraction", "attacker_val_fraction"):
        f = number(0.0, 1.0, lo_open=True)
        if f >= 1.0:
            raise fail("must be below 1")
        return f
    raise fail("unknown axis")


def normalise(params: dict) -> dict:
    """Collapse the axes that do not matter for this cell to None."""
    p = dict(params)
    if p["attack"] == "pruning-aware" and p["attack_threshold"] == "same":
        p["attack_threshold"] = p["threshold"]
    if p["attack"] != "pruning-aware":
        p["attack_threshold"] = None  # (attacker_val_fraction stays: every attacker model trains without its hold-out)
    if p["attack"] == "none":
        p["poison_rate"] = None
        p["trigger"] = None
    if p["defense"] in ("none", "fine-tuning"):
        p["threshold"] = None
        p["criterion"] = None
        p["stop_rule"] = None
    if p["defense"] in ("none", "pruning"):
        p["finetune_epochs"] = None
        p["recipe"] = None
        p["lr_factors"] = None
    if p["defense"] == "none":
        p["defender_val_fraction"] = None
    return p


def _matches(params: dict, rule: dict) -> bool:
    for k, want in rule.items():
        wants = want if isinstance(want, list) else [want]
        if params.get(k) not in wants and not any(
                isinstance(w, (int, float)) and isinstance(params.get(k), (int, float)) and float(w) == params.get(k)
                for w in wants):
            return False
    return True


def cell_id(params: dict) -> str:
    # The recipe, criterion and stop_rule axes came after the first grids: each left out of the
    # fingerprint where it is the paper's value (or collapsed to None), a cell keeps the id it had
    # before the axes existed.
    return f"{params['task']}.{params['attack']}.{params['defense']}.{fingerprint(_without_paper_values(params), 12)}"


def _without_paper_values(params: dict) -> dict:
    """`params` less the later axes that hold the paper's value (or None): the ids they had before."""
    return {k: v for k, v in params.items() if not (k in LATER_AXES and v in (None, LATER_AXES[k]))}


def expand(cfg: GridConfig) -> list[Cell]:
    """The grid's cells in a stable order (duplicates after normalisation dropped)."""
    names = list(AXES)
    checked = [[_check(n, v) for v in cfg.axes[n]] for n in names]
    cells: dict[str, Cell] = {}
    for combo in itertools.product(*checked):
        raw = dict(zip(names, combo))
        if any(_matches(raw, rule) for rule in cfg.exclude):
            continue
        params = normalise(raw)
        if any(_matches(params, rule) for rule in cfg.exclude):
            continue
        cid = cell_id(params)
        cells.setdefault(cid, Cell(cid, params))
    if not cells:
        raise BadInputError("the grid is empty (every cell was excluded)")
    return list(cells.values())
