"""The paper's pruning-aware attack: hide the backdoor in channels the defender will keep.

1. train on clean data; 2. prune the channels that are dormant on clean data, with the defender's
own ranking and stop rule; 3. train the pruned network on poisoned data, so the backdoor is written
into the surviving channels; 4. reinstate the pruned channels as decoys whose bias is lowered so
they never fire (on clean and triggered inputs alike), giving back the original architecture;
5. if the model misses its accuracy or ASR target, train the backdoor longer and report it.
The attacker then checks its work as the defender would (pruning on its own validation data) and,
if the backdoor does not survive, starts again from step 2 with more aggressive pruning.

The paper's step 5 instead *adds neurons* when accuracy or the backdoor is weak: `widen=N` adds N
channels to the pruned layer (see `attack.widen`) before the backdoor is trained into the pruned
net, decided up front (so the recipe fixes the architecture). The result is no longer the built-in
architecture: `PruningAwareResult.widen` records what was added, and a loader rebuilds it with
`widen_layer` on a fresh model.

`val_data` is the attacker's own clean validation data. It chooses (the pruning, the rounds, the
simulated defender) and must be held out of `train_data`, as the defender's validation data is
held out of what it fine-tunes on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..data.types import tensors
from ..defense.api import DEFAULT_THRESHOLD, Pruning, RunOptions
from ..defense.layer import producer_chain
from ..defense.mask import clear_mask
from ..evaluation.metrics import accuracy, attack_metrics
from ..runtime import pick_device
from ..training import TrainConfig, train
from .badnets import BadNets
from .widen import widen_layer

RELU_TYPES = (nn.ReLU, nn.ReLU6)


@dataclass
class PruningAwareResult:
    """The backdoored model (original architecture, decoys in place) and how it was made."""

    model: nn.Module
    layer: str
    decoys: list[int]
    bias_param: str
    clean_val_acc: float
    val_acc: float
    val_asr: float
    rounds: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    attacker_threshold: float = DEFAULT_THRESHOLD  # the stop rule the attacker pruned with (see `escalate`)
    survival_asr: float | None = None  # attacker-val ASR after the simulated defender's pruning
    attempts: list[dict] = field(default_factory=list)
    widen: dict | None = None  # WidenInfo.to_dict() when the pruned layer was widened (else None)


def decoy_bias(model: nn.Module, example: torch.Tensor, layer: str) -> str:
    """Name of the bias parameter that can switch the layer's channels off: the last per-channel
    bias (conv or BatchNorm) before the ReLU that produces the layer's output."""
    chain = producer_chain(model, example, layer)
    if not chain or not isinstance(chain[-1][1], RELU_TYPES):
        raise ValueError(
            f"the pruning-aware attack needs the pruned layer {layer!r} to be a ReLU output; "
            f"found the chain {[type(m).__name__ for _, m in chain]}"
        )
    for name, module in reversed(chain[:-1]):
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.dim() == 1:
            return f"{name}.bias"
    raise ValueError(f"no per-channel bias before the ReLU of {layer!r} to lower")


@dataclass
class PruningAwareAttack:
    """Steps 2-5 of the attack on a clean model (step 1 is the caller's ordinary training)."""

    badnets: BadNets
    threshold: float = DEFAULT_THRESHOLD
    backdoor: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=5, lr=1e-3, optimizer="adam", weight_decay=0.0, schedule="constant"))
    decoy_value: float = -1e20  # the authors' released model uses -1e20: decoys never fire
    target_asr: float = 0.95
    max_acc_drop: float = 0.02
    max_rounds: int = 3
    layer: str | None = None
    seed: int = 0
    device: str | torch.device | None = None
    progress: bool = False
    # Per-round training checkpoints go to `<checkpoint_prefix>.round<r>` and are resumed when
    # present (each is keyed by its round's data, settings and starting weights, so a stale one is
    # refused, never silently used). The caller deletes them once the result is stored.
    checkpoint_prefix: str | None = None
    # The attacker anticipates the defense: after each attempt it prunes the result as the defender
    # would (its own validation data, the defender's threshold). If the backdoor does not survive
    # (the pruned net still had slack, so the defender went on past the decoys into the channels
    # holding the backdoor), the next attempt prunes the clean net further: threshold + extra.
    escalate: tuple[float, ...] = (0.0, 4.0, 8.0)
    survive_asr: float = 0.8
    # Channels added to the pruned layer before the backdoor is trained (the paper's "add
    # neurons"); 0: none. Raises WidenError for layouts `widen_layer` cannot widen exactly.
    widen: int = 0

    def run(self, clean_model: nn.Module, train_data: TensorDataset, val_data: TensorDataset) -> PruningAwareResult:
        """Attack `clean_model` (not modified) with `val_data` as the attacker's own clean
        validation data. Each attempt prunes with a larger stop-rule threshold (`escalate`), and
        ends with the defender simulated on `val_data`: the first attempt whose backdoor survives
        that pruning (ASR >= `survive_asr`) is returned, else the one whose backdoor survived best.
        `val_data` must not be part of `train_data` (its figures would flatter the attacker)."""
        if self.widen < 0:
            raise ValueError(f"widen must be >= 0, got {self.widen}")
        t0 = time.perf_counter()
        dev = pick_device(self.device)
        trig_val = self.badnets.triggered(val_data)
        best, attempts = None, []
        for i, extra in enumerate(self.escalate):
            res = self._attempt(clean_model, train_data, val_data, trig_val, self.threshold + extra, i, dev)
            sim = Pruning(self.threshold, res.layer).fit(res.model, val_data, trig_val,
                                                         RunOptions(device=dev, seed=self.seed))
            res.survival_asr = float(sim.after.asr)
            attempts.append({"attempt": i + 1, "attacker_threshold": self.threshold + extra,
                             "decoys": len(res.decoys), "rounds": len(res.rounds), "val_acc": res.val_acc,
                             "val_asr": res.val_asr, "defender_pruned_fraction": sim.pruned_fraction,
                             "channels": sim.num_channels,
                             "asr_after_defender_pruning": res.survival_asr})
            if best is None or res.survival_asr > best.survival_asr:
                best = res
            if res.survival_asr >= self.survive_asr:
                break
        best.attempts, best.seconds = attempts, time.perf_counter() - t0
        return best

    def _attempt(self, clean_model: nn.Module, train_data: TensorDataset, val_data: TensorDataset,
                 trig_val, threshold: float, attempt: int, dev: torch.device) -> PruningAwareResult:
        """Steps 2-5 once, pruning the clean model with `threshold` points."""
        pr = Pruning(threshold, self.layer).fit(clean_model, val_data, run=RunOptions(device=dev, seed=self.seed))
        model, layer, decoys = pr.model, pr.layer, list(pr.pruned_channels)
        clean_acc = pr.before.clean_acc
        x, _ = tensors(val_data)
        example = x[:2].to(dev)
        widened = None
        if self.widen:  # new channels at the end, kept (unmasked): the backdoor can grow into them
            widened = widen_layer(model, layer, self.widen, example, seed=self.seed).to_dict()
        poisoned = self.badnets.poison(train_data).dataset
        rounds: list[dict] = []
        total_epochs = 0
        for r in range(self.max_rounds):
            # Each round that misses the target enlarges the backdoor training by another round.
            ckpt = None
            if self.checkpoint_prefix is not None:
                ckpt = f"{self.checkpoint_prefix}.round{r + 1}" + (f".attempt{attempt + 1}" if attempt else "")
            train(model, poisoned, self.backdoor, device=dev, seed=self.seed + r,
                  progress=self.progress, desc=f"backdoor pruned net (round {r + 1})",
                  checkpoint_path=ckpt, resume=ckpt is not None)
            total_epochs += self.backdoor.epochs
            acc = accuracy(model, val_data, dev)
            asr = attack_metrics(model, trig_val, dev)[0]
            rounds.append({"round": r + 1, "total_epochs": total_epochs, "val_acc": acc, "val_asr": asr})
            if asr >= self.target_asr and clean_acc - acc <= self.max_acc_drop:
                break
        # Reinstate the pruned channels as decoys that never fire.
        bias_name = decoy_bias(model, example, layer)
        clear_mask(model, layer)
        with torch.no_grad():
            model.get_parameter(bias_name)[torch.as_tensor(decoys, dtype=torch.long)] = self.decoy_value
        return PruningAwareResult(
            model=model, layer=layer, decoys=decoys, bias_param=bias_name, clean_val_acc=clean_acc,
            val_acc=accuracy(model, val_data, dev), val_asr=attack_metrics(model, trig_val, dev)[0],
            rounds=rounds, attacker_threshold=threshold, widen=widened,
        )
