"""`fineprune train`: train a clean or backdoored model for one of the paper's tasks."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .registry import FlagProgress, add_threads, command

#: Per-epoch checkpoint inside --out while training runs (removed once the model is saved).
TRAIN_CHECKPOINT = ".fineprune-train.ckpt"


def _args(p: argparse.ArgumentParser) -> None:
    from ..tasks import task_names

    p.add_argument("--task", required=True, choices=task_names(), help="which application")
    p.add_argument("--attack", default="badnets", choices=("none", "badnets"),
                   help="none = clean model; badnets = the task's default backdoor (default)")
    p.add_argument("--data-root", default=os.environ.get("FINEPRUNE_DATA"),
                   help="folder holding the dataset archive or its extracted folder (default $FINEPRUNE_DATA; "
                        "not needed for --task mnist)")
    p.add_argument("--out", required=True, help="output folder for model.safetensors and model.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the task's)")
    p.add_argument("--poison-rate", type=float, default=None,
                   help="fraction of the training set poisoned (default: the task's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    add_threads(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint in --out (same settings and seed); "
                        "the result equals an uninterrupted run's")
    p.add_argument("--force", action="store_true",
                   help="start over even though --out holds an interrupted run's checkpoint (without --resume "
                        "or --force such a folder is refused)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch output")


@command("train", _args)
def run(args: argparse.Namespace) -> int:
    """Train a clean or backdoored model for a task and save it (safetensors + JSON)."""

    from ..errors import BadInputError
    from ..experiment.train import save_trained, train_task
    from ..pipeline.outdir import check_out_dir, prepare_out_dir, refuse_interrupted
    from ..tasks import get_task
    from ..training import TrainConfig

    spec = get_task(args.task)
    if not args.data_root and spec.needs_data:
        raise BadInputError("no data: pass --data-root PATH (the folder holding the dataset archive) "
                            "or set FINEPRUNE_DATA")
    if args.epochs is not None and args.epochs < 1:
        raise BadInputError(f"--epochs must be at least 1, got {args.epochs}")
    if args.poison_rate is not None and not 0.0 < args.poison_rate <= 1.0:
        raise BadInputError(f"--poison-rate must be in (0, 1], got {args.poison_rate}")
    out = check_out_dir(args.out, force=True)  # a file is refused; an existing folder is reused
    checkpoint = out / TRAIN_CHECKPOINT
    if checkpoint.is_file() and not args.resume and not args.force:
        refuse_interrupted(out)
    if args.resume and not checkpoint.is_file() and not args.quiet:
        print(f"fineprune train: no checkpoint in {out}; starting from the first epoch")
    t0 = time.perf_counter()
    data = spec.load(args.data_root, seed=args.seed)
    attack = spec.make_attack(seed=args.seed, rate=args.poison_rate, data=data) if args.attack == "badnets" else None
    cfg = spec.attacker if args.epochs is None else TrainConfig(**{**spec.attacker.to_dict(), "epochs": args.epochs})
    if not args.quiet:
        what = "clean" if attack is None else f"backdoored ({attack.rate:.1%} {attack.trigger.name}, {attack.policy.kind})"
        print(f"fineprune train: {spec.name}, {what}; {len(data.train)} train / {len(data.val)} val / "
              f"{len(data.test)} test; {cfg.epochs} epochs")
    prepare_out_dir(out, force=True)
    if not args.resume:
        checkpoint.unlink(missing_ok=True)  # --force: a kill before epoch 1 must not leave the old one
    trained = train_task(spec, data, attack=attack, cfg=cfg, seed=args.seed, device=args.device,
                         progress=False if args.quiet else FlagProgress(sys.stdout), checkpoint_path=checkpoint, resume=args.resume)
    trained.record["seconds"]["wall"] = round(time.perf_counter() - t0, 2)
    weights, meta = save_trained(trained, out)
    checkpoint.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    m = trained.test
    print(f"test: CA {100 * m.clean_acc:.2f}%  ASR {100 * m.asr:.2f}%  RA {100 * m.robust_acc:.2f}%  "
          f"({trained.record['seconds']['wall']:.0f}s)")
    print(f"wrote {weights} and {meta}")
    return 0
