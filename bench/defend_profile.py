"""Benchmark 2: end-to-end fine-pruning time per task, and where the time goes (cProfile).

Per task: load the data; the attacker trains a BadNets-backdoored model (not part of the defense,
timed apart; shortened with --attacker-epochs and cached under ~/.cache/fineprune/bench); then the
defender runs `FinePruning.fit` (statistics + sweep, fine-tuning, evaluation) under cProfile and
draws the pruning-curve report. The defender's clean data is split 70/30 into fine-tuning and
choosing data, as in the demo.

    python bench/defend_profile.py                          # demo, face, speech, traffic
    python bench/defend_profile.py --tasks demo --tiny      # smoke test
"""
from __future__ import annotations

import cProfile
import hashlib
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fineprune.data.splits import stratified_split  # noqa: E402
from fineprune.data.types import make_dataset, tensors  # noqa: E402
from fineprune.defense.api import DEFAULT_FINETUNE, FinePruning, RunOptions  # noqa: E402
from fineprune.report.plots import plot_pruning_curve  # noqa: E402
from fineprune.training import TrainConfig, train  # noqa: E402


def _demo_setup(seed: int, tiny: bool):
    from fineprune.attack.badnets import BadNets
    from fineprune.attack.policy import AllToOne
    from fineprune.attack.triggers import PatchTrigger
    from fineprune.data.embedded import load_mnist5k
    from fineprune.models.small import SmallCNN
    from fineprune.tasks import get_task

    ATTACKER_TRAINING = get_task("mnist").attacker

    data = load_mnist5k(seed=seed)
    if tiny:
        from fineprune.tasks import shrink
        data = shrink(data, 0.1, seed, eval_fraction=0.3)
    attack = BadNets(PatchTrigger(size=(3, 3), position=(-2, -2), color=(1.0,)), AllToOne(0),
                     rate=0.10, seed=seed)
    return data, attack, lambda: SmallCNN(), ATTACKER_TRAINING, None


def _task_setup(name: str, seed: int, tiny: bool):
    from fineprune.tasks import get_task, shrink

    spec = get_task(name)
    data = spec.load(common.data_root(), seed=seed)
    if tiny:
        data = shrink(data, 0.05, seed, eval_fraction=min(1.0, 400 / len(data.val)))
    return data, spec.make_attack(seed=seed, data=data), lambda: spec.build_model(data.num_classes), \
        spec.attacker, spec.finetune


def backdoored_model(task: str, build, data, poisoned, cfg: TrainConfig, seed: int):
    """The attacker's model, cached by recipe (the defense is what is measured)."""
    x, y = tensors(poisoned)
    key = hashlib.sha256(f"{task}|{x.shape}|{int(y.sum())}|{cfg.to_dict()}|{seed}".encode()).hexdigest()[:16]
    path = Path.home() / ".cache" / "fineprune" / "bench" / f"backdoored-{task}-{key}.pt"
    torch.manual_seed(seed)
    model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), 0.0, True
    t0 = time.perf_counter()
    train(model, poisoned, cfg, device=torch.device("cpu"), seed=seed)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), seconds, False


def top_functions(prof: cProfile.Profile, key: str, n: int) -> list[dict]:
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc,
                     "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)})
    rows.sort(key=lambda r: r[f"{key}_s"], reverse=True)
    return rows[:n]


def bench_task(task: str, args) -> dict:
    t0 = time.perf_counter()
    setup = _demo_setup if task == "demo" else (lambda s, t: _task_setup(task, s, t))
    data, attack, build, attacker_cfg, task_finetune = setup(args.seed, args.tiny)
    t_load = time.perf_counter() - t0
    poisoned = attack.poison(data.train)
    poisoned = getattr(poisoned, "dataset", poisoned)
    epochs = 1 if args.tiny else (args.attacker_epochs or attacker_cfg.epochs)
    cfg = TrainConfig(**{**attacker_cfg.to_dict(), "epochs": epochs})
    model, t_attack, cached = backdoored_model(task, build, data, poisoned, cfg, args.seed)
    xd, yd = tensors(data.val)
    ft_idx, val_idx = stratified_split(yd, (0.7, 0.3), args.seed)
    clean_train, clean_val = make_dataset(xd[ft_idx], yd[ft_idx]), make_dataset(xd[val_idx], yd[val_idx])
    triggered = attack.triggered(clean_val)
    ft = task_finetune or DEFAULT_FINETUNE
    ft = TrainConfig(**{**ft.to_dict(), "epochs": 1 if args.tiny else (args.finetune_epochs or ft.epochs)})
    prof = cProfile.Profile()
    prof.enable()
    t1 = time.perf_counter()
    run = RunOptions(device="cpu", seed=args.seed)
    res = FinePruning(finetune=ft).fit(model, clean_train, clean_val, triggered, run)
    t_defend = time.perf_counter() - t1
    prof.disable()
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plot_pruning_curve(res.sweep, Path(tmp) / "curve.png", res.stop_k)
    t_report = time.perf_counter() - t2
    sweep_s, ft_s = res.timings.get("sweep", 0.0), res.timings.get("fine-tune", 0.0)
    out = {
        "task": task, "model": type(model).__name__, "layer": res.layer, "channels": res.num_channels,
        "n_finetune": len(ft_idx), "n_choose": len(val_idx), "n_triggered": len(triggered),
        "attacker_epochs": epochs, "attacker_train_s": round(t_attack, 2), "attacker_cached": cached,
        "finetune": ft.to_dict(),
        "seconds": {"load": round(t_load, 3), "defend_total": round(t_defend, 3),
                    "sweep (statistics + all k)": round(sweep_s, 3), "fine-tune": round(ft_s, 3),
                    "evaluate + layer + copy": round(t_defend - sweep_s - ft_s, 3),
                    "report (plot)": round(t_report, 3)},
        "sweep_extra": {**res.sweep.extra, "stop_k": res.stop_k},
        "before": res.before.to_dict(), "after": res.after.to_dict(),
        "pruned_fraction": round(res.pruned_fraction, 4),
        "top_tottime": top_functions(prof, "tottime", args.top),
        "top_cumtime": top_functions(prof, "cumtime", args.top),
    }
    print(f"{task}: defend {t_defend:.1f}s (sweep {sweep_s:.2f}s, fine-tune {ft_s:.1f}s), load {t_load:.1f}s",
          flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["demo", "face", "speech", "traffic"])
    p.add_argument("--attacker-epochs", type=int, default=None, help="default: the task's own")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: the defense's own")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    info = common.setup(args)
    tasks = [t for t in args.tasks if t == "demo" or common.data_root().is_dir()]
    results = [bench_task(t, args) for t in tasks]
    common.write_result("defend_profile", args.out, common.finish({"machine": info, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
