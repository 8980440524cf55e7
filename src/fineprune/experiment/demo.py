"""`fineprune demo`: the whole story on 5,000 real MNIST digits, in well under a minute on a CPU.

The `mnist` task run through the experiment engine: a trainer plants a BadNets backdoor (10%
poisoning, 3x3 white patch, all-to-one -> 0); the defender holds clean data the trainer never saw
and tries no defense, fine-tuning, pruning and fine-pruning. Everything is measured on a test
split nobody chose anything on. Models are kept in `OUT/models`, so a rerun reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..defense.api import DEFAULT_FINETUNE
from ..progress import Progress, as_progress
from ..report.plots import plot_pruning_curve
from ..runtime import seed_everything, write_json_atomic
from ..tasks import get_task
from .measure import defend_one
from .models import ModelStore, get_model
from .setup import load_task_data, prepare_task
from .vocabulary import DEFAULT_THRESHOLD, DEFENSES

TASK = get_task("mnist")


@dataclass
class DemoConfig:
    seed: int = 0
    poison_rate: float = TASK.poison_rate  # fixed before any defense ran; never tuned to flatter a defense
    threshold: float = DEFAULT_THRESHOLD
    attacker_epochs: int = TASK.attacker.epochs
    finetune_epochs: int = DEFAULT_FINETUNE.epochs
    defender_val_fraction: float = 0.3


def run_demo(out: str | Path = "fineprune-demo", cfg: DemoConfig | None = None,
             progress: bool | Progress = True, device: str | None = None) -> list[dict]:
    """Train clean + backdoored models, run the defenses, write results.json and pruning_curve.png.
    Rows name the model ("clean", "backdoored") and the `defend()` method ("none" for none)."""
    cfg = cfg or DemoConfig()
    out = Path(out)
    seed_everything(cfg.seed)
    setup = prepare_task(TASK, load_task_data(TASK, "", cfg.seed), data_root="", seed=cfg.seed,
                         poison_rate=cfg.poison_rate, epochs=cfg.attacker_epochs,
                         finetune_epochs=cfg.finetune_epochs, defender_val_fraction=cfg.defender_val_fraction,
                         device=device, progress=progress)
    store = ModelStore(out / "models")
    rows: list[dict] = []
    curve = None
    for attack, model_name, defenses in (("none", "clean", ["none"]), ("badnets", "backdoored", list(DEFENSES))):
        model, info, _ = get_model(setup, attack, store)
        for defense in defenses:
            r, res = defend_one(setup, attack, model, info, defense, cfg.threshold)
            row = {"model": model_name, "defense": DEFENSES[defense] or "none",
                   **{k: r[k] for k in ("clean_acc", "asr", "robust_acc", "pruned_fraction")},
                   "seconds": r["seconds"] + r.get("train_seconds", 0.0)}
            rows.append(row)
            if defense == "pruning":
                curve = res
            asr = "-" if row["asr"] is None else f"{100 * row['asr']:.1f}%"
            as_progress(progress).log(f"  {row['model']:<10} {row['defense']:<12} CA {100 * row['clean_acc']:.1f}%"
                                      f"  ASR {asr}  ({row['seconds']:.1f}s)")
    write_json_atomic(out / "results.json", rows)
    plot_pruning_curve(curve.sweep, out / "pruning_curve.png", curve.stop_k,
                       title="MNIST BadNets: pruning the last conv layer (validation data)")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | defense | clean acc | ASR | pruned | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}%"
        lines.append(f"| {r['model']} | {r['defense']} | {100 * r['clean_acc']:.1f}% | {asr} | "
                     f"{100 * r['pruned_fraction']:.0f}% | {r['seconds']:.1f} |")
    return "\n".join(lines)
