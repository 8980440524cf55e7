"""The purification comparison as BENCHMARKS.md shows it: one block per task and attack, one row per
defense, and each defense's worst case over all blocks (issue 14's rule for choosing a default).

    python bench/purification_table.py bench/results/purification-real/results.jsonl \
        [bench/results/purification-mnist/results.jsonl ...]

Test figures measure; nothing here feeds back into a run. CA drop is against the received
(backdoored) model of the same block; ASR is on triggered test inputs whose label is not the target.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT_LR = "1,0.1,0.01"
# The mnist cut's wide ladder started at 3x, which no mnist cell kept (BENCHMARKS.md), so its cells
# are those of the finer ladder without that step.
SAME_LADDER = {"3,1,0.3,0.1,0.03": "1,0.3,0.1,0.03"}


def _defense(r: dict) -> str:
    if r["defense"] == "none":
        return "none"
    lr = r.get("lr_factors") or DEFAULT_LR
    lr = SAME_LADDER.get(lr, lr)
    parts = [r["defense"], r.get("recipe") or "plain"]
    if r["defense"] == "fine-pruning":
        parts.append(r.get("criterion") or "activation")
        if (r.get("stop_rule") or "paper") != "paper":
            parts.append(f"stop {r['stop_rule']}")
    parts.append("lr " + ("default" if lr == DEFAULT_LR else lr))
    return " / ".join(parts)


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        for line in p.read_text().splitlines():
            r = json.loads(line)
            if r.get("status") == "ok":
                rows.append(r)
    return rows


def block(r: dict) -> tuple[str, str]:
    attack = r["attack"] if r["attack"] == "pruning-aware" else f"{r['attack']} {r.get('trigger') or 'task'}"
    if r.get("poison_rate"):
        attack += f" {100 * r['poison_rate']:g}%"
    return r["task"], attack


def main(paths: list[Path]) -> None:
    rows = load(paths)
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[block(r)][_defense(r)].append(r)
    worst: dict[str, list[tuple[float, float, tuple]]] = defaultdict(list)
    print("| task | attack | defense | CA | CA drop | ASR | s/cell | lr kept |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(cells):
        base = cells[key].get("none")
        base_ca = statistics.mean(r["clean_acc"] for r in base) if base else None
        for name in sorted(cells[key], key=lambda n: (n != "none", "paper" not in n and n != _paper(), n)):
            rs = cells[key][name]
            ca = statistics.mean(r["clean_acc"] for r in rs)
            asr = max(r["asr"] for r in rs)  # worst seed
            drop = None if base_ca is None else 100 * (base_ca - ca)
            secs = statistics.mean(r.get("seconds", 0.0) for r in rs)
            lrs = sorted({r.get("finetune_lr") for r in rs if r.get("finetune_lr")})
            print(f"| {key[0]} | {key[1]} | {name} | {100 * ca:.1f} | "
                  f"{'-' if drop is None else f'{drop:+.1f}'} | {100 * asr:.1f} | {secs:.0f} | "
                  f"{', '.join(f'{v:g}' for v in lrs) or '-'} |")
            if name != "none" and drop is not None:
                worst[name].append((100 * asr, drop, key))
    print()
    print("| defense | blocks | worst ASR (where) | worst CA drop (where) | blocks ASR <= 2 and drop <= 1.5 |")
    print("|---|---|---|---|---|")
    for name, vals in sorted(worst.items(), key=lambda kv: max(v[0] for v in kv[1])):
        a = max(vals, key=lambda v: v[0])
        d = max(vals, key=lambda v: v[1])
        ok = sum(1 for v in vals if v[0] <= 2 and v[1] <= 1.5)
        print(f"| {name} | {len(vals)} | {a[0]:.1f} ({' '.join(a[2])}) | {d[1]:+.1f} ({' '.join(d[2])}) | "
              f"{ok}/{len(vals)} |")


def _paper() -> str:
    return "fine-pruning / plain / activation / lr default"


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
