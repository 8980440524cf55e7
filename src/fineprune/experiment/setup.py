"""Everything one (task, seed, data settings) needs before a model is trained or defended.

The attacker holds out part of the training split as its own clean validation data (seeded):
its models train on the rest, and the held-out part only chooses (the pruning-aware attacker's
pruning and checks), as the defender's validation data does. The defender holds only the clean
validation split: part fine-tunes, part chooses (ranking, stop point, best epoch). The test
split only measures.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..attack.badnets import BadNets
from ..attack.triggers import BlendTrigger
from ..attack.widen import widen_layer
from ..data.splits import holdout
from ..data.types import TaskData, tensors
from ..defense.api import DEFAULT_FINETUNE
from ..defense.layer import find_prune_layer
from ..evaluation.metrics import TriggeredSet
from ..progress import Progress
from ..runtime import fingerprint, pick_device
from ..tasks import TaskSpec, shrink
from ..training import TrainConfig
from .vocabulary import TRIGGERS

# The blended trigger's opacity: the middle of the 0.1-0.2 range the blended attack is used with
# (Chen et al. 2017; BackdoorBench uses 0.2); fixed before any defense ran.
BLEND_ALPHA = 0.15


@dataclass
class TaskSetup:
    """A task's data, attack, training settings and the two parties' splits; shared by
    `fineprune reproduce` (one per task), `fineprune grid` (one per cell) and `fineprune demo`."""

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
    base: dict  # the provenance every model of this setup shares (its fingerprint names the files)
    seed: int
    device: torch.device
    progress: bool | Progress = False

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
    return fingerprint([(k, list(v.shape)) for k, v in model.state_dict().items()])


def load_task_data(task: TaskSpec, data_root: str, seed: int, subsample: float = 1.0) -> TaskData:
    """The task's splits, shrunk to `subsample` (seeded)."""
    return shrink(task.load(data_root, seed=seed), subsample, seed)


def prepare_task(task: TaskSpec, data: TaskData, *, data_root: str, seed: int, subsample: float = 1.0,
                 poison_rate: float | None = None, epochs: int | None = None,
                 finetune_epochs: int | None = None, defender_val_fraction: float = 0.3,
                 attacker_val_fraction: float = 0.2, device: str | torch.device | None = None,
                 progress: bool | Progress = False, trigger: str = "task") -> TaskSetup:
    """Attack, training settings and the defender's / attacker's splits for `data`
    (`poison_rate` None: the task's own rate; `trigger`: a name of `TRIGGERS`)."""
    attack: BadNets = task.make_attack(seed=seed, rate=poison_rate, data=data)
    if trigger == "blend":  # the task's policy, rate and mode; the trigger a seeded pattern
        pattern = BlendTrigger.noise(tuple(tensors(data.test)[0].shape[1:]), seed=seed, alpha=BLEND_ALPHA)
        pattern.name = f"blend(alpha={BLEND_ALPHA},seed={seed})"  # names the model's provenance
        attack = BadNets(pattern, attack.policy, rate=attack.rate, mode=attack.mode, seed=seed)
    elif trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {', '.join(TRIGGERS)}, not {trigger!r}")
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
            "data_root": str(Path(data_root).resolve()) if task.needs_data else None,
            # The training data is the split minus the attacker's hold-out: part of every provenance,
            # so models stored before the hold-out existed (trained on all of it) are not reused.
            "attacker_split": {"val_fraction": attacker_val_fraction, "seed": seed + 1,
                               "train": len(attacker_train), "val": len(attacker_val)}}
    return TaskSetup(task=task, data=data, attack=attack, train_cfg=train_cfg, ft_cfg=ft_cfg,
                     defender_train=defender_train, defender_val=defender_val,
                     attacker_train=attacker_train, attacker_val=attacker_val,
                     trig_test=trig_test, trig_val=trig_val, base=base, seed=seed,
                     device=pick_device(device), progress=progress)
