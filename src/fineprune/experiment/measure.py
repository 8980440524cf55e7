"""Defend one model as an experiment says, and measure the result on the test split: one row."""
from __future__ import annotations

import time

from torch import nn

from ..defense.api import LR_FACTORS, DefenseResult, RunOptions, defend, format_lr_factors
from ..evaluation.metrics import evaluate
from ..progress import as_progress
from ..purify.registry import paper, resolve
from ..runtime import seed_everything
from .setup import TaskSetup
from .vocabulary import DEFENSES


def defend_one(setup: TaskSetup, attack_name: str, model: nn.Module, info: dict, defense: str,
               threshold: float, recipe: str | None = None, criterion: str | None = None,
               stop_rule: str | None = None, lr_factors: tuple[float, ...] = LR_FACTORS,
               epoch_asr: bool = True) -> tuple[dict, DefenseResult | None]:
    """Run `defense` (a noun of `DEFENSES`) on `model` with the defender's clean data; measure it
    on the test split. Returns the results row (task, attack, defense, clean_acc, asr, robust_acc,
    pruned_fraction, seconds, ...) and the defense's result (None for "none"). `recipe`,
    `criterion`, `stop_rule`: method specs (`fineprune.purify`; None: each family's default). A
    method the defense used is recorded in the row, as its canonical spec under its family and
    fully resolved under "methods", unless it is the paper's (so rows of the paper's fine-pruning
    are as they always were). `epoch_asr`: measure the triggered validation set after every
    fine-tuning epoch (curves only; the row never uses it)."""
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {', '.join(DEFENSES)}, not {defense!r}")
    # Fine-tuning's dropout draws from the global RNG: seed it here, so a row does not depend on
    # what ran before it (models trained in this process, or loaded from an earlier run).
    seed_everything(setup.seed)
    t0 = time.perf_counter()
    method = DEFENSES[defense]
    res = None if method is None else defend(
        model, setup.defender_train, setup.defender_val, method, triggered=setup.trig_val,
        threshold=threshold, finetune=setup.ft_cfg, recipe=recipe,
        criterion=criterion, stop_rule=stop_rule, lr_factors=lr_factors,
        run=RunOptions(device=setup.device, seed=setup.seed, epoch_asr=epoch_asr))
    for warning in [] if res is None else res.warnings:  # logged; the row keeps its fields
        as_progress(setup.progress).log(f"  {setup.task.name} {attack_name} {defense}: warning: {warning}")
    m = evaluate(model if res is None else res.model, setup.data.test, setup.trig_test, setup.device)
    row = {"task": setup.task.name, "attack": attack_name, "defense": defense, **m.to_dict(),
           "pruned_fraction": 0.0 if res is None else res.pruned_fraction,
           "seconds": round(time.perf_counter() - t0, 3)}
    if res is None:
        row["train_seconds"] = round(info.get("train_seconds", 0.0), 3)
    elif res.sweep is not None:
        row["stop_k"] = res.stop_k
        row["num_channels"] = res.num_channels
    if res is not None and res.finetune is not None:
        row["best_epoch"] = res.finetune.best_epoch
        if tuple(lr_factors) != LR_FACTORS:
            row["lr_factors"] = format_lr_factors(lr_factors)
        if res.finetune.attempts:  # the guard retried gentler: the learning rate kept
            row["finetune_lr"] = res.finetune.lr if res.finetune.best_epoch else None
    if res is not None:
        used = {f: o for f, o in res.methods.items() if resolve(f, o).spec() != paper(f).spec()}
        row.update({f: resolve(f, o).spec() for f, o in used.items()})
        if used:
            row["methods"] = used
    return row, res
