"""Benchmark 1: fineprune's cached sweep against the usual protocol, same model, data and k-grid.

The usual protocol (as backdoor toolboxes sweep): rank channels with one hooked pass, then for
each k mask the k lowest channels and run the whole network over the validation set. The
re-ranking variant recomputes the activations of the currently pruned network before every step
(done in the same pass that evaluates it: the cheapest honest form). When a protocol is run on a
subset of k (`--full-ks`), its per-step cost is measured and extrapolated linearly to all C+1
steps (each step is one forward pass over the same data, so the cost per step is constant).

    python bench/sweep_speed.py                 # traffic, face, resnet18 (trained briefly, real data)
    python bench/sweep_speed.py --tiny          # smoke test
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fineprune.data.types import tensors  # noqa: E402
from fineprune.defense.layer import find_prune_layer  # noqa: E402
from fineprune.defense.sweep import cached_sweep  # noqa: E402

TRAIN = {"traffic": dict(epochs=1, max_train=12000), "face": dict(epochs=15, max_train=None),
         "resnet18": dict(epochs=1, max_train=6000)}


@torch.inference_mode()
def plain_forward(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """One forward pass over the validation set: the floor any sweep must pay."""
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


class _MaskHook:
    """Forward hook zeroing masked channels of a layer's output, recording channel sums."""

    def __init__(self, channels: int) -> None:
        self.keep = torch.ones(channels, dtype=torch.bool)
        self.sums = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def __call__(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(out.dim()) if d != 1]
        self.sums += out.double().sum(dim=dims)
        self.count += out.numel() // out.shape[1]
        return out.masked_fill(~self.keep.view(1, -1, *([1] * (out.dim() - 2))), 0.0)

    def means(self) -> torch.Tensor:
        return self.sums / max(self.count, 1)

    def reset(self) -> None:
        self.sums.zero_()
        self.count = 0


def usual_protocol(model: nn.Module, layer: str, channels: int, x: torch.Tensor, y: torch.Tensor,
                   ks: list[int]) -> dict:
    """Rank once, then one full masked forward pass per k in `ks`."""
    hook = _MaskHook(channels)
    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        t0 = time.perf_counter()
        plain_forward(model, x)
        order = torch.sort(hook.means(), stable=True).indices
        t_rank = time.perf_counter() - t0
        correct, t_steps = {}, []
        for k in ks:
            t0 = time.perf_counter()
            hook.keep[:] = True
            hook.keep[order[:k]] = False
            correct[k] = int((plain_forward(model, x) == y).sum())
            t_steps.append(time.perf_counter() - t0)
    finally:
        handle.remove()
    return {"correct": correct, "rank_s": t_rank, "step_s": t_steps, "order": order.tolist()}


def rerank_protocol(model: nn.Module, layer: str, channels: int, x: torch.Tensor, y: torch.Tensor,
                    steps: int) -> dict:
    """Steps k = 0..steps-1: one pass evaluates the pruned network and re-ranks what is left."""
    hook = _MaskHook(channels)
    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        correct, t_steps, pruned = {}, [], []
        for k in range(steps):
            t0 = time.perf_counter()
            hook.reset()
            correct[k] = int((plain_forward(model, x) == y).sum())
            means = hook.means().masked_fill(~hook.keep, float("inf"))
            nxt = int(torch.sort(means, stable=True).indices[0])
            pruned.append(nxt)
            hook.keep[nxt] = False
            t_steps.append(time.perf_counter() - t0)
    finally:
        handle.remove()
    return {"correct": correct, "step_s": t_steps, "order": pruned}


def load_legacy(path: Path):
    """An older sweep.py (e.g. `git show COMMIT:src/fineprune/defense/sweep.py`), for before/after."""
    name = "fineprune.defense._sweep_legacy"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def even_ks(c: int, n: int) -> list[int]:
    if n <= 0 or n >= c + 1:
        return list(range(c + 1))
    return sorted({round(i * c / (n - 1)) for i in range(n)})


def bench_model(name: str, args, legacy) -> dict:
    task = common.MODEL_TASK[name]
    data, kind = common.load_task(task, synthetic=args.tiny, seed=args.seed)
    train = TRAIN.get(name, {}) if not args.tiny and not args.random_init else {"epochs": 0}
    t0 = time.perf_counter()
    model = common.trained_model(name, data, train.get("epochs", 0), args.seed, train.get("max_train"))
    t_train = time.perf_counter() - t0
    x, y = tensors(data.val)
    n = args.n_val.get(name) if args.n_val else None
    n = min(x.shape[0], n or (64 if args.tiny else 2000 if name != "resnet18" else 1000))
    x, y = x[:n].contiguous(), y[:n].contiguous()
    choice = find_prune_layer(model, x[:2])
    c = choice.channels
    ks = even_ks(c, 3 if args.tiny else args.full_ks)
    rerank_steps = min(c + 1, 3 if args.tiny else max(args.full_ks, 1))
    curves = {}

    def cached() -> None:
        curves["cached"] = cached_sweep(model, choice.name, x, y)

    def cached_exact_head() -> None:
        curves["exact_head"] = cached_sweep(model, choice.name, x, y, fast=False)

    runs: dict = {}

    def usual() -> None:
        runs.setdefault("usual", []).append(usual_protocol(model, choice.name, c, x, y, ks))

    def rerank() -> None:
        runs.setdefault("rerank", []).append(rerank_protocol(model, choice.name, c, x, y, rerank_steps))

    fns = {"plain_forward": lambda: plain_forward(model, x), "cached": cached,
           "cached_exact_head": cached_exact_head}
    if legacy is not None:
        fns["cached_legacy"] = lambda: curves.__setitem__("legacy", legacy.cached_sweep(model, choice.name, x, y))
    fns["usual"] = usual
    fns["rerank"] = rerank
    plain_forward(model, x[:256])  # warm-up (allocator, oneDNN primitives)
    times = common.alternate(fns, args.rounds or (1 if args.tiny else 3))

    cur = curves["cached"]
    u_steps = [s for r in runs["usual"] for s in r["step_s"]]
    r_steps = [s for r in runs["rerank"] for s in r["step_s"]]
    usual_total = [r["rank_s"] + (c + 1) * common.median(r["step_s"]) for r in runs["usual"]]
    rerank_total = [(c + 1) * common.median(r["step_s"]) for r in runs["rerank"]]
    cached_t, floor_t = times["cached"], times["plain_forward"]
    equal_usual = all(cur.clean_correct[k] == v for r in runs["usual"] for k, v in r["correct"].items())
    equal_rerank = all(cur.clean_correct[k] == v for r in runs["rerank"] for k, v in r["correct"].items())
    same_order = runs["usual"][0]["order"] == cur.order
    out = {
        "model": name, "data": kind, "task": task, "layer": choice.name, "channels": c,
        "n_val": int(x.shape[0]), "train_seconds": round(t_train, 2), "train": train,
        "usual_ks": ks, "usual_extrapolated": len(ks) < c + 1,
        "rerank_steps_run": rerank_steps, "rerank_extrapolated": rerank_steps < c + 1,
        "times": common.summary(times),
        "usual_step_median_s": round(common.median(u_steps), 4),
        "rerank_step_median_s": round(common.median(r_steps), 4),
        "usual_total_s": [round(v, 3) for v in usual_total],
        "rerank_total_s": [round(v, 3) for v in rerank_total],
        "ratios": {
            "usual_over_cached": round(common.paired_ratio(usual_total, cached_t), 2),
            "rerank_over_cached": round(common.paired_ratio(rerank_total, cached_t), 2),
            "cached_over_plain_forward": round(common.paired_ratio(cached_t, floor_t), 3),
            "exact_head_over_cached": round(common.paired_ratio(times["cached_exact_head"], cached_t), 2),
        },
        "cached_extra": cur.extra,
        "recomputed_fraction": round(cur.extra["recomputed"] / max(cur.extra["evaluated"], 1), 4),
        "counts_equal_usual": equal_usual, "counts_equal_rerank": equal_rerank,
        "order_equal_usual": same_order,
        "counts_equal_exact_head": curves["exact_head"].clean_correct == cur.clean_correct,
        "clean_acc_k0": cur.clean_acc[0],
    }
    if legacy is not None:
        out["ratios"]["legacy_over_cached"] = round(common.paired_ratio(times["cached_legacy"], cached_t), 2)
        out["counts_equal_legacy"] = curves["legacy"].clean_correct == cur.clean_correct
    out["goals"] = {
        "cached_50x_faster_than_usual": out["ratios"]["usual_over_cached"] >= 50,
        "cached_within_1.5x_of_forward": out["ratios"]["cached_over_plain_forward"] <= 1.5,
    }
    print(f"{name}: C={c} N={x.shape[0]} usual/cached {out['ratios']['usual_over_cached']}x, "
          f"rerank/cached {out['ratios']['rerank_over_cached']}x, cached/forward "
          f"{out['ratios']['cached_over_plain_forward']}, recomputed {out['recomputed_fraction']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["traffic", "face", "resnet18"])
    p.add_argument("--full-ks", type=int, default=9,
                   help="k values the usual protocol runs (evenly spaced, extrapolated); 0 = all")
    p.add_argument("--n-val", type=lambda s: dict((k, int(v)) for k, v in (i.split("=") for i in s.split(","))),
                   default=None, help="validation samples per model, e.g. traffic=2000,resnet18=1000")
    p.add_argument("--random-init", action="store_true", help="do not train the models briefly first")
    p.add_argument("--legacy", type=Path, default=None,
                   help="an older sweep.py to time alongside (before/after comparison)")
    args = p.parse_args(argv)
    info = common.setup(args)
    legacy = load_legacy(args.legacy) if args.legacy else None
    results = [bench_model(m, args, legacy) for m in args.models]
    common.write_result("sweep_speed", args.out, common.finish({"machine": info, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
