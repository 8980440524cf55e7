"""Neural Cleanse's mitigations (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor
Attacks in Neural Networks", S&P 2019), driven by this toolkit's own scan: unlearning with the
reversed trigger (a fine-tuning recipe) and pruning the channels it excites (a pruning criterion,
evaluated by the exact sweep with the stop rule as the accuracy guard, so it needs no training:
the option for a defender with two images per class).

Which triggers: those of the classes the scan flags; when it flags none, the `top` classes with
the smallest reversed triggers (the likeliest targets, which is all a defender without evidence
can go on; the run records which). The scan is a spec of the scan family with `;` between its
options, since `,` separates this method's own: `nc-unlearn,scan=k-arm;steps=300`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from .criteria import Criterion
from .recipes import Recipe
from .registry import resolve
from .scan.base import ScanResult


@dataclass
class Triggers:
    """Reversed triggers to stamp: masks (T, 1, *spatial) and patterns (T, C, *spatial)."""

    classes: list[int]
    masks: torch.Tensor
    patterns: torch.Tensor
    flagged: bool  # the classes were flagged (False: the smallest, nothing was flagged)

    def stamp(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """x with trigger `which[i]` applied to row i: (1 - m) x + m p."""
        m, p = self.masks[which].to(x), self.patterns[which].to(x)
        return (1 - m) * x + m * p


def reversed_triggers(model: nn.Module, data: Dataset, scan_spec: str, top: int, *, device=None, seed: int = 0,
                      workers: int = 0) -> tuple[Triggers, ScanResult]:
    """Scan `model` on `data` and return the triggers to use (flagged classes, else the `top` smallest)."""
    scan = resolve("scan", scan_spec.replace(";", ","), what="`scan`")
    param = next(model.parameters())
    with torch.no_grad():
        example = next(iter(torch.utils.data.DataLoader(data, batch_size=1)))[0].to(param.device)
        was = model.training
        model.eval()
        num_classes = int(model(example).shape[-1])
        model.train(was)
    result = scan.run(model, data, num_classes, device=device or param.device, seed=seed, workers=workers)
    classes = list(result.flagged) or result.smallest(top)
    masks = torch.stack([result.by_class(k).mask.float() for k in classes])
    patterns = torch.stack([result.by_class(k).pattern.float() for k in classes])
    return Triggers(classes, masks, patterns, bool(result.flagged)), result


@dataclass
class NCUnlearn(Recipe):
    """Unlearning with the scan's reversed trigger (Neural Cleanse's first mitigation): during
    fine-tuning, `fraction` of each batch's inputs carry a reversed trigger (one of the classes
    the scan flags, else of the `top` smallest) with their TRUE labels, so the model learns that
    the trigger means nothing. The paper stamps 20% of the clean fine-tuning data; `scan` is the
    scan spec (`;` between its options). The scan runs once, on the fine-tuning data, before the
    first epoch (again, identically, on a resumed run)."""

    name: ClassVar[str] = "nc-unlearn"
    scan: str = "neural-cleanse"
    fraction: float = 0.2
    top: int = 1
    triggers: Triggers | None = field(default=None, init=False, repr=False, compare=False)
    found: ScanResult | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.fraction <= 1 and self.top >= 1):
            raise ValueError(f"needs 0 < fraction <= 1 and top >= 1; got {self.fraction}, {self.top}")
        resolve("scan", self.scan.replace(";", ","), what="`scan`")  # a bad scan spec fails now

    def prepare(self, model: nn.Module, example: torch.Tensor, generator: torch.Generator,
                data: Dataset | None = None) -> None:
        super().prepare(model, example, generator, data)
        if data is None:
            raise ValueError("nc-unlearn needs the fine-tuning data to scan (train(..., data))")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.triggers, self.found = reversed_triggers(model, data, self.scan, self.top, seed=seed)

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = super().augment(x, generator)
        if self.triggers is None:
            raise RuntimeError("NCUnlearn.prepare(model, ...) must run before training")
        n = x.shape[0]
        rows = torch.rand(n, generator=generator) < self.fraction
        which = torch.randint(0, len(self.triggers.classes), (n,), generator=generator)
        if bool(rows.any()):
            x = x.clone()
            idx = rows.nonzero().flatten().to(x.device)
            x[idx] = self.triggers.stamp(x[idx], which[rows])
        return x


@dataclass
class TriggerExcitation(Criterion):
    """Pruning by reversed-trigger excitation (Neural Cleanse's second mitigation): the layer's
    channels by decreasing (mean activation on clean inputs carrying the reversed trigger - mean
    activation on the same clean inputs), so the channels the trigger drives hardest go first; the
    exact sweep and the stop rule then decide how many, on clean validation accuracy alone. No
    training: it works where fine-tuning on a handful of images cannot. Triggers as for
    nc-unlearn; `samples` clean inputs measure the excitation."""

    name: ClassVar[str] = "nc-excitation"
    scan: str = "neural-cleanse"
    top: int = 1
    samples: int = 512

    def __post_init__(self) -> None:
        if not (self.top >= 1 and self.samples >= 1):
            raise ValueError(f"needs top >= 1 and samples >= 1; got {self.top}, {self.samples}")
        resolve("scan", self.scan.replace(";", ","), what="`scan`")

    def rank(self, model, layer, clean, *, device=None, seed=0, workers=0) -> list[int]:
        from ..defense.sweep import layer_means
        from .scan.inputs import scan_inputs

        triggers, _ = reversed_triggers(model, clean, self.scan, self.top, device=device, seed=seed, workers=workers)
        x, _ = scan_inputs(clean, self.samples, seed, workers)
        which = torch.arange(x.shape[0]) % len(triggers.classes)
        stamped = triggers.stamp(x, which)
        excitation = (layer_means(model, layer, stamped, device=device) - layer_means(model, layer, x, device=device))
        return torch.sort(excitation.double(), descending=True, stable=True).indices.tolist()
