"""`fineprune reproduce`: the paper's experiment (Table 1) on real data.

Per task the attacker trains three models: clean, BadNets-backdoored and pruning-aware-backdoored.
The attacker first holds out part of the training split as its own clean validation data
(`attacker_val_fraction`, seeded): all three models train on the rest (`attacker_train`), and the
held-out part only chooses (the pruning-aware attacker's pruning, its simulated defender, its
checks), as the defender's validation data does. The defender holds only the clean validation
split (part fine-tunes, part chooses: ranking, stop point, best epoch) and runs no defense /
fine-tuning / pruning / fine-pruning on each model; the test split only measures. Trained models are cached in
`OUT/models` under a fingerprint of everything that made them, so a rerun reuses them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..attack.badnets import BadNets
from ..attack.pruning_aware import PruningAwareAttack
from ..attack.widen import widen_layer
from ..data.splits import holdout
from ..defense.api import DEFAULT_FINETUNE, DefenseResult, defend
from ..defense.persist import load_pruned, save_pruned
from ..data.types import TaskData, tensors
from ..defense.layer import find_prune_layer
from ..evaluation.metrics import TriggeredSet, evaluate
from ..runtime import pick_device, seed_everything, write_json_atomic
from ..tasks import TaskSpec, get_task, shrink
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
    attacker_val_fraction: float = 0.2  # of the training split, held out: the attacker's choices only
    pa_widen: int = 0  # channels the pruning-aware attacker adds to the pruned layer (PruningAwareAttack.widen)
    subsample: float = 1.0  # < 1 shrinks every split (tests, quick looks); recorded in results
    epochs: int | None = None  # override the task's attacker epochs (tests)
    finetune_epochs: int | None = None
    device: str | None = None
    progress: bool = True
    timings: bool = True  # False: `seconds` fields are null, so two runs' results.json are byte-identical
    extra: dict = field(default_factory=dict)


def _fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _ModelStore:
    """Trained models on disk keyed by a fingerprint of their recipe (reused by later runs).

    While a model trains, its per-epoch checkpoints live beside it (`<name>-<fp>.ckpt*`): a run
    killed mid-training resumes from the last finished epoch when rerun, and ends as an
    uninterrupted run would. They are deleted once the model is stored."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def files(self, name: str, recipe: dict) -> tuple[Path, Path]:
        """(weights, info) paths of the model `name` made by `recipe` (they may not exist yet)."""
        fp = _fingerprint(recipe)
        return self.folder / f"{name}-{fp}.safetensors", self.folder / f"{name}-{fp}.json"

    def get(self, name: str, recipe: dict, build: "callable", make: "callable") -> tuple[nn.Module, dict, bool]:
        """`make(checkpoint_prefix)` trains the model when it is not stored yet."""
        weights, info_path = self.files(name, recipe)
        if weights.exists() and info_path.exists():
            model = load_pruned(build(), weights)
            return model, json.loads(info_path.read_text()), True
        self.folder.mkdir(parents=True, exist_ok=True)
        prefix = weights.with_suffix(".ckpt")
        model, info = make(str(prefix))
        save_pruned(model, weights, {"fineprune.recipe": json.dumps(recipe, default=str)})
        write_json_atomic(info_path, {"recipe": recipe, **info})  # last: marks the model complete
        for pattern in (prefix.name + "*", f".{prefix.name}*.tmp"):  # and a killed write's temp file
            for f in self.folder.glob(pattern):
                f.unlink(missing_ok=True)
        return model, info, False


@dataclass
class TaskSetup:
    """Everything one (task, seed, data settings) needs before any model is trained or defended:
    shared by `fineprune reproduce` (one per task) and `fineprune grid` (one per cell)."""

    task: TaskSpec
    data: TaskData
    attack: BadNets
    train_cfg: TrainConfig
    ft_cfg: TrainConfig
    defender_train: TensorDataset
    defender_val: TensorDataset
    attacker_train: TensorDataset  # what every attacker model trains on (training split minus attacker_val)
    attacker_val: TensorDataset  # held out of the training split (disjoint from attacker_train): choices only
    trig_test: TriggeredSet
    trig_val: TriggeredSet
    base: dict  # the recipe every model of this setup shares (its fingerprint names the files)
    seed: int
    device: torch.device
    progress: bool = False
    attacker_val_fraction: float = 0.2

    def fresh(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.task.build_model().to(self.device)

    def builder(self, attack_name: str, pa_widen: int = 0) -> Callable[[], nn.Module]:
        """A function building the (untrained) network the model `attack_name` has, to load its
        stored weights into: the task's architecture, widened as the pruning-aware attacker widened
        it (`pa_widen` channels on the pruned layer)."""
        if attack_name != "pruning-aware" or not pa_widen:
            return self.fresh

        def build() -> nn.Module:
            model = self.fresh()
            x, _ = tensors(self.attacker_val)
            example = x[:2].to(self.device)
            widen_layer(model, find_prune_layer(model, example).name, pa_widen, example)
            return model
        return build


def arch_signature(model: nn.Module) -> str:
    """Digest of a network's parameter and buffer names and shapes: a stored model is reused only
    by the architecture that made it, even if a built-in name changes meaning between versions."""
    sig = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:16]


def load_task_data(task: TaskSpec, data_root: str, seed: int, subsample: float = 1.0) -> TaskData:
    """The task's splits, shrunk to `subsample` (seeded)."""
    return shrink(task.load(data_root, seed=seed), subsample, seed)


def prepare_task(task: TaskSpec, data: TaskData, *, data_root: str, seed: int, subsample: float = 1.0,
                 poison_rate: float | None = None, epochs: int | None = None,
                 finetune_epochs: int | None = None, defender_val_fraction: float = 0.3,
                 attacker_val_fraction: float = 0.2, device: str | torch.device | None = None,
                 progress: bool = False) -> TaskSetup:
    """Attack, training settings and the defender's / attacker's splits for `data`
    (`poison_rate` None: the task's own rate)."""
    attack: BadNets = task.make_attack(seed=seed, rate=poison_rate, data=data)
    train_cfg: TrainConfig = task.attacker
    if epochs is not None:
        train_cfg = TrainConfig(**{**train_cfg.to_dict(), "epochs": epochs})
    ft_cfg: TrainConfig = copy.deepcopy(task.finetune or DEFAULT_FINETUNE)
    if finetune_epochs is not None:
        ft_cfg = TrainConfig(**{**ft_cfg.to_dict(), "epochs": finetune_epochs})

    defender_train, defender_val = holdout(data.val, defender_val_fraction, seed, groups=data.val_groups)
    # The attacker's validation data is held out of what its models train on (as the defender's
    # is): a model validated on its own training data would make the attacker's choices on
    # figures it has memorised. All three attacker models train on the same rest, so the clean
    # model the pruning-aware attack starts from has not seen it either, and the three stay comparable.
    attacker_train, attacker_val = holdout(data.train, attacker_val_fraction, seed + 1)
    trig_test = attack.triggered(data.test)
    trig_val = attack.triggered(defender_val)  # measured along the sweep only; never chooses
    base = {"task": task.name, "seed": seed, "subsample": subsample, "train": train_cfg.to_dict(),
            "arch": task.arch, "arch_signature": arch_signature(task.build_model(data.num_classes)),
            "data_root": str(Path(data_root).resolve()),
            # The training data is the split minus the attacker's hold-out: part of every recipe,
            # so models stored before the hold-out existed (trained on all of it) are not reused.
            "attacker_split": {"val_fraction": attacker_val_fraction, "seed": seed + 1,
                               "train": len(attacker_train), "val": len(attacker_val)}}
    return TaskSetup(task=task, data=data, attack=attack, train_cfg=train_cfg, ft_cfg=ft_cfg,
                     defender_train=defender_train, defender_val=defender_val,
                     attacker_train=attacker_train, attacker_val=attacker_val,
                     trig_test=trig_test, trig_val=trig_val, base=base, seed=seed,
                     device=pick_device(device), progress=progress,
                     attacker_val_fraction=attacker_val_fraction)


def model_recipe(setup: TaskSetup, attack_name: str, pa_threshold: float = 4.0,
                 pa_widen: int = 0) -> tuple[str, dict]:
    """(file name stem, recipe) of the model `attack_name` ("none" = clean) trained for `setup`."""
    name = setup.task.name
    if attack_name == "none":
        return f"{name}-clean", setup.base
    if attack_name == "badnets":
        return f"{name}-badnets", {**setup.base, "attack": setup.attack.describe()}
    if attack_name == "pruning-aware":
        recipe = {**setup.base, "attack": setup.attack.describe(), "pa_threshold": pa_threshold,
                  "pa_escalate": list(PruningAwareAttack.escalate)}
        if pa_widen:  # a different architecture: its own files (and 0 keeps the recipe as it was)
            recipe["pa_widen"] = pa_widen
        return f"{name}-pruning-aware" + (f"-widen{pa_widen}" if pa_widen else ""), recipe
    raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, not {attack_name!r}")


def get_model(setup: TaskSetup, attack_name: str, store: _ModelStore, *, pa_threshold: float = 4.0,
              clean: "callable | None" = None, pa_widen: int = 0) -> tuple[nn.Module, dict, bool]:
    """The model `attack_name` of `setup`: from `store` when its recipe was trained before, else
    trained now and stored. Returns (model, info, reused). The pruning-aware attack starts from
    the clean model: `clean()` must return (clean model, its info) when it has to be trained.
    `pa_widen`: channels the pruning-aware attacker adds to the pruned layer (0: none)."""
    name, recipe = model_recipe(setup, attack_name, pa_threshold, pa_widen)
    task, dev, seed, train_cfg = setup.task, setup.device, setup.seed, setup.train_cfg

    def make_clean(ckpt: str):
        t0 = time.perf_counter()
        m = setup.fresh()
        train(m, setup.attacker_train, train_cfg, device=dev, seed=seed, progress=setup.progress,
              desc=f"{task.name}: clean", checkpoint_path=ckpt, resume=True)
        return m, {"train_seconds": time.perf_counter() - t0}

    def make_badnets(ckpt: str):
        t0 = time.perf_counter()
        m = setup.fresh()
        train(m, setup.attack.poison(setup.attacker_train).dataset, train_cfg, device=dev, seed=seed,
              progress=setup.progress, desc=f"{task.name}: badnets", checkpoint_path=ckpt, resume=True)
        return m, {"train_seconds": time.perf_counter() - t0}

    def make_pruning_aware(ckpt: str):
        if clean is None:
            raise ValueError("the pruning-aware attack needs the clean model (pass clean=)")
        t0 = time.perf_counter()
        clean_model, clean_info = clean()
        seed_everything(seed)  # dropout draws: the same whether the clean model was trained or loaded
        # The attacker backdoors the pruned clean net with half its usual training per round.
        backdoor_cfg = TrainConfig(**{**train_cfg.to_dict(), "epochs": max(1, train_cfg.epochs // 2)})
        pa = PruningAwareAttack(setup.attack, threshold=pa_threshold, backdoor=backdoor_cfg, seed=seed,
                                device=dev, progress=setup.progress, checkpoint_prefix=ckpt, widen=pa_widen)
        res = pa.run(copy.deepcopy(clean_model), setup.attacker_train, setup.attacker_val)
        return res.model, {"train_seconds": time.perf_counter() - t0 + clean_info.get("train_seconds", 0.0),
                           "layer": res.layer, "decoys": res.decoys, "bias_param": res.bias_param,
                           "rounds": res.rounds, "attacker_threshold": res.attacker_threshold,
                           "attempts": res.attempts, "widen": res.widen}

    make = {"none": make_clean, "badnets": make_badnets, "pruning-aware": make_pruning_aware}[attack_name]
    return store.get(name, recipe, setup.builder(attack_name, pa_widen), make)


def defend_one(setup: TaskSetup, attack_name: str, model: nn.Module, info: dict, defense: str,
               threshold: float) -> tuple[dict, DefenseResult | None]:
    """Run `defense` on `model` with the defender's clean data and measure it on the test split:
    one results row (task, attack, defense, clean_acc, asr, robust_acc, pruned_fraction, seconds, ...)."""
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {', '.join(DEFENSES)}, not {defense!r}")
    # Fine-tuning's dropout draws from the global RNG: seed it here, so a row does not depend on
    # what ran before it (models trained in this process, or loaded from an earlier run).
    seed_everything(setup.seed)
    t0 = time.perf_counter()
    if defense == "none":
        repaired, pruned_fraction, res = model, 0.0, None
    else:
        res = defend(model, setup.defender_train, setup.defender_val, _METHOD[defense], triggered=setup.trig_val,
                     threshold=threshold, finetune=setup.ft_cfg, device=setup.device, seed=setup.seed)
        repaired, pruned_fraction = res.model, res.pruned_fraction
    m = evaluate(repaired, setup.data.test, setup.trig_test, setup.device)
    row = {"task": setup.task.name, "attack": attack_name, "defense": defense, **m.to_dict(),
           "pruned_fraction": pruned_fraction, "seconds": round(time.perf_counter() - t0, 3)}
    if defense == "none":
        row["train_seconds"] = round(info.get("train_seconds", 0.0), 3)
    if res is not None and res.sweep is not None:
        row["stop_k"] = res.sweep.extra["stop_k"]
        row["num_channels"] = res.num_channels
    if res is not None and res.finetune is not None:
        row["best_epoch"] = res.finetune.best_epoch
    return row, res


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
    write_json_atomic(out / "run.json", run_record(cfg))
    return rows


def run_record(cfg: ReproduceConfig) -> dict:
    """What a rerun must match to give the same numbers: settings, seed, thread count, versions."""
    from .provenance import versions

    settings = {k: v for k, v in vars(cfg).items() if k not in ("progress", "extra", "out")}
    return {"settings": settings, "threads": torch.get_num_threads(),
            "device": str(pick_device(cfg.device)), "versions": versions()}


def _log(cfg: ReproduceConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, flush=True)


def _run_task(task, cfg: ReproduceConfig, out: Path) -> tuple[list[dict], dict]:
    seed_everything(cfg.seed)
    t_load = time.perf_counter()
    data = load_task_data(task, cfg.data_root, cfg.seed, cfg.subsample)
    _log(cfg, f"[{task.name}] data: train {len(data.train)}, val {len(data.val)}, test {len(data.test)} "
              f"({time.perf_counter() - t_load:.1f}s)")
    setup = prepare_task(task, data, data_root=cfg.data_root, seed=cfg.seed, subsample=cfg.subsample,
                         epochs=cfg.epochs, finetune_epochs=cfg.finetune_epochs,
                         defender_val_fraction=cfg.defender_val_fraction,
                         attacker_val_fraction=cfg.attacker_val_fraction, device=cfg.device,
                         progress=cfg.progress)
    _log(cfg, f"[{task.name}] attacker: its models train on {len(setup.attacker_train)}, "
              f"{len(setup.attacker_val)} held out to choose with")
    store = _ModelStore(out / "models")

    clean, clean_info, reused = get_model(setup, "none", store)
    _log(cfg, f"[{task.name}] clean model {'reused' if reused else 'trained'}")
    badnets, bad_info, reused = get_model(setup, "badnets", store)
    _log(cfg, f"[{task.name}] badnets model {'reused' if reused else 'trained'}")
    aware, aware_info, reused = get_model(setup, "pruning-aware", store, pa_threshold=cfg.threshold,
                                          clean=lambda: (clean, clean_info), pa_widen=cfg.pa_widen)
    _log(cfg, f"[{task.name}] pruning-aware model {'reused' if reused else 'trained'} "
              f"({len(aware_info.get('decoys', []))} decoys)")

    rows, curves = [], {}
    for attack_name, model, info in (("none", clean, clean_info), ("badnets", badnets, bad_info),
                                     ("pruning-aware", aware, aware_info)):
        for defense in DEFENSES:
            row, res = defend_one(setup, attack_name, model, info, defense, cfg.threshold)
            if res is not None and res.sweep is not None and defense == "pruning":
                curves[(task.name, attack_name)] = res
            rows.append(row)
            asr = "-" if row["asr"] is None else f"{100 * row['asr']:.1f}%"
            _log(cfg, f"  {task.name:<8} {attack_name:<14} {defense:<13} CA {100 * row['clean_acc']:.1f}%  "
                      f"ASR {asr}  pruned {100 * row['pruned_fraction']:.0f}%  ({row['seconds']:.1f}s)")
            if not cfg.timings:  # wall-clock is the one field two runs cannot share
                row.update({k: None for k in row if "seconds" in k})
    return rows, curves
