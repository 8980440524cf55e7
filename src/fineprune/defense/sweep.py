"""Activation statistics and the pruning sweep (accuracy for every number of pruned channels).

The cached sweep runs the network up to the pruned layer once per input, keeps what crosses the
cut, and then evaluates only the head for each k, several k per batch. The same pass gives the
channel statistics. When the model cannot be cut (torch.fx cannot trace it), the fallback runs the
whole masked network for each k. Both apply the identical mask operation to the identical tensor.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .cut import NetworkCut, cut_at
from .mask import apply_keep, clear_mask, set_pruned

log = logging.getLogger(__name__)


@dataclass
class SweepCurve:
    """Metrics after pruning the k lowest-activation channels, for k = 0..C."""

    layer: str
    order: list[int]  # channels in pruning order (increasing mean activation on clean data)
    channel_means: list[float]
    clean_correct: list[int]  # per k
    num_clean: int
    asr_hits: list[int] | None = None  # per k: triggered inputs classified as the attack's label
    robust_hits: list[int] | None = None  # per k: triggered inputs classified as their true label
    num_triggered: int = 0
    mode: str = "cached"  # "cached" or "full"
    seconds: float = 0.0
    triggered_means: list[float] | None = None  # per-channel mean activation on triggered inputs
    extra: dict = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.order)

    @property
    def clean_acc(self) -> list[float]:
        return [c / self.num_clean for c in self.clean_correct]

    @property
    def asr(self) -> list[float] | None:
        if self.asr_hits is None:
            return None
        return [c / self.num_triggered for c in self.asr_hits]

    @property
    def robust_acc(self) -> list[float] | None:
        if self.robust_hits is None:
            return None
        return [c / self.num_triggered for c in self.robust_hits]

    def fractions(self) -> list[float]:
        return [k / self.num_channels for k in range(self.num_channels + 1)]


def _keep_matrix(order: torch.Tensor, ks: range, device: torch.device) -> torch.Tensor:
    """Row i keeps every channel except the first ks[i] of `order`."""
    c = order.numel()
    rank = torch.empty(c, dtype=torch.long)
    rank[order] = torch.arange(c)
    ks_t = torch.tensor(list(ks), dtype=torch.long).unsqueeze(1)
    return (rank.unsqueeze(0) >= ks_t).to(device)


class _Cache:
    """Boundary tensors of one dataset, kept on the compute device."""

    def __init__(self, parts: list[list[torch.Tensor]]) -> None:
        self.values = [torch.cat(col) for col in zip(*parts)] if parts else []

    @property
    def h(self) -> torch.Tensor:
        return self.values[0]


@torch.inference_mode()
def _run_pre(cut: NetworkCut, x: torch.Tensor, batch_size: int, device: torch.device,
             bar: tqdm | None) -> _Cache:
    parts = []
    for i in range(0, x.shape[0], batch_size):
        out = cut.pre(x[i : i + batch_size].to(device))
        parts.append([t for t in out])
        if bar is not None:
            bar.update(min(batch_size, x.shape[0] - i))
    return _Cache(parts)


def channel_means_of(h: torch.Tensor) -> torch.Tensor:
    """Mean over samples and positions of each channel (dim 1), accumulated in float64."""
    dims = [d for d in range(h.dim()) if d != 1]
    return h.double().mean(dim=dims)


@torch.inference_mode()
def _head_counts(
    cut: NetworkCut, cache: _Cache, keep: torch.Tensor, labels: list[torch.Tensor],
    budget_elems: int,
) -> list[torch.Tensor]:
    """For each row of `keep`, how many predictions equal each label tensor in `labels`."""
    n = cache.h.shape[0]
    per_sample = sum(v[0].numel() for v in cache.values)
    k_total = keep.shape[0]
    counts = [torch.zeros(k_total, dtype=torch.long) for _ in labels]
    # Batch several masks per head call, within a memory budget.
    sample_chunk = max(1, min(n, budget_elems // max(per_sample, 1)))
    k_chunk = max(1, budget_elems // max(per_sample * sample_chunk, 1))
    dev_labels = [lab.to(cache.h.device) for lab in labels]
    for s in range(0, n, sample_chunk):
        vals = [v[s : s + sample_chunk] for v in cache.values]
        m = vals[0].shape[0]
        for k0 in range(0, k_total, k_chunk):
            kk = keep[k0 : k0 + k_chunk]
            r = kk.shape[0]
            h = vals[0].unsqueeze(0).expand(r, *vals[0].shape).reshape(r * m, *vals[0].shape[1:])
            keep_rows = kk.repeat_interleave(m, dim=0)
            h = h.masked_fill(~keep_rows.view(r * m, -1, *([1] * (h.dim() - 2))), 0.0)
            rest = [v.unsqueeze(0).expand(r, *v.shape).reshape(r * m, *v.shape[1:]) for v in vals[1:]]
            pred = cut.head(h, *rest).argmax(dim=1).view(r, m)
            for j, lab in enumerate(dev_labels):
                counts[j][k0 : k0 + r] += (pred == lab[s : s + m]).sum(dim=1).cpu()
    return counts


def cached_sweep(
    model: nn.Module,
    layer: str,
    x_clean: torch.Tensor,
    y_clean: torch.Tensor,
    triggered: "TriggeredSet | None" = None,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    budget_mb: float = 256.0,
    progress: bool = False,
    cut: NetworkCut | None = None,
) -> SweepCurve:
    """Sweep k = 0..C with the front of the network run once (see module docstring)."""
    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        cut = cut or cut_at(model, layer)
        total = x_clean.shape[0] + (triggered.x.shape[0] if triggered is not None else 0)
        bar = tqdm(total=total, desc="cache features", unit="img", disable=not progress, leave=False)
        clean = _run_pre(cut, x_clean, batch_size, device, bar)
        trig = _run_pre(cut, triggered.x, batch_size, device, bar) if triggered is not None else None
        bar.close()
        means = channel_means_of(clean.h).cpu()
        order = torch.sort(means, stable=True).indices
        c = order.numel()
        budget = int(budget_mb * 2**20 / 4)
        kbar = tqdm(total=c + 1, desc="sweep", unit="k", disable=not progress, leave=False)
        clean_correct = torch.zeros(c + 1, dtype=torch.long)
        asr_hits = robust_hits = None
        if trig is not None:
            asr_hits = torch.zeros(c + 1, dtype=torch.long)
            robust_hits = torch.zeros(c + 1, dtype=torch.long)
        step = max(1, min(c + 1, 16))
        for k0 in range(0, c + 1, step):
            ks = range(k0, min(c + 1, k0 + step))
            keep = _keep_matrix(order, ks, clean.h.device)
            (cc,) = _head_counts(cut, clean, keep, [y_clean], budget)
            clean_correct[k0 : k0 + len(ks)] = cc
            if trig is not None:
                a, r = _head_counts(cut, trig, keep, [triggered.y_target, triggered.y_true], budget)
                asr_hits[k0 : k0 + len(ks)] = a
                robust_hits[k0 : k0 + len(ks)] = r
            kbar.update(len(ks))
        kbar.close()
        trig_means = channel_means_of(trig.h).cpu().tolist() if trig is not None else None
    finally:
        model.train(was_training)
    return SweepCurve(
        layer=layer, order=order.tolist(), channel_means=means.tolist(),
        clean_correct=clean_correct.tolist(), num_clean=int(y_clean.shape[0]),
        asr_hits=None if asr_hits is None else asr_hits.tolist(),
        robust_hits=None if robust_hits is None else robust_hits.tolist(),
        num_triggered=0 if triggered is None else len(triggered), mode="cached",
        seconds=time.perf_counter() - t0, triggered_means=trig_means,
    )


@torch.inference_mode()
def layer_means(
    model: nn.Module, layer: str, x: torch.Tensor, batch_size: int = 256,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Per-channel mean activation of `layer`'s output over `x`, by a forward hook (one pass)."""
    device = device or next(model.parameters()).device
    module = model.get_submodule(layer)
    total: list[torch.Tensor] = []
    count = [0]

    def hook(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        dims = [d for d in range(o.dim()) if d != 1]
        total.append(o.double().sum(dim=dims))
        count[0] += o.numel() // o.shape[1]

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, x.shape[0], batch_size):
            model(x[i : i + batch_size].to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return (torch.stack(total).sum(0) / count[0]).cpu()


def full_sweep(
    model: nn.Module,
    layer: str,
    x_clean: torch.Tensor,
    y_clean: torch.Tensor,
    triggered: "TriggeredSet | None" = None,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    progress: bool = False,
) -> SweepCurve:
    """The usual protocol: for each k, mask and run the whole network. Slow but always works."""
    from ..evaluation.metrics import predict

    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    means = layer_means(model, layer, x_clean, batch_size, device)
    trig_means = (
        layer_means(model, layer, triggered.x, batch_size, device).tolist()
        if triggered is not None else None
    )
    order = torch.sort(means, stable=True).indices
    c = order.numel()
    clean_correct, asr_hits, robust_hits = [], [], []
    try:
        for k in tqdm(range(c + 1), desc="sweep (full)", unit="k", disable=not progress, leave=False):
            set_pruned(model, layer, order[:k].tolist(), c)
            clean_correct.append(int((predict(model, x_clean, batch_size, device) == y_clean).sum()))
            if triggered is not None:
                p = predict(model, triggered.x, batch_size, device)
                asr_hits.append(int((p == triggered.y_target).sum()))
                robust_hits.append(int((p == triggered.y_true).sum()))
    finally:
        clear_mask(model, layer)
    return SweepCurve(
        layer=layer, order=order.tolist(), channel_means=means.tolist(),
        clean_correct=clean_correct, num_clean=int(y_clean.shape[0]),
        asr_hits=asr_hits if triggered is not None else None,
        robust_hits=robust_hits if triggered is not None else None,
        num_triggered=0 if triggered is None else len(triggered), mode="full",
        seconds=time.perf_counter() - t0, triggered_means=trig_means,
    )


def sweep(
    model: nn.Module, layer: str, x_clean: torch.Tensor, y_clean: torch.Tensor,
    triggered: "TriggeredSet | None" = None, *, mode: str = "auto", batch_size: int = 256,
    device: torch.device | None = None, progress: bool = False, budget_mb: float = 256.0,
) -> SweepCurve:
    """Cached sweep when the model can be cut at `layer`, else the full protocol (`mode="auto"`)."""
    if mode not in ("auto", "cached", "full"):
        raise ValueError(f"sweep mode must be auto, cached or full, not {mode!r}")
    if mode in ("auto", "cached"):
        try:
            cut = cut_at(model, layer)
        except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
            if mode == "cached":
                raise
            log.warning("cannot cut the model at %s (%s); using full forward passes", layer, exc)
        else:
            return cached_sweep(model, layer, x_clean, y_clean, triggered, batch_size=batch_size,
                                device=device, budget_mb=budget_mb, progress=progress, cut=cut)
    return full_sweep(model, layer, x_clean, y_clean, triggered, batch_size=batch_size,
                      device=device, progress=progress)
