"""Benchmark: how well the backdoor scans detect (issue 21, item 4), on a zoo of the attacker's models.

For every task x attack x seed the attacker's model is trained once through the experiment engine
(`prepare_task`, `get_model`, `ModelStore`: the same provenance fingerprints as `fineprune
reproduce` and `fineprune grid`, so a models folder they filled is reused with --models-dir),
then each scan spec scans it with the DEFENDER's clean data only (setup.defender_train +
setup.defender_val: what `fineprune defend` scans with). The test split only measures the model
(clean accuracy, ASR of its own trigger), never the scan. Each (model, scan) appends one JSON line
to OUT/results.jsonl (the whole file is rewritten atomically after each line); a rerun skips the
lines already there, so a killed zoo resumes where it stopped.

Attacks (the zoo's names):
    clean           the clean twin (a flag on it is a false positive)
    badnets         BadNets with the task's own trigger (patch, sticker, sunglasses, tone) and rate
    blend           BadNets with a seeded random pattern blended over the whole input (alpha 0.15;
                    the `trigger: blend` axis of grid configs, experiment/setup.py)
    pruning-aware   the pruning-aware attack on the task's trigger (starts from the clean twin)
    rate-1pct       BadNets with the task's trigger at a 1% poison rate

    python bench/scan_zoo.py run --out bench/results/scan-zoo                     # mnist, 3 seeds
    python bench/scan_zoo.py run --out bench/results/scan-zoo --data-root ../shared/data \\
        --tasks mnist face speech traffic traffic-resnet
    python bench/scan_zoo.py summary --out bench/results/scan-zoo                 # the table

The summary prints, per task x attack x scan: models scanned, TPR (share of backdoored models with
any class flagged) or FPR (share of clean models flagged) at the scan's own threshold, the
target-identification rate (target among the flagged; and flagged == [target]), and mean / max
seconds per scan, with the known blind spots noted (whole-image blend, all-to-all targets).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

#: zoo attack -> (the engine's attack name, its trigger axis, poison rate override).
ATTACKS: dict[str, tuple[str, str, float | None]] = {
    "clean": ("none", "task", None),
    "badnets": ("badnets", "task", None),
    "blend": ("badnets", "blend", None),
    "pruning-aware": ("pruning-aware", "task", None),
    "rate-1pct": ("badnets", "task", 0.01),
}
DEFAULT_SCANS = ["neural-cleanse", "k-arm"]
TASKS = ["mnist", "face", "speech", "traffic", "traffic-resnet"]
RESULTS = "results.jsonl"
#: The fields that name one (model, scan): a line with the same values is not run again.
KEY_FIELDS = ("task", "attack", "seed", "scan", "subsample", "epochs")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train or reuse the zoo's models and scan each (resumable)")
    run.add_argument("--out", type=Path, required=True, help="folder for results.jsonl (and models/)")
    run.add_argument("--tasks", nargs="+", default=["mnist"], choices=TASKS)
    run.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--scans", nargs="+", default=list(DEFAULT_SCANS),
                     help="scan specs, one per argument (a spec's options are comma-separated: "
                          "'neural-cleanse,index=log'); default: neural-cleanse k-arm")
    run.add_argument("--data-root", default=str(common.data_root()),
                     help="folder of the dataset archives (default $FINEPRUNE_DATA or ../shared/data; "
                          "mnist needs none)")
    run.add_argument("--models-dir", type=Path, default=None,
                     help="where the attacker's models are kept (default OUT/models; a `reproduce` or "
                          "`grid` run's models folder is reused where the provenance matches)")
    run.add_argument("--subsample", type=float, default=1.0, help="fraction of each split (quick runs)")
    run.add_argument("--epochs", type=int, default=None, help="attacker training epochs (default the task's)")
    run.add_argument("--device", default="cpu",
                     help="where the scans run: cpu (default: issue 21's cost marks are CPU seconds) or cuda")
    run.add_argument("--train-device", default=None,
                     help="where the attacker's models train (default: --device); the stored models "
                          "do not depend on it beyond float rounding")
    run.add_argument("--threads", type=int, default=1,
                     help="torch threads (default 1, as issue 21's cost marks; on a shared machine more "
                          "threads stall at barriers)")
    run.add_argument("--quiet", action="store_true", help="no line per scan")
    summ = sub.add_parser("summary", help="print the detection table of OUT/results.jsonl")
    summ.add_argument("--out", type=Path, required=True)
    summ.add_argument("--json", action="store_true", help="the table as JSON instead of markdown")
    return p


# ---- results file --------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict]:
    """The lines of results.jsonl (a line that does not parse is reported and skipped)."""
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"scan_zoo: {path}:{n} is not JSON; skipped", file=sys.stderr)
    return rows


def append_row(path: Path, row: dict) -> None:
    """Add one line: the whole file is rewritten beside itself and renamed over it, so a killed run
    never leaves a half line."""
    from fineprune.runtime import atomic_path

    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(old + json.dumps(row, sort_keys=False) + "\n", encoding="utf-8")


def row_key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(k)) for k in KEY_FIELDS)


# ---- one model, its scans --------------------------------------------------------------------

def true_target(policy) -> tuple[int | None, str]:
    """(the single target class or None, the policy's kind)."""
    kind = getattr(policy, "kind", type(policy).__name__)
    if kind == "all-to-all":
        return None, kind
    return getattr(policy, "target", None), kind


def scan_rows(task_name: str, attack: str, seed: int, scans: list[str], args, data_cache: dict,
              done: set, log) -> Iterator[dict]:
    """Scan the model (task, attack, seed) with every spec of `scans` not in `done`: one row each,
    yielded as soon as its scan ends (so the caller stores it before the next scan starts)."""
    from fineprune.data.types import make_dataset, tensors
    from fineprune.evaluation.metrics import evaluate
    from fineprune.experiment import ModelStore, get_model, load_task_data, model_provenance, prepare_task
    from fineprune.purify.registry import resolve
    from fineprune.runtime import fingerprint, seed_everything
    from fineprune.tasks import get_task

    engine_attack, trigger, rate = ATTACKS[attack]
    base = {"task": task_name, "attack": attack, "seed": seed, "subsample": args.subsample, "epochs": args.epochs}
    todo = [(spec, resolve("scan", spec).spec()) for spec in scans]
    todo = [(spec, canon) for spec, canon in todo if row_key({**base, "scan": canon}) not in done]
    if not todo:
        return
    task = get_task(task_name)
    key = (task_name, seed)
    if key not in data_cache:
        data_cache.clear()  # one task's data at a time
        data_cache[key] = load_task_data(task, args.data_root, seed, args.subsample)
    data = data_cache[key]
    seed_everything(seed)
    setup = prepare_task(task, data, data_root=args.data_root, seed=seed, subsample=args.subsample,
                         poison_rate=rate, epochs=args.epochs, device=args.train_device or args.device,
                         trigger=trigger)
    store = ModelStore(args.models_dir or args.out / "models")
    t0 = time.perf_counter()
    models: dict[str, tuple] = {}

    def clean():
        if "none" not in models:
            models["none"] = get_model(setup, "none", store)
        return models["none"][:2]

    model, _, reused = get_model(setup, engine_attack, store, clean=clean)
    train_s = time.perf_counter() - t0
    name, provenance = model_provenance(setup, engine_attack)
    scan_device = torch.device(args.device)
    model = model.to(scan_device).eval()
    measured = evaluate(model, data.test, setup.trig_test, device=scan_device)
    target, policy = true_target(setup.attack.policy)
    if engine_attack == "none":
        target = None
    # The defender's clean data only: what `fineprune defend` scans with.
    xs, ys = zip(*(tensors(d) for d in (setup.defender_train, setup.defender_val)))
    scan_data = make_dataset(torch.cat(xs), torch.cat(ys))
    for spec, canon in todo:
        res = resolve("scan", spec).run(model, scan_data, data.num_classes, device=scan_device, seed=seed,
                                        class_names=list(data.class_names) or None)
        idx = {c.cls: c.anomaly_index for c in res.classes}
        by_size = [c.cls for c in sorted(res.classes, key=lambda c: (c.size, c.cls))]
        row = {**base, "scan": canon,
               "trigger": None if engine_attack == "none" else trigger,
               "rate": None if engine_attack == "none" else setup.attack.rate,
               "policy": None if engine_attack == "none" else policy,
               "target": target, "flagged": list(res.flagged),
               "detected": bool(res.flagged),
               "exact": target is not None and list(res.flagged) == [target],
               "target_flagged": target is not None and target in res.flagged,
               "max_anomaly_index": round(max(idx.values()), 4),
               "target_anomaly_index": None if target is None else round(idx[target], 4),
               "target_size_rank": None if target is None else by_size.index(target) + 1,
               "seconds": round(res.seconds, 3), "stopped_by": res.stopped_by,
               "classes_completed": res.completed, "num_classes": len(res.classes),
               "steps": sum(c.steps for c in res.classes), "scan_samples": res.samples,
               "clean_acc": round(measured.clean_acc, 4),
               "asr": None if measured.asr is None else round(measured.asr, 4),
               "model": name, "model_fingerprint": fingerprint(provenance),
               "model_reused": reused, "train_seconds": round(train_s, 2),
               "device": str(scan_device), "threads": torch.get_num_threads(),
               "loadavg": round(os.getloadavg()[0], 2), "verdict": res.verdict()}
        log(f"{task_name:<14} {attack:<14} seed {seed}  {canon:<28} flagged {row['flagged']} "
            f"(target {target}; max index {row['max_anomaly_index']:.2f})  {row['seconds']:.1f}s")
        yield row


def run(args) -> int:
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = {row_key(r) for r in read_rows(path)}
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    data_cache: dict = {}
    added = 0
    for task_name in args.tasks:
        for seed in args.seeds:
            for attack in args.attacks:
                for row in scan_rows(task_name, attack, seed, args.scans, args, data_cache, done, log):
                    append_row(path, row)
                    done.add(row_key(row))
                    added += 1
    log(f"{added} new line(s) in {path} ({len(done)} in all)")
    return 0


# ---- the table -----------------------------------------------------------------------------

#: Where a mask-inversion scan is blind by construction: the table says so next to its figures.
def known_miss(row: dict) -> str:
    if row.get("trigger") == "blend":
        return "blend: whole-image trigger, no small mask (known miss)"
    if row.get("policy") == "all-to-all":
        return "all-to-all: no single target class (known miss)"
    if row.get("task") == "face" and row.get("attack") != "clean":
        return "sunglasses: physical trigger on the features the model relies on (Wenger et al. 2021)"
    if row.get("policy") == "source-specific":
        return "source-specific: only the source class flips, the scan asks every class to"
    return ""


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per task x attack x scan (in the zoo's order)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["attack"], r["scan"])].append(r)
    order = {a: i for i, a in enumerate(ATTACKS)}
    tasks = {t: i for i, t in enumerate(TASKS)}
    scans: dict[str, int] = {}
    for r in rows:  # scans in the order they were first run
        scans.setdefault(r["scan"], len(scans))
    table = []
    for (task, attack, scan), rs in sorted(groups.items(), key=lambda kv: (tasks.get(kv[0][0], 99), kv[0][0],
                                                                           order.get(kv[0][1], 99), scans[kv[0][2]])):
        n = len(rs)
        detected = sum(r["detected"] for r in rs) / n
        targeted = [r for r in rs if r.get("target") is not None]
        secs = [r["seconds"] for r in rs]
        entry = {"task": task, "attack": attack, "scan": scan, "models": n,
                 "seeds": sorted({r["seed"] for r in rs}),
                 "tpr": None if attack == "clean" else round(detected, 4),
                 "fpr": round(detected, 4) if attack == "clean" else None,
                 "target_id_rate": round(sum(r["target_flagged"] for r in targeted) / len(targeted), 4)
                 if targeted else None,
                 "exact_rate": round(sum(r["exact"] for r in targeted) / len(targeted), 4) if targeted else None,
                 "mean_max_index": round(sum(r["max_anomaly_index"] for r in rs) / n, 3),
                 "mean_asr": None if any(r.get("asr") is None for r in rs)
                 else round(sum(r["asr"] for r in rs) / n, 4),
                 "mean_seconds": round(sum(secs) / n, 2), "max_seconds": round(max(secs), 2),
                 "note": next((m for m in map(known_miss, rs) if m), "")}
        table.append(entry)
    return table


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown(table: list[dict]) -> str:
    lines = [("| task | attack | scan | models | TPR | FPR | target id (exact) | mean max index | mean ASR | "
              "s/scan mean (max) | note |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        tid = "-" if e["target_id_rate"] is None else f"{_pct(e['target_id_rate'])} ({_pct(e['exact_rate'])})"
        lines.append(f"| {e['task']} | {e['attack']} | {e['scan']} | {e['models']} | {_pct(e['tpr'])} | "
                     f"{_pct(e['fpr'])} | {tid} | {e['mean_max_index']:.2f} | {_pct(e['mean_asr'])} | "
                     f"{e['mean_seconds']:.1f} ({e['max_seconds']:.1f}) | {e['note']} |")
    return "\n".join(lines)


def summary(args) -> int:
    rows = read_rows(args.out / RESULTS)
    if not rows:
        print(f"scan_zoo: no results in {args.out / RESULTS}", file=sys.stderr)
        return 1
    table = summarize(rows)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        devices = sorted({f"{r.get('device')}, {r.get('threads')} thread(s)" for r in rows})
        print(f"{len(rows)} scans of {len({(r['task'], r['attack'], r['seed']) for r in rows})} models "
              f"({'; '.join(devices)}); TPR/FPR: any class flagged at the scan's threshold; target id: "
              "the true target among the flagged (exactly [target])")
        print(markdown(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run(args) if args.command == "run" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
