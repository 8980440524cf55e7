"""Checks that catch a mis-specified run before it wastes time or misleads.

Wrong preprocessing (a different normalisation, size or value range than the model was trained
with) is the usual reason a received model looks bad on the defender's data; it shows up as clean
accuracy near chance, and every number after it would be meaningless.
"""
from __future__ import annotations

import torch

from ..errors import BadInputError


def check_labels(y: torch.Tensor, num_classes: int, source: str) -> None:
    """Labels must be indices of the model's outputs."""
    if y.numel() and int(y.max()) >= num_classes:
        raise BadInputError(f"{source}: labels go up to {int(y.max())} but the model has {num_classes} "
                            "outputs; check `num_classes` or the data's labels")


def check_val_classes(y: torch.Tensor, source: str) -> None:
    """A validation set must hold at least two classes: on one class, always answering it scores
    100%, so clean accuracy (and the pruning stop rule built on it) would mean nothing."""
    present = torch.unique(y)
    if present.numel() < 2:
        which = f"label {int(present[0])}" if present.numel() else "no labels"
        raise BadInputError(f"{source}: the validation data holds only one class ({which}); clean accuracy "
                            "on one class means nothing: give clean data from at least two classes (ideally all)")


def chance_level(y: torch.Tensor) -> float:
    """Accuracy of always answering the most common label."""
    return float(torch.bincount(y).max()) / max(int(y.numel()), 1)


def accuracy_warnings(acc: float, y: torch.Tensor, threshold: float) -> list[str]:
    """Warnings about the clean accuracy before the defense and the validation set's size."""
    warnings = []
    chance = chance_level(y)
    if acc < chance + 0.25 * (1.0 - chance):
        warnings.append(
            f"clean accuracy before the defense is {100 * acc:.1f}%, near chance ({100 * chance:.1f}% "
            "for always answering the most common label): the preprocessing probably differs from "
            "the model's training (check `mean`/`std`, `input_size`, the value range and channel "
            "order), or `arch`/`num_classes` are wrong; the results below are unlikely to mean much")
    n = int(y.numel())
    if n and 100.0 / n > threshold / 2:
        warnings.append(
            f"the validation part has only {n} samples (one sample = {100 / n:.1f} points), coarse "
            f"for a {threshold:g}-point stop rule; give more clean data or a larger `val_fraction`")
    return warnings
