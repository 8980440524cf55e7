"""Clean accuracy, attack success rate and robust accuracy, as the paper defines them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..data.types import tensors


@dataclass
class TriggeredSet:
    """Triggered inputs with their true labels and the label the attack wants.

    Only inputs whose true label differs from the attack's output belong here: ASR on an input
    already labelled as the target would count the model's clean skill as attack success.
    """

    x: torch.Tensor
    y_true: torch.Tensor
    y_target: torch.Tensor

    def __post_init__(self) -> None:
        keep = self.y_true != self.y_target
        if not bool(keep.all()):
            self.x, self.y_true, self.y_target = self.x[keep], self.y_true[keep], self.y_target[keep]

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
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | None = None
) -> torch.Tensor:
    """Predicted labels for `x`, in eval mode (the model's mode is restored afterwards)."""
    device = device or next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        out = [
            model(x[i : i + batch_size].to(device)).argmax(dim=1).cpu()
            for i in range(0, x.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: TensorDataset, device: torch.device | None = None) -> float:
    x, y = tensors(data)
    if len(y) == 0:
        raise ValueError("cannot measure accuracy on an empty dataset")
    return float((predict(model, x, device=device) == y).float().mean())


def attack_metrics(
    model: nn.Module, triggered: TriggeredSet, device: torch.device | None = None
) -> tuple[float, float]:
    """(ASR, robust accuracy) on a triggered set."""
    if len(triggered) == 0:
        raise ValueError("the triggered set has no input whose true label differs from the target")
    pred = predict(model, triggered.x, device=device)
    asr = float((pred == triggered.y_target).float().mean())
    robust = float((pred == triggered.y_true).float().mean())
    return asr, robust


def evaluate(
    model: nn.Module,
    clean: TensorDataset,
    triggered: TriggeredSet | None = None,
    device: torch.device | None = None,
) -> Metrics:
    """Clean accuracy and, when a triggered set is given, ASR and robust accuracy."""
    m = Metrics(clean_acc=accuracy(model, clean, device))
    if triggered is not None:
        m.asr, m.robust_acc = attack_metrics(model, triggered, device)
    return m
