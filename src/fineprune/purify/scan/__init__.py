"""Backdoor scans, the method family "scan" (`purify.registry`): evidence of a backdoor from the
model and clean data alone, by reversing a trigger per class (`base` has the result and the
verdict line; `inversion` the shared optimiser; `neural_cleanse` and `k_arm` the methods)."""
from . import neural_cleanse, k_arm  # noqa: F401,I001  (register the built-in scans, NC first)
from .base import ClassScan, Scan, ScanResult, anomaly_indices, verdict_line

__all__ = ["ClassScan", "Scan", "ScanResult", "anomaly_indices", "verdict_line"]
