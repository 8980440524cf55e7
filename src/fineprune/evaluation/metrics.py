"""Clean accuracy, attack success rate and robust accuracy, as the paper defines them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import stream


@dataclass
class TriggeredSet:
    """Triggered inputs with their true labels and the label the attack wants.

    Only inputs whose true label differs from the attack's output belong here: ASR on an input
    already labelled as the target would count the model's clean skill as attack success.
    `x`: the inputs as a tensor, or a Dataset whose items' inputs are used (a lazy folder: only
    `y_true` and `y_target` are held in memory; dropped inputs become a Subset, not a copy).
    """

    x: torch.Tensor | Dataset
    y_true: torch.Tensor
    y_target: torch.Tensor

    def __post_init__(self) -> None:
        keep = self.y_true != self.y_target
        if not bool(keep.all()):
            if isinstance(self.x, torch.Tensor):
                self.x = self.x[keep]
            else:
                self.x = Subset(self.x, torch.nonzero(keep).flatten().tolist())
            self.y_true, self.y_target = self.y_true[keep], self.y_target[keep]

    def __len__(self) -> int:
        return int(self.y_true.shape[0])


@dataclass
class Metrics:
    """Fractions in [0, 1]; `asr`/`robust_acc` are None when no triggered set was given."""

    clean_acc: float
    asr: float | None = None
    robust_acc: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@torch.inference_mode()
def predict(
    model: nn.Module, x: torch.Tensor | Dataset, batch_size: int = 512, device: torch.device | None = None,
    workers: int = 0,
) -> torch.Tensor:
    """Predicted labels for the inputs `x` (a tensor, or a Dataset's items' inputs, read by
    `workers` DataLoader processes), in eval mode (the model's mode is restored afterwards)."""
    device = device or next(iter(model.parameters()), torch.empty(0)).device
    if stream.num_samples(x):
        batch_size = stream.inference_batch(x, batch_size)
    was_training = model.training
    model.eval()
    try:
        out = [model(xb.to(device)).argmax(dim=1).cpu()
               for xb in stream.iter_inputs(x, batch_size, workers=workers, pin=torch.device(device).type == "cuda")]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@torch.inference_mode()
def accuracy(model: nn.Module, data: Dataset, device: torch.device | None = None, workers: int = 0) -> float:
    """Fraction of `data` predicted right: one pass, labels taken from the same batches as the
    inputs (an unknown dataset is not read twice). Batches as `predict`'s (512, fewer for large
    inputs: `stream.inference_batch`)."""
    device = device or next(iter(model.parameters()), torch.empty(0)).device
    batch = stream.inference_batch(data, 512) if stream.num_samples(data) else 512
    was_training = model.training
    model.eval()
    hits: list[torch.Tensor] = []
    try:
        for xb, yb in stream.iter_batches(data, batch, workers=workers, pin=torch.device(device).type == "cuda"):
            hits.append(model(xb.to(device)).argmax(dim=1).cpu() == yb)
    finally:
        model.train(was_training)
    if not hits or sum(h.numel() for h in hits) == 0:
        raise ValueError("cannot measure accuracy on an empty dataset")
    return float(torch.cat(hits).float().mean())  # as before streaming: the same float, bit for bit


def attack_metrics(
    model: nn.Module, triggered: TriggeredSet, device: torch.device | None = None, workers: int = 0,
) -> tuple[float, float]:
    """(ASR, robust accuracy) on a triggered set."""
    if len(triggered) == 0:
        raise ValueError("the triggered set has no input whose true label differs from the target")
    pred = predict(model, triggered.x, device=device, workers=workers)
    asr = float((pred == triggered.y_target).float().mean())
    robust = float((pred == triggered.y_true).float().mean())
    return asr, robust


def evaluate(
    model: nn.Module,
    clean: Dataset,
    triggered: TriggeredSet | None = None,
    device: torch.device | None = None,
    workers: int = 0,
) -> Metrics:
    """Clean accuracy and, when a triggered set is given, ASR and robust accuracy."""
    m = Metrics(clean_acc=accuracy(model, clean, device, workers))
    if triggered is not None:
        m.asr, m.robust_acc = attack_metrics(model, triggered, device, workers)
    return m
