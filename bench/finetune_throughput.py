"""Benchmark 4: fine-tuning throughput of `fineprune.training.train` against a plain PyTorch loop.

Both train the same (masked, as in fine-pruning) model from the same weights on the same data with
the same optimiser, schedule and shuffling, so they do identical arithmetic: the final weights are
compared to prove it. Runs alternate within one process; samples/s are compared by medians.

With `--precision P ...` it measures mixed-precision fine-tuning instead (bench/results/
finetune_precision.json): `train` with each precision (and, with `--channels-last`, each also in
channels-last layout), alternating, from the same briefly pre-trained and masked model, reporting
samples/s, the time ratio to fp32 and the clean validation accuracy (evaluated in fp32) after the
same fine-tuning; fp16 needs `--device cuda`.

    python bench/finetune_throughput.py
    python bench/finetune_throughput.py --tiny
    python bench/finetune_throughput.py --precision fp32 bf16 --channels-last --epochs 2
    python bench/finetune_throughput.py --precision fp32 bf16 fp16 --device cuda --threads 4
"""
from __future__ import annotations

import copy
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fineprune.data.types import make_dataset, tensors  # noqa: E402
from fineprune.defense.api import DEFAULT_FINETUNE  # noqa: E402
from fineprune.defense.layer import find_prune_layer  # noqa: E402
from fineprune.defense.mask import pruned_channels, set_pruned  # noqa: E402
from fineprune.evaluation.metrics import accuracy  # noqa: E402
from fineprune.training import TrainConfig, train  # noqa: E402


def plain_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int) -> None:
    """What one writes by hand: shuffled index slices, SGD with momentum, per-step cosine decay."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((x.shape[0] + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def bench_model(name: str, args) -> dict:
    data, kind = common.load_task(common.MODEL_TASK[name], synthetic=args.tiny, seed=args.seed)
    x, y = tensors(data.train)
    n = min(x.shape[0], 128 if args.tiny else args.n_train)
    x, y = x[:n].contiguous(), y[:n].contiguous()
    base = common.build_model(name, data.num_classes).eval()
    choice = find_prune_layer(base, x[:2])
    set_pruned(base, choice.name, list(range(0, choice.channels, 3)), choice.channels)  # as after pruning
    cfg = copy.deepcopy(DEFAULT_FINETUNE)
    cfg.epochs = args.epochs
    ds = make_dataset(x, y)
    finals: dict[str, nn.Module] = {}

    def run_fineprune() -> None:
        m = copy.deepcopy(base)
        torch.manual_seed(args.seed)  # dropout draws from the global generator
        train(m, ds, cfg, device=torch.device("cpu"), seed=args.seed)
        finals["fineprune"] = m

    def run_plain() -> None:
        m = copy.deepcopy(base)
        torch.manual_seed(args.seed)
        plain_loop(m, x, y, cfg, args.seed)
        finals["plain"] = m

    run_plain()  # warm-up (the first optimizer imports torch._dynamo)
    times = common.alternate({"fineprune_train": run_fineprune, "plain_loop": run_plain},
                             args.rounds or (1 if args.tiny else 5))
    a, b = finals["fineprune"].state_dict(), finals["plain"].state_dict()
    same = all(torch.equal(a[k], b[k]) for k in a)
    samples = n * cfg.epochs
    result = {
        "model": name, "data": kind, "n_train": n, "epochs": cfg.epochs, "config": cfg.to_dict(),
        "pruned_layer": choice.name, "times": common.summary(times),
        "samples_per_s": {k: round(samples / common.median(v), 1) for k, v in times.items()},
        "fineprune_over_plain_time": round(common.paired_ratio(times["fineprune_train"], times["plain_loop"]), 4),
        "identical_weights": same,
    }
    result["goal_within_5pct"] = result["fineprune_over_plain_time"] <= 1.05
    print(f"{name}: fineprune {result['samples_per_s']['fineprune_train']}/s, plain "
          f"{result['samples_per_s']['plain_loop']}/s, time ratio {result['fineprune_over_plain_time']}, "
          f"identical weights {same}", flush=True)
    return result


def bench_precision(name: str, args) -> dict:
    """Fine-tuning throughput and the clean accuracy it reaches, per precision (see module doc)."""
    device = torch.device(args.device)
    data, kind = common.load_task(common.MODEL_TASK[name], synthetic=args.tiny, seed=args.seed)
    x, y = tensors(data.train)
    n = min(x.shape[0], 128 if args.tiny else args.n_train)
    x, y = x[:n].contiguous(), y[:n].contiguous()
    xv, yv = tensors(data.val)
    n_val = min(xv.shape[0], 128 if args.tiny else args.n_val)
    val = make_dataset(xv[:n_val], yv[:n_val])
    # Fine-tuning starts from a trained model, as in a defense (weights cached by common).
    base = common.trained_model(name, data, 0 if args.tiny else args.pretrain_epochs, seed=args.seed,
                                max_train=n).eval()
    choice = find_prune_layer(base, x[:2])
    set_pruned(base, choice.name, list(range(0, choice.channels, 3)), choice.channels)  # as after pruning
    acc_start = accuracy(base, val, torch.device("cpu"))
    ds = make_dataset(x, y)
    variants = [(p, cl) for p in args.precision for cl in ((False, True) if args.channels_last else (False,))]
    finals: dict[str, nn.Module] = {}

    def runner(prec: str, cl: bool):
        cfg = replace(DEFAULT_FINETUNE, epochs=args.epochs, precision=prec, channels_last=cl)

        def run() -> None:
            m = copy.deepcopy(base)
            torch.manual_seed(args.seed)
            train(m, ds, cfg, device=device, seed=args.seed)
            finals[label(prec, cl)] = m
        return run

    def label(prec: str, cl: bool) -> str:
        return prec + ("+channels_last" if cl else "")

    fns = {label(p, cl): runner(p, cl) for p, cl in variants}
    next(iter(fns.values()))()  # warm-up (first optimizer step imports torch._dynamo; kernels load)
    times = common.alternate(fns, args.rounds or (1 if args.tiny else 3))
    samples = n * args.epochs
    rows = {}
    for key, model in finals.items():
        rows[key] = {
            "samples_per_s": round(samples / common.median(times[key]), 1),
            "clean_acc": round(accuracy(model.cpu(), val, torch.device("cpu")), 4),
            "masks_kept": pruned_channels(model, choice.name) == pruned_channels(base, choice.name),
        }
        if "fp32" in finals and key != "fp32":
            rows[key]["time_over_fp32"] = round(common.paired_ratio(times[key], times["fp32"]), 4)
            rows[key]["acc_minus_fp32"] = round(rows[key]["clean_acc"] - rows["fp32"]["clean_acc"], 4)
    result = {"model": name, "data": kind, "device": str(device), "n_train": n, "n_val": n_val,
              "epochs": args.epochs, "pretrain_epochs": 0 if args.tiny else args.pretrain_epochs,
              "config": replace(DEFAULT_FINETUNE, epochs=args.epochs).to_dict(), "pruned_layer": choice.name,
              "clean_acc_before": round(acc_start, 4), "times": common.summary(times), "precision": rows}
    print(f"{name} on {device}: " + ", ".join(f"{k} {r['samples_per_s']}/s acc {r['clean_acc']}"
                                              for k, r in rows.items()), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["traffic", "face"],
                   choices=["traffic", "face", "speech", "resnet18"])
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=None,
                   help="measure these fine-tuning precisions (with clean accuracy) instead of the plain loop")
    p.add_argument("--channels-last", action="store_true", help="with --precision: each also in channels-last")
    p.add_argument("--device", default="cpu", help="with --precision: cpu or cuda")
    p.add_argument("--n-val", type=int, default=2048, help="with --precision: validation samples for accuracy")
    p.add_argument("--pretrain-epochs", type=int, default=2,
                   help="with --precision: epochs of the (cached) model fine-tuning starts from")
    args = p.parse_args(argv)
    info = common.setup(args)
    if args.precision:
        info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        results = [bench_precision(m, args) for m in args.models]
        common.write_result("finetune_precision", args.out, common.finish({"machine": info, "results": results}))
        return 0
    results = [bench_model(m, args) for m in args.models]
    common.write_result("finetune_throughput", args.out, common.finish({"machine": info, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
