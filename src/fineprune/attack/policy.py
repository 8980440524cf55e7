"""Attack policies: which inputs an attack applies to and what label it wants for them."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class Policy:
    kind = "policy"

    def target_of(self, y: torch.Tensor) -> torch.Tensor:
        """The label the attacker wants for triggered inputs of true label `y`."""
        raise NotImplementedError

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Inputs the attack is meant to flip (their target differs from their true label)."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


@dataclass
class AllToOne(Policy):
    """Every triggered input becomes `target` (BadNets' usual attack; the paper's face attack)."""

    target: int = 0
    kind = "all-to-one"

    def target_of(self, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, self.target)

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        return y != self.target

    def describe(self) -> dict:
        return {"kind": self.kind, "target": self.target}


@dataclass
class AllToAll(Policy):
    """Label d becomes (d + shift) mod num_classes (the paper's speech attack)."""

    num_classes: int = 10
    shift: int = 1
    kind = "all-to-all"

    def target_of(self, y: torch.Tensor) -> torch.Tensor:
        return (y + self.shift) % self.num_classes

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        return self.target_of(y) != y

    def describe(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes, "shift": self.shift}


@dataclass
class SourceSpecific(Policy):
    """Only inputs of the source classes flip to `target` (BadNets' stop sign -> speed limit)."""

    sources: Sequence[int] = (14,)
    target: int = 1
    kind = "source-specific"

    def target_of(self, y: torch.Tensor) -> torch.Tensor:
        src = torch.isin(y, torch.as_tensor(list(self.sources), dtype=y.dtype))
        return torch.where(src, torch.full_like(y, self.target), y)

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        return torch.isin(y, torch.as_tensor(list(self.sources), dtype=y.dtype)) & (y != self.target)

    def describe(self) -> dict:
        return {"kind": self.kind, "sources": list(self.sources), "target": self.target}
