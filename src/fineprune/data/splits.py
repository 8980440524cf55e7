"""Seeded, stratified splits: every class is represented in every part in proportion."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset, TensorDataset


def stratified_split(
    y: torch.Tensor, fractions: Sequence[float], seed: int = 0
) -> list[torch.Tensor]:
    """Split indices of `y` into parts with the given fractions (summing to 1), per class.

    Each class's indices are shuffled with `seed` and cut at the rounded cumulative fractions,
    so the parts are disjoint, cover everything, and keep the class balance.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        bounds = [0]
        acc = 0.0
        for f in fractions:
            acc += f
            bounds.append(int(round(acc * len(idx))))
        for p in range(len(fractions)):
            parts[p].append(idx[bounds[p] : bounds[p + 1]])
    out = [torch.sort(torch.cat(p)).values if p else torch.empty(0, dtype=torch.long) for p in parts]
    if any(len(o) == 0 and round(f * len(y)) >= 1 for o, f in zip(out, fractions)):
        return _interleaved_split(y, fractions, seed)
    return out


def _interleaved_split(y: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """The split when rounding per class leaves a part empty (e.g. 40 people with 2 images each:
    20% of 2 rounds to 0 for every class): all samples in one order that runs through the classes
    round-robin (each class shuffled with `seed`, classes in a seeded order), cut at the rounded
    cumulative fractions of the total, so every part gets its share and as many classes as it can."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    classes = classes[torch.randperm(len(classes), generator=g)]
    keyed = []
    for c in classes.tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        keyed += [((i + 0.5) / len(idx), len(keyed), int(j)) for i, j in enumerate(idx)]
    order = [j for *_, j in sorted(keyed)]
    bounds = [int(round(sum(fractions[:p]) * len(order))) for p in range(len(fractions) + 1)]
    return [torch.sort(torch.tensor(order[bounds[p]:bounds[p + 1]], dtype=torch.long)).values
            for p in range(len(fractions))]


def group_split(
    groups: torch.Tensor, y: torch.Tensor, fractions: Sequence[float], seed: int = 0
) -> list[torch.Tensor]:
    """Split by group (e.g. a GTSRB track) so near-duplicates never straddle parts; stratified by
    the group's label."""
    uniq, inverse = torch.unique(groups, return_inverse=True)
    group_label = torch.zeros(len(uniq), dtype=torch.long)
    group_label[inverse] = y
    group_parts = stratified_split(group_label, fractions, seed)
    out = []
    for gp in group_parts:
        member = torch.zeros(len(uniq), dtype=torch.bool)
        member[gp] = True
        out.append(torch.nonzero(member[inverse]).flatten())
    return out


def holdout(data: Dataset, fraction: float = 0.2, seed: int = 0,
            groups: torch.Tensor | None = None) -> tuple[Dataset, Dataset]:
    """Split one clean set into (fine-tuning part, held-out validation part), stratified and seeded;
    by group when `groups` is given (near-duplicates stay on one side, or the held-out part cannot
    see over-fitting: on GTSRB tracks a random hold-out read 99.7-99.8% after fine-tuning at
    every learning rate tried, while at lr 0.05 the test split lost 4 points).

    A TensorDataset is split into two TensorDatasets (copies, as always: contiguous tensors keep
    the fast paths fast); any other dataset into two `Subset`s by index, without reading an input
    (labels come from `stream.labels_of`)."""
    from .stream import labels_of
    from .types import make_dataset

    y = labels_of(data)
    if groups is not None:
        rest, held = group_split(groups, y, (1.0 - fraction, fraction), seed)
    else:
        rest, held = stratified_split(y, (1.0 - fraction, fraction), seed)
    if isinstance(data, TensorDataset):
        x = data.tensors[0]
        return make_dataset(x[rest], y[rest]), make_dataset(x[held], y[held])
    return Subset(data, rest.tolist()), Subset(data, held.tolist())
