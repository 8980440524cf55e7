"""The scan family's base, its result, the anomaly index and the one verdict line.

A scan looks for evidence of a backdoor without the trigger: it reverses, for each class, the
smallest input change that sends clean inputs to that class, and flags a class whose change is an
outlier on the small side (Wang et al., "Neural Cleanse", S&P 2019). No evidence is not proof of a
clean model: blended (whole-image) triggers, all-to-all attacks and physical triggers on the
features the model relies on escape this kind of scan (Wenger et al., CVPR 2021).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ..registry import Method

#: Normal consistency constant of the median absolute deviation (MAD * 1.4826 estimates sigma),
#: as Neural Cleanse's outlier test uses it.
MAD_CONSISTENCY = 1.4826


@dataclass
class ClassScan:
    """One class's reversed trigger. `size` is the method's size measure (`ScanResult.size_measure`,
    the mask's L1 norm for mask inversions: pixels, a pixel counted once over its channels);
    `final_size` the size of the trigger kept (`mask`, `pattern`), which can be smaller than `size`
    when the method compares classes at an equal effort and then refined some of them (k-arm);
    `success` the share of the scan's clean inputs of other classes that the reversed trigger
    sends to this class; `reached` whether it ever met the method's success target; `steps` the
    optimisation steps spent on it; `status` why its inversion ended (`converged`: the method's own
    early stop; `steps`: its step cap; `gave-up`: it could not reach the target; `budget`: the
    time or step budget of the whole scan ran out; `not-run`: never optimised)."""

    cls: int
    size: float  # what the anomaly index compares
    anomaly_index: float
    success: float
    reached: bool
    steps: int
    status: str
    flagged: bool = False
    mask: torch.Tensor | None = field(default=None, repr=False)     # (1, *spatial), values in [0, 1]
    pattern: torch.Tensor | None = field(default=None, repr=False)  # (C, *spatial), in the inputs' space
    final_size: float | None = None  # the smallest trigger found with all the effort spent (the one kept)

    @property
    def kept_size(self) -> float:
        """The size of the kept (pictured) trigger."""
        return self.size if self.final_size is None else self.final_size

    @property
    def completed(self) -> bool:
        """Fully inverted: it met the target and its inversion ended by the method's own rule."""
        return self.reached and self.status in ("converged", "steps")


@dataclass
class ScanResult:
    """What a scan found. `method` is the canonical spec and `options` every option resolved
    (`Method.options()`); `coverage(k)` = class k's kept size / `mask_elements` (the share of the
    input its reversed trigger covers); `flagged` the classes whose anomaly index exceeds
    `threshold` on the small side, most anomalous first; `stopped_by` "done", "time budget" or
    "step budget" (k-arm's `pulls`, which only cuts the refinement, not the comparison)."""

    method: str
    options: dict[str, Any]
    size_measure: str
    classes: list[ClassScan]
    flagged: list[int]
    threshold: float
    mask_elements: int
    samples: int
    seconds: float
    stopped_by: str = "done"
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    # Per-channel min and max of the scan's clean inputs, (1, C, 1, ...): the patterns' box (also
    # how the pictures map inputs to pixels).
    box: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def completed(self) -> int:
        """How many classes were fully inverted (see `ClassScan.completed`)."""
        return sum(c.completed for c in self.classes)

    def by_class(self, k: int) -> ClassScan:
        return next(c for c in self.classes if c.cls == k)

    def coverage(self, k: int) -> float:
        """The share of the input class k's kept trigger covers."""
        return self.by_class(k).kept_size / self.mask_elements

    def smallest(self, n: int = 3) -> list[int]:
        """The `n` classes with the smallest reversed triggers."""
        return [c.cls for c in sorted(self.classes, key=lambda c: (c.size, c.cls))[:n]]

    def verdict(self) -> str:
        return verdict_line(self)

    def to_json(self) -> dict[str, Any]:
        """scan.json's content (no tensors)."""
        names = self.class_names
        rows = []
        for c in self.classes:
            row: dict[str, Any] = {"class": c.cls}
            if names and c.cls < len(names) and names[c.cls] != str(c.cls):
                row["name"] = names[c.cls]
            row.update({"anomaly_index": _finite(c.anomaly_index), self.size_measure: round(c.size, 4),
                        f"final_{self.size_measure}": round(c.kept_size, 4),
                        "coverage": round(c.kept_size / self.mask_elements, 6), "attack_success": round(c.success, 4),
                        "reached_target": c.reached, "steps": c.steps, "status": c.status, "flagged": c.flagged})
            rows.append(row)
        return {"verdict": self.verdict(), "flagged": list(self.flagged), "threshold": self.threshold,
                "method": self.options, "spec": self.method, "size_measure": self.size_measure,
                "mask_elements": self.mask_elements, "samples": self.samples,
                "classes_completed": self.completed, "num_classes": len(self.classes),
                "stopped_by": self.stopped_by, "seconds": round(self.seconds, 3), "classes": rows,
                "notes": list(self.notes)}


def _finite(v: float) -> float | None:
    return round(v, 4) if math.isfinite(v) else None


#: How sizes are compared: "linear" is Neural Cleanse's test on the sizes themselves; "log" the
#: same test on their logarithms (a mask 9x smaller than the median is as anomalous whatever the
#: input's scale, and a few large clean-class masks no longer widen the MAD).
INDEX_SCALES = ("linear", "log")


def anomaly_indices(sizes: Sequence[float], scale: str = "linear") -> list[float]:
    """Neural Cleanse's anomaly index of each size: (median - size) / (1.4826 * MAD), so a class
    far BELOW the others is large and positive (only the small side is evidence: a backdoor makes
    its target easy to reach). `scale` "log" applies it to log sizes. A MAD of 0 (all sizes but
    the outliers equal) is floored at a millionth of the median, so the index stays finite."""
    if not sizes:
        return []
    if scale not in INDEX_SCALES:
        raise ValueError(f"scale must be one of {', '.join(INDEX_SCALES)}, not {scale!r}")
    if scale == "log":
        sizes = [math.log(max(s, 1e-6)) for s in sizes]
    med = statistics.median(sizes)
    mad = MAD_CONSISTENCY * statistics.median(abs(s - med) for s in sizes)
    mad = max(mad, 1e-6 * abs(med), 1e-12)
    return [(med - s) / mad for s in sizes]


def flag(sizes: Sequence[float], threshold: float, scale: str = "linear") -> tuple[list[float], list[int]]:
    """The anomaly indices and the flagged classes (index > threshold, below the median), most
    anomalous first."""
    idx = anomaly_indices(sizes, scale)
    med = statistics.median(sizes) if sizes else 0.0
    flagged = [k for k in sorted(range(len(sizes)), key=lambda k: -idx[k])
               if idx[k] > threshold and sizes[k] < med]
    return idx, flagged


def _class_label(result: ScanResult, k: int) -> str:
    names = result.class_names
    if names and k < len(names) and names[k] != str(k):
        return f'class {k} "{names[k]}"'
    return f"class {k}"


def verdict_line(result: ScanResult) -> str:
    """The one-line verdict (the CLI prints it; `defend` can reuse it). It never calls a model
    clean: a scan that finds nothing has only failed to find evidence."""
    name = result.options.get("name", result.method)
    partial = ""
    if result.stopped_by == "time budget":
        partial = (f"; the time budget ran out with {result.completed} of {len(result.classes)} classes "
                   "fully inverted")
    if result.flagged:
        parts = [f"{_class_label(result, k)} (anomaly index {result.by_class(k).anomaly_index:.1f}; reversed "
                 f"trigger covers {100 * result.coverage(k):.1f}% of the input)" for k in result.flagged]
        return f"backdoor evidence: {', '.join(parts)}{partial}"
    top = max((c.anomaly_index for c in result.classes), default=0.0)
    return (f"no backdoor evidence found by {name} (largest anomaly index {top:.1f}, threshold "
            f"{result.threshold:g}{partial}); a backdoor this scan cannot see may still be present")


@dataclass
class Scan(Method, family="scan"):
    """Base of the backdoor scans: `run` reverses a trigger per class from clean data alone and
    flags the outliers. Never modifies the model and never sees triggered or test data."""

    # Neural Cleanse. What chose it: it is the baseline with published behaviour and known
    # failures (purification-notes: BackdoorBench's NC rows, blended and all-to-all misses);
    # k-arm is cheaper on many classes but is not the default until the benchmark zoo of issue 21
    # shows it finds what NC finds (not measured yet).
    default_spec: ClassVar[str] = "neural-cleanse"

    def run(self, model: nn.Module, clean: Dataset, num_classes: int, *, device: torch.device | str | None = None,
            seed: int = 0, progress: Any = None, class_names: list[str] | None = None,
            workers: int = 0) -> ScanResult:
        """Scan `model` (never modified) with `clean` data only; `progress`: a `fineprune.progress`
        channel (or True for stderr)."""
        raise NotImplementedError
