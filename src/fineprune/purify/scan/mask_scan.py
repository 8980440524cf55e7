"""What the mask-inversion scans share: their options, the setup (inputs, device, progress) and
the result (anomaly index over the classes' mask sizes). Subclasses only schedule the classes."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from ...progress import Progress, as_progress
from ...runtime import pick_device
from .base import INDEX_SCALES, ClassScan, Scan, ScanResult, flag
from .inputs import scan_inputs
from .inversion import Arm, Inversion, Schedule


def final_size(arm: Arm) -> float:
    """The smallest mask that met the target, or the last mask where none did."""
    return arm.best if arm.reached else arm.size


@dataclass
class MaskScan(Scan):
    """Options of a mask-and-pattern inversion (defaults: Neural Cleanse's, see `inversion`).

    `steps`: optimisation steps per class at most (each a mini-batch of `batch_size`); `samples`:
    clean inputs used (the authors' 1,000); `threshold`: the anomaly index above which a class is
    flagged (the authors' 2); `index`: "linear" (the authors' test on the L1 norms) or "log" (the
    same test on their logarithms, see `base.INDEX_SCALES`); `time_budget`: seconds after which the scan stops and reports what it
    has (None: no limit); the rest is the lambda schedule."""

    steps: int = 1000
    batch_size: int = 32
    check_every: int = 10
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_multiplier: float = 2.0
    patience: int = 5
    success: float = 0.99
    early_stop_patience: int = 10
    samples: int = 1000
    threshold: float = 2.0
    index: str = "linear"
    time_budget: float | None = None

    def __post_init__(self) -> None:
        self.schedule().validate()
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2, got {self.samples}")
        if self.index not in INDEX_SCALES:
            raise ValueError(f"index must be one of {', '.join(INDEX_SCALES)}, not {self.index!r}")
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be a positive number of seconds, got {self.time_budget}")

    def schedule(self) -> Schedule:
        return Schedule(steps=self.steps, batch_size=self.batch_size, check_every=self.check_every, lr=self.lr,
                        init_cost=self.init_cost, cost_multiplier=self.cost_multiplier, patience=self.patience,
                        success=self.success, early_stop_patience=self.early_stop_patience)

    def bar_total(self, num_classes: int) -> int:
        """Class-steps the progress bar counts to (the most the scan can spend)."""
        return num_classes * self.steps

    def schedule_classes(self, inv: Inversion) -> None:
        """Optimise the classes (the method's own order and stopping)."""
        raise NotImplementedError

    def run(self, model: nn.Module, clean: Dataset, num_classes: int, *, device: torch.device | str | None = None,
            seed: int = 0, progress: bool | Progress | None = None,
            class_names: list[str] | None = None, workers: int = 0) -> ScanResult:
        """Reverse a trigger for every class of `model` from `clean` data alone and flag outliers.
        Deterministic for a seed on a given device and thread count; `model` is not modified.
        `class_names` label the verdict; `workers` decode a lazy folder's inputs in processes."""
        t0 = time.perf_counter()
        if num_classes < 2:
            raise ValueError(f"a scan needs at least 2 classes, got {num_classes}")
        progress = as_progress(progress)
        dev = pick_device(device)
        x, y = scan_inputs(clean, self.samples, seed, workers)
        with progress.bar(self.bar_total(num_classes), f"scan ({self.name})", unit="step", leave=False) as bar:
            inv = Inversion(model, x, y, num_classes, self.schedule(), device=dev, seed=seed, bar=bar,
                            time_budget=self.time_budget)
            self.schedule_classes(inv)
        inv.stop_all("not-run")  # anything the method left (never optimised, or cut short)
        res = self.result(inv, x.shape[0], class_names)
        res.seconds = time.perf_counter() - t0
        return res

    def compared_sizes(self, inv: Inversion) -> list[float]:
        """The size of each class that the anomaly index compares: its smallest mask that met the
        target (the last mask where none did)."""
        return [final_size(arm) for arm in inv.arms]

    def result(self, inv: Inversion, samples: int, class_names: list[str] | None) -> ScanResult:
        sizes = self.compared_sizes(inv)
        indices, flagged = flag(sizes, self.threshold, self.index)
        rows = []
        for arm, size, ai in zip(inv.arms, sizes, indices):
            mask, pattern = inv.trigger(arm.cls)
            rows.append(ClassScan(cls=arm.cls, size=float(size), anomaly_index=float(ai),
                                  success=inv.success_of(arm.cls, mask, pattern), reached=arm.reached,
                                  steps=arm.steps, status=arm.status or "not-run", flagged=arm.cls in flagged,
                                  mask=mask, pattern=pattern, final_size=final_size(arm)))
        notes: list[str] = []
        unreached = [a.cls for a in inv.arms if not a.reached and a.steps > 0]
        if unreached:
            notes.append(f"classes {unreached} never met the {self.success:g} success target: their size is "
                         "the last mask's")
        return ScanResult(method=self.spec(), options=self.options(), size_measure="mask_l1", classes=rows,
                          flagged=flagged, threshold=self.threshold, mask_elements=inv.mask_elements,
                          samples=samples, seconds=0.0, stopped_by=inv.stopped_by,
                          class_names=class_names, notes=notes + self.notes(inv),
                          box=(inv.lo.cpu(), inv.hi.cpu()))

    def notes(self, inv: Inversion) -> list[str]:
        return []
