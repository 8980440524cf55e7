"""Pruning criteria: trigger-agnostic orders of one layer's channels, registered methods of the
family "criterion" (`purify.registry`).

Each criterion's `rank` returns the layer's channels in pruning order (most suspicious first); the
order is then evaluated by the same exact sweep (`sweep(..., order=...)`) and the same stop rule as
the paper's mean-activation ranking. None of them looks at triggered data: the paper's ranking
(`Activation`), the channel Lipschitz bound (`CLP`) and adversarial neuron perturbation (`ANP`).

CLP and ANP work on a conv map's channels (dim 1) and on a transformer MLP's hidden units (the LAST dim of
a (batch, tokens, hidden) output, `layer.LayerChoice.channel_dim == -1`): there a "channel" is one
hidden unit over all tokens, the unit the sweep ranks and the mask zeroes, so the criteria must
score the same units or their orders would not be permutations of what the sweep prunes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from ..data import stream
from ..defense.layer import PRODUCER_LINKS, _layout, channel_dim_of, producer_calls, trace_calls
from ..defense.mask import CHANNEL_DIM_ATTR, keep_shape
from .registry import Method, resolve

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Normalisations whose scale comes from the data of each input: no per-channel weight to fold.
_UNFOLDABLE = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm)


def activation_order(model: nn.Module, layer: str, clean_x: torch.Tensor | Dataset, *,
                     batch_size: int = 256, device: torch.device | None = None, workers: int = 0) -> list[int]:
    """The paper's ranking (Liu et al., RAID 2018): channels by increasing mean activation of
    `layer`'s output on clean data, ties by index. This is what the sweep does when it is given
    no order; provided for comparison and for callers that want the list itself."""
    from ..defense.sweep import layer_means

    means = layer_means(model, layer, clean_x, batch_size, device, workers)
    return torch.sort(means, stable=True).indices.tolist()


def _producer(model: nn.Module, layer: str, example: torch.Tensor) -> tuple[str, nn.Module, list[tuple[str, nn.Module]]]:
    """The module whose output channels are `layer`'s, and the channel-wise leaf modules between its
    output and `layer`'s (forward order). Checked by replaying that chain on the producer's output:
    a residual sum (or anything else mixed in) makes it differ, and raises ValueError.

    For a conv map (channels on dim 1) the producer is a conv, followed by BatchNorm, activations,
    dropout or pooling. For channels on the last dim (a transformer MLP's hidden units, as the
    module's `fineprune_channel_dim` annotation or, unannotated, the traced structure says) it is
    the Linear whose output units they are (the MLP's first Linear), followed by element-wise
    modules only: a BatchNorm or pooling module would act on dim 1 (the tokens), not on the units,
    so it is not channel-wise there. The layout is read without annotating `model` (CLP leaves it
    untouched)."""
    calls = trace_calls(model, example)
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1
    mine = [c for c in calls if c.name == layer]
    if len(mine) != 1:
        raise ValueError(f"CLP: module {layer!r} must run exactly once per forward pass (runs {len(mine)} times)")
    target = mine[0].output
    if not isinstance(target, torch.Tensor) or target.dim() < 3:
        raise ValueError(f"CLP: {layer!r} does not output a (batch, channels, positions...) tensor")
    annotated = getattr(mine[0].module, CHANNEL_DIM_ATTR, None)
    last = (int(annotated) if annotated is not None else _layout(calls, mine[0])) == -1
    # Activations (1-Lipschitz or a fixed slope), dropout and pooling change a channel's bound only
    # by a constant common to all channels, so they may lie between the producer and the layer.
    producers, between = PRODUCER_LINKS[-1 if last else 1]
    what = "Linear" if last else "conv"
    chain = producer_calls(calls, target, producers, between)
    if chain and not isinstance(chain[0].module, producers + between):
        raise ValueError(
            f"CLP: cannot find the {what} producing {layer!r}'s channels: {chain[0].name} "
            f"({type(chain[0].module).__name__}) is neither a {what} nor "
            f"{'element-wise' if last else 'channel-wise'}")
    if not chain or not isinstance(chain[0].module, producers):
        if last:
            raise ValueError(
                f"CLP: cannot find the Linear producing {layer!r}'s hidden units (its output is not a "
                "Linear's followed only by element-wise modules); choose the activation right after "
                "an MLP's first Linear")
        raise ValueError(
            f"CLP: cannot find the conv producing {layer!r}'s channels (its output is not a conv's "
            "followed only by channel-wise modules, e.g. a residual sum or a functional op); "
            "choose a layer right after a conv (or conv + BatchNorm)")
    for c in chain:
        if counts[c.name] != 1:
            raise ValueError(f"CLP: {c.name} runs {counts[c.name]} times per forward pass; cannot tell its channels")
        if isinstance(c.module, _UNFOLDABLE):
            raise ValueError(  # noqa: TRY004
                f"CLP: {c.name} ({type(c.module).__name__}) normalises each input by its own "
                "statistics; only BatchNorm (running statistics) can be folded into the conv")
        if isinstance(c.module, _BN_TYPES) and c.module.running_var is None:
            raise ValueError(f"CLP: {c.name} keeps no running statistics, so it cannot be folded into the conv")
    name, producer = chain[0].name, chain[0].module
    have = target.shape[-1] if last else target.shape[1]
    outputs = producer.out_features if last else producer.out_channels
    if have != outputs:
        raise ValueError(f"CLP: {layer!r} has {have} channels but {name} outputs {outputs}")
    _check_replay(model, example, layer, chain)
    return name, producer, [(c.name, c.module) for c in chain[1:]]


@torch.no_grad()
def _check_replay(model: nn.Module, example: torch.Tensor, layer: str, chain: list) -> None:
    """Run the chain after the producer (conv or Linear) on a copy of its output and compare with
    `layer`'s output."""
    seen: dict[str, torch.Tensor] = {}
    conv = chain[0].module
    handles = [
        conv.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.detach().clone())),
        model.get_submodule(layer).register_forward_hook(
            lambda m, i, o: seen.__setitem__("layer", o.detach().clone())),
    ]
    was_training = model.training
    model.eval()
    try:
        try:
            model(example)
        finally:
            for handle in handles:  # before the replay, which calls the layer's module again
                handle.remove()
        h = seen["conv"]
        for c in chain[1:]:  # in eval mode too: BatchNorm must use (and not update) its statistics
            h = c.module(h.clone())
    finally:
        model.train(was_training)
    want = seen["layer"]
    scale = float(want.abs().max()) if want.numel() else 0.0
    if h.shape != want.shape or not torch.allclose(h, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
        raise ValueError(
            f"CLP: {layer!r}'s output is not {chain[0].name}'s output passed through "
            f"{[c.name for c in chain[1:]]} alone (a residual sum or another input is mixed in); "
            "CLP needs a layer whose channels are one conv's (plus BatchNorm / activation) or one "
            "Linear's hidden units (plus activation)")


def uclc(model: nn.Module, layer: str, example: torch.Tensor) -> torch.Tensor:
    """Upper bound of each channel's Lipschitz constant (Zheng et al., ECCV 2022), float64.

    For the conv producing `layer`'s channels, channel k's weight W_k (in_channels/groups, kernel)
    is reshaped to (in_channels/groups, prod(kernel)), scaled by every following BatchNorm's
    gamma_k / sqrt(running_var_k + eps) (folded, as in the paper), and its largest singular value
    taken. For a transformer MLP's hidden units (channels last) the producer is the MLP's first
    Linear: unit k is row W_k of its weight applied to every token, a 1 x in_features matrix whose
    largest singular value is the row's L2 norm; nothing is folded (only element-wise modules
    follow, whose Lipschitz constant is common to all units). Data-free: `example` only fixes the
    input shape (the model is traced on seeded noise of that shape, to find the producer and check
    that nothing else, e.g. a residual, adds in).
    """
    gen = torch.Generator().manual_seed(0)
    param = next(iter(model.parameters()), None)
    dev = param.device if param is not None else example.device
    dtype = example.dtype if example.is_floating_point() else torch.float32
    noise = torch.rand(example[:2].shape, generator=gen, dtype=dtype).to(dev)
    _, producer, after = _producer(model, layer, noise)
    with torch.no_grad():
        w = producer.weight.detach().double().cpu()
        if isinstance(producer, nn.Linear):  # (out_features, in_features): one row per hidden unit
            return torch.linalg.vector_norm(w, ord=2, dim=1)
        scale = torch.ones(w.shape[0], dtype=torch.float64)
        for _, m in after:
            if isinstance(m, _BN_TYPES):
                gamma = m.weight.detach().double().cpu() if m.weight is not None else torch.ones_like(scale)
                scale = scale * gamma / torch.sqrt(m.running_var.detach().double().cpu() + m.eps)
        mats = w.reshape(w.shape[0], w.shape[1], -1)
        return torch.linalg.matrix_norm(mats, ord=2) * scale.abs()


def clp_order(model: nn.Module, layer: str, example: torch.Tensor) -> list[int]:
    """CLP (Zheng et al., "Data-Free Backdoor Removal based on Channel Lipschitzness", ECCV 2022):
    channels by decreasing UCLC (`uclc`), ties by index. A backdoor channel must amplify a small
    trigger into a large response, hence a large Lipschitz constant. The paper prunes channels
    above mean + u * std of the layer's UCLCs; here the order goes through the sweep and the stop
    rule instead. Data-free: `example` only gives the input shape."""
    return torch.sort(uclc(model, layer, example), descending=True, stable=True).indices.tolist()


def anp_mask(
    model: nn.Module, layer: str, clean_x: torch.Tensor | Dataset, clean_y: torch.Tensor | None, *,
    iterations: int = 200, batch_size: int = 64, eps: float = 0.4, steps: int = 1,
    alpha: float = 0.2, lr: float = 0.2, momentum: float = 0.9, seed: int = 0,
    device: torch.device | None = None, workers: int = 0,
) -> torch.Tensor:
    """The per-channel mask of ANP (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored
    Deep Models", NeurIPS 2021), restricted to `layer`'s output channels: dim 1 of a conv map, the
    last dim of a transformer MLP's (batch, tokens, hidden) output (`layer.channel_dim_of`, read
    on the copy), so that there is one mask value per hidden unit, shared by all tokens, as the
    sweep's mask prunes them -- not one per token.

    `layer`'s output h becomes (m + delta) * h per channel (a forward hook on a deep copy of the
    model in eval mode; the input model is not touched). Each iteration takes a mini-batch of the
    clean data (seeded shuffling, epochs in turn), draws delta uniformly in [-eps, eps], takes
    `steps` sign-gradient ascent steps of size eps / steps on the cross-entropy w.r.t. delta
    (clipped to [-eps, eps]), then one SGD step (lr 0.2, momentum 0.9, as the paper's code) on
    alpha * L(m) + (1 - alpha) * L(m + delta) w.r.t. m -- the paper's weighting: alpha on the
    natural loss -- and clips m to [0, 1]. Returns m (float32, on the CPU). Deterministic for a
    seed on the CPU. The clean data: tensors, or a Dataset `clean_x` with `clean_y` None, read
    through `stream` in the same shuffled order (`workers` DataLoader processes)."""
    data = TensorDataset(clean_x, clean_y) if isinstance(clean_x, torch.Tensor) else clean_x
    n = stream.num_samples(data)
    if n == 0:
        raise ValueError("ANP needs clean data")
    device = device or next(model.parameters()).device
    net = copy.deepcopy(model).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    module = net.get_submodule(layer)
    gen = torch.Generator().manual_seed(seed)
    # On the copy: an unannotated layer is traced (and the copy annotated), the input model is not.
    first = stream.take(data, 1).to(device)
    cdim = channel_dim_of(net, layer, first)
    state: dict = {}

    def hook(m: nn.Module, i: tuple, out: torch.Tensor) -> torch.Tensor:
        if "mask" not in state:  # first (shape-finding) call
            state["channels"] = out.shape[cdim]
            return out
        factor = state["mask"] + state["delta"] if state["noisy"] else state["mask"]
        return out * factor.view(keep_shape(factor.shape[0], out.dim(), cdim))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            net(first)
        c = state["channels"]
        mask = torch.ones(c, device=device, requires_grad=True)
        delta = torch.zeros(c, device=device, requires_grad=True)
        state.update(mask=mask, delta=delta, noisy=False)
        opt = torch.optim.SGD([mask], lr=lr, momentum=momentum)
        pin = torch.device(device).type == "cuda"
        # One shuffled pass after another, a batch per iteration; a new permutation is drawn only
        # when the next batch is needed (the generator's draws stay in the order they always had).
        batches = stream.iter_batches(data, batch_size, order=torch.randperm(n, generator=gen),
                                      workers=workers, pin=pin)
        for _ in range(iterations):
            batch = next(batches, None)
            if batch is None:
                batches = stream.iter_batches(data, batch_size, order=torch.randperm(n, generator=gen),
                                              workers=workers, pin=pin)
                batch = next(batches)
            x, y = batch[0].to(device), batch[1].to(device)
            # Step 1: the adversarial channel perturbation (maximise the loss).
            if eps > 0:
                with torch.no_grad():
                    delta.copy_((torch.rand(c, generator=gen) * 2 - 1).mul_(eps).to(device))
                state["noisy"] = True
                for _ in range(steps):
                    loss = F.cross_entropy(net(x), y)
                    (grad,) = torch.autograd.grad(loss, delta)
                    with torch.no_grad():
                        delta.add_(grad.sign(), alpha=eps / steps).clamp_(-eps, eps)
            # Step 2: the mask (minimise natural and perturbed loss).
            opt.zero_grad(set_to_none=True)
            state["noisy"] = False
            loss = alpha * F.cross_entropy(net(x), y)
            if eps > 0:
                state["noisy"] = True
                loss = loss + (1 - alpha) * F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
            state["noisy"] = False
    finally:
        handle.remove()
    return mask.detach().float().cpu()


def anp_order(model: nn.Module, layer: str, clean_x: torch.Tensor | Dataset, clean_y: torch.Tensor | None, *,
              seed: int = 0, device: torch.device | None = None, **options) -> list[int]:
    """ANP (Wu & Wang, NeurIPS 2021): channels by increasing learned mask value (`anp_mask`), ties
    by index. Channels whose small perturbation most raises the clean loss -- typical of backdoor
    neurons -- get low masks and are pruned first. `options` go to `anp_mask`."""
    m = anp_mask(model, layer, clean_x, clean_y, seed=seed, device=device, **options)
    return torch.sort(m, stable=True).indices.tolist()


@dataclass
class Criterion(Method, family="criterion"):
    """Base of the pruning criteria: `rank` returns the layer's channels in pruning order (most
    suspicious first), from the defender's clean validation data (or the weights) only."""

    # The paper's ranking. What chose it: the paper; CLP and ANP are not yet chosen by any worst
    # case (BENCHMARKS, "Purification on the real tasks").
    default_spec: ClassVar[str] = "activation"
    paper_spec: ClassVar[str] = "activation"  # the paper's (Liu et al., RAID 2018)
    # True when the sweep computes exactly this ranking in its own single pass over the clean data
    # (so a defense need not call `rank` and pay a second pass; the result is the same list).
    ranked_by_sweep: ClassVar[bool] = False

    def rank(self, model: nn.Module, layer: str, clean: Dataset, *, device: torch.device | None = None,
             seed: int = 0, workers: int = 0) -> list[int]:
        raise NotImplementedError


@dataclass
class Activation(Criterion):
    """Increasing mean activation on clean data (Liu et al., "Fine-Pruning", RAID 2018), ties by
    index: the paper's ranking."""

    name: ClassVar[str] = "activation"
    ranked_by_sweep: ClassVar[bool] = True

    def rank(self, model, layer, clean, *, device=None, seed=0, workers=0) -> list[int]:
        return activation_order(model, layer, clean, device=device, workers=workers)


@dataclass
class CLP(Criterion):
    """Decreasing channel Lipschitz upper bound, from the weights alone (Zheng et al., "Data-Free
    Backdoor Removal based on Channel Lipschitzness", ECCV 2022); see `uclc`. The paper's
    threshold u is replaced by the sweep and the stop rule, so CLP has no option here."""

    name: ClassVar[str] = "clp"

    def rank(self, model, layer, clean, *, device=None, seed=0, workers=0) -> list[int]:
        return clp_order(model, layer, stream.take(clean, 2))


@dataclass
class ANP(Criterion):
    """Increasing adversarial-neuron-perturbation mask (Wu & Wang, "Adversarial Neuron Pruning
    Purifies Backdoored Deep Models", NeurIPS 2021), learned on clean data; see `anp_mask`.
    Defaults: the paper's eps 0.4, alpha 0.2, mask lr 0.2 and momentum 0.9, one perturbation step;
    200 iterations of batch 64 (the paper runs 2,000 on CIFAR-10; fewer suffice for the small
    layer masked here)."""

    name: ClassVar[str] = "anp"
    eps: float = 0.4
    alpha: float = 0.2
    iterations: int = 200
    batch_size: int = 64
    steps: int = 1
    lr: float = 0.2
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not (self.eps >= 0 and 0 <= self.alpha <= 1 and self.iterations >= 1 and self.batch_size >= 1
                and self.steps >= 1 and self.lr > 0 and 0 <= self.momentum < 1):
            raise ValueError("needs eps >= 0, 0 <= alpha <= 1, iterations, batch_size, steps >= 1, lr > 0, "
                             f"0 <= momentum < 1; got {self.options()}")

    def rank(self, model, layer, clean, *, device=None, seed=0, workers=0) -> list[int]:
        return anp_order(model, layer, clean, None, seed=seed, device=device, workers=workers,
                         iterations=self.iterations, batch_size=self.batch_size, eps=self.eps,
                         steps=self.steps, alpha=self.alpha, lr=self.lr, momentum=self.momentum)


def channel_order(spec: str | Criterion | None, model: nn.Module, layer: str, clean: Dataset | torch.Tensor,
                  clean_y: torch.Tensor | None = None, *, device: torch.device | None = None, seed: int = 0,
                  workers: int = 0) -> list[int] | None:
    """The pruning order of `layer`'s channels by criterion `spec`, to pass as
    `sweep(..., order=...)`; None where the sweep computes the same ranking itself
    (`ranked_by_sweep`, the paper's). `clean`: a Dataset, or inputs with their labels `clean_y`."""
    criterion = resolve("criterion", spec, what="`criterion`")
    if criterion.ranked_by_sweep:
        return None
    if isinstance(clean, torch.Tensor):
        clean = TensorDataset(clean, clean_y if clean_y is not None else torch.zeros(len(clean), dtype=torch.long))
    return criterion.rank(model, layer, clean, device=device, seed=seed, workers=workers)
