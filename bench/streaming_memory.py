"""Peak memory of `fineprune defend` on large image folders (issue 15, BENCHMARKS.md "Streaming").

Two measurements, each written to a JSON under bench/results/:

* `run`: `fineprune defend` as a user runs it (a subprocess), on a torchvision or timm model with
  random weights saved as safetensors (memory and time do not depend on the weights), over one
  or more ImageFolders made by bench/make_imagefolder.py. The process tree's resident memory
  (main process's RSS plus each DataLoader worker's unique set size: a forked worker shares the
  main process's pages, which its RSS would count twice) is sampled every 0.2 s; the peak of the sum, the main
  process's own peak and the wall time are recorded per folder, so N -> peak RSS is a curve.

      python bench/streaming_memory.py run --arch torchvision:resnet18 --epochs 1 \
          --folders /tmp/gtsrb224-2000 /tmp/gtsrb224-10000 --threads 2 --workers 1

* `equal`: the lazy (streamed) folder and the same images held in memory give the same sweep
  curve and the same pruned channels (Python API, one process), on a subset that fits both.

      python bench/streaming_memory.py equal --arch torchvision:resnet18 --folder /tmp/gtsrb224-2000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from common import RESULTS, finish, machine


def _model_file(arch: str, num_classes: int, folder: Path, seed: int = 0) -> Path:
    """A randomly initialised model of `arch` saved as safetensors (the 'received model')."""
    from safetensors.torch import save_file

    from fineprune.io.arch import build_arch

    torch.manual_seed(seed)
    model = build_arch(arch, num_classes=num_classes)
    path = folder / f"{arch.replace(':', '_').replace(',', '_')}-{num_classes}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _classes(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir())


def _images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


class _Sampler(threading.Thread):
    """Samples the resident memory of a process and its children (the DataLoader workers)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.proc, self.every = psutil.Process(pid), every
        self.peak_tree = self.peak_main = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                main = self.proc.memory_info().rss
                # a worker forked from the main process shares its pages: count only its own (USS)
                tree = main + sum(c.memory_full_info().uss for c in self.proc.children(recursive=True))
            except psutil.Error:
                break
            self.peak_main, self.peak_tree = max(self.peak_main, main), max(self.peak_tree, tree)
            time.sleep(self.every)


def cmd_run(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in args.folders:
            k = _classes(folder)
            model = _model_file(args.arch, k, Path(tmp))
            out = Path(tmp) / f"out-{folder.name}"
            cmd = [sys.executable, "-m", "fineprune.cli", "defend",
                   "--model", str(model), "--arch", args.arch, "--data", str(folder), "--out", str(out),
                   "--method", args.method, "--epochs", str(args.epochs), "--workers", str(args.workers),
                   "--batch-size", str(args.batch_size), "--quiet", "--no-compact"]
            if args.max_cache_mb is not None:
                cmd += ["--max-cache-mb", str(args.max_cache_mb)]
            if args.lr_factors is not None:
                cmd += ["--lr-factors", args.lr_factors]
            t0 = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            sampler = _Sampler(p.pid)
            sampler.start()
            log, _ = p.communicate()
            sampler.stop.set()
            sampler.join()
            wall = time.perf_counter() - t0
            record = json.loads((out / "model.json").read_text()) if (out / "model.json").exists() else {}
            row = {"folder": str(folder), "images": _images(folder), "classes": k, "rc": p.returncode,
                   "wall_s": round(wall, 1), "peak_rss_tree_mb": round(sampler.peak_tree / 2**20),
                   "peak_rss_main_mb": round(sampler.peak_main / 2**20),
                   "pruned_count": record.get("pruned_count"), "num_channels": record.get("num_channels"),
                   "timings": record.get("timings_seconds"), "layer": record.get("layer"),
                   "layer_reason": record.get("layer_reason"),
                   "outputs": sorted(f.name for f in out.iterdir()) if out.exists() else []}
            if p.returncode != 0:
                row["log_tail"] = log[-2000:]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"mode": "run", "arch": args.arch, "method": args.method, "epochs": args.epochs,
            "workers": args.workers, "batch_size": args.batch_size, "max_cache_mb": args.max_cache_mb,
            "lr_factors": args.lr_factors, "threads": args.threads, "rows": rows}


def cmd_equal(args: argparse.Namespace) -> dict:
    from fineprune.data.generic import load_data
    from fineprune.data.splits import holdout
    from fineprune.defense.api import Pruning, RunOptions
    from fineprune.io.arch import build_arch

    lazy, names = load_data(args.folder, lazy=True)
    eager, _ = load_data(args.folder)
    torch.manual_seed(0)
    model = build_arch(args.arch, num_classes=len(names)).eval()
    results = {}
    for name, data in (("in_memory", eager), ("streamed", lazy)):
        _, val = holdout(data, fraction=args.val_fraction, seed=0)
        t0 = time.perf_counter()
        r = Pruning().fit(model, val, run=RunOptions(progress=False, workers=args.workers))
        results[name] = {"seconds": round(time.perf_counter() - t0, 1), "stop_k": r.stop_k,
                         "pruned": [int(c) for c in r.pruned_channels],
                         "clean_correct": [int(c) for c in r.sweep.clean_correct]}
        print(name, results[name]["seconds"], "s, stop", r.stop_k, flush=True)
    same = (results["in_memory"]["clean_correct"] == results["streamed"]["clean_correct"]
            and results["in_memory"]["pruned"] == results["streamed"]["pruned"])
    print("same curve and pruned channels:", same)
    return {"mode": "equal", "arch": args.arch, "folder": str(args.folder), "images": _images(args.folder),
            "val_fraction": args.val_fraction, "same_curve_and_channels": same,
            "seconds": {k: v["seconds"] for k, v in results.items()}, "stop_k": results["streamed"]["stop_k"],
            "channels": len(results["streamed"]["clean_correct"]) - 1, "layer": r.layer}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run")
    run.add_argument("--folders", type=Path, nargs="+", required=True)
    run.add_argument("--arch", default="torchvision:resnet18")
    run.add_argument("--method", default="fine-prune")
    run.add_argument("--epochs", type=int, default=1)
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--max-cache-mb", type=float, default=None)
    run.add_argument("--lr-factors", default=None, help="passed on (e.g. 1: one fine-tuning run, no retries)")
    eq = sub.add_parser("equal")
    eq.add_argument("--folder", type=Path, required=True)
    eq.add_argument("--arch", default="torchvision:resnet18")
    eq.add_argument("--val-fraction", type=float, default=0.2)
    eq.add_argument("--workers", type=int, default=0)
    for p in (run, eq):
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = {"machine": machine(), **(cmd_run(args) if args.mode == "run" else cmd_equal(args))}
    name = args.arch.replace(":", "_").split(",")[0] + (f"_{args.method}" if args.mode == "run" else "")
    out = args.out or RESULTS / f"streaming_{args.mode}_{name}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(finish(payload), indent=2) + "\n")
    os.replace(tmp, out)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
