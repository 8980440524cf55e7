"""BadNets data poisoning: stamp a trigger on a fraction of the training inputs and relabel them.

Trigger, policy and dataset stay separate: any Trigger, any Policy, any TensorDataset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from ..data.types import make_dataset, tensors
from ..evaluation.metrics import TriggeredSet
from .policy import Policy
from .triggers import Trigger


@dataclass
class Poisoned:
    """The poisoned training set and which of its rows carry the trigger."""

    dataset: TensorDataset
    poisoned_rows: torch.Tensor
    source_indices: torch.Tensor  # rows of the clean set the poisoned samples were made from


@dataclass
class BadNets:
    """`rate` is the fraction of the training set that is poisoned, drawn (seeded) from the inputs
    the policy applies to. `mode="replace"` stamps those inputs in place; `mode="add"` appends
    stamped copies and keeps the originals (as BadNets did for traffic signs)."""

    trigger: Trigger
    policy: Policy
    rate: float = 0.1
    mode: str = "replace"
    seed: int = 0

    def poison(self, data: TensorDataset) -> Poisoned:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"poisoning rate must be in [0, 1], got {self.rate}")
        if self.mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', not {self.mode!r}")
        x, y = tensors(data)
        candidates = torch.nonzero(self.policy.eligible(y)).flatten()
        n_poison = int(round(self.rate * x.shape[0]))
        if n_poison > candidates.numel():
            raise ValueError(
                f"cannot poison {n_poison} inputs: only {candidates.numel()} are eligible under "
                f"{self.policy.describe()}"
            )
        g = torch.Generator().manual_seed(self.seed)
        chosen = torch.sort(candidates[torch.randperm(candidates.numel(), generator=g)[:n_poison]]).values
        stamped = self.trigger.apply(x[chosen])
        relabelled = self.policy.target_of(y[chosen])
        if self.mode == "replace":
            x2, y2 = x.clone(), y.clone()
            x2[chosen], y2[chosen] = stamped, relabelled
            rows = chosen
        else:
            x2, y2 = torch.cat([x, stamped]), torch.cat([y, relabelled])
            rows = torch.arange(x.shape[0], x.shape[0] + n_poison)
        return Poisoned(make_dataset(x2, y2), rows, chosen)

    def triggered(self, data: TensorDataset) -> TriggeredSet:
        """Triggered copies of the inputs the attack applies to, for measuring ASR."""
        x, y = tensors(data)
        keep = self.policy.eligible(y)
        return TriggeredSet(self.trigger.apply(x[keep]), y[keep], self.policy.target_of(y[keep]))

    def describe(self) -> dict:
        return {"attack": "badnets", "trigger": self.trigger.name, "rate": self.rate,
                "mode": self.mode, "seed": self.seed, **self.policy.describe()}
