"""`fineprune reproduce`: the paper's experiment (Table 1) on real data.

Per task the attacker trains three models on the training split: clean, BadNets-backdoored and
pruning-aware-backdoored. The defender holds only the clean validation split (part fine-tunes,
part chooses: ranking, stop point, best epoch) and runs no defense / fine-tuning / pruning /
fine-pruning on each model; the test split only measures. Trained models are cached in
`OUT/models` under a fingerprint of everything that made them, so a rerun reuses them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..attack.badnets import BadNets
from ..attack.pruning_aware import PruningAwareAttack
from ..data.splits import holdout
from ..defense.api import DEFAULT_FINETUNE, DefenseResult, defend
from ..defense.persist import load_pruned, save_pruned
from ..evaluation.metrics import evaluate
from ..runtime import pick_device, seed_everything, write_json_atomic
from ..tasks import get_task, shrink
from ..training import TrainConfig, train

ATTACKS = ("none", "badnets", "pruning-aware")
DEFENSES = ("none", "fine-tuning", "pruning", "fine-pruning")
_METHOD = {"fine-tuning": "fine-tune", "pruning": "prune", "fine-pruning": "fine-prune"}

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
    data_root: str = "../shared/data"
    out: str = "fineprune-reproduce"
    seed: int = 0
    threshold: float = 4.0
    defender_val_fraction: float = 0.3  # of the clean validation split; the rest fine-tunes
    attacker_val_fraction: float = 0.2  # of the training split, for the pruning-aware attacker
    subsample: float = 1.0  # < 1 shrinks every split (tests, quick looks); recorded in results
    epochs: int | None = None  # override the task's attacker epochs (tests)
    finetune_epochs: int | None = None
    device: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _ModelStore:
    """Trained models on disk keyed by a fingerprint of their recipe (reused by later runs)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, name: str, recipe: dict, build: "callable", make: "callable") -> tuple[nn.Module, dict, bool]:
        fp = _fingerprint(recipe)
        weights = self.folder / f"{name}-{fp}.safetensors"
        info_path = self.folder / f"{name}-{fp}.json"
        if weights.exists() and info_path.exists():
            model = load_pruned(build(), weights)
            return model, json.loads(info_path.read_text()), True
        model, info = make()
        self.folder.mkdir(parents=True, exist_ok=True)
        save_pruned(model, weights, {"fineprune.recipe": json.dumps(recipe, default=str)})
        write_json_atomic(info_path, {"recipe": recipe, **info})
        return model, info, False


def run_reproduce(cfg: ReproduceConfig) -> list[dict]:
    """Run every task of `cfg`; write results.json, table.md, figures and report.html to cfg.out."""
    from ..report.reproduce import write_reproduce_outputs

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    curves: dict[tuple[str, str], DefenseResult] = {}
    for task_name in cfg.tasks:
        task_rows, task_curves = _run_task(get_task(task_name), cfg, out)
        rows.extend(task_rows)
        curves.update(task_curves)
        write_json_atomic(out / "results.json", rows)  # after each task: partial progress is visible
    write_reproduce_outputs(out, rows, curves, PAPER, cfg)
    return rows


def _log(cfg: ReproduceConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, flush=True)


def _run_task(task, cfg: ReproduceConfig, out: Path) -> tuple[list[dict], dict]:
    dev = pick_device(cfg.device)
    seed_everything(cfg.seed)
    t_load = time.perf_counter()
    data = shrink(task.load(cfg.data_root, seed=cfg.seed), cfg.subsample, cfg.seed)
    _log(cfg, f"[{task.name}] data: train {len(data.train)}, val {len(data.val)}, test {len(data.test)} "
              f"({time.perf_counter() - t_load:.1f}s)")
    attack: BadNets = task.make_attack(seed=cfg.seed, data=data)
    train_cfg: TrainConfig = task.attacker
    if cfg.epochs is not None:
        train_cfg = TrainConfig(**{**train_cfg.to_dict(), "epochs": cfg.epochs})
    ft_cfg: TrainConfig = copy.deepcopy(task.finetune or DEFAULT_FINETUNE)
    if cfg.finetune_epochs is not None:
        ft_cfg = TrainConfig(**{**ft_cfg.to_dict(), "epochs": cfg.finetune_epochs})

    defender_train, defender_val = holdout(data.val, cfg.defender_val_fraction, cfg.seed)
    _, attacker_val = holdout(data.train, cfg.attacker_val_fraction, cfg.seed + 1)
    trig_test = attack.triggered(data.test)
    trig_val = attack.triggered(defender_val)  # measured along the sweep only; never chooses

    store = _ModelStore(out / "models")
    base = {"task": task.name, "seed": cfg.seed, "subsample": cfg.subsample, "train": train_cfg.to_dict(),
            "arch": task.arch, "data_root": str(Path(cfg.data_root).resolve())}
    attack_desc = attack.describe()

    def fresh() -> nn.Module:
        torch.manual_seed(cfg.seed)
        return task.build_model().to(dev)

    def make_clean():
        t0 = time.perf_counter()
        m = fresh()
        train(m, data.train, train_cfg, device=dev, seed=cfg.seed, progress=cfg.progress, desc=f"{task.name}: clean")
        return m, {"train_seconds": time.perf_counter() - t0}

    clean, clean_info, reused = store.get(f"{task.name}-clean", base, fresh, make_clean)
    _log(cfg, f"[{task.name}] clean model {'reused' if reused else 'trained'}")

    def make_badnets():
        t0 = time.perf_counter()
        m = fresh()
        train(m, attack.poison(data.train).dataset, train_cfg, device=dev, seed=cfg.seed,
              progress=cfg.progress, desc=f"{task.name}: badnets")
        return m, {"train_seconds": time.perf_counter() - t0}

    badnets, bad_info, reused = store.get(f"{task.name}-badnets", {**base, "attack": attack_desc}, fresh, make_badnets)
    _log(cfg, f"[{task.name}] badnets model {'reused' if reused else 'trained'}")

    def make_pruning_aware():
        t0 = time.perf_counter()
        # The attacker backdoors the pruned clean net with half its usual training per round.
        backdoor_cfg = TrainConfig(**{**train_cfg.to_dict(), "epochs": max(1, train_cfg.epochs // 2)})
        pa = PruningAwareAttack(attack, threshold=cfg.threshold, backdoor=backdoor_cfg, seed=cfg.seed,
                                device=dev, progress=cfg.progress)
        res = pa.run(copy.deepcopy(clean), data.train, attacker_val)
        return res.model, {"train_seconds": time.perf_counter() - t0 + clean_info.get("train_seconds", 0.0),
                           "layer": res.layer, "decoys": res.decoys, "bias_param": res.bias_param,
                           "rounds": res.rounds}

    aware, aware_info, reused = store.get(
        f"{task.name}-pruning-aware", {**base, "attack": attack_desc, "pa_threshold": cfg.threshold},
        fresh, make_pruning_aware)
    _log(cfg, f"[{task.name}] pruning-aware model {'reused' if reused else 'trained'} "
              f"({len(aware_info.get('decoys', []))} decoys)")

    rows, curves = [], {}
    for attack_name, model, info in (("none", clean, clean_info), ("badnets", badnets, bad_info),
                                     ("pruning-aware", aware, aware_info)):
        for defense in DEFENSES:
            t0 = time.perf_counter()
            if defense == "none":
                repaired, pruned_fraction, res = model, 0.0, None
            else:
                res = defend(model, defender_train, defender_val, _METHOD[defense], triggered=trig_val,
                             threshold=cfg.threshold, finetune=ft_cfg, device=dev, seed=cfg.seed)
                repaired, pruned_fraction = res.model, res.pruned_fraction
                if res.sweep is not None and defense == "pruning":
                    curves[(task.name, attack_name)] = res
            m = evaluate(repaired, data.test, trig_test, dev)
            row = {"task": task.name, "attack": attack_name, "defense": defense, **m.to_dict(),
                   "pruned_fraction": pruned_fraction, "seconds": round(time.perf_counter() - t0, 3)}
            if defense == "none":
                row["train_seconds"] = round(info.get("train_seconds", 0.0), 3)
            if res is not None and res.sweep is not None:
                row["stop_k"] = res.sweep.extra["stop_k"]
                row["num_channels"] = res.num_channels
            if res is not None and res.finetune is not None:
                row["best_epoch"] = res.finetune.best_epoch
            rows.append(row)
            asr = "-" if row["asr"] is None else f"{100 * row['asr']:.1f}%"
            _log(cfg, f"  {task.name:<8} {attack_name:<14} {defense:<13} CA {100 * row['clean_acc']:.1f}%  "
                      f"ASR {asr}  pruned {100 * pruned_fraction:.0f}%  ({row['seconds']:.1f}s)")
    return rows, curves
