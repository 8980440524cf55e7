"""Activation statistics and the pruning sweep (accuracy for every number of pruned channels).

The cached sweep runs the network up to the pruned layer once per input, keeps what crosses the
cut (after the head's zero-preserving channel-wise prefix, e.g. a max-pool: see `head_plan`), and
then evaluates only the head for each k: incrementally when every first layer after the cut is
linear (`head_plan`), else several k per batch of the exact head (`counting`). Where the cut
proves class-token pooling (a ViT whose logits read token 0 alone: `cut.TokenSlice`), only the
tokens that reach the logits are cached and replayed. The same pass gives the channel statistics
(over every token). With `max_cache_mb`, what does not fit is recomputed chunk by chunk after the
ranking pass instead of being kept. When the model cannot be cut (torch.fx cannot trace it), the
fallback runs the whole masked network for each k.

What is guaranteed (the tests check it; `error_bounds` proves the certified part):
* The ranking is the full protocol's: channel means are float64 sums of the same front outputs,
  batch by batch in the same order as `layer_means` (with the same `batch_size`).
* Every prediction of the incremental path is either certified or recomputed. A certified one
  equals the prediction of *every* float32 forward pass of the masked head on the same front
  values whose dot products obey the standard rounding model: any summation order, with or without
  FMA, any batch size. The rest are recomputed with the exact head (the masked head itself, run in
  float32), whose argmax equals a full pass's except on last-bit ties: where two logits are within
  a few ulps, evaluations differing only in summation order (the full protocol run with batch 7 and
  with batch 256 is such a pair: CPU matmul kernels change with the batch) may pick different
  classes, and so may the sweep. Per-k counts therefore equal the full protocol's whenever no
  prediction is such a tie, as on every model of the tests and benchmarks; at a tie they may
  differ exactly as two batch sizes of the full protocol differ.
* An explicit `order` (another criterion's ranking, see `criteria`) replaces only the ranking:
  the channel means are still measured, and the counts per k are as exact as above.
* Sweeps run under `exact_float32()`: no TF32 / bfloat16 products (cuDNN allows TF32 by default);
  whatever cannot be turned off makes the certificate use TF32's unit roundoff.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data import stream
from ..progress import Progress, as_progress
from ..runtime import load_checkpoint, run_digest, save_checkpoint
from .counting import Counter
from .cut import NetworkCut, cut_at
from .error_bounds import exact_float32
from .head_plan import HeadPlan, plan_head
from .layer import channel_dim_of
from .mask import clear_mask, set_pruned




@dataclass
class SweepCurve:
    """Metrics after pruning the first k channels of `order`, for k = 0..C. The order is the
    paper's (increasing mean activation on clean data) unless the sweep was given an explicit one
    (`criterion` names what produced it, see `criteria`)."""

    layer: str
    order: list[int]  # channels in pruning order (by default increasing mean activation on clean data)
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
    criterion: str = "activation"  # what ordered the channels ("activation": the paper's ranking)

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


def check_order(order, num_channels: int) -> torch.Tensor:
    """`order` as a long tensor after checking it is a permutation of range(num_channels)."""
    try:
        vals = [int(c) for c in order]
        if any(v != c for v, c in zip(vals, order)):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError("order must be a sequence of integer channel indices") from None
    if sorted(vals) != list(range(num_channels)):
        raise ValueError(f"order must be a permutation of the layer's {num_channels} channels "
                         f"(0..{num_channels - 1}, each once); got {len(vals)} entries")
    return torch.tensor(vals, dtype=torch.long)


def _criterion(order, criterion: str | None) -> str:
    return criterion or ("activation" if order is None else "custom")


def _channel_sums(h: torch.Tensor) -> torch.Tensor:
    """Per-channel float64 sum of one batch: summed per batch in batch order, exactly as
    `layer_means` does, so the cached and the full sweep rank channels identically."""
    return h.double().sum(dim=[d for d in range(h.dim()) if d != 1])


def _nbytes(values: list[torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in values)


@dataclass
class _Data:
    """One data set to sweep: inputs (a tensor, or a Dataset read by ranges through `stream`, so
    only the bounded feature cache, never the inputs, has to fit in memory), the label tensors to
    count against, and its progress."""

    x: torch.Tensor | Dataset
    labels: list[torch.Tensor]
    sums: list[torch.Tensor] = field(default_factory=list)
    stored: list[torch.Tensor] | None = None  # prefixed boundary of samples [0, n_stored)
    n_stored: int = 0
    done: int = 0  # samples counted so far (the streaming phase goes on from here)


class _Front:
    """Runs the network's front and the head's prefix batch by batch. With `tokens` (a
    `cut.TokenSlice`), the boundary is cut down to the tokens that reach the logits after the
    channel statistics (over every token) are taken, and only those tokens are cached."""

    def __init__(self, cut: NetworkCut, plan: HeadPlan, batch_size: int, device: torch.device,
                 bar: tqdm, workers: int = 0, tokens=None) -> None:
        self.cut, self.plan, self.bs, self.device, self.bar = cut, plan, batch_size, device, bar
        self.workers, self.tokens = workers, tokens

    def _cached(self, boundary: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if self.tokens is not None:
            boundary = self.tokens.narrow(boundary)
        return [self.plan.prefix(boundary[0]), *boundary[1:]]

    @torch.inference_mode()
    def run(self, data: _Data, start: int, stop: int, out: list[torch.Tensor] | None,
            row0: int = 0) -> None:
        """Channel sums of samples [start, stop) go to `data.sums`; their prefixed boundary
        values into `out` (preallocated, rows from `row0`) when given."""
        i = start
        for xb in stream.iter_inputs(data.x, self.bs, start=start, stop=stop, workers=self.workers,
                                     pin=self.device.type == "cuda"):
            j = i + xb.shape[0]
            boundary = self.cut.pre(xb.to(self.device))
            data.sums.append(_channel_sums(boundary[0]))
            if out is not None:
                vals = self._cached(boundary)
                for o, v in zip(out, vals):
                    o[row0 + i - start : row0 + j - start] = v
            self.bar.update(j - i)
            i = j

    @torch.inference_mode()
    def shapes(self, x: torch.Tensor | Dataset) -> tuple[int, int, list[tuple[torch.Size, torch.dtype]]]:
        """Channels and positions per channel of h, and the per-sample shape and dtype of each
        cached value."""
        boundary = self.cut.pre(stream.take(x, 1).to(self.device))
        vals = self._cached(boundary)
        h = boundary[0]  # channel statistics average over every position (every token)
        return h.shape[1], h[0].numel() // h.shape[1], [(v.shape[1:], v.dtype) for v in vals]


def _alloc(shapes: list[tuple[torch.Size, torch.dtype]], n: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty((n, *shape), dtype=dtype, device=device) for shape, dtype in shapes]


def _first_pass(sets: list[_Data], front: _Front, shapes: list, per_sample: int, limit: float | None) -> None:
    """Channel statistics, caching what fits in `limit` bytes (whole batches). The ranking needs
    all clean data; the triggered set's uncached rest waits for `_stream_rest`."""
    room = float("inf") if limit is None else limit
    for i, d in enumerate(sets):
        n = stream.num_samples(d.x)
        fit = n if room == float("inf") else min(n, int(room // max(per_sample, 1)))
        fit = fit if fit == n else fit - fit % front.bs
        room -= fit * per_sample
        d.n_stored = fit
        d.stored = _alloc(shapes, fit, front.device)
        front.run(d, 0, fit, d.stored)
        if i == 0 and fit < n:
            front.run(d, fit, n, None)


def _stream_rest(sets: list[_Data], counters: list[Counter], front: _Front, shapes: list,
                 per_sample: int, limit: float | None, bar: tqdm, after_group=None) -> None:
    """Recompute the uncounted samples in groups of whole batches that fit in `limit` bytes;
    `after_group()` runs after each group (the checkpoint)."""
    group = front.bs if limit is None else max(1, int(limit // max(per_sample, 1)) // front.bs) * front.bs
    for i, d in enumerate(sets):
        n = stream.num_samples(d.x)
        for a in range(d.done, n, group):
            b = min(n, a + group)
            chunk = _alloc(shapes, b - a, front.device)
            # The clean set's statistics were all taken in the first pass.
            front.run(_Data(d.x, []) if i == 0 else d, a, b, chunk)
            counters[i].add(chunk, [lab[a:b] for lab in d.labels])
            d.done = b
            bar.update(b - a)
            del chunk
            if after_group is not None:
                after_group()


class _SweepCheckpoint:
    """The streaming phase's progress on disk: channel statistics, ranking, per-k counts so far and
    how far each set got. Written atomically after each streamed group, so a killed sweep over big
    data goes on from its last group; keyed by model, data and settings, so a stale file is refused."""

    def __init__(self, path: str | os.PathLike[str], key: str) -> None:
        self.path, self.key = Path(path), key

    def save(self, sets: list[_Data], counters: list[Counter], means: torch.Tensor, order: torch.Tensor) -> None:
        state = {
            "means": means, "order": order,
            "done": [d.done for d in sets],
            "sums": [torch.stack(d.sums).sum(0).cpu() if d.sums else torch.empty(0) for d in sets],
            "counts": [[c.cpu() for c in k.counts] for k in counters],
            "tallies": [[k.recomputed, k.evaluated, k.fast_samples] for k in counters],
        }
        save_checkpoint(self.path, self.key, state)

    def load(self) -> dict:
        return load_checkpoint(self.path, self.key, "sweep checkpoint")

    @staticmethod
    def restore(state: dict, sets: list[_Data], counters: list[Counter], device: torch.device) -> None:
        for d, done, sums in zip(sets, state["done"], state["sums"]):
            d.done, d.n_stored, d.stored = int(done), 0, None
            d.sums = [sums.to(device)] if sums.numel() else []
        for k, counts, (rec, ev, fast) in zip(counters, state["counts"], state["tallies"]):
            k.counts = [c.to(device) for c in counts]
            k.recomputed, k.evaluated, k.fast_samples = int(rec), int(ev), int(fast)


def _sweep_key(model: nn.Module, layer: str, sets: list[_Data], settings: dict) -> str | None:
    """The checkpoint's key: settings, weights, inputs and labels (inputs as `stream.key_tensors`:
    tensors by their bytes, as before lazy datasets; None when a dataset has no fingerprint)."""
    tensors = [*model.state_dict().values()]
    for d in sets:
        inputs = stream.key_tensors(d.x, inputs_only=True)
        if inputs is None:
            return None
        tensors += [*inputs, *d.labels]
    return run_digest({"layer": layer, **settings}, tensors)


@exact_float32()
def cached_sweep(
    model: nn.Module,
    layer: str,
    x_clean: torch.Tensor | Dataset,
    y_clean: torch.Tensor | None,
    triggered: "TriggeredSet | None" = None,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    budget_mb: float = 256.0,
    max_cache_mb: float | None = None,
    progress: bool | Progress = False,
    cut: NetworkCut | None = None,
    fast: bool = True,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    order: list[int] | None = None,
    criterion: str | None = None,
    workers: int = 0,
    tokens: bool = True,
) -> SweepCurve:
    """Sweep k = 0..C with the front of the network run once (see module docstring).

    The clean data: inputs `x_clean` and labels `y_clean`, or a Dataset `x_clean` with `y_clean`
    None (labels by `stream.labels_of`); a Dataset is read in ranges through `stream` (`workers`
    DataLoader processes), so what is held is the bounded feature cache, not the inputs.

    `budget_mb` bounds the working memory of batched head calls; `max_cache_mb` bounds the cached
    features: what does not fit is recomputed in chunks after the ranking pass (no disk needed).
    `fast=False` disables the incremental frontier path (for comparisons).
    `checkpoint_path`: when samples must be streamed (they do not fit `max_cache_mb`), progress is
    saved there after the ranking pass and after each streamed group; with `resume`, a sweep
    killed mid-way goes on from it and gives the same curve (see `_SweepCheckpoint`).
    `order`: an explicit pruning order (a permutation of the layer's channels, first = pruned
    first) replacing the activation ranking, e.g. from `criteria.channel_order`; the channel means
    are still measured and reported. `criterion` names it in the curve (default "activation"
    without `order`, "custom" with one).
    `tokens`: where the cut proved class-token pooling (`cut.TokenSlice`: a ViT's logits read
    token 0 alone), cache and replay only the tokens that reach the logits (the same counts at
    every k, about tokens-fold less work per k); `tokens=False` keeps every token (for
    comparisons)."""
    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    batch_size = stream.inference_batch(x_clean, batch_size)
    was_training = model.training
    model.eval()
    try:
        cut = cut or cut_at(model, layer, stream.take(x_clean, 1).to(device))
        sliced = cut.tokens if tokens else None
        plan = plan_head(cut, tokens=sliced is not None)
        if y_clean is None:
            y_clean = stream.labels_of(x_clean, workers)
        sets = [_Data(x_clean, [y_clean])]
        if triggered is not None:
            sets.append(_Data(triggered.x, [triggered.y_target, triggered.y_true]))
        total = sum(stream.num_samples(d.x) for d in sets)
        progress = as_progress(progress)
        bar = progress.bar(total, "cache features", unit="img", leave=False)
        front = _Front(cut, plan, batch_size, device, bar, workers, sliced)
        channels, positions, shapes = front.shapes(x_clean)
        given = None if order is None else check_order(order, channels)
        per_sample = _nbytes([torch.empty(s, dtype=t) for s, t in shapes])
        limit = None if max_cache_mb is None else max_cache_mb * 2**20
        budget = max(1, int(budget_mb * 2**20 / 4))
        ckpt = None
        if checkpoint_path is not None:
            settings = {"batch_size": batch_size, "max_cache_mb": max_cache_mb, "fast": fast}
            if given is not None:  # absent by default: the key of an activation sweep is unchanged
                settings["order"] = given.tolist()
            key = _sweep_key(model, layer, sets, settings)
            if key is None:
                stream.warn_unkeyed("the sweep's checkpoint")
            else:
                ckpt = _SweepCheckpoint(checkpoint_path, key)
        state = ckpt.load() if ckpt is not None and resume and ckpt.path.is_file() else None
        if state is None:
            _first_pass(sets, front, shapes, per_sample, limit)
            means = (torch.stack(sets[0].sums).sum(0) / (stream.num_samples(sets[0].x) * positions)).cpu()
            order = torch.sort(means, stable=True).indices if given is None else given
        else:
            means, order = state["means"], state["order"]
        bar.close()
        counters = [Counter(plan, order, len(d.labels), budget, device, fast) for d in sets]
        kbar = progress.bar(total, "sweep", unit="img", leave=False)
        if state is None:
            for d, counter in zip(sets, counters):
                counter.add(d.stored, [lab[: d.n_stored] for lab in d.labels])
                kbar.update(d.n_stored)
                d.stored = None  # free before streaming the rest
                d.done = d.n_stored
        else:
            _SweepCheckpoint.restore(state, sets, counters, device)
            kbar.update(sum(d.done for d in sets))
        streaming = any(d.done < stream.num_samples(d.x) for d in sets)
        save = None
        if ckpt is not None and streaming:
            save = lambda: ckpt.save(sets, counters, means, order)  # noqa: E731
            if state is None:
                save()  # the ranking pass is the costly part to lose
        _stream_rest(sets, counters, front, shapes, per_sample, limit, kbar, save)
        kbar.close()
        clean_correct, = counters[0].result()
        asr_hits = robust_hits = trig_means = None
        if triggered is not None:
            asr_hits, robust_hits = counters[1].result()
            if sets[1].sums:
                trig_means = (torch.stack(sets[1].sums).sum(0)
                              / (stream.num_samples(triggered.x) * positions)).cpu().tolist()
    finally:
        model.train(was_training)
    extra = {
        "fast_path": counters[0].fast_samples > 0, "prefix_ops": plan.prefix_ops,
        "recomputed": sum(k.recomputed for k in counters),
        "evaluated": sum(k.evaluated for k in counters),
        "streamed_samples": sum(stream.num_samples(d.x) - d.n_stored for d in sets),
        "resumed": state is not None,
        "cache_mb": round(sum(d.n_stored for d in sets) * per_sample / 2**20, 3),
        "tokens": None if sliced is None else list(sliced.tokens),  # tokens replayed (None: all)
    }
    return SweepCurve(
        layer=layer, order=order.tolist(), channel_means=means.tolist(),
        clean_correct=clean_correct, num_clean=int(y_clean.shape[0]),
        asr_hits=asr_hits, robust_hits=robust_hits,
        num_triggered=0 if triggered is None else len(triggered), mode="cached",
        seconds=time.perf_counter() - t0, triggered_means=trig_means, extra=extra,
        criterion=_criterion(given, criterion),
    )


@torch.inference_mode()
def layer_means(
    model: nn.Module, layer: str, x: torch.Tensor | Dataset, batch_size: int = 256,
    device: torch.device | None = None, workers: int = 0,
) -> torch.Tensor:
    """Per-channel mean activation of `layer`'s output over the inputs `x` (a tensor or a
    Dataset's inputs), by a forward hook (one pass). Channels-last outputs are viewed with
    channels at dim 1, as the cut hands them to the cached sweep (see `cut`), so both rank
    channels from bit-identical sums."""
    device = device or next(model.parameters()).device
    batch_size = stream.inference_batch(x, batch_size)
    module = model.get_submodule(layer)
    cdim = channel_dim_of(model, layer, stream.take(x, 1).to(device)) if stream.num_samples(x) else 1
    total: list[torch.Tensor] = []
    count = [0]

    def hook(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        o = o.movedim(cdim, 1) if cdim != 1 else o
        dims = [d for d in range(o.dim()) if d != 1]
        total.append(o.double().sum(dim=dims))
        count[0] += o.numel() // o.shape[1]

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for xb in stream.iter_inputs(x, batch_size, workers=workers, pin=torch.device(device).type == "cuda"):
            model(xb.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return (torch.stack(total).sum(0) / count[0]).cpu()


@exact_float32()
def full_sweep(
    model: nn.Module,
    layer: str,
    x_clean: torch.Tensor | Dataset,
    y_clean: torch.Tensor | None,
    triggered: "TriggeredSet | None" = None,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    progress: bool | Progress = False,
    order: list[int] | None = None,
    criterion: str | None = None,
    workers: int = 0,
) -> SweepCurve:
    """The usual protocol: for each k, mask and run the whole network. Slow but always works.
    `order` / `criterion`: an explicit pruning order and its name; the data (a Dataset with
    `y_clean` None) and `workers`: as in `cached_sweep`."""
    from ..evaluation.metrics import predict

    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    batch_size = stream.inference_batch(x_clean, batch_size)
    if y_clean is None:
        y_clean = stream.labels_of(x_clean, workers)
    means = layer_means(model, layer, x_clean, batch_size, device, workers)
    given = None if order is None else check_order(order, means.numel())
    trig_means = (
        layer_means(model, layer, triggered.x, batch_size, device, workers).tolist()
        if triggered is not None else None
    )
    curve_criterion = _criterion(order, criterion)
    order = torch.sort(means, stable=True).indices if given is None else given
    c = order.numel()
    clean_correct, asr_hits, robust_hits = [], [], []
    try:
        for k in as_progress(progress).bar(c + 1, "sweep (full)", unit="k", iterable=range(c + 1), leave=False):
            set_pruned(model, layer, order[:k].tolist(), c)
            clean_correct.append(int((predict(model, x_clean, batch_size, device, workers) == y_clean).sum()))
            if triggered is not None:
                p = predict(model, triggered.x, batch_size, device, workers)
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
        seconds=time.perf_counter() - t0, triggered_means=trig_means, criterion=curve_criterion,
    )


def sweep(
    model: nn.Module, layer: str, x_clean: torch.Tensor | Dataset, y_clean: torch.Tensor | None,
    triggered: "TriggeredSet | None" = None, *, mode: str = "auto", batch_size: int = 256,
    device: torch.device | None = None, progress: bool | Progress = False, budget_mb: float = 256.0,
    max_cache_mb: float | None = None, checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False, order: list[int] | None = None, criterion: str | None = None,
    workers: int = 0,
) -> SweepCurve:
    """Cached sweep when the model can be cut at `layer`, else the full protocol (`mode="auto"`).
    The clean data: tensors (`x_clean`, `y_clean`), or any Dataset `x_clean` with `y_clean` None,
    read through `fineprune.data.stream` by `workers` DataLoader processes (same curve).
    `budget_mb`: working memory of batched head calls; `max_cache_mb`: bound on cached features;
    `checkpoint_path` / `resume`: the streaming phase's checkpoint (see `cached_sweep`);
    `order` / `criterion`: an explicit pruning order replacing the activation ranking, and its
    name (see `cached_sweep` and `criteria.channel_order`)."""
    if mode not in ("auto", "cached", "full"):
        raise ValueError(f"sweep mode must be auto, cached or full, not {mode!r}")
    if mode in ("auto", "cached"):
        try:
            example = stream.take(x_clean, 1).to(device or next(model.parameters()).device)
            cut = cut_at(model, layer, example)
        except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
            if mode == "cached":
                raise
            as_progress(progress).log(f"note: cannot cut the model at {layer} ({exc}); the sweep runs full "
                                      "forward passes (the same counts, slower)")
        else:
            return cached_sweep(model, layer, x_clean, y_clean, triggered, batch_size=batch_size,
                                device=device, budget_mb=budget_mb, max_cache_mb=max_cache_mb,
                                progress=progress, cut=cut, checkpoint_path=checkpoint_path, resume=resume,
                                order=order, criterion=criterion, workers=workers)
    return full_sweep(model, layer, x_clean, y_clean, triggered, batch_size=batch_size,
                      device=device, progress=progress, order=order, criterion=criterion, workers=workers)
