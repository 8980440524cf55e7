"""`fineprune methods`: the registered defender's methods, their sources and options."""
from __future__ import annotations

import argparse

from .registry import command

_TITLES = {"recipe": "Fine-tuning recipes (--recipe)", "criterion": "Pruning criteria (--criterion)",
           "stop_rule": "Stop rules (--stop-rule)"}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", dest="plugins", action="append", metavar="FILE",
                   help="a Python file imported first (its methods are listed too); repeatable")


@command("methods", _args)
def run(args: argparse.Namespace) -> int:
    """List the defender's methods (from the method registry) with their options and defaults."""
    from ..purify import registry

    registry.load_plugins(args.plugins or [])
    for family in registry.families():
        default = registry.base(family).default_spec
        print(f"## {_TITLES.get(family, registry.LABELS.get(family, family))}: default `{default}`\n")
        print(registry.help_table(family) + "\n")
    print("A method is written NAME[,key=value...], e.g. --recipe ft-sam,rho=8 --criterion anp,eps=0.3")
    return 0
