"""`fineprune defend`: sanitize a received model with the defender's clean data, write a report.

A thin layer: flags (and an optional config file) become a `DefendJob`; `defend_files` does the
work. Flags given on the command line win over the config file.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from ..defense.api import METHODS
from ..errors import as_flags
from ..purify.registry import help_line
from .registry import FlagProgress, add_preprocessing, command


def _args(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("model and data")
    io.add_argument("--model", metavar="FILE", help="the received model: safetensors, a state dict "
                    "(.pt/.pth) or a TorchScript archive (weights only; never executed)")
    io.add_argument("--arch", metavar="SPEC", help="architecture: a built-in name, torchvision:NAME, "
                    "timm:NAME[,key=value...] (e.g. timm:vit_tiny_patch16_224,img_size=32) "
                    "or package.module:function")
    io.add_argument("--num-classes", type=int, metavar="N", help="model outputs (default: the clean data's classes)")
    io.add_argument("--data", metavar="PATH", help="clean data: ImageFolder dir, .npz (x, y), wav folder, or task:NAME")
    io.add_argument("--data-root", metavar="DIR", help="dataset folder for task:NAME data (default $FINEPRUNE_DATA)")
    io.add_argument("--val", metavar="PATH", help="separate clean validation data (default: hold out "
                    "--val-fraction of --data)")
    io.add_argument("--val-fraction", type=float, metavar="F", help="held-out part of --data (default 0.2)")
    io.add_argument("--triggered", metavar="PATH", help="triggered test inputs with their true labels (measures "
                    "ASR); task:NAME applies that task's attack to its test split")
    io.add_argument("--target", metavar="T", help="the attack's target label (index or class name)")
    io.add_argument("--out", metavar="DIR", help="output folder (must be new or empty unless --force)")
    io.add_argument("--force", action="store_true", default=None, help="overwrite fineprune's files in --out")
    io.add_argument("--config", metavar="FILE", help="options from a TOML (or YAML) file; flags win")
    add_preprocessing(p)
    d = p.add_argument_group("defense")
    d.add_argument("--method", choices=METHODS, help="fine-prune (default), prune or fine-tune")
    d.add_argument("--layer", metavar="NAME", help="module whose output is pruned (default: the last conv feature "
                   "map; in a transformer, the last block's MLP hidden units)")
    d.add_argument("--threshold", type=float, metavar="POINTS",
                   help="stop pruning before clean accuracy falls more than this many points (default 4)")
    d.add_argument("--epochs", type=int, help="fine-tuning epochs (default 10)")
    d.add_argument("--lr", type=float, help="fine-tuning learning rate (default 0.05)")
    d.add_argument("--batch-size", type=int, help="fine-tuning batch size (default 64)")
    d.add_argument("--optimizer", choices=("sgd", "adam"), help="fine-tuning optimizer (default sgd)")
    d.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="fine-tuning arithmetic: fp32 (default, exact), bf16 (mixed precision: CPU or GPU) or "
                        "fp16 (mixed precision with loss scaling: CUDA only); the sweep and evaluation stay fp32")
    d.add_argument("--channels-last", action="store_true", default=None,
                   help="fine-tune image models in channels-last memory layout (faster on many CPUs and "
                        "GPUs; same arithmetic, so results differ only in the last bits)")
    # Method specs, checked by DefendJob (not argparse choices): a bad name or option is one error
    # line with suggestions, as in a config file. The help is generated from the method registry.
    d.add_argument("--recipe", metavar="SPEC", help="how fine-tuning trains: " + help_line("recipe"))
    d.add_argument("--criterion", metavar="SPEC", help="pruning order: " + help_line("criterion"))
    d.add_argument("--lr-factors", metavar="LIST",
                   help="fine-tuning learning rates tried, as factors of --lr, strongest first; the first run "
                        "within --tolerance of the original on validation data is kept (default 1,0.1,0.01)")
    d.add_argument("--stop-rule", metavar="SPEC", help="when pruning stops (within --threshold): "
                   + help_line("stop_rule"))
    d.add_argument("--tolerance", type=float, metavar="POINTS",
                   help="the fine-tuning accuracy guard: a run whose best epoch loses more than this many "
                        "points on validation data is discarded (default: the --threshold value)")
    e = p.add_argument_group("backdoor evidence (a trigger-free scan before and after the defense)")
    e.add_argument("--scan", metavar="SPEC", help="how to scan: " + help_line("scan"))
    e.add_argument("--no-scan", action="store_true", default=None, help="skip the scans (the result then "
                   "says nothing about whether a backdoor remains)")
    e.add_argument("--select", choices=("evidence", "accuracy"),
                   help="how fine-tuning's result is chosen: evidence (default: among the runs within "
                        "--tolerance, and the model from before fine-tuning, prefer one the scan finds no "
                        "evidence in) or accuracy (the first run within --tolerance; the scan only measures)")
    e.add_argument("--fail-on-evidence", action="store_true", default=None,
                   help="exit with status 3 when the scan still flags a class after the defense (for CI "
                        "pipelines; the outputs are written either way)")
    d.add_argument("--plugin", dest="plugins", action="append", metavar="FILE",
                   help="a Python file imported first: it may register methods (see README, \"Adding a "
                        "method\") or tasks; repeatable")
    d.add_argument("--max-cache-mb", type=float, metavar="MB",
                   help="bound on the sweep's cached features; what does not fit is recomputed in chunks "
                        "(default: cache everything)")
    d.add_argument("--no-compact", dest="compact", action="store_false", default=None,
                   help="skip the compact export")
    d.add_argument("--export", choices=("onnx",),
                   help="also write model.onnx (and model-compact.onnx), checked against PyTorch with "
                        "onnxruntime (pip install 'fineprune[onnx]')")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, help="seed for the split and fine-tuning (default 0)")
    r.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    r.add_argument("--quiet", action="store_true",
                   help="no progress: only the warnings and a one-line verdict, on stderr")
    r.add_argument("--silent", action="store_true",
                   help="print nothing but errors (no progress, warnings, verdict or summary; the warnings "
                        "stay in model.json and report.html)")
    r.add_argument("--workers", type=int, metavar="N", help="processes decoding image or wav folders in "
                   "parallel (default 0: in the main process; tensors from .npz or task:NAME need none)")
    r.add_argument("--resume", action="store_true", default=None,
                   help="continue an interrupted run from its checkpoints in --out (fine-tuning, and the "
                        "sweep when it streams; same command otherwise; the result equals an uninterrupted run's)")


def _job(args: argparse.Namespace):
    from ..pipeline.config import FIELDS, read_config
    from ..pipeline.job import DefendJob

    options = read_config(args.config) if args.config else {}
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    missing = [n for n in ("model", "arch", "data", "out") if not options.get(n)]
    if missing:
        from ..errors import BadInputError
        raise BadInputError(f"missing {', '.join('--' + m for m in missing)} (give them as flags or in --config)")
    return DefendJob(**options)


def _plain_load_warning(res) -> str | None:
    """The warning when plain `load_state_dict` of model.safetensors does not give the defended model."""
    r = res.defense
    if r.layer is None or res.plain is None or res.plain.baked:
        return None
    from ..pipeline.record import TORCHSCRIPT_NAME

    safe = ["fineprune's load_pruned"] + [p.name for p in res.files if p.name in
                                         (TORCHSCRIPT_NAME, "model-compact.safetensors")]
    return ("model.safetensors is NOT defended when loaded with plain load_state_dict (the pruned channels "
            f"come back); use {', '.join(safe)} (see report.html)")


def _headline(res) -> str:
    """The recorded decision in one sentence: model.json's `decision.headline`, which the report's
    headline also is (defense/decision.py); never rebuilt here from the configuration."""
    return f"{res.defense.method}: {res.record['decision']['headline']}"


def _print_summary(res) -> None:
    r = res.defense
    rows = [("clean accuracy", r.before.clean_acc, r.after.clean_acc),
            ("attack success rate", r.before.asr, r.after.asr),
            ("robust accuracy", r.before.robust_acc, r.after.robust_acc)]
    print(f"\n{_headline(res)}")
    for name, b, a in rows:
        if b is None:
            print(f"  {name:<20} not measured (no --triggered set)")
        else:
            print(f"  {name:<20} {100 * b:5.1f}% -> {100 * a:5.1f}%")
    if r.scans:  # beside the accuracy, plainly: is there evidence left?
        before, after = (", ".join(f"class {k}" for k in r.scans[w].flagged) or "none found" for w in ("before", "after"))
        print(f"  {'backdoor evidence':<20} {before} -> {after} ({r.scans['after'].method})")
        if r.scans["after"].flagged:
            print(f"WARNING: {r.scans['after'].verdict()} after the defense")
    print(f"wrote {', '.join(p.name for p in res.files)} to {res.out}")
    if r.layer is not None and res.plain is not None and res.plain.baked:
        print("model.safetensors: the pruning is baked into the weights, so plain load_state_dict "
              "gives the defended model too")
    elif (warning := _plain_load_warning(res)) is not None:
        print(f"WARNING: {warning}")


def _print_verdict(res) -> None:
    """--quiet: every warning of the run, then the one-line verdict, on stderr (nothing on stdout)."""
    from ..defense.decision import outcome

    r = res.defense
    lines = [as_flags(w) for w in res.warnings]
    if (plain := _plain_load_warning(res)) is not None:
        lines.append(plain)
    for w in lines:
        print(f"warning: {w}", file=sys.stderr)
    print(f"fineprune: {_headline(res)} {outcome(r.before, r.after)}", file=sys.stderr, flush=True)


@command("defend", _args)
def run(args: argparse.Namespace) -> int:
    """Remove a backdoor from a received model (files in, sanitized model and report out)."""
    from ..pipeline.defend_files import defend_files

    from ..pipeline.job import EXIT_EVIDENCE

    job = _job(args)
    if args.silent:  # nothing but errors: Python's warnings too (the run's own are in model.json)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = defend_files(job, progress=False)
    else:
        # --quiet drops the progress only: the warnings and the verdict come from the result at the end.
        res = defend_files(job, progress=False if args.quiet else FlagProgress())  # bars and lines on stderr
        if args.quiet:
            _print_verdict(res)
        else:
            _print_summary(res)
    evidence = res.defense.scans.get("after")
    return EXIT_EVIDENCE if job.fail_on_evidence and evidence is not None and evidence.flagged else 0
