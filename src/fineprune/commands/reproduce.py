"""`fineprune reproduce`: the paper's results table on the real datasets."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..purify.registry import help_line
from ..purify.stop_rules import DEFAULT_THRESHOLD
from ..tasks import DEFAULT_DATA_ROOT
from .registry import FlagProgress, add_threads, command

TASKS = ("face", "speech", "traffic")  # "all": the paper's three; "mnist" runs on embedded data


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=(*TASKS, "mnist", "all"), default="all")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help=f"folder with the dataset archives or extracted folders (default {DEFAULT_DATA_ROOT})")
    p.add_argument("--out", default="fineprune-reproduce", help="output folder; trained models are reused from it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="stop rule, accuracy points (default %(default)g)")
    p.add_argument("--subsample", type=float, default=1.0, help="use this fraction of every split (quick looks)")
    p.add_argument("--epochs", type=int, default=None, help="override the attacker's training epochs")
    p.add_argument("--finetune-epochs", type=int, default=None)
    # Method specs (NAME[,key=value...]), resolved by the method registry; None: each family's default.
    p.add_argument("--recipe", metavar="SPEC", help="the defender's fine-tuning recipe: " + help_line("recipe"))
    p.add_argument("--criterion", metavar="SPEC", help="the defender's pruning order: " + help_line("criterion"))
    p.add_argument("--stop-rule", metavar="SPEC", help="the defender's stop rule: " + help_line("stop_rule"))
    p.add_argument("--device", default=None)
    add_threads(p)
    p.add_argument("--no-timings", dest="timings", action="store_false",
                   help="write null for every wall-clock `seconds` field, so two runs with the same seed "
                        "give byte-identical results.json")
    p.add_argument("--quiet", action="store_true")


@command("reproduce", _args)
def run(args: argparse.Namespace) -> int:
    """Train clean / BadNets / pruning-aware models per task and run every defense on them."""
    from ..purify.stop_rules import check_threshold
    from ..errors import BadInputError
    from ..experiment.reproduce import ReproduceConfig, run_reproduce

    check_threshold(args.threshold)
    if not 0 < args.subsample <= 1:
        raise BadInputError(f"--subsample must be in (0, 1], got {args.subsample}")
    if args.task != "mnist" and not Path(args.data_root).exists():
        raise BadInputError(f"data root {args.data_root} does not exist; pass --data-root with the dataset archives")
    tasks = TASKS if args.task == "all" else (args.task,)
    t0 = time.perf_counter()
    cfg = ReproduceConfig(tasks=tasks, data_root=args.data_root, out=args.out, seed=args.seed,
                          threshold=args.threshold, subsample=args.subsample, epochs=args.epochs,
                          finetune_epochs=args.finetune_epochs, recipe=args.recipe,
                          criterion=args.criterion, stop_rule=args.stop_rule, device=args.device,
                          progress=False if args.quiet else FlagProgress(sys.stdout),
                          timings=args.timings)
    run_reproduce(cfg)
    out = Path(args.out)
    print((out / "table.md").read_text())
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'channels.json'}, {out / 'report.html'} "
          f"in {time.perf_counter() - t0:.0f}s")
    return 0
