"""The one in-memory data shape fineprune passes around: float inputs and int64 labels."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset


def make_dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """A TensorDataset with float32 inputs and int64 labels (checked, not guessed).

    The inputs get the standard row-major strides, not merely `is_contiguous()` ones: a one-channel
    image batch permuted from (N, H, W, 1) passes `is_contiguous()` with channels-last strides,
    which send convolutions down another kernel (last-bit differences), so the same data read
    lazily (batches collated with standard strides) would not be bit-identical to it."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs and labels differ in length: {x.shape[0]} vs {y.shape[0]}")
    x = x.float().contiguous()
    if x.stride() != torch.empty(x.shape, device="meta").stride():
        x = x.clone(memory_format=torch.contiguous_format)
    return TensorDataset(x, y.long().contiguous())


def tensors(ds: TensorDataset | torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a dataset; materialises non-tensor datasets once (reading every input: use it
    only where a whole tensor is truly needed; `fineprune.data.stream` reads in batches)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack([torch.as_tensor(v) for v in xs]), torch.as_tensor(ys)


@dataclass
class TaskData:
    """A task's splits: `train` is the trainer's, `val` the defender's clean data, `test` only measures."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    input_kind: str = "image"  # "image" (N,C,H,W in [0,1]) or "audio" (N,1,L waveform in [-1,1])
    info: dict = field(default_factory=dict)
    # Group id per val sample (GTSRB: the track, ~30 near-identical frames of one sign), so the
    # defender's own hold-out never puts near-duplicates on both sides; None: samples independent.
    val_groups: torch.Tensor | None = None
