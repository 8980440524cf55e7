"""The ViT exact sweep with and without class-token slicing (issue 24, item 2).

Model: timm `vit_tiny_patch16_224` (random weights: time does not depend on them), pruned layer
`blocks.11.mlp.act` (768 hidden units), inputs random images. Three measurements, 1 thread:

- *forward*: one plain forward pass over the sliced sweep's images (the floor of any sweep);
- *sliced*: `cached_sweep` (class-token pooling found by the cut: only token 0 is cached and
  replayed per k) over `--n-fast` images;
- *today*: the same sweep with `tokens=False` (every token replayed, the path before this work)
  over `--n-slow` and `--n-slow`/2 images; its cost is a fixed part (tracing the cut) plus the
  same per-k head work for every image, so it is extrapolated to `--n-fast` images along the line
  through those two points (the slope is the cost per image).

Equality: the sliced and the unsliced sweeps give the same counts at every k on the n-slow images
(the tests also check both against full masked passes on small ViTs).

    python bench/vit_sweep.py --n-fast 400 --n-slow 4
    python bench/vit_sweep.py --tiny
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fineprune.defense.cut import cut_at  # noqa: E402
from fineprune.defense.sweep import cached_sweep  # noqa: E402

LAYER = "blocks.11.mlp.act"


@torch.inference_mode()
def forward(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        model(x[i : i + batch_size])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import timm

    p = common.base_parser(__doc__)
    p.add_argument("--n-fast", type=int, default=400, help="images for the forward pass and the sliced sweep")
    p.add_argument("--n-slow", type=int, default=4, help="images for today's (unsliced) sweep")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=43)
    args = p.parse_args(argv)
    if args.tiny:
        args.n_fast, args.n_slow, args.img_size = 16, 2, 32
    info = common.setup(args)
    kw = {"img_size": args.img_size} if args.img_size != 224 else {}
    if args.tiny:
        kw.update(patch_size=8, depth=2, embed_dim=32, num_heads=2)
    layer = LAYER if not args.tiny else "blocks.1.mlp.act"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=args.classes, **kw).eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand((args.n_fast, 3, args.img_size, args.img_size), generator=gen)
    y = torch.randint(0, args.classes, (args.n_fast,), generator=gen)
    # the batch `fineprune defend` uses at this input size (32 MiB of input, stream.inference_batch)
    from fineprune.data import stream
    bs = stream.inference_batch(x, 256)

    cut = cut_at(model, layer, x[:1])
    assert cut.tokens is not None and cut.tokens.tokens == [0], "the cut should find class-token pooling"
    forward(model, x[: min(2, args.n_fast)], bs)  # warm-up
    t_forward = forward(model, x, bs)
    t0 = time.perf_counter()
    sliced = cached_sweep(model, layer, x, y, batch_size=bs)
    t_sliced = time.perf_counter() - t0
    print(f"forward {t_forward:.1f} s, sliced sweep {t_sliced:.1f} s over {args.n_fast} images", flush=True)

    xs, ys = x[: args.n_slow], y[: args.n_slow]
    small = cached_sweep(model, layer, xs, ys, batch_size=bs)
    half = max(1, args.n_slow // 2)
    t0 = time.perf_counter()
    cached_sweep(model, layer, xs[:half], ys[:half], batch_size=bs, tokens=False)
    t_half = time.perf_counter() - t0
    t0 = time.perf_counter()
    today = cached_sweep(model, layer, xs, ys, batch_size=bs, tokens=False)
    t_today = time.perf_counter() - t0
    equal = today.clean_correct == small.clean_correct and today.order == small.order
    per_image = (t_today - t_half) / (args.n_slow - half) if args.n_slow > half else t_today / args.n_slow
    today_extrap = t_today + per_image * (args.n_fast - args.n_slow)
    payload = {
        "machine": info, "model": "timm:vit_tiny_patch16_224", "img_size": args.img_size, "layer": layer,
        "channels": len(sliced.order), "tokens_replayed": sliced.extra["tokens"],
        "tokens_total": int(cut.pre(x[:1])[0].shape[-1]), "batch_size": bs,
        "n_fast": args.n_fast, "n_slow": args.n_slow,
        "forward_s": round(t_forward, 3), "sliced_sweep_s": round(t_sliced, 3),
        "today_sweep_s_on_n_slow": round(t_today, 3), "today_sweep_s_on_half_n_slow": round(t_half, 3),
        "today_s_per_image": round(per_image, 3),
        "today_sweep_s_extrapolated_to_n_fast": round(today_extrap, 1),
        "speedup_vs_today_extrapolated": round(today_extrap / t_sliced, 1),
        "sliced_over_forward": round(t_sliced / t_forward, 3),
        "equal_counts_sliced_vs_today_on_n_slow": equal,
    }
    print(payload)
    common.write_result("vit_sweep" if not args.tiny else "vit_sweep_tiny", args.out, common.finish(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
