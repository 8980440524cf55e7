"""Iterate a dataset in batches: the one way fineprune reads data.

In-memory tensors (a TensorDataset, a Subset of one, or a bare input tensor) are read by index
slicing, exactly as before this module existed, so tensor runs stay bit-identical and fast. Any
other `torch.utils.data.Dataset` (a lazy image or wav folder, a user's own class) goes through a
DataLoader whose sampler walks the same positions in the same order, so a lazy dataset and the
equivalent TensorDataset give the same batches, and training or sweeping them gives the same
result. Decoding then runs in `workers` DataLoader processes, and nothing holds all inputs at once.

Worker processes persist across passes: the first pass over a dataset with `workers` > 0 starts
a pool that later passes over the same dataset object reuse (a new pass only hands it new
positions), instead of starting and stopping processes for every epoch, evaluation and sweep
phase. At most `MAX_POOLS` pools live at once (least recently used closed first), and
`close_workers()` closes them all. A dataset must therefore not change between passes (the
workers keep the copy they started with); fineprune's own datasets never do. No pass draws from
torch's global random generator (the DataLoader's worker seeds come from a private one), so
reading a dataset lazily, with or without workers, leaves every later random draw (dropout,
shuffles) as reading the same data from tensors does.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from ..errors import BadInputError

#: Inputs alone: a dataset of (x, y) items, or a bare tensor of inputs (a triggered set's x).
Inputs = torch.Tensor | Dataset


def _tensor_source(data: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(x, y, rows) when `data` is a TensorDataset of (x, y) or a chain of Subsets of one (`rows`:
    the parent rows of positions 0..n-1, None for all of them); None for any other dataset."""
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise BadInputError(f"a TensorDataset of data must hold (inputs, labels), not "
                                f"{len(data.tensors)} tensor(s)")
        return data.tensors[0], data.tensors[1], None
    if isinstance(data, Subset):
        inner = _tensor_source(data.dataset)
        if inner is None:
            return None
        x, y, rows = inner
        sub = torch.as_tensor(data.indices, dtype=torch.long)
        return x, y, sub if rows is None else rows[sub]
    return None


def num_samples(data: Inputs) -> int:
    return int(data.shape[0]) if isinstance(data, torch.Tensor) else len(data)  # type: ignore[arg-type]


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """default_collate, then (x, y) as tensors with int64 labels (what a TensorDataset would give)."""
    batch = default_collate(items)
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise BadInputError("each item of a dataset must be (input, label); got "
                            f"{type(items[0]).__name__} items")
    return torch.as_tensor(batch[0]), torch.as_tensor(batch[1]).long()


class _Batches:
    """A DataLoader's batch sampler whose batches are replaced before each pass, so one pool of
    persistent workers serves passes over different positions."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class _Pool:
    loader: DataLoader
    sampler: _Batches
    busy: bool = False  # a pass is reading it (a second, nested pass gets its own loader)


#: Worker pools kept between passes (each holds `workers` processes and a reference to its dataset).
MAX_POOLS = 3
_POOLS: OrderedDict[tuple[int, int, bool], _Pool] = OrderedDict()
_PASSES = itertools.count()


def _seed_generator() -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from: private (torch's global
    generator is never drawn from), following the run's seed (`torch.initial_seed()` reads it
    without drawing) and different for every loader made in this process."""
    return torch.Generator().manual_seed((torch.initial_seed() + next(_PASSES)) % 2**63)


def _loader(data: Dataset, batches, workers: int, pin: bool, persistent: bool) -> DataLoader:
    return DataLoader(data, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                      pin_memory=pin, persistent_workers=persistent, generator=_seed_generator())


def _shutdown(pool: _Pool) -> None:
    it = getattr(pool.loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    pool.loader._iterator = None


def close_workers() -> None:
    """Stop every persistent worker pool now (they also stop when the process exits)."""
    while _POOLS:
        _shutdown(_POOLS.popitem(last=False)[1])


def _pool_for(data: Dataset, workers: int, pin: bool) -> tuple[tuple[int, int, bool], _Pool]:
    key = (id(data), workers, pin)
    pool = _POOLS.get(key)
    if pool is not None and pool.loader.dataset is not data:  # cannot happen while the pool holds it
        _shutdown(_POOLS.pop(key))
        pool = None
    if pool is None:
        sampler = _Batches()
        pool = _Pool(_loader(data, sampler, workers, pin, persistent=True), sampler)
        _POOLS[key] = pool
        while len(_POOLS) > MAX_POOLS:
            _shutdown(_POOLS.popitem(last=False)[1])
    _POOLS.move_to_end(key)
    return key, pool


def iter_batches(
    data: Dataset, batch_size: int, *, order: torch.Tensor | None = None, start: int = 0,
    stop: int | None = None, workers: int = 0, pin: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) CPU batches of positions `order[start:stop]` (default: positions start..stop-1 in
    turn), `batch_size` at a time, the last batch possibly shorter.

    Tensors take the index-slicing fast path; any other Dataset a DataLoader over the same positions
    (`workers` processes, kept for later passes over the same dataset: see the module docstring;
    `pin`ned memory when CUDA is present)."""
    if batch_size < 1:
        raise BadInputError(f"`batch_size` must be >= 1, got {batch_size}")
    if workers < 0:
        raise BadInputError(f"`workers` must be >= 0, got {workers}")
    n = num_samples(data) if order is None else int(order.shape[0])
    stop = n if stop is None else min(int(stop), n)
    src = _tensor_source(data)
    if src is not None:
        x, y, rows = src
        for i in range(start, stop, batch_size):
            j = min(stop, i + batch_size)
            if order is None and rows is None:
                yield x[i:j], y[i:j]
                continue
            idx = order[i:j] if order is not None else torch.arange(i, j)
            if rows is not None:
                idx = rows[idx]
            yield x[idx], y[idx]
        return
    if start >= stop:
        return
    positions: Sequence[int] = order[start:stop].tolist() if order is not None else range(start, stop)
    batches = [list(positions[i : i + batch_size]) for i in range(0, len(positions), batch_size)]
    pin = pin and torch.cuda.is_available()
    if workers == 0:
        yield from _loader(data, batches, 0, pin, persistent=False)
        return
    key, pool = _pool_for(data, workers, pin)
    if pool.busy:  # a pass over this dataset is under way (nested reading): a one-pass loader
        yield from _loader(data, batches, workers, pin, persistent=False)
        return
    pool.sampler.batches, pool.busy = batches, True
    try:
        yield from pool.loader
    except GeneratorExit:  # the reader stopped early: the next pass resets the pool
        raise
    except BaseException:  # a worker failed (e.g. an undecodable file): do not reuse the pool
        if _POOLS.get(key) is pool:
            _shutdown(_POOLS.pop(key))
        raise
    finally:
        pool.busy = False


def iter_inputs(data: Inputs, batch_size: int, *, start: int = 0, stop: int | None = None,
                workers: int = 0, pin: bool = False) -> Iterator[torch.Tensor]:
    """The inputs of positions start..stop-1 in batches; a bare tensor is sliced."""
    if isinstance(data, torch.Tensor):
        stop = data.shape[0] if stop is None else min(int(stop), data.shape[0])
        for i in range(start, stop, batch_size):
            yield data[i: min(stop, i + batch_size)]
        return
    for x, _ in iter_batches(data, batch_size, start=start, stop=stop, workers=workers, pin=pin):
        yield x


def take(data: Inputs, n: int) -> torch.Tensor:
    """The first `n` inputs (fewer when the data is shorter): examples for shapes, tracing, checks
    and previews, without reading the rest."""
    n = min(int(n), num_samples(data))
    if n < 1:
        raise BadInputError("the data set is empty; it needs at least one sample")
    return next(iter_inputs(data, n, stop=n))


def sample_shape(data: Inputs) -> tuple[int, ...]:
    """Shape of one input (reads only the first item of a lazy dataset)."""
    if isinstance(data, torch.Tensor):
        return tuple(data.shape[1:])
    src = _tensor_source(data)
    if src is not None:
        return tuple(src[0].shape[1:])
    return tuple(take(data, 1).shape[1:])


#: Input bytes per inference batch (evaluation, sweep, channel means). A network's activation memory
#: grows with its input's size, so a fixed count of 256-512 samples that is nothing at 32x32
#: holds several GB at 224x224 (resnet18: 2.6 GB at 512). What chose it: the largest batch that
#: leaves every built-in task's batch as it was (their inputs are at most 32 KB, so 512 of them
#: fit) and keeps a 224x224 RGB batch at 53 samples, which the streaming benchmark measured
#: within its memory bound (BENCHMARKS.md "Streaming").
INFERENCE_BATCH_BYTES = 32 * 2**20


def inference_batch(data: Inputs, requested: int) -> int:
    """`requested`, lowered so that one batch of inputs stays within INFERENCE_BATCH_BYTES (float32).
    The result depends only on the input shape, so every pass over the same data (cached and full
    sweep, before and after) batches it the same way."""
    numel = 1
    for d in sample_shape(data):
        numel *= int(d)
    return max(1, min(int(requested), INFERENCE_BATCH_BYTES // max(4 * numel, 1)))


def labels_of(data: Dataset, workers: int = 0) -> torch.Tensor:
    """All labels as int64, decoding no input where the dataset can tell them: a TensorDataset's
    label tensor, `.targets` / `.labels` (lazy folders, torchvision-style datasets), a Subset's
    parent labels at its indices; otherwise one pass over the dataset."""
    src = _tensor_source(data)
    if src is not None:
        _, y, rows = src
        return y if rows is None else y[rows]
    if isinstance(data, Subset):
        return labels_of(data.dataset, workers)[torch.as_tensor(data.indices, dtype=torch.long)]
    if isinstance(data, ConcatDataset):
        return torch.cat([labels_of(d, workers) for d in data.datasets])
    for attr in ("targets", "labels"):
        known = getattr(data, attr, None)
        if known is not None and not callable(known):
            y = torch.as_tensor(known).long().flatten()
            if y.shape[0] == len(data):  # type: ignore[arg-type]
                return y
    ys = [y for _, y in iter_batches(data, inference_batch(data, 256), workers=workers)]
    return torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)


def _tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    from ..runtime import run_digest

    return run_digest({}, tensors)


def fingerprint(data: Dataset) -> str | None:
    """A cheap key for the data's content, for resuming and caching: tensors hashed; a dataset's
    own `fingerprint()` (lazy folders: paths, sizes, mtimes, decode settings); a Subset: its
    parent's key and indices. None when unknown: then callers skip resuming instead of reading
    (and hashing) all data."""
    if isinstance(data, TensorDataset):
        return _tensor_digest(data.tensors)
    if isinstance(data, Subset):
        parent = fingerprint(data.dataset)
        if parent is None:
            return None
        idx = torch.as_tensor(data.indices, dtype=torch.long)
        return hashlib.sha256(parent.encode() + idx.numpy().tobytes()).hexdigest()
    method = getattr(data, "fingerprint", None)
    if callable(method):
        value = method()
        return None if value is None else str(value)
    return None


def key_tensors(data: Inputs, *, inputs_only: bool = False) -> list[torch.Tensor] | None:
    """What a resume or cache key hashes for `data`: the tensors themselves for in-memory data
    (so keys made before lazy datasets existed are unchanged), else the fingerprint's bytes;
    None when the dataset has no fingerprint. `inputs_only`: a TensorDataset's inputs alone (the
    sweep hashes labels separately)."""
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, TensorDataset):
        return [data.tensors[0]] if inputs_only else list(data.tensors)
    fp = fingerprint(data)
    if fp is None:
        return None
    return [torch.frombuffer(bytearray(json.dumps({"fingerprint": fp}).encode()), dtype=torch.uint8)]


def warn_unkeyed(what: str) -> None:
    """The warning when a dataset without `fingerprint()` turns resuming or caching off. A Python
    warning, not a progress line (`fineprune.progress`): it is addressed to the programmer whose
    Dataset class lacks the method, so it must show even where progress is off, once per call
    site, and be catchable (`warnings.catch_warnings`, pytest.warns)."""
    warnings.warn(f"{what} is off: the dataset has no fingerprint() method, so a checkpoint could not "
                  "tell whether it was written for the same data (reading all data to hash it would "
                  "cost a full pass); give the dataset a fingerprint() returning a string that changes "
                  "with its content", stacklevel=3)
