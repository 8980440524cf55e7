"""`fineprune demo`: train, backdoor and defend on the embedded MNIST digits."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..purify.stop_rules import DEFAULT_THRESHOLD
from .registry import FlagProgress, command


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="fineprune-demo", help="output folder (default ./fineprune-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="stop rule, accuracy points (default %(default)g)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


@command("demo", _args)
def run(args: argparse.Namespace) -> int:
    """Run the whole story (attack, four defenses) on 5,000 embedded MNIST digits."""
    from ..purify.stop_rules import check_threshold
    from ..experiment.demo import DemoConfig, format_table, run_demo

    check_threshold(args.threshold)
    t0 = time.perf_counter()
    if not args.quiet:
        print("fineprune demo: MNIST (5,000 real digits), BadNets 3x3 patch, 10% poisoning, target 0")
    rows = run_demo(args.out, DemoConfig(seed=args.seed, threshold=args.threshold),
                    progress=False if args.quiet else FlagProgress(sys.stdout), device=args.device)
    print()
    print("Test-set results (CA = clean accuracy, ASR = attack success rate):")
    print(format_table(rows))
    out = Path(args.out)
    print(f"\nwrote {out / 'results.json'} and {out / 'pruning_curve.png'} in {time.perf_counter() - t0:.0f}s")
    return 0
