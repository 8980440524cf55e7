"""What runs inside a Ray worker: train one model, or defend and measure one cell.

Both are plain functions (the runner wraps them with `ray.remote`), importable by every worker
from the installed `fineprune` package. Models live in `OUT/models` under the same provenance
fingerprints as `fineprune reproduce` uses, so a resumed grid (or a reproduce run in the same
folder) reuses them. Each worker process keeps the last loaded datasets in memory.
"""
from __future__ import annotations

import os
import socket
import time
from functools import lru_cache

from .config import load_plugins


@lru_cache(maxsize=2)  # a worker keeps the last two datasets it loaded
def _task_data(task_name: str, data_root: str, seed: int, subsample: float):
    from ..experiment import load_task_data
    from ..tasks import get_task

    return load_task_data(get_task(task_name), data_root, seed, subsample)


def _or(value, default):
    return default if value is None else value


def _setup(params: dict, data_root: str, device: str | None):
    from ..experiment import prepare_task
    from ..runtime import seed_everything
    from ..tasks import get_task

    task = get_task(params["task"])
    seed = params["seed"]
    seed_everything(seed)
    data = _task_data(task.name, str(data_root), seed, params["subsample"])
    return prepare_task(
        task, data, data_root=data_root, seed=seed, subsample=params["subsample"],
        poison_rate=params.get("poison_rate"), epochs=params.get("epochs"),
        finetune_epochs=params.get("finetune_epochs"),
        defender_val_fraction=_or(params.get("defender_val_fraction"), 0.3),
        attacker_val_fraction=_or(params.get("attacker_val_fraction"), 0.2),
        device=device, progress=False, trigger=params.get("trigger") or "task")


def _where() -> dict:
    return {"node": socket.gethostname(), "pid": os.getpid()}


def train_model(spec: dict, clean: dict | None = None) -> dict:
    """Train (or find on disk) the model of `spec` = {"key", "params", "models_dir", "data_root",
    "device", "plugins"}; `clean` is the clean model's result (pruning-aware only).
    Returns {"key", "path", "info", "reused", "seconds", "node", "pid"}."""
    from ..defense.persist import load_pruned
    from ..experiment import DEFAULT_THRESHOLD, ModelStore, get_model, model_provenance
    from ..experiment.models import PROVENANCE_KEYS

    t0 = time.perf_counter()
    load_plugins(spec.get("plugins", []))
    params = spec["params"]
    setup = _setup(params, spec["data_root"], spec.get("device"))
    store = ModelStore(spec["models_dir"])
    attack = params["attack"]
    pa_threshold = _or(params.get("attack_threshold"), DEFAULT_THRESHOLD)

    def clean_model():
        if clean is None:
            raise ValueError("the pruning-aware model needs the clean model's result")
        return load_pruned(setup.fresh(), clean["path"]), clean["info"]

    _, info, reused = get_model(setup, attack, store, pa_threshold=pa_threshold, clean=clean_model)
    name, provenance = model_provenance(setup, attack, pa_threshold)
    weights, _ = store.files(name, provenance)
    info = {k: v for k, v in info.items() if k not in PROVENANCE_KEYS}
    return {"key": spec["key"], "path": str(weights), "info": info, "reused": reused,
            "seconds": round(time.perf_counter() - t0, 3), **_where()}


def run_cell(cell: dict, model: dict) -> dict:
    """Defend the trained `model` (a `train_model` result) as the cell says and measure it on the
    test split. `cell` = {"id", "params", "data_root", "device", "plugins"}. Returns the cell's
    metrics (the runner adds the params and bookkeeping)."""
    from ..defense.api import LR_FACTORS, format_lr_factors, parse_lr_factors
    from ..defense.persist import load_pruned
    from ..experiment import DEFAULT_THRESHOLD, defend_one
    from ..purify.registry import paper

    t0 = time.perf_counter()
    load_plugins(cell.get("plugins", []))
    params = cell["params"]
    setup = _setup(params, cell["data_root"], cell.get("device"))
    net = load_pruned(setup.fresh(), model["path"])
    # defend_one seeds its own draws: the same cell gives the same numbers in any worker.
    threshold = _or(params["threshold"], DEFAULT_THRESHOLD)
    row, _ = defend_one(setup, params["attack"], net, model.get("info", {}), params["defense"], threshold,
                        # an axis collapsed to None does not apply to this defense: the paper's then
                        **{f: params.get(f) or paper(f).spec() for f in ("recipe", "criterion", "stop_rule")},
                        lr_factors=parse_lr_factors(params.get("lr_factors") or format_lr_factors(LR_FACTORS)),
                        epoch_asr=False)  # a row records the final test metrics only
    for k in ("task", "attack", "defense"):
        row.pop(k, None)
    row["cell_seconds"] = round(time.perf_counter() - t0, 3)
    return {**row, **_where()}
