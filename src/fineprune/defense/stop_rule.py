"""The paper's stop rule: prune while clean validation accuracy stays within a threshold."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import BadInputError

DEFAULT_THRESHOLD = 4.0  # the paper's fine-pruning stop rule: prune while clean validation accuracy stays within 4 points


def check_threshold(threshold: float) -> float:
    """Thresholds are percentage points in [0, 100] (a BadInputError, so also a ValueError)."""
    t = float(threshold)
    if not 0.0 <= t <= 100.0 or t != t:
        raise BadInputError(f"threshold is in percentage points and must lie in [0, 100], got {threshold}")
    return t


def stop_point(clean_correct: Sequence[int], num_clean: int, threshold: float) -> int:
    """Number of channels to prune.

    Pruning proceeds one channel at a time in increasing order of activation and stops at the
    first k whose accuracy is more than `threshold` points below the unpruned model's; the answer
    is the k just before it (the last model that met the rule, never one step past it). Accuracy is
    compared in correct-prediction counts, so no rounding moves the boundary.
    """
    t = check_threshold(threshold)
    if num_clean <= 0:
        raise ValueError("the validation set is empty")
    allowed = t / 100.0 * num_clean
    base = clean_correct[0]
    for k, correct in enumerate(clean_correct):
        if base - correct > allowed + 1e-9:
            return k - 1
    return len(clean_correct) - 1
