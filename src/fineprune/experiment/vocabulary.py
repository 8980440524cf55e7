"""The words experiments use, defined once: attacks, defenses and the stop rule's default.

Experiments (`reproduce`, `grid`, `demo`) name defenses by the paper's nouns ("fine-pruning"): the
rows of results.json, the columns of table.md and the values of a grid axis. Each noun runs one
`defend()` method (a verb, as `fineprune defend --method` takes it), or none: "none" measures the
received model as it is. Both spellings stay, since saved results and configs use the nouns and
scripts call `defend()` with the verbs; this table is the only place that relates them.
"""
from __future__ import annotations

from ..defense.api import METHODS
from ..purify.stop_rules import DEFAULT_THRESHOLD

#: The models an experiment trains: the clean twin, BadNets, and the pruning-aware attack.
ATTACKS = ("none", "badnets", "pruning-aware")

#: BadNets triggers an experiment can plant: the task's own (sunglasses, tone, sticker, patch), or
#: "blend": a fixed random pattern alpha-blended over the whole input (Chen et al. 2017), see setup.
TRIGGERS = ("task", "blend")

#: Defense noun -> the `defend()` method it runs (None: no defense), in the order tables show them.
DEFENSES: dict[str, str | None] = {"none": None, "fine-tuning": "fine-tune", "pruning": "prune",
                                   "fine-pruning": "fine-prune"}

assert set(DEFENSES.values()) - {None} == set(METHODS), "every defend() method has one noun"

__all__ = ["ATTACKS", "DEFAULT_THRESHOLD", "DEFENSES", "TRIGGERS"]
