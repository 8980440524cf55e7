"""`fineprune demo`: the whole story on 5,000 real MNIST digits, in about a minute on a laptop CPU.

A trainer plants a BadNets backdoor (10% poisoning, 3x3 white patch, all-to-one -> 0); the
defender holds clean data the trainer never saw and tries no defense, fine-tuning, pruning and
fine-pruning. Everything is measured on a test split nobody chose anything on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .attack.badnets import BadNets
from .attack.policy import AllToOne
from .attack.triggers import PatchTrigger
from .data.embedded import load_mnist5k
from .data.splits import stratified_split
from .data.types import make_dataset, tensors
from .defense.api import DEFAULT_FINETUNE, defend
from .evaluation.metrics import evaluate
from .models.small import SmallCNN
from .report.plots import plot_pruning_curve
from .runtime import pick_device, seed_everything, write_json_atomic
from .training import TrainConfig, train

ATTACKER_TRAINING = TrainConfig(epochs=8, lr=1e-3, batch_size=64, optimizer="adam", weight_decay=0.0,
                                schedule="constant")


@dataclass
class DemoConfig:
    seed: int = 0
    poison_rate: float = 0.10  # fixed before any defense ran; never tuned to flatter a defense
    patch: int = 3
    target: int = 0
    threshold: float = 4.0
    width: int = 16
    attacker_epochs: int = ATTACKER_TRAINING.epochs
    finetune_epochs: int = DEFAULT_FINETUNE.epochs
    defender_val_fraction: float = 0.3


def run_demo(out: str | Path = "fineprune-demo", cfg: DemoConfig | None = None,
             progress: bool = True, device: str | None = None) -> list[dict]:
    """Train clean + backdoored models, run the defenses, write results.json and pruning_curve.png."""
    cfg = cfg or DemoConfig()
    out = Path(out)
    dev = pick_device(device)
    seed_everything(cfg.seed)
    data = load_mnist5k(seed=cfg.seed)
    attack = BadNets(PatchTrigger(size=(cfg.patch, cfg.patch), position=(-2, -2), color=(1.0,)),
                     AllToOne(cfg.target), rate=cfg.poison_rate, seed=cfg.seed)
    poisoned = attack.poison(data.train)
    triggered_test = attack.triggered(data.test)
    # The defender's clean data: part fine-tunes, part chooses (stop rule, best epoch).
    xd, yd = tensors(data.val)
    ft_idx, val_idx = stratified_split(yd, (1 - cfg.defender_val_fraction, cfg.defender_val_fraction), cfg.seed)
    clean_train, clean_val = make_dataset(xd[ft_idx], yd[ft_idx]), make_dataset(xd[val_idx], yd[val_idx])
    triggered_val = attack.triggered(clean_val)  # only measured along the sweep, never chooses

    attacker_cfg = TrainConfig(**{**ATTACKER_TRAINING.to_dict(), "epochs": cfg.attacker_epochs})
    rows: list[dict] = []

    def log(row: dict) -> None:
        rows.append(row)
        if progress:
            asr = "-" if row["asr"] is None else f"{100 * row['asr']:.1f}%"
            print(f"  {row['model']:<10} {row['defense']:<12} CA {100 * row['clean_acc']:.1f}%  ASR {asr}"
                  f"  ({row['seconds']:.1f}s)", flush=True)

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    clean_model = SmallCNN(width=cfg.width).to(dev)
    train(clean_model, data.train, attacker_cfg, device=dev, seed=cfg.seed, progress=progress, desc="train clean")
    m = evaluate(clean_model, data.test, triggered_test, dev)
    log({"model": "clean", "defense": "none", **m.to_dict(), "pruned_fraction": 0.0,
         "seconds": time.perf_counter() - t0})

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    bad_model = SmallCNN(width=cfg.width).to(dev)
    train(bad_model, poisoned.dataset, attacker_cfg, device=dev, seed=cfg.seed, progress=progress,
          desc="train backdoored")
    m = evaluate(bad_model, data.test, triggered_test, dev)
    log({"model": "backdoored", "defense": "none", **m.to_dict(), "pruned_fraction": 0.0,
         "seconds": time.perf_counter() - t0})

    ft_cfg = TrainConfig(**{**DEFAULT_FINETUNE.to_dict(), "epochs": cfg.finetune_epochs})
    curve, stop_k = None, None
    for method in ("fine-tune", "prune", "fine-prune"):
        res = defend(bad_model, clean_train, clean_val, method, triggered=triggered_val,
                     threshold=cfg.threshold, finetune=ft_cfg, device=dev, seed=cfg.seed,
                     progress=progress)
        m = evaluate(res.model, data.test, triggered_test, dev)
        log({"model": "backdoored", "defense": method, **m.to_dict(),
             "pruned_fraction": res.pruned_fraction, "seconds": res.seconds})
        if method == "prune":
            curve, stop_k = res.sweep, res.sweep.extra["stop_k"]

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", rows)
    plot_pruning_curve(curve, out / "pruning_curve.png", stop_k,
                       title="MNIST BadNets: pruning the last conv layer (validation data)")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | defense | clean acc | ASR | pruned | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}%"
        lines.append(f"| {r['model']} | {r['defense']} | {100 * r['clean_acc']:.1f}% | {asr} | "
                     f"{100 * r['pruned_fraction']:.0f}% | {r['seconds']:.1f} |")
    return "\n".join(lines)
