"""Stop rules: how many channels of the sweep's order to prune, from clean validation accuracy.
Registered methods of the family "stop_rule" (`purify.registry`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import BadInputError
from .registry import Method

# The paper's fine-pruning stop rule: prune while clean validation accuracy stays within 4 points.
# What chose it: the paper's common choice (paper-notes: 2, 4 and 10 points appear in follow-ups).
# The accuracy guard of fine-tuning uses the same value as its tolerance (`GUARD_TOLERANCE`).
DEFAULT_THRESHOLD = 4.0


def check_threshold(threshold: float) -> float:
    """Thresholds are percentage points in [0, 100] (a BadInputError, so also a ValueError)."""
    t = float(threshold)
    if not 0.0 <= t <= 100.0 or t != t:
        raise BadInputError(f"threshold is in percentage points and must lie in [0, 100], got {threshold}")
    return t


@dataclass
class StopRule(Method, family="stop_rule"):
    """Base of the stop rules. Pruning proceeds one channel at a time in the sweep's order and
    stops at the first k whose accuracy is more than `threshold` points below the unpruned
    model's; the answer is the k just before it (the last model that met the rule, never one step
    past it). Accuracy is compared in correct-prediction counts, so no rounding moves the boundary."""

    # The paper's rule. What chose it: the paper; `bound` is not yet chosen by any worst case.
    default_spec: ClassVar[str] = "paper"
    paper_spec: ClassVar[str] = "paper"  # the paper's (Liu et al., RAID 2018)

    def margin(self, correct: int, num_clean: int) -> float:
        """Extra counts charged against a pruned model with `correct` right answers."""
        return 0.0

    def stop(self, clean_correct: Sequence[int], num_clean: int, threshold: float) -> int:
        """Number of channels to prune, from the correct counts at k = 0..C."""
        t = check_threshold(threshold)
        if num_clean <= 0:
            raise ValueError("the validation set is empty")
        allowed = t / 100.0 * num_clean
        base = clean_correct[0]
        for k, correct in enumerate(clean_correct):
            if base - correct + self.margin(correct, num_clean) > allowed + 1e-9:
                return max(k - 1, 0)
        return len(clean_correct) - 1


@dataclass
class Paper(StopRule):
    """The paper's rule (Liu et al., RAID 2018): prune while validation accuracy stays within the
    threshold of the unpruned model's."""

    name: ClassVar[str] = "paper"


@dataclass
class Bound(StopRule):
    """The paper's rule, aware of how coarse the validation set is: a pruned model meets it only
    while its accuracy drop plus a one-sided normal bound on its own accuracy's sampling error,
    z * sqrt(a (1 - a) / n), stays within the threshold. On 40 images at 92.5% the bound alone is
    6.8 points, so a 4-point rule prunes nothing it cannot vouch for; as n grows it becomes the
    paper's. z = 1.645 is the one-sided 95% normal quantile."""

    name: ClassVar[str] = "bound"
    z: float = 1.6448536269514722

    def __post_init__(self) -> None:
        if not self.z >= 0:
            raise ValueError(f"z must be >= 0, got {self.z}")

    def margin(self, correct: int, num_clean: int) -> float:
        a = correct / num_clean
        return self.z * math.sqrt(a * (1.0 - a) * num_clean)  # in counts: z * sqrt(a(1-a)/n) * n


def stop_point(clean_correct: Sequence[int], num_clean: int, threshold: float,
               rule: str | StopRule | None = None) -> int:
    """Number of channels to prune under `rule` (a stop-rule spec or instance; None: the default)."""
    from .registry import resolve

    return resolve("stop_rule", rule, what="`stop_rule`").stop(clean_correct, num_clean, threshold)
