"""`fineprune scan`: look for evidence of a backdoor in a received model, from clean data alone.

The model file, the data and the preprocessing are read exactly as `fineprune defend` reads them
(the same functions: `pipeline.model_input`, `pipeline.inputs`, `pipeline.outdir`, and
`DefendJob.validate` for the shared options); the scan itself is a method of the "scan" family
(`fineprune.purify.scan`), and its files are written by `purify.scan.report`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from datetime import UTC, datetime

from ..purify.registry import help_line
from .registry import FlagProgress, add_preprocessing, add_threads, command


def _args(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("model and data")
    io.add_argument("--model", metavar="FILE", required=True, help="the received model: safetensors, a state "
                    "dict (.pt/.pth) or a TorchScript archive (weights only; never executed)")
    io.add_argument("--arch", metavar="SPEC", required=True, help="architecture: a built-in name, "
                    "torchvision:NAME, timm:NAME[,key=value...] or package.module:function")
    io.add_argument("--num-classes", type=int, metavar="N", help="model outputs (default: the clean data's classes)")
    io.add_argument("--data", metavar="PATH", required=True,
                    help="clean data: ImageFolder dir, .npz (x, y), wav folder, or task:NAME (its validation split)")
    io.add_argument("--data-root", metavar="DIR", help="dataset folder for task:NAME data (default $FINEPRUNE_DATA)")
    io.add_argument("--out", metavar="DIR", required=True, help="output folder (must be new or empty unless --force)")
    io.add_argument("--force", action="store_true", help="overwrite fineprune's files in --out")
    add_preprocessing(p)
    s = p.add_argument_group("scan")
    s.add_argument("--method", metavar="SPEC", help="how to scan: " + help_line("scan"))
    s.add_argument("--plugin", dest="plugins", action="append", metavar="FILE",
                   help="a Python file imported first (it may register scan methods); repeatable")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="seed for the scan's samples and optimisation (default 0)")
    r.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    r.add_argument("--quiet", action="store_true", help="no progress output; the verdict line still goes to stderr")
    r.add_argument("--workers", type=int, metavar="N", help="processes decoding image or wav folders (default 0)")
    add_threads(r)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["fineprune", "scan"]
    for name in ("model", "arch", "num_classes", "data", "data_root", "out", "mean", "std", "input_size",
                 "image_mode", "image_check", "audio_length", "sample_rate", "method", "seed", "device", "workers"):
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        parts += [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    for plugin in args.plugins or []:
        parts += ["--plugin", str(plugin)]
    return shlex.join(parts + (["--force"] if args.force else []))


def scan_files(args: argparse.Namespace, progress) -> tuple[object, list]:
    """Load the model and the clean data as `defend` does, scan, write the files; returns the
    `ScanResult` and the paths written."""
    import torch

    from ..data import stream
    from ..io.model_files import load_weights
    from ..pipeline.inputs import Preprocessing, TaskSource, load_input
    from ..pipeline.job import DefendJob
    from ..pipeline.model_input import build_model, check_outputs, first_conv_channels
    from ..pipeline.outdir import check_out_dir, prepare_out_dir
    from ..pipeline.provenance import versions
    from ..pipeline.sanity import check_labels
    from ..purify.registry import resolve
    from ..purify.scan.report import write_scan_outputs
    from ..runtime import seed_everything

    # The options `defend` shares, checked by its own validation (refused before any work).
    DefendJob(model=args.model, arch=args.arch, data=args.data, out=args.out, num_classes=args.num_classes,
              mean=args.mean, std=args.std, input_size=args.input_size, image_mode=args.image_mode,
              workers=args.workers, plugins=args.plugins).validate()
    scan = resolve("scan", args.method, what="`method`")
    check_out_dir(args.out, args.force)
    seed_everything(args.seed)
    loaded = load_weights(args.model)  # refuses unsafe pickles before anything else happens
    expected = first_conv_channels(args.arch, loaded)
    image_mode = args.image_mode or {1: "grey", 3: "rgb"}.get(expected or 0)
    prep = Preprocessing(args.mean, args.std, tuple(args.input_size) if args.input_size else None,
                         args.audio_length, args.sample_rate, image_mode, image_check=args.image_check or "decode")
    clean = load_input(args.data, prep, "clean", TaskSource(args.data_root, args.seed))
    labels = stream.labels_of(clean.dataset, args.workers or 0)
    num_classes = int(args.num_classes) if args.num_classes else max(len(clean.class_names), int(labels.max()) + 1)
    check_labels(labels, num_classes, clean.source)
    examples = stream.take(clean.dataset, 64)
    model = build_model(args.arch, num_classes, int(examples.shape[1]), loaded, expected)
    check_outputs(model, examples[:2], num_classes)
    progress.log(f"scanning {num_classes} classes with {scan.spec()} on {len(clean.dataset)} clean inputs")
    result = scan.run(model, clean.dataset, num_classes, device=args.device, seed=args.seed, progress=progress,
                      class_names=clean.class_names, workers=args.workers or 0)
    out = prepare_out_dir(args.out, args.force)
    record = {"model": {"path": str(args.model), "sha256": loaded.sha256, "format": loaded.format},
              "arch": args.arch, "data": clean.describe(), "preprocessing": prep.to_dict(), "seed": args.seed,
              "device": str(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
              "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "versions": versions(), "command": _command_line(args)}
    files = write_scan_outputs(out, result, (examples, labels[: examples.shape[0]]), record)
    if args.force:  # pictures an earlier scan left for other classes would mix two runs
        for old in out.glob("trigger-class*-*.png"):
            if old not in files:
                old.unlink()
    return result, files


@command("scan", _args)
def run(args: argparse.Namespace) -> int:
    """Look for backdoor evidence in a received model from clean data alone (no trigger needed)."""
    from ..progress import QUIET

    result, files = scan_files(args, QUIET if args.quiet else FlagProgress())
    if not args.quiet:
        print(f"wrote {', '.join(p.name for p in files)} to {files[0].parent}")
    print(f"fineprune: {result.verdict()}", file=sys.stderr, flush=True)
    return 0
