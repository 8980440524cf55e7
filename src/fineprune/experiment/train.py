"""Train one model for a task (clean, or backdoored with the task's BadNets attack), measure it,
and save it as `model.safetensors` + `model.json`.

The clean twin and the backdoored model share everything (seed, initial weights, data order for
the clean rows, training settings), so their difference is the poisoning alone.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..attack.badnets import BadNets
from ..data.types import TaskData, tensors
from ..defense.layer import find_prune_layer
from ..errors import BadInputError
from ..evaluation.metrics import Metrics, accuracy, attack_metrics, evaluate
from ..progress import Progress, as_progress
from ..runtime import pick_device, write_json_atomic
from ..tasks import TaskSpec
from ..training import TrainConfig, train

RECORD_FORMAT = "fineprune-model/1"


@dataclass
class TrainedTask:
    """A trained model and the record describing it (what `model.json` holds)."""

    model: nn.Module
    record: dict
    test: Metrics
    val: Metrics


def describe_trigger(trigger) -> dict:
    fn = getattr(trigger, "describe", None)
    return fn() if callable(fn) else {"name": getattr(trigger, "name", type(trigger).__name__)}


def train_task(
    spec: TaskSpec,
    data: TaskData,
    *,
    attack: BadNets | None,
    cfg: TrainConfig | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | Progress = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> TrainedTask:
    """Train `spec`'s model on `data.train` (poisoned by `attack` when given) and measure it.

    Clean accuracy, ASR and robust accuracy are measured on the test split (ASR with the task's
    default attack also for a clean model: that is the baseline a backdoor must beat), and on the
    validation split every epoch (the only numbers any choice may look at).
    `checkpoint_path` / `resume`: per-epoch checkpoints, as `fineprune.training.train`.
    `progress`: a line per epoch and a bar that moves within each epoch.
    """
    t_start = time.perf_counter()
    channel = as_progress(progress)
    dev = pick_device(device)
    cfg = cfg or spec.attacker
    reference = attack or spec.make_attack(seed=seed, data=data)  # measures ASR of clean models too
    if attack is not None:
        try:
            poisoned = attack.poison(data.train)
        except ValueError as exc:
            raise BadInputError(f"cannot poison the {spec.name} training set: {exc}") from None
        train_set, n_poisoned = poisoned.dataset, int(poisoned.poisoned_rows.numel())
    else:
        train_set, n_poisoned = data.train, 0
    triggered_val = reference.triggered(data.val)
    triggered_test = reference.triggered(data.test)

    torch.manual_seed(seed)
    model = spec.build_model(data.num_classes).to(dev)

    def show(rec) -> None:
        channel.log(f"  epoch {rec.epoch:>3}/{cfg.epochs}  val acc {100 * rec.val_acc:5.1f}%  "
                    f"val ASR {100 * rec.asr:5.1f}%  ({rec.seconds:.0f}s)")

    t_train = time.perf_counter()
    hist = train(model, train_set, cfg, device=dev, seed=seed, val_fn=lambda m: accuracy(m, data.val, dev),
                 extra_fn=lambda m: attack_metrics(m, triggered_val, dev)[0], progress=channel, desc="train",
                 checkpoint_path=checkpoint_path, resume=resume, on_epoch=show)
    train_seconds = time.perf_counter() - t_train
    # From the training records, so a resumed run's history includes the epochs before the kill.
    history = [{"epoch": r.epoch, "val_acc": r.val_acc, "val_asr": r.asr, "train_loss": r.train_loss,
                "seconds": round(r.seconds, 2)} for r in hist.epochs]

    test = evaluate(model, data.test, triggered_test, dev)
    val = evaluate(model, data.val, triggered_val, dev)
    x_val, _ = tensors(data.val)
    layer = find_prune_layer(model, x_val[:2].to(dev))
    record = {
        "format": RECORD_FORMAT,
        "fineprune_version": __version__,
        "task": spec.name,
        "description": spec.description,
        "architecture": {"name": spec.arch, "num_classes": data.num_classes,
                         "input_shape": list(tensors(data.test)[0].shape[1:]), "input_kind": data.input_kind,
                         "prune_layer": layer.name, "prune_channels": layer.channels},
        "attack": "badnets" if attack is not None else "none",
        "trigger": describe_trigger(reference.trigger),
        "policy": reference.policy.describe(),
        "poison_rate": attack.rate if attack is not None else 0.0,
        "poison_mode": attack.mode if attack is not None else None,
        "poisoned_samples": n_poisoned,
        "asr_measured_with": "the task's attack trigger and policy" + ("" if attack else " (clean model: baseline)"),
        "seed": seed,
        "training": cfg.to_dict(),
        "history": history,
        "data": {"train": len(train_set), "train_clean": len(data.train), "val": len(data.val),
                 "test": len(data.test), "triggered_test": len(triggered_test),
                 "source": data.info.get("source"), "shrunk": data.info.get("shrunk")},
        "metrics": {"test": test.to_dict(), "val": val.to_dict()},
        "seconds": {"train": round(train_seconds, 2), "total": round(time.perf_counter() - t_start, 2)},
        "threads": torch.get_num_threads(),
        "device": str(dev),
    }
    return TrainedTask(model=model, record=record, test=test, val=val)


def save_trained(trained: TrainedTask, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `out_dir/model.safetensors` then `out_dir/model.json` (each atomically; the JSON last,
    so a folder with a model.json always has the weights it describes)."""
    from ..io.model_files import save_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, meta = out / "model.safetensors", out / "model.json"
    r = trained.record
    save_weights(trained.model, weights, metadata={
        "fineprune_format": RECORD_FORMAT, "task": r["task"], "architecture": r["architecture"]["name"],
        "num_classes": str(r["architecture"]["num_classes"]), "attack": r["attack"],
    })
    write_json_atomic(meta, r)
    return weights, meta
