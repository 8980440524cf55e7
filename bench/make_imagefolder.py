"""Make a large ImageFolder of real images for the streaming benchmarks (BENCHMARKS.md "Streaming").

GTSRB at 32x32 (../shared/data) upscaled to SIZE x SIZE (bilinear) and written as JPEG files in
one subfolder per class, the layout `fineprune defend` reads lazily. The images are the first N of
one fixed permutation (seed 0) of all 51,839 frames, so every N covers all classes and a larger N
holds the smaller one:

    python bench/make_imagefolder.py --n 10000 --size 224 --out /tmp/gtsrb224-10k

Nothing here is fineprune's code path: the folder is input data, made once, outside the repo.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import data_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, required=True, help="number of images (at most 51,839)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = ap.parse_args()

    from fineprune.data.traffic import load_traffic

    data = load_traffic(data_root())
    parts = [data.train, data.val, data.test]
    x = torch.cat([p.tensors[0] for p in parts])
    y = torch.cat([p.tensors[1] for p in parts])
    if not 0 < args.n <= len(y):
        raise SystemExit(f"--n must be in 1..{len(y)}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: args.n]
    args.out.mkdir(parents=True, exist_ok=True)
    for rank, i in enumerate(order.tolist()):
        folder = args.out / f"{int(y[i]):05d}"
        folder.mkdir(exist_ok=True)
        target = folder / f"{rank:06d}.jpg"
        if target.exists():
            continue
        pixels = (x[i].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        img = Image.fromarray(pixels).resize((args.size, args.size), Image.BILINEAR)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="JPEG", quality=args.quality)
        os.replace(tmp, target)
    print(f"{len(order)} images in {args.out}")


if __name__ == "__main__":
    main()
