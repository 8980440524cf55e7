"""The pruning-aware attack with and without widening the pruned layer (the paper's "add neurons"),
on the embedded MNIST task, defended by pruning and by fine-pruning.

The models are `fineprune reproduce`'s (same recipes, same attacker hold-out, same defender data);
only the pruning-aware attacker's `widen` differs. Test-split figures only measure.

    python bench/widen_mnist.py --widen 16 --out /tmp/widen-mnist     # one thread, seed 0
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fineprune.experiment import (  # noqa: E402
    ModelStore,
    defend_one,
    get_model,
    load_task_data,
    prepare_task,
)
from fineprune.runtime import seed_everything  # noqa: E402
from fineprune.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widen", type=int, nargs="+", default=[16], help="extra channels (0 is always run)")
    ap.add_argument("--out", default="/tmp/widen-mnist", help="model store (reused by a rerun)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = common.machine()
    seed_everything(args.seed)
    task = get_task("mnist")
    data = load_task_data(task, "", args.seed)
    setup = prepare_task(task, data, data_root=".", seed=args.seed, device="cpu")
    store = ModelStore(Path(args.out) / "models")
    clean = get_model(setup, "none", store)
    rows = []
    for widen in [0, *[w for w in args.widen if w]]:
        t0 = time.perf_counter()
        model, info, reused = get_model(setup, "pruning-aware", store, pa_threshold=args.threshold,
                                        clean=lambda: clean[:2], pa_widen=widen)
        made = time.perf_counter() - t0
        for defense in ("none", "pruning", "fine-pruning"):
            row, _ = defend_one(setup, "pruning-aware", model, info, defense, args.threshold)
            row.update(widen=widen, decoys=len(info["decoys"]), attempts=len(info["attempts"]),
                       attacker_threshold=info["attacker_threshold"],
                       survival_asr_attacker_val=info["attempts"][-1]["asr_after_defender_pruning"],
                       model_seconds=None if reused else round(made, 1))
            rows.append(row)
            asr = "-" if row["asr"] is None else f"{100 * row['asr']:.1f}%"
            print(f"widen {widen:>3}  {defense:<13} CA {100 * row['clean_acc']:.1f}%  ASR {asr}  "
                  f"pruned {row.get('stop_k', 0)}/{row.get('num_channels', '-')}  decoys {len(info['decoys'])}",
                  flush=True)
    out = common.RESULTS / "widen_mnist.json"
    out.write_text(json.dumps(common.finish({"machine": meta, "rows": rows}), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
