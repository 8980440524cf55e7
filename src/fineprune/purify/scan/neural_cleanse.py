"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", S&P 2019): every class inverted to the end of its schedule, then the outlier test."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .inversion import Inversion
from .mask_scan import MaskScan


@dataclass
class NeuralCleanse(MaskScan):
    """Neural Cleanse (Wang et al., S&P 2019): per class, the smallest mask and pattern that send
    clean inputs to it, under the authors' lambda schedule; a class whose mask's L1 norm is an
    outlier on the small side (anomaly index > 2) is flagged. Every class gets the same treatment:
    all are stepped together until each converges or reaches `steps`."""

    name: ClassVar[str] = "neural-cleanse"

    def schedule_classes(self, inv: Inversion) -> None:
        everyone = list(range(inv.num_classes))
        while inv.active(everyone):
            inv.advance(everyone)
