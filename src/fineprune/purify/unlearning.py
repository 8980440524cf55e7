"""Adversarial unlearning: find a perturbation that plays the trigger's role on clean inputs, then
train the model to ignore it. Registered as fine-tuning recipes (`purify.recipes`), so they run in
fine-tuning's place in `fine-tune` and `fine-prune`, under the same accuracy guard, learning-rate
ladder, checkpoints and channel masks (the masks are forward hooks, so pruned channels stay zero
in every pass, adversarial ones included).

Perturbation sizes are fractions of each input channel's value range on the clean data (the
range of [0, 1] pixels is 1, so the papers' values carry over; normalised inputs get the same
perturbation in pixel terms). Batch-norm statistics stay frozen while unlearning (the model runs
in eval mode, as SAU's default): adversarial batches in train mode would pull the running
statistics away from clean data, which cost a sketch of SAU 44 points of accuracy on a BN CNN
(purification-notes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..training import TrainConfig
from .recipes import Recipe

# How many clean inputs set the per-channel value range (a seeded, stratified subset).
_RANGE_SAMPLES = 1024


def channel_range(data: Dataset | None, example: torch.Tensor) -> torch.Tensor:
    """Per-channel (max - min) of the clean inputs, shaped (1, C, 1, ...) on `example`'s device:
    the unit perturbation sizes are measured in."""
    from .scan.inputs import channel_box, scan_inputs

    x = example if data is None else scan_inputs(data, _RANGE_SAMPLES, seed=0)[0]
    lo, hi = channel_box(x.float())
    return (hi - lo).to(example.device)


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@dataclass
class _Unlearning(Recipe):
    """Shared by the unlearning recipes: their own optimizer settings (`config`), the frozen
    received model (`reference`), the inputs' value range, eval-mode passes."""

    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    train_mode: bool = False  # True: batch-norm statistics follow the (clean and adversarial) batches
    reference: nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    scale: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer not in ("sgd", "adam") or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"needs optimizer sgd or adam, lr > 0, weight_decay >= 0; got {self.options()}")

    def config(self, cfg: TrainConfig) -> TrainConfig:
        """The method's own optimizer, learning rate and weight decay replace fine-tuning's."""
        return replace(cfg, optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay)

    def prepare(self, model: nn.Module, example: torch.Tensor, generator: torch.Generator,
                data: Dataset | None = None) -> None:
        super().prepare(model, example, generator, data)
        self.reference = _frozen_copy(model)
        self.scale = channel_range(data, example)

    def _ready(self) -> tuple[nn.Module, torch.Tensor]:
        if self.reference is None or self.scale is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(model, ...) must run before training")
        return self.reference, self.scale


@dataclass
class SAU(_Unlearning):
    """Shared adversarial unlearning (Wei et al., "Shared Adversarial Unlearning: Backdoor
    Mitigation by Unlearning Shared Adversarial Examples", NeurIPS 2023). Per batch, `steps`
    L-inf PGD sign steps (`step_size` each, within `eps`, both as fractions of each channel's range,
    starting at +eps) find perturbations that fool both the received (frozen) model and the
    current one into the same wrong label: it minimises `beta_adv` * (minus the cross-entropy of
    whichever model is not yet fooled) + `beta_shared` * (Jensen-Shannon divergence of the two
    models' outputs where they do not yet share a wrong label). The model then trains on the clean
    cross-entropy + `shared` * (minus log of one minus its probability of the received model's
    adversarial label, on the inputs the received model is fooled on) + `adversarial` * the
    cross-entropy of the perturbed inputs. Defaults: the authors' BackdoorBench configuration
    (eps 0.2, step 0.2, 5 steps, beta 0.01 and 1, weights 1 / 0 / 1, Adam 1e-4, BN frozen)."""

    name: ClassVar[str] = "sau"
    eps: float = 0.2
    step_size: float = 0.2
    steps: int = 5
    beta_adv: float = 0.01
    beta_shared: float = 1.0
    shared: float = 1.0
    adversarial: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.eps > 0 and self.step_size > 0 and self.steps >= 1 and self.shared >= 0 and self.adversarial >= 0):
            raise ValueError(f"needs eps, step_size > 0, steps >= 1, shared, adversarial >= 0; got {self.options()}")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Shared adversarial perturbations of the batch (model in eval mode, its parameters'
        gradients untouched)."""
        ref, scale = self._ready()
        bound = self.eps * scale
        with torch.no_grad():
            clean_pred, clean_pred_ref = model(x).argmax(1), ref(x).argmax(1)
        delta = bound.expand_as(x).clone().requires_grad_(True)
        n = x.shape[0]
        for _ in range(self.steps):
            logits, logits_ref = model(x + delta), ref(x + delta)
            pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
            fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
            shared = fooled & fooled_ref & (pred == pred_ref)
            if bool(shared.all()):
                break
            ce = F.cross_entropy(logits.float(), y, reduction="none")
            ce_ref = F.cross_entropy(logits_ref.float(), y, reduction="none")
            loss_adv = -((ce * ~fooled).sum() + (ce_ref * ~fooled_ref).sum()) / (2 * n)
            p = F.softmax(logits.float(), 1).clamp_min(1e-8)
            q = F.softmax(logits_ref.float(), 1).clamp_min(1e-8)
            m = 0.5 * (p + q)
            js = 0.5 * (p * (p / m).log() + q * (q / m).log()).sum(1)
            loss = self.beta_adv * loss_adv + self.beta_shared * (js * ~shared).sum() / n
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= self.step_size * scale * grad.sign()
                delta.copy_(torch.maximum(torch.minimum(delta, bound), -bound))
        return delta.detach()

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ref, _ = self._ready()
        was_training = model.training
        model.eval()
        delta = self.perturb(model, x, y)
        model.train(self.train_mode and was_training)
        try:
            logits, adv_logits = model(torch.cat([x, x + delta])).split(x.shape[0])
        finally:
            model.train(was_training)
        with torch.no_grad():
            ref_clean, ref_adv = ref(x).argmax(1), ref(x + delta).argmax(1)
        loss = self.loss(model, logits, y)
        if self.adversarial:
            loss = loss + self.adversarial * F.cross_entropy(adv_logits, y)
        suspect = (ref_adv != y) & (ref_adv != ref_clean)  # the received model is fooled there
        if self.shared and bool(suspect.any()):
            p_adv = F.softmax(adv_logits.float(), 1).gather(1, ref_adv[:, None])[:, 0][suspect]
            loss = loss - self.shared * torch.log(1 + 1e-6 - p_adv.clamp(0.001, 0.999)).sum() / x.shape[0]
        return loss + self.distillation(x, logits) if self.distill else loss


@dataclass
class IBAU(_Unlearning):
    """Universal-perturbation unlearning in the style of i-BAU (Zeng et al., "Adversarial
    Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022): one perturbation for all
    inputs plays the trigger's role (a backdoor is one universal shortcut), and the model learns to
    classify perturbed clean inputs correctly. Per batch, `inner_steps` sign-ascent steps of size
    `step_size` (fractions of each channel's range) move the universal perturbation toward higher
    cross-entropy, within `eps`; it persists across batches and epochs (the inner maximisation,
    warm-started: i-BAU re-solves it each round) and is saved with the checkpoints. The model then
    trains on the perturbed inputs' cross-entropy (i-BAU's outer loss) plus `clean` times the clean
    one. Where we differ, and why: i-BAU differentiates through the inner solution (implicit
    hypergradient, 5 fixed-point iterations); here its gradient is the first-order one (the
    perturbation taken as fixed), and the perturbation is bounded (eps 0.2, SAU's box) instead of
    L2-penalised, so its size does not depend on the input scaling. Adam 1e-4 as in BackdoorBench's
    i-BAU configuration."""

    name: ClassVar[str] = "i-bau"
    eps: float = 0.2
    step_size: float = 0.05
    inner_steps: int = 5
    clean: float = 1.0
    delta: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.eps > 0 and self.step_size > 0 and self.inner_steps >= 1 and self.clean >= 0):
            raise ValueError(f"needs eps, step_size > 0, inner_steps >= 1, clean >= 0; got {self.options()}")

    def prepare(self, model: nn.Module, example: torch.Tensor, generator: torch.Generator,
                data: Dataset | None = None) -> None:
        super().prepare(model, example, generator, data)
        self.delta = torch.zeros_like(example[:1], dtype=torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.delta is None else {"delta": self.delta.detach().cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "delta" in state and self.delta is not None:
            self.delta = state["delta"].to(self.delta.device, self.delta.dtype)

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, scale = self._ready()
        bound = self.eps * scale[:1]
        was_training = model.training
        model.eval()
        delta = self.delta.clone().requires_grad_(True)
        for _ in range(self.inner_steps):
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta).float(), y), delta)
            with torch.no_grad():
                delta += self.step_size * scale[:1] * grad.sign()
                delta.copy_(torch.maximum(torch.minimum(delta, bound), -bound))
        self.delta = delta.detach()
        model.train(self.train_mode and was_training)
        try:
            logits, adv_logits = model(torch.cat([x, x + self.delta])).split(x.shape[0])
        finally:
            model.train(was_training)
        loss = self.loss(model, adv_logits, y)
        if self.clean:
            loss = loss + self.clean * self.loss(model, logits, y)
        return loss + self.distillation(x, logits) if self.distill else loss
