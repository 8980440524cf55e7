"""`fineprune reproduce`: the paper's experiment (Table 1) on real data.

Per task the attacker trains three models (clean, BadNets, pruning-aware; `models.py`) on its part
of the training split, and the defender runs every defense of `DEFENSES` on each with its clean
validation data (`measure.py`); the test split only measures. Trained models are kept in
`OUT/models` by provenance, so a rerun reuses them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..defense.api import DefenseResult
from ..progress import Progress, as_progress
from ..purify.registry import canonical
from ..runtime import pick_device, seed_everything, write_json_atomic
from ..tasks import DEFAULT_DATA_ROOT, TaskSpec, get_task
from .measure import defend_one
from .models import ModelStore, get_model
from .setup import load_task_data, prepare_task
from .vocabulary import ATTACKS, DEFAULT_THRESHOLD, DEFENSES

# Table 1 of the paper as recalled in shared/docs/paper-notes.md (marked unverified there):
# (clean accuracy, ASR) per (task, attack, defense); pruning alone is not given.
PAPER = {
    ("face", "badnets", "none"): (0.978, 1.00), ("face", "badnets", "fine-tuning"): (0.978, 0.00),
    ("face", "badnets", "fine-pruning"): (0.978, 0.00),
    ("speech", "badnets", "none"): (0.990, 0.77), ("speech", "badnets", "fine-tuning"): (0.990, 0.435),
    ("speech", "badnets", "fine-pruning"): (0.988, 0.02),
    ("traffic", "badnets", "none"): (0.849, 0.991), ("traffic", "badnets", "fine-tuning"): (0.857, 0.921),
    ("traffic", "badnets", "fine-pruning"): (0.873, 0.288),
    ("face", "pruning-aware", "none"): (0.974, 0.999), ("face", "pruning-aware", "fine-tuning"): (0.978, 0.00),
    ("face", "pruning-aware", "fine-pruning"): (0.977, 0.00),
}


@dataclass
class ReproduceConfig:
    tasks: tuple[str, ...] = ("face", "speech", "traffic")
    data_root: str = DEFAULT_DATA_ROOT
    out: str = "fineprune-reproduce"
    seed: int = 0
    threshold: float = DEFAULT_THRESHOLD
    defender_val_fraction: float = 0.3  # of the clean validation split; the rest fine-tunes
    attacker_val_fraction: float = 0.2  # of the training split, held out: the attacker's choices only
    pa_widen: int = 0  # channels the pruning-aware attacker adds to the pruned layer (PruningAwareAttack.widen)
    subsample: float = 1.0  # < 1 shrinks every split (tests, quick looks); recorded in results
    epochs: int | None = None  # override the task's attacker epochs (tests)
    finetune_epochs: int | None = None
    # The defender's methods, specs NAME[,key=value...] (fineprune.purify); None: each family's default.
    recipe: str | None = None  # how fine-tuning trains
    criterion: str | None = None  # the pruning order
    stop_rule: str | None = None  # when pruning stops
    device: str | None = None
    progress: bool | Progress = True  # where the run's lines and bars go (True: stderr)
    timings: bool = True  # False: `seconds` fields are null, so two runs' results.json are byte-identical
    extra: dict = field(default_factory=dict)
    attacks: tuple[str, ...] = ATTACKS  # the models each task trains (the demo: clean and BadNets)
    defenses: tuple[str, ...] = tuple(DEFENSES)


def run_reproduce(cfg: ReproduceConfig) -> list[dict]:
    """Run every task of `cfg`; write results.json, table.md, figures and report.html to cfg.out."""
    from ..report.reproduce import write_reproduce_outputs

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    curves: dict[tuple[str, str], DefenseResult] = {}
    for task_name in cfg.tasks:
        task_rows, task_curves = run_task(get_task(task_name), cfg, ModelStore(out / "models"))
        rows.extend(task_rows)
        curves.update(task_curves)
        write_json_atomic(out / "results.json", rows)  # after each task: partial progress is visible
    write_reproduce_outputs(out, rows, curves, PAPER, cfg)
    write_json_atomic(out / "run.json", run_record(cfg))
    return rows


def run_record(cfg: ReproduceConfig) -> dict:
    """What a rerun must match to give the same numbers: settings, seed, thread count, versions."""
    from ..pipeline.provenance import versions

    settings = {k: v for k, v in vars(cfg).items()
                if k not in ("progress", "extra", "out", "attacks", "defenses")}
    settings.update({f: canonical(f, getattr(cfg, f)) for f in ("recipe", "criterion", "stop_rule")})
    return {"settings": settings, "threads": torch.get_num_threads(),
            "device": str(pick_device(cfg.device)), "versions": versions()}


def run_task(task: TaskSpec, cfg: ReproduceConfig, store: ModelStore
             ) -> tuple[list[dict], dict[tuple[str, str], DefenseResult]]:
    """One task: its models (from `store` or trained), every defense on each, one row per pair.
    Returns the rows and, per attack, the pruning defense's result (its sweep draws the figures)."""
    log = as_progress(cfg.progress).log
    seed_everything(cfg.seed)
    t_load = time.perf_counter()
    data = load_task_data(task, cfg.data_root, cfg.seed, cfg.subsample)
    log(f"[{task.name}] data: train {len(data.train)}, val {len(data.val)}, test {len(data.test)} "
        f"({time.perf_counter() - t_load:.1f}s)")
    setup = prepare_task(task, data, data_root=cfg.data_root, seed=cfg.seed, subsample=cfg.subsample,
                         epochs=cfg.epochs, finetune_epochs=cfg.finetune_epochs,
                         defender_val_fraction=cfg.defender_val_fraction,
                         attacker_val_fraction=cfg.attacker_val_fraction, device=cfg.device,
                         progress=cfg.progress)
    log(f"[{task.name}] attacker: its models train on {len(setup.attacker_train)}, "
        f"{len(setup.attacker_val)} held out to choose with")
    models: dict[str, tuple] = {}
    for attack_name in cfg.attacks:
        model, info, reused = get_model(setup, attack_name, store, pa_threshold=cfg.threshold,
                                        clean=lambda: models["none"][:2], pa_widen=cfg.pa_widen)
        models[attack_name] = (model, info)
        decoys = f" ({len(info.get('decoys', []))} decoys)" if attack_name == "pruning-aware" else ""
        log(f"[{task.name}] {'clean' if attack_name == 'none' else attack_name} model "
            f"{'reused' if reused else 'trained'}{decoys}")

    rows, curves = [], {}
    for attack_name, (model, info) in models.items():
        for defense in cfg.defenses:
            row, res = defend_one(setup, attack_name, model, info, defense, cfg.threshold, cfg.recipe,
                                  cfg.criterion, cfg.stop_rule)
            if res is not None and res.sweep is not None and defense == "pruning":
                curves[(task.name, attack_name)] = res
            rows.append(row)
            asr = "-" if row["asr"] is None else f"{100 * row['asr']:.1f}%"
            log(f"  {task.name:<8} {attack_name:<14} {defense:<13} CA {100 * row['clean_acc']:.1f}%  "
                f"ASR {asr}  pruned {100 * row['pruned_fraction']:.0f}%  ({row['seconds']:.1f}s)")
            if not cfg.timings:  # wall-clock is the one field two runs cannot share
                row.update({k: None for k in row if "seconds" in k})
    return rows, curves
