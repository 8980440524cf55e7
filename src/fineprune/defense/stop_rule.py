"""The paper's stop rule: prune while clean validation accuracy stays within a threshold."""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import BadInputError

STOP_RULES = ("paper", "bound")
_Z95 = 1.6448536269514722  # one-sided 95% normal quantile
# The paper's fine-pruning stop rule: prune while clean validation accuracy stays within 4 points.
DEFAULT_THRESHOLD = 4.0


def check_threshold(threshold: float) -> float:
    """Thresholds are percentage points in [0, 100] (a BadInputError, so also a ValueError)."""
    t = float(threshold)
    if not 0.0 <= t <= 100.0 or t != t:
        raise BadInputError(f"threshold is in percentage points and must lie in [0, 100], got {threshold}")
    return t


def stop_point(clean_correct: Sequence[int], num_clean: int, threshold: float, rule: str = "paper") -> int:
    """Number of channels to prune.

    Pruning proceeds one channel at a time in increasing order of activation and stops at the
    first k whose accuracy is more than `threshold` points below the unpruned model's; the answer
    is the k just before it (the last model that met the rule, never one step past it). Accuracy is
    compared in correct-prediction counts, so no rounding moves the boundary.

    `rule="bound"` makes the rule aware of how coarse the validation set is: a pruned model meets
    it only while its accuracy drop plus a one-sided 95% normal bound on its own accuracy's
    sampling error, z * sqrt(a (1 - a) / n), stays within the threshold. On 40 images at 92.5% the
    bound alone is 6.8 points, so a 4-point rule prunes nothing it cannot vouch for; as n grows the
    bound shrinks and the rule becomes the paper's.
    """
    t = check_threshold(threshold)
    if num_clean <= 0:
        raise ValueError("the validation set is empty")
    if rule not in STOP_RULES:
        raise BadInputError(f"stop rule must be one of {', '.join(STOP_RULES)}, not {rule!r}")
    allowed = t / 100.0 * num_clean
    base = clean_correct[0]
    for k, correct in enumerate(clean_correct):
        margin = 0.0
        if rule == "bound":
            a = correct / num_clean
            margin = _Z95 * math.sqrt(a * (1.0 - a) * num_clean)  # in counts: z * sqrt(a(1-a)/n) * n
        if base - correct + margin > allowed + 1e-9:
            return max(k - 1, 0)
    return len(clean_correct) - 1
