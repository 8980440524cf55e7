"""Activation statistics and the pruning sweep (accuracy for every number of pruned channels).

The cached sweep runs the network up to the pruned layer once per input, keeps what crosses the
cut (after the head's zero-preserving channel-wise prefix, e.g. a max-pool: see `head_plan`), and
then evaluates only the head for each k: incrementally when the head starts with a Linear layer,
else several k per batch of the exact head. The same pass gives the channel statistics. With
`max_cache_mb`, what does not fit is recomputed chunk by chunk after the ranking pass instead of
being kept. When the model cannot be cut (torch.fx cannot trace it), the fallback runs the whole
masked network for each k. All paths give the predictions of the masked full network.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .cut import NetworkCut, cut_at
from . import error_bounds as eb
from .head_plan import HeadPlan, plan_head
from .mask import clear_mask, set_pruned

log = logging.getLogger(__name__)

# Elements per step-chunk of the incremental path: small enough to stay in cache (measured).
_FAST_CHUNK_ELEMS = 2**22
# Above this share of (k, sample) pairs needing the exact head, the rest of a chunk goes exact.
_MAX_UNSURE = 0.5


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


def channel_means_of(h: torch.Tensor) -> torch.Tensor:
    """Mean over samples and positions of each channel (dim 1), accumulated in float64."""
    dims = [d for d in range(h.dim()) if d != 1]
    return h.double().mean(dim=dims)


def _channel_sums(h: torch.Tensor) -> torch.Tensor:
    """Per-channel float64 sum of one batch: summed per batch in batch order, exactly as
    `layer_means` does, so the cached and the full sweep rank channels identically."""
    return h.double().sum(dim=[d for d in range(h.dim()) if d != 1])


def _nbytes(values: list[torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in values)


def _masked(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`p` (..., C, *spatial) with channels where `keep` (..., C) is False set to exactly zero
    (even Inf/NaN), broadcasting the leading dims: one pass, no intermediate copy."""
    spatial = p.dim() - keep.dim()
    return torch.where(keep.view(*keep.shape, *([1] * spatial)), p, 0.0)


class _Counter:
    """Per-k counts of predictions equal to each label tensor, over parts of a data set."""

    def __init__(self, plan: HeadPlan, order: torch.Tensor, num_labels: int, budget_elems: int,
                 device: torch.device, fast: bool) -> None:
        self.plan = plan
        c = order.numel()
        self.order = order.to(device)
        self.keep = _keep_matrix(order, range(c + 1), device)  # row k keeps all but order[:k]
        self.counts = [torch.zeros(c + 1, dtype=torch.long, device=device) for _ in range(num_labels)]
        self.budget = budget_elems
        self.fast = fast and plan.fast is not None
        self.recomputed = 0  # (k, sample) pairs of the fast path re-run with the exact head
        self.evaluated = 0
        self.fast_samples = 0
        self._unsure_rate = 0.0

    @torch.inference_mode()
    def add(self, values: list[torch.Tensor], labels: list[torch.Tensor]) -> None:
        if values[0].shape[0] == 0:
            return
        labels = [lab.to(values[0].device) for lab in labels]
        if self.fast and self.plan.fast.applies_to(values[0]):
            self._add_fast(values[0], labels)
            self.fast_samples += values[0].shape[0]
        else:
            self._add_exact(values, labels)

    def result(self) -> list[list[int]]:
        return [c.cpu().tolist() for c in self.counts]

    def _tally(self, k0: int, pred: torch.Tensor, labels: list[torch.Tensor]) -> None:
        for j, lab in enumerate(labels):
            self.counts[j][k0 : k0 + pred.shape[0]] += (pred == lab).sum(dim=1)

    def _add_exact(self, values: list[torch.Tensor], labels: list[torch.Tensor],
                   k_stop: int | None = None) -> None:
        """Several masks per head call: (k, sample) pairs stacked into one batch (k < k_stop)."""
        n = values[0].shape[0]
        k_total = self.keep.shape[0] if k_stop is None else k_stop
        per_sample = max(1, sum(v[0].numel() for v in values))
        m_chunk = max(1, min(n, self.budget // per_sample))
        k_chunk = max(1, self.budget // (per_sample * m_chunk))
        for s in range(0, n, m_chunk):
            vals = [v[s : s + m_chunk] for v in values]
            m = vals[0].shape[0]
            for k0 in range(0, k_total, k_chunk):
                kk = self.keep[k0 : min(k_total, k0 + k_chunk)]
                r = kk.shape[0]
                p = _masked(vals[0].unsqueeze(0), kk.unsqueeze(1)).view(r * m, *vals[0].shape[1:])
                rest = [v.unsqueeze(0).expand(r, *v.shape).reshape(r * m, *v.shape[1:]) for v in vals[1:]]
                pred = self.plan.body(p, *rest).argmax(dim=1).view(r, m)
                self._tally(k0, pred, [lab[s : s + m] for lab in labels])
                self.evaluated += r * m

    def _add_fast(self, p: torch.Tensor, labels: list[torch.Tensor]) -> None:
        """Frontier outputs for k from those for k+1 plus channel order[k]'s share, k = C..0."""
        fast = self.plan.fast
        n, c = p.shape[0], p.shape[1]
        shapes = [f.full(p[:1]).shape[1:] for f in fast.frontier]
        width = sum(math.prod(sh) for sh in shapes)
        m_chunk = max(1, min(n, self.budget // (4 * (p[0].numel() + 4 * width))))
        for a in range(0, n, m_chunk):
            pa = p[a : a + m_chunk]
            m = pa.shape[0]
            labs = [lab[a : a + m] for lab in labels]
            bound = fast.logit_bound(pa)
            zs = [f.empty(pa.new_empty(m, *sh)) for f, sh in zip(fast.frontier, shapes)]
            ts = [f.empty(z, absolute=True) for f, z in zip(fast.frontier, zs)]
            self._fast_steps(torch.tensor([c]), [z.unsqueeze(0).clone() for z in zs],
                             [t.unsqueeze(0) for t in ts], bound, pa, labs)
            k_chunk = max(1, min(c, min(self.budget, _FAST_CHUNK_ELEMS) // (m * (6 * width + 8))))
            for j1 in range(c, 0, -k_chunk):
                if self._unsure_rate > _MAX_UNSURE:  # margins too small for the bound: exact is cheaper
                    self._add_exact([pa], labs, k_stop=j1)
                    break
                j0 = max(0, j1 - k_chunk)
                ks = torch.arange(j1 - 1, j0 - 1, -1)  # row i of this chunk is k = j1-1-i
                idx = self.order[ks.to(self.order.device)]
                zks = [_accumulate(z, f.contributions(pa, idx)) for f, z in zip(fast.frontier, zs)]
                tks = [_accumulate(t, f.contributions(pa, idx, absolute=True))
                       for f, t in zip(fast.frontier, ts)]
                zs, ts = [zk[-1] for zk in zks], [tk[-1] for tk in tks]
                if fast.tail_in_place:
                    zs = [z.clone() for z in zs]
                self._fast_steps(ks, zks, tks, bound, pa, labs)

    def _fast_steps(self, ks: torch.Tensor, zks: list[torch.Tensor], tks: list[torch.Tensor],
                    bound: torch.Tensor, p: torch.Tensor, labels: list[torch.Tensor]) -> None:
        """Predictions for k = ks[i] from frontier outputs zks[.][i] (r, m, ...), their T_k in
        tks; pairs whose margin the rounding bound cannot certify are recomputed exactly."""
        r, m = zks[0].shape[0], zks[0].shape[1]
        logits = self.plan.fast.tail(*[z.reshape(r * m, *z.shape[2:]) for z in zks])
        if logits.shape[1] < 2:
            pred = torch.zeros(r * m, dtype=torch.long, device=logits.device)
            pairs = torch.nonzero(~torch.isfinite(logits).all(dim=1)).flatten()
        else:
            top = logits.topk(2, dim=1)
            pred = top.indices[:, 0]
            pairs = torch.nonzero(eb.unsure(top.values, pred, bound)).flatten()
            if pairs.numel():  # second chance with each pair's own, smaller T_k
                t_pairs = [t.reshape(r * m, *t.shape[2:])[pairs] for t in tks]
                d = self.plan.fast.logit_bound_at(t_pairs, p.shape[1])
                pairs = pairs[eb.unsure(top.values[pairs], pred[pairs], d)]
        self._unsure_rate = pairs.numel() / max(1, r * m)
        ks_dev = ks.to(pred.device)
        if pairs.numel():
            self.recomputed += pairs.numel()
            step = max(1, self.budget // max(1, p[0].numel()))
            for i in range(0, pairs.numel(), step):
                q = pairs[i : i + step]
                rows = q % m
                pred[q] = self.plan.body(_masked(p[rows], self.keep[ks_dev[q // m]])).argmax(dim=1)
        self.evaluated += r * m
        pred = pred.view(r, m)
        for j, lab in enumerate(labels):
            self.counts[j].index_add_(0, ks_dev, (pred == lab).sum(dim=1))


def _accumulate(start: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """In place: row i = start + shares[0] + ... + shares[i] (one pass, sums in that order)."""
    shares[0] += start
    for i in range(1, shares.shape[0]):
        shares[i] += shares[i - 1]
    return shares


@dataclass
class _Data:
    """One data set to sweep: inputs, the label tensors to count against, and its progress."""

    x: torch.Tensor
    labels: list[torch.Tensor]
    sums: list[torch.Tensor] = field(default_factory=list)
    stored: list[torch.Tensor] | None = None  # prefixed boundary of samples [0, n_stored)
    n_stored: int = 0


class _Front:
    """Runs the network's front and the head's prefix batch by batch."""

    def __init__(self, cut: NetworkCut, plan: HeadPlan, batch_size: int, device: torch.device,
                 bar: tqdm) -> None:
        self.cut, self.plan, self.bs, self.device, self.bar = cut, plan, batch_size, device, bar

    @torch.inference_mode()
    def run(self, data: _Data, start: int, stop: int, out: list[torch.Tensor] | None,
            row0: int = 0) -> None:
        """Channel sums of samples [start, stop) go to `data.sums`; their prefixed boundary
        values into `out` (preallocated, rows from `row0`) when given."""
        for i in range(start, stop, self.bs):
            j = min(stop, i + self.bs)
            boundary = self.cut.pre(data.x[i:j].to(self.device))
            data.sums.append(_channel_sums(boundary[0]))
            if out is not None:
                vals = [self.plan.prefix(boundary[0]), *boundary[1:]]
                for o, v in zip(out, vals):
                    o[row0 + i - start : row0 + j - start] = v
            self.bar.update(j - i)

    @torch.inference_mode()
    def shapes(self, x: torch.Tensor) -> tuple[int, list[tuple[torch.Size, torch.dtype]]]:
        """Positions per channel of h, and the per-sample shape and dtype of each cached value."""
        boundary = self.cut.pre(x[:1].to(self.device))
        vals = [self.plan.prefix(boundary[0]), *boundary[1:]]
        h = boundary[0]
        return h[0].numel() // h.shape[1], [(v.shape[1:], v.dtype) for v in vals]


def _alloc(shapes: list[tuple[torch.Size, torch.dtype]], n: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty((n, *shape), dtype=dtype, device=device) for shape, dtype in shapes]


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
    max_cache_mb: float | None = None,
    progress: bool = False,
    cut: NetworkCut | None = None,
    fast: bool = True,
) -> SweepCurve:
    """Sweep k = 0..C with the front of the network run once (see module docstring).

    `budget_mb` bounds the working memory of batched head calls; `max_cache_mb` bounds the cached
    features: what does not fit is recomputed in chunks after the ranking pass (no disk needed).
    `fast=False` disables the incremental linear-head path (for comparisons)."""
    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        cut = cut or cut_at(model, layer)
        plan = plan_head(cut)
        sets = [_Data(x_clean, [y_clean])]
        if triggered is not None:
            sets.append(_Data(triggered.x, [triggered.y_target, triggered.y_true]))
        total = sum(d.x.shape[0] for d in sets)
        bar = tqdm(total=total, desc="cache features", unit="img", disable=not progress, leave=False)
        front = _Front(cut, plan, batch_size, device, bar)
        positions, shapes = front.shapes(x_clean)
        per_sample = _nbytes([torch.empty(s, dtype=t) for s, t in shapes])
        room = float("inf") if max_cache_mb is None else max_cache_mb * 2**20
        # Pass 1: channel statistics, caching what fits. The ranking needs all clean data; the
        # triggered set's uncached rest is run in pass 2 only.
        for i, d in enumerate(sets):
            n = d.x.shape[0]
            fit = n if room == float("inf") else min(n, int(room // max(per_sample, 1)))
            fit = fit if fit == n else fit - fit % batch_size
            room -= fit * per_sample
            d.n_stored = fit
            d.stored = _alloc(shapes, fit, device)
            front.run(d, 0, fit, d.stored)
            if i == 0 and fit < n:
                front.run(d, fit, n, None)
        bar.close()
        means = (torch.stack(sets[0].sums).sum(0) / (sets[0].x.shape[0] * positions)).cpu()
        order = torch.sort(means, stable=True).indices
        c = order.numel()
        budget = max(1, int(budget_mb * 2**20 / 4))
        counters = [_Counter(plan, order, len(d.labels), budget, device, fast) for d in sets]
        kbar = tqdm(total=total, desc="sweep", unit="img", disable=not progress, leave=False)
        for d, counter in zip(sets, counters):
            counter.add(d.stored, [lab[: d.n_stored] for lab in d.labels])
            kbar.update(d.n_stored)
            d.stored = None  # free before streaming the rest
        limit = None if max_cache_mb is None else max_cache_mb * 2**20
        group = batch_size if limit is None else max(batch_size, int(limit // max(per_sample, 1)) // batch_size * batch_size)
        for i, d in enumerate(sets):
            n = d.x.shape[0]
            for a in range(d.n_stored, n, group):
                b = min(n, a + group)
                chunk = _alloc(shapes, b - a, device)
                if i == 0:
                    front.run(_Data(d.x, []), a, b, chunk)  # statistics already taken in pass 1
                else:
                    front.run(d, a, b, chunk)
                counters[i].add(chunk, [lab[a:b] for lab in d.labels])
                kbar.update(b - a)
                del chunk
        kbar.close()
        clean_correct, = counters[0].result()
        asr_hits = robust_hits = trig_means = None
        if triggered is not None:
            asr_hits, robust_hits = counters[1].result()
            trig_means = (torch.stack(sets[1].sums).sum(0)
                          / (triggered.x.shape[0] * positions)).cpu().tolist()
    finally:
        model.train(was_training)
    extra = {
        "fast_path": counters[0].fast_samples > 0, "prefix_ops": plan.prefix_ops,
        "recomputed": sum(k.recomputed for k in counters),
        "evaluated": sum(k.evaluated for k in counters),
        "streamed_samples": sum(d.x.shape[0] - d.n_stored for d in sets),
        "cache_mb": round(sum(d.n_stored for d in sets) * per_sample / 2**20, 3),
    }
    return SweepCurve(
        layer=layer, order=order.tolist(), channel_means=means.tolist(),
        clean_correct=clean_correct, num_clean=int(y_clean.shape[0]),
        asr_hits=asr_hits, robust_hits=robust_hits,
        num_triggered=0 if triggered is None else len(triggered), mode="cached",
        seconds=time.perf_counter() - t0, triggered_means=trig_means, extra=extra,
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
    max_cache_mb: float | None = None,
) -> SweepCurve:
    """Cached sweep when the model can be cut at `layer`, else the full protocol (`mode="auto"`).
    `budget_mb`: working memory of batched head calls; `max_cache_mb`: bound on cached features."""
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
                                device=device, budget_mb=budget_mb, max_cache_mb=max_cache_mb,
                                progress=progress, cut=cut)
    return full_sweep(model, layer, x_clean, y_clean, triggered, batch_size=batch_size,
                      device=device, progress=progress)
