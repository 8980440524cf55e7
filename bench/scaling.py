"""Benchmark 3: sweep time and peak memory as validation size and channel count grow, and the
`max_cache_mb` bound capping memory.

Each configuration runs in its own subprocess, so its peak resident memory (ru_maxrss, a
high-water mark) is its own. tracemalloc cannot see tensor memory (torch allocates outside
Python's allocator), so RSS is the measure: `rss_before_mb` is the peak after building the model
and data and warming up, `sweep_peak_extra_mb` what the sweep added on top. glibc keeps freed
mid-size buffers in its heap, so that RSS includes memory no tensor holds any more; a second run
per configuration pins glibc's mmap threshold at 4 MiB (MALLOC_MMAP_THRESHOLD_) so that large
buffers go back to the system when freed: its peak (`live_extra_mb`) is close to the memory the
sweep really holds at once. That run is slower (page faults), so only its memory is reported.

The model is a scaling CNN (labelled as such, random weights): 16x16x3 input, conv 16 -> pool ->
conv C (the pruned ReLU, C x 8 x 8) -> 1x1 conv 32 -> ReLU -> global average pool -> Linear(32, 10).
Nothing after the cut shrinks the map, so the cache is the whole C x 8 x 8 tensor (256 C bytes a
sample: 1 GiB at 16k samples and C = 256) -- the case `max_cache_mb` exists for.

    python bench/scaling.py
    python bench/scaling.py --tiny
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def scaling_cnn(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(n: int, c: int, max_cache_mb: float | None, budget_mb: float, seed: int) -> dict:
    """Run inside the child: one sweep, its time and memory."""
    from fineprune.defense.sweep import cached_sweep

    torch.manual_seed(seed)
    model = scaling_cnn(c).eval()
    x = torch.rand(n, 3, 16, 16)
    with torch.no_grad():
        y = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, n, 512)])
    y[::4] = (y[::4] + 1) % 10  # so accuracy moves with k
    cached_sweep(model, "4", x[:64], y[:64], max_cache_mb=max_cache_mb, budget_mb=budget_mb)  # warm-up
    before = _rss_mb()
    t0 = time.perf_counter()
    curve = cached_sweep(model, "4", x, y, max_cache_mb=max_cache_mb, budget_mb=budget_mb)
    seconds = time.perf_counter() - t0
    after = _rss_mb()
    digest = hashlib.sha256(json.dumps(curve.clean_correct).encode()).hexdigest()[:16]
    return {
        "n_val": n, "channels": c, "max_cache_mb": max_cache_mb, "budget_mb": budget_mb,
        "seconds": round(seconds, 3), "rss_before_mb": round(before, 1), "rss_peak_mb": round(after, 1),
        "sweep_peak_extra_mb": round(after - before, 1),
        "input_mb": round(x.numel() * 4 / 2**20, 1),
        "full_cache_would_be_mb": round(n * c * 64 * 4 / 2**20, 1),
        "cache_mb": curve.extra["cache_mb"], "streamed_samples": curve.extra["streamed_samples"],
        "recomputed": curve.extra["recomputed"], "fast_path": curve.extra["fast_path"],
        "counts_sha": digest,
    }


def configs(tiny: bool) -> list[tuple[int, int, float | None]]:
    if tiny:
        return [(256, 16, None), (256, 16, 0.05)]
    grid: list[tuple[int, int, float | None]] = []
    for n in (1000, 4000, 16000):
        grid.append((n, 256, None))
    for c in (64, 1024):
        grid.append((4000, c, None))
    # The bound: 16k x 256 (1 GiB of features) capped at 64 MB; 16k x 1024 (4 GiB) only capped.
    grid += [(16000, 256, 64.0), (16000, 1024, 256.0)]
    return grid


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--one", nargs=3, metavar=("N", "C", "MAX_CACHE_MB"), help=argparse_help())
    p.add_argument("--budget-mb", type=float, default=64.0, help="working memory of head batches")
    args = p.parse_args(argv)
    info = common.setup(args)
    if args.one:
        n, c, cap = int(args.one[0]), int(args.one[1]), args.one[2]
        print(json.dumps(one(n, c, None if cap == "none" else float(cap), args.budget_mb, args.seed)))
        return 0
    rows = []
    for n, c, cap in configs(args.tiny):
        cmd = [sys.executable, __file__, "--one", str(n), str(c), "none" if cap is None else str(cap),
               "--budget-mb", str(1.0 if args.tiny else args.budget_mb), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        row = _child(cmd, {})
        live = _child(cmd, {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)})
        row["live_extra_mb"] = live["sweep_peak_extra_mb"]
        rows.append(row)
        print(f"N={n} C={c} cap={cap}: {row['seconds']}s, peak RSS {row['rss_peak_mb']} MB "
              f"(+{row['sweep_peak_extra_mb']} MB, live +{row['live_extra_mb']} MB; full cache "
              f"{row['full_cache_would_be_mb']} MB), streamed {row['streamed_samples']}", flush=True)
    same = {}
    for r in rows:
        same.setdefault((r["n_val"], r["channels"]), set()).add(r["counts_sha"])
    result = {"machine": info, "model": "scaling CNN (see docstring), random weights", "results": rows,
              "bounded_equals_unbounded": all(len(v) == 1 for v in same.values())}
    common.write_result("scaling", args.out, common.finish(result))
    return 0


def _child(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def argparse_help() -> str:
    return "run one configuration in this process and print its JSON (used by the parent)"


if __name__ == "__main__":
    raise SystemExit(main())
