"""The clean inputs a scan optimises on: a seeded, stratified subset held in memory, and the box
its reversed patterns must stay in."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ...data import stream
from ...data.splits import stratified_split
from ...errors import BadInputError


def scan_inputs(clean: Dataset, samples: int, seed: int, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `samples` clean inputs and their labels, a seeded stratified subset when the data
    holds more (every class in proportion), read in one pass (a lazy folder decodes only these,
    in `workers` processes)."""
    y = stream.labels_of(clean, workers)
    n = int(y.shape[0])
    if n == 0:
        raise BadInputError("the clean data is empty; a scan needs clean inputs")
    if samples < n:
        idx = stratified_split(y, [samples / n, 1 - samples / n], seed)[0]
    else:
        idx = torch.arange(n)
    xs, ys = [], []
    for xb, yb in stream.iter_batches(clean, stream.inference_batch(clean, 256), order=idx, workers=workers):
        xs.append(xb.float())
        ys.append(yb)
    return torch.cat(xs), torch.cat(ys)


def channel_box(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of the inputs, shaped (1, C, 1, ...) to broadcast: the range a
    reversed pattern may take. The inputs may be normalised (mean/std), so the box is the data's own
    value range in the model's input space, not [0, 1]; blending (1 - m) x + m p is the same in raw
    and normalised space, since normalisation is affine per channel."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    lo, hi = x.amin(dim=dims).view(shape), x.amax(dim=dims).view(shape)
    return lo, torch.maximum(hi, lo + 1e-6)
