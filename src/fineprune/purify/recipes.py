"""Fine-tuning recipes for the defender's second stage, registered methods of the family
"recipe" (`purify.registry`; a spec such as `ft-sam,rho=8` picks one with its options).

A recipe is the part of one training step that differs between fine-tuning methods; the loop in
`fineprune.training` calls its hooks: `prepare(model, example, generator)` once before the first
epoch, then per training batch `augment(x, generator)`, `loss(model, logits, y)` (inside the
closure) and `step(model, opt, closure)`. Every recipe runs the model's ordinary forward, so the
defense's channel masks (forward hooks, `defense.mask`) keep pruned channels exactly zero. Random
draws come from the run's seeded generator only: same seed, same weights.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..training import TrainConfig
from .registry import Method

Closure = Callable[[], torch.Tensor]


def augment_batch(x: torch.Tensor, generator: torch.Generator, flip: bool = False) -> torch.Tensor:
    """Per-sample augmentation. Images (N, C, H, W): random crop of the zero-padded image
    (pad = max(1, H // 8)), then a horizontal flip with probability 1/2 only when `flip`.
    Audio (N, C, T): random time shift of up to T // 10 samples (zero-filled), then a random
    gain in U[0.8, 1.2]. Random numbers are drawn on the CPU from `generator`."""
    n, dev = x.shape[0], x.device
    if x.dim() == 4:
        h, w = x.shape[2], x.shape[3]
        p = max(1, h // 8)
        off = torch.randint(0, 2 * p + 1, (2, n), generator=generator).to(dev)
        rows = (off[0][:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(w, device=dev))[:, None, None, :]
        out = F.pad(x, (p, p, p, p))[torch.arange(n, device=dev)[:, None, None, None],
                                     torch.arange(x.shape[1], device=dev)[None, :, None, None], rows, cols]
        if flip:
            mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
            out = torch.where(mask[:, None, None, None], out.flip(3), out)
        return out
    if x.dim() == 3:
        t = x.shape[2]
        m = t // 10
        shift = torch.randint(-m, m + 1, (n,), generator=generator).to(dev)
        idx = ((m - shift)[:, None] + torch.arange(t, device=dev))[:, None, :]
        out = F.pad(x, (m, m))[torch.arange(n, device=dev)[:, None, None],
                               torch.arange(x.shape[1], device=dev)[None, :, None], idx]
        gain = (0.8 + 0.4 * torch.rand(n, generator=generator)).to(device=dev, dtype=x.dtype)
        return out * gain[:, None, None]
    raise ValueError(f"augmentation handles images (N, C, H, W) and audio (N, C, T), not shape {tuple(x.shape)}")


@dataclass
class Recipe(Method, family="recipe"):
    """Base recipe = plain fine-tuning. `augmentation` turns on `augment_batch` for training
    batches (`flip` allows horizontal flips: leave it off for text, digits and signs);
    `label_smoothing` is passed to the cross-entropy.

    Distillation, an option of every recipe (`distill` > 0): the model fine-tuning starts from
    (the received model, pruned in fine-pruning) is the teacher on the same clean, augmented
    inputs, and `distill` * T^2 * KL(teacher || student) at temperature T = `temperature` joins the
    loss (Hinton et al., 2015), so the clean function is kept while the rest of the loss removes
    the backdoor. T = 4 and weight 1 are what brought FST on the natural-image hold-out from -6.8 to
    -2.8 points of accuracy (purification-notes); off by default (the papers' recipes have none).

    A recipe's training step is `batch_loss` (forward and loss of one batch) inside `step`
    (backward and optimizer step); `config` may replace fine-tuning settings with the method's own
    (an unlearning method's optimizer and learning rate); `state_dict` holds whatever the recipe
    learns during training that a resumed run must restore."""

    # The paper's fine-tuning. What chose it: the paper; the real-task comparison (BENCHMARKS,
    # "Purification on the real tasks") has not yet found a recipe with a better worst case.
    default_spec: ClassVar[str] = "plain"
    paper_spec: ClassVar[str] = "plain"  # the paper's (Liu et al., RAID 2018)
    # Whether `step` works under fp16 loss scaling: True when it only runs the closure and calls
    # opt.step() (which the scaler wraps); False when it uses the raw gradients itself.
    grad_scaler: ClassVar[bool] = True
    augmentation: bool = False
    flip: bool = False
    label_smoothing: float = 0.0
    distill: float = 0.0
    temperature: float = 4.0
    teacher: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def prepare(self, model: nn.Module, example: torch.Tensor, generator: torch.Generator,
                data: Dataset | None = None) -> None:
        """Called once before training, and before a resumed checkpoint is loaded, so what it
        keeps is the starting model's (`example`: a training batch on the model's device; `data`:
        the training set, for methods that must look at it first)."""
        if self.distill > 0:
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def __post_init__(self) -> None:
        if not (self.distill >= 0 and self.temperature > 0 and 0 <= self.label_smoothing < 1):
            raise ValueError(f"needs distill >= 0, temperature > 0 and 0 <= label_smoothing < 1; got "
                             f"{self.distill}, {self.temperature}, {self.label_smoothing}")

    def key_options(self) -> dict:
        """`options()` as a training checkpoint's key holds it: without the distillation options
        while distillation is off, so runs from before they existed keep their keys."""
        opts = self.options()
        if not self.distill:
            opts.pop("distill", None), opts.pop("temperature", None)
        return opts

    def config(self, cfg: TrainConfig) -> TrainConfig:
        """The fine-tuning settings this recipe trains with (by default `cfg` unchanged)."""
        return cfg

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the recipe learned during training (a resumed run restores it); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`'s values."""

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one (augmented) training batch: `loss` of the model's logits, plus the
        distillation term when on. Methods that need the inputs themselves override this."""
        logits = model(x)
        loss = self.loss(model, logits, y)
        return loss + self.distillation(x, logits) if self.distill else loss

    def distillation(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | float:
        """`distill` * T^2 * KL(teacher(x) / T || logits / T), 0 when off."""
        if not self.distill:
            return 0.0
        if self.teacher is None:
            raise RuntimeError("prepare(model, ...) must run before training with distillation")
        with torch.no_grad():
            target = F.log_softmax(self.teacher(x).float() / self.temperature, dim=1)
        student = F.log_softmax(logits.float() / self.temperature, dim=1)
        kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
        return self.distill * self.temperature ** 2 * kl

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment_batch(x, generator, self.flip) if self.augmentation else x

    def loss(self, model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def step(self, model: nn.Module, opt: torch.optim.Optimizer, closure: Closure) -> torch.Tensor:
        """Gradients are zero on entry; `closure` runs forward, loss and backward and returns the
        loss. Returns the batch's training loss."""
        loss = closure()
        opt.step()
        return loss


@dataclass
class Plain(Recipe):
    """The paper's fine-tuning (Liu et al., "Fine-Pruning", RAID 2018): cross-entropy, one
    backward, one optimizer step. Numerically identical to the training loop without a recipe."""

    name: ClassVar[str] = "plain"


@dataclass
class Augment(Recipe):
    """Plain fine-tuning on augmented batches (standard crop/flip augmentation, e.g. He et al.
    CVPR 2016; time shift and gain for audio), see `augment_batch`. Flips only with `flip=True`."""

    name: ClassVar[str] = "augment"
    augmentation: bool = True


@dataclass
class FTSAM(Recipe):
    """FT-SAM (Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
    Minimization", ICCV 2023): fine-tune with SAM (Foret et al., ICLR 2021). Per batch: gradient g
    at w; move to w + e with e = rho * T^2 g / ||T g|| (adaptive SAM, ASAM, Kwon et al. ICML 2021:
    T = |w|; plain SAM: T = 1); gradient at w + e (batch-norm running statistics frozen for that
    pass); back to w; the base optimizer steps with the second gradient. Loss: cross-entropy with
    label smoothing 0.1.

    Defaults follow the FT-SAM reference configuration in BackdoorBench (config/defense/ft-sam,
    CIFAR-10: rho 2.0, label smoothing 0.1; GTSRB uses rho 8.0): the method relies on a large,
    scale-invariant (adaptive) perturbation to push the model out of the backdoor's sharp region;
    rho = 2.0 is also ASAM's recommended CIFAR value. With `adaptive=False` use a SAM-sized rho
    (Foret et al.: 0.05)."""

    name: ClassVar[str] = "ft-sam"
    grad_scaler: ClassVar[bool] = False  # the perturbation is computed from the (scaled) raw gradients
    label_smoothing: float = 0.1
    rho: float = 2.0
    adaptive: bool = True

    def step(self, model: nn.Module, opt: torch.optim.Optimizer, closure: Closure) -> torch.Tensor:
        loss = closure()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            scaled = [(p.abs() * p.grad) if self.adaptive else p.grad for p in params]
            norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2) if scaled else torch.tensor(0.0)
            scale = self.rho / (float(norm) + 1e-12)
            eps = [(p.abs() * s if self.adaptive else s) * scale for p, s in zip(params, scaled)]
            for p, e in zip(params, eps):
                p.add_(e)
        opt.zero_grad(set_to_none=True)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in bns]
        for m in bns:
            m.momentum = 0.0  # running stats stay as after the first pass
        try:
            closure()
        finally:
            for m, (mom, nbt) in zip(bns, saved):
                m.momentum = mom
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
        opt.step()
        return loss


def classifier_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """The last nn.Linear (in module order) with `num_classes` outputs."""
    head = None
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            head = m
    if head is None:
        raise ValueError(f"no nn.Linear layer with {num_classes} outputs (the classifier head) in the model")
    return head


@dataclass
class FST(Recipe):
    """Feature Shift Tuning (Min et al., "Towards Stable Backdoor Purification through Feature
    Shift Tuning", NeurIPS 2023). Before tuning, the classifier head (last nn.Linear with one
    output per class) is re-initialised (U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight and bias, as
    in the authors' code) and its weight rescaled to the original weight's Frobenius norm. Loss:
    cross-entropy + alpha * <W, W_orig> (the head weight's inner product with the original one),
    pushing the head, and so the features, away from the backdoored solution; after every step W
    is rescaled back to the original norm. alpha = 0.2 is the default of the official
    implementation (AISafety-HKUST/stable_backdoor_purification, fine_tune/fst.py)."""

    name: ClassVar[str] = "fst"
    alpha: float = 0.2
    head: nn.Linear | None = field(default=None, init=False, repr=False, compare=False)
    w_orig: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    norm: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def prepare(self, model: nn.Module, example: torch.Tensor, generator: torch.Generator,
                data: Dataset | None = None) -> None:
        super().prepare(model, example, generator, data)  # the teacher (distillation) is the model as received
        was_training = model.training
        model.eval()
        with torch.no_grad():
            num_classes = model(example).shape[-1]
        model.train(was_training)
        head = classifier_head(model, num_classes)
        w = head.weight
        self.head, self.w_orig = head, w.detach().clone()
        self.norm = self.w_orig.norm()
        bound = 1.0 / math.sqrt(w.shape[1])
        with torch.no_grad():
            new = ((torch.rand(w.shape, generator=generator, dtype=w.dtype) * 2 - 1) * bound).to(w.device)
            w.copy_(new * (self.norm / new.norm().clamp_min(1e-12)))
            if head.bias is not None:
                b = (torch.rand(head.bias.shape, generator=generator, dtype=w.dtype) * 2 - 1) * bound
                head.bias.copy_(b.to(w.device))

    def _ready(self) -> nn.Linear:
        if self.head is None or self.w_orig is None:
            raise RuntimeError("FST.prepare(model, ...) must run before training")
        return self.head

    def loss(self, model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        head = self._ready()
        return super().loss(model, logits, y) + self.alpha * torch.sum(head.weight * self.w_orig)

    def step(self, model: nn.Module, opt: torch.optim.Optimizer, closure: Closure) -> torch.Tensor:
        head = self._ready()
        loss = super().step(model, opt, closure)
        with torch.no_grad():
            head.weight.mul_(self.norm / head.weight.norm().clamp_min(1e-12))
        return loss
