"""A plain, fast training loop shared by the attacker's training and the defender's fine-tuning."""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import stream
from .precision import Precision, make_precision
from .progress import Progress, as_progress
from .runtime import load_checkpoint, run_digest, save_checkpoint

if TYPE_CHECKING:
    from .purify.recipes import Recipe


@dataclass
class TrainConfig:
    """Optimiser settings. `optimizer` is "sgd" (with momentum) or "adam"."""

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" (anneal to 0 over the run) or "constant"
    precision: str = "fp32"  # "fp32", or mixed precision "bf16" / "fp16" (fineprune.precision)
    channels_last: bool = False  # image batches and weights in channels-last layout (speed only)

    def to_dict(self) -> dict:
        """The settings as a dict. Fields added after configs were first hashed (checkpoint run
        keys, stored-model and grid ids) are left out while at their defaults, so those keys stay
        byte-identical for every run that does not use them."""
        d = asdict(self)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d


_LATER_FIELDS = {"precision": "fp32", "channels_last": False}


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_acc: float | None = None
    asr: float | None = None
    seconds: float = 0.0


@dataclass
class TrainHistory:
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0
    diverged: bool = False  # the loss became NaN or infinite: training stopped at that epoch
    lr: float | None = None  # the learning rate of the run kept (the defense's fine-tuning may retry gentler)
    attempts: list[dict] = field(default_factory=list)  # the defense's discarded fine-tuning runs
    selection: str = ""  # why the defense kept this run when a backdoor scan took part in choosing


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', not {cfg.optimizer!r}")


def batches(
    x: torch.Tensor | Dataset, y: torch.Tensor | None, batch_size: int, generator: torch.Generator | None,
    *, workers: int = 0, pin: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of tensors (x, y), or of a Dataset `x` (with `y` None). Tensors are
    sliced by index (much cheaper than a DataLoader); other datasets go through `stream` with the
    same permutation, so a lazy dataset and its TensorDataset give the same batches."""
    n = stream.num_samples(x)
    perm = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if y is None:
        yield from stream.iter_batches(x, batch_size, order=perm, workers=workers, pin=pin)
        return
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


def train_one_epoch(
    model: nn.Module, x: torch.Tensor | Dataset, y: torch.Tensor | None, opt: torch.optim.Optimizer,
    batch_size: int, generator: torch.Generator, device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_batch: Callable[[int], None] | None = None,
    recipe: Recipe | None = None,
    precision: Precision | None = None,
    workers: int = 0,
) -> float:
    """One pass over (x, y), or over the Dataset `x` when `y` is None (read by `workers` DataLoader
    processes, see `batches`); returns the mean training loss. `on_batch` gets each batch's size
    (progress within the epoch: an epoch of a real task can take minutes on a CPU). `recipe`
    (`fineprune.purify.recipes`): how a batch is augmented, scored and stepped; None = plain.
    `precision` (`fineprune.precision`): autocast, loss scaling, memory layout; None = fp32."""
    if recipe is None:
        from .purify.recipes import Plain
        recipe = Plain()
    amp = precision if precision is not None else Precision(device_type=torch.device(device).type)
    model.train()
    total, count = 0.0, 0
    for xb, yb in batches(x, y, batch_size, generator, workers=workers, pin=torch.device(device).type == "cuda"):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        xb = amp.batch(recipe.augment(xb, generator))

        def closure(xb=xb, yb=yb) -> torch.Tensor:
            with amp.autocast():
                loss = recipe.batch_loss(model, xb, yb)
            amp.backward(loss)
            return loss

        opt.zero_grad(set_to_none=True)
        loss = recipe.step(model, amp.optimizer(opt), closure)
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * xb.shape[0]
        count += xb.shape[0]
        if on_batch is not None:
            on_batch(xb.shape[0])
    model.eval()
    return total / max(count, 1)


_RECORD_FIELDS = ("train_loss", "val_acc", "asr", "seconds")


def _run_key(model: nn.Module, x: torch.Tensor | Dataset, y: torch.Tensor | None, cfg: TrainConfig, seed: int,
             recipe: Recipe | None = None) -> str | None:
    """What a checkpoint must match to be resumed: settings, seed, recipe, data and starting weights.
    (No recipe and "plain" give the key of a run from before recipes existed.) Data: tensors (x, y),
    or a Dataset `x` with `y` None, keyed by `stream.key_tensors` (a TensorDataset by its tensors,
    so the key is the same as for its (x, y)); None when that dataset has no fingerprint."""
    parts = [x, y] if y is not None else stream.key_tensors(x)
    if parts is None:
        return None
    settings = {"cfg": cfg.to_dict(), "seed": seed}
    if recipe is not None:
        from .purify.recipes import Plain
        if recipe.key_options() != Plain().key_options():
            settings["recipe"] = recipe.key_options()
    return run_digest(settings, (*parts, *model.state_dict().values()))


def _save_checkpoint(path: Path, key: str, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
                     sched, gen: torch.Generator, hist: TrainHistory, best_score: float | None,
                     best_state: dict | None, amp: Precision | None = None, recipe: Recipe | None = None) -> None:
    records = torch.tensor([[float("nan") if getattr(r, f) is None else float(getattr(r, f))
                             for f in _RECORD_FIELDS] for r in hist.epochs], dtype=torch.float64)
    state = {
        "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else {}, "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(), "records": records,
        "best_score": best_score, "best_epoch": hist.best_epoch, "best_state": best_state or {},
    }
    if amp is not None and amp.scaler is not None:  # fp16's loss scale: part of an exact resume
        state["scaler"] = amp.state_dict()
    if recipe is not None and (learned := recipe.state_dict()):  # e.g. a universal perturbation
        state["recipe"] = learned
    save_checkpoint(path, key, state)


def _load_checkpoint(path: Path, key: str, model: nn.Module, opt: torch.optim.Optimizer, sched,
                     gen: torch.Generator, hist: TrainHistory,
                     amp: Precision | None = None, recipe: Recipe | None = None
                     ) -> tuple[int, float | None, dict | None]:
    """Restore everything `_save_checkpoint` wrote (plain data and tensors only: weights_only)."""
    state = load_checkpoint(path, key)
    if recipe is not None:
        recipe.load_state_dict(state.get("recipe", {}))
    if amp is not None:
        amp.load_state_dict(state.get("scaler", {}))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    for i, row in enumerate(state["records"].tolist(), start=1):
        vals = [None if v != v else v for v in row]
        hist.epochs.append(EpochRecord(i, *vals))
    hist.best_epoch = state["best_epoch"]
    return int(state["epoch"]) + 1, state["best_score"], (state["best_state"] or None)


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    device: torch.device,
    seed: int = 0,
    val_fn: Callable[[nn.Module], float] | None = None,
    extra_fn: Callable[[nn.Module], float] | None = None,
    keep_best: bool = False,
    progress: bool | Progress = False,
    desc: str = "train",
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    recipe: Recipe | None = None,
    workers: int = 0,
) -> TrainHistory:
    """Train `model` in place. With `keep_best`, the weights of the epoch with the best `val_fn`
    score are restored at the end (ties go to the later epoch: more training, same validation).

    `checkpoint_path`: after every epoch, the model, optimizer, scheduler, shuffling and torch RNG
    states, the epoch records and the best weights so far are written there atomically (a kill
    leaves the previous epoch's checkpoint intact). With `resume` and an existing checkpoint,
    training continues after its last epoch and ends exactly as an uninterrupted run would; a
    checkpoint from another run (other data, settings or starting weights) is refused.
    `on_epoch` sees each finished epoch's record (progress lines: send them to a `Progress`'s `log`
    so they land above the bar). `progress` (a `Progress`, or True for stderr) shows one bar over
    all epochs' samples. `recipe` (`fineprune.purify.recipes`): the fine-tuning method;
    None or "plain" is the paper's plain training, bit for bit; its `prepare` runs before the first
    epoch (and before a resumed checkpoint is loaded), drawing from the run's seeded generator.
    `data`: any Dataset of (input, label); tensors are sliced in memory, other datasets are read by
    `workers` DataLoader processes in the same shuffled order (`fineprune.data.stream`). A dataset
    without a fingerprint (`stream.fingerprint`) cannot be checkpointed: a warning, no checkpoint."""
    if cfg.epochs < 0:
        raise ValueError("epochs must be >= 0")
    n = stream.num_samples(data)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    model.to(device)
    amp = make_precision(cfg.precision, device, recipe, channels_last=cfg.channels_last)
    opt = make_optimizer(model, cfg)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', not {cfg.schedule!r}")
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        if steps and cfg.schedule == "cosine" else None
    )
    gen = torch.Generator().manual_seed(seed)
    hist = TrainHistory(lr=cfg.lr)
    best_score, best_state = None, None
    t_start = time.perf_counter()
    first = 1
    key = _run_key(model, data, None, cfg, seed, recipe) if checkpoint_path is not None else ""
    if key is None:
        stream.warn_unkeyed("fine-tuning checkpointing and resuming")
        checkpoint_path, key = None, ""
    if recipe is not None:
        recipe.prepare(model, stream.take(data, 2).to(device), gen, data=data)
    if checkpoint_path is not None and resume and Path(checkpoint_path).is_file():
        first, best_score, best_state = _load_checkpoint(Path(checkpoint_path), key, model, opt, sched, gen, hist,
                                                         amp, recipe)
    amp.set_layout(model)
    # One bar over every sample of every epoch, so it moves (with time left) within an epoch too.
    with as_progress(progress).bar(cfg.epochs * n, desc, unit="sample", initial=(first - 1) * n, unit_scale=True,
                                   leave=False, mininterval=0.5) as bar:
        for epoch in range(first, cfg.epochs + 1):
            bar.set_description_str(f"{desc} epoch {epoch}/{cfg.epochs}", refresh=False)
            t0 = time.perf_counter()
            loss = train_one_epoch(model, data, None, opt, cfg.batch_size, gen, device, sched,
                                   on_batch=bar.update, recipe=recipe, workers=workers, precision=amp)
            rec = EpochRecord(epoch=epoch, train_loss=loss)
            if val_fn is not None:
                rec.val_acc = val_fn(model)
            if extra_fn is not None:
                rec.asr = extra_fn(model)
            rec.seconds = time.perf_counter() - t0
            hist.epochs.append(rec)
            if keep_best and rec.val_acc is not None and (best_score is None or rec.val_acc >= best_score):
                best_score, hist.best_epoch = rec.val_acc, epoch
                best_state = copy.deepcopy(model.state_dict())
            if checkpoint_path is not None:
                _save_checkpoint(Path(checkpoint_path), key, epoch, model, opt, sched, gen, hist, best_score,
                                 best_state, amp, recipe)
            if on_epoch is not None:
                on_epoch(rec)
            if not math.isfinite(loss):  # diverged: every later epoch would be NaN too
                hist.diverged = True
                break
    amp.reset_layout(model)
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    hist.seconds = time.perf_counter() - t_start
    return hist
