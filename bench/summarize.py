"""Print the markdown tables of BENCHMARKS.md from bench/results/*.json (paste, do not overwrite:
other sections of BENCHMARKS.md are written by hand).

    python bench/summarize.py [RESULTS_DIR]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _machine(d: dict) -> str:
    m = d["machine"]
    end = m.get("loadavg_end") or d.get("loadavg_end") or [float("nan")]
    return (f"{m['nproc']} cores ({m['cpu']}), torch {m['torch']}, {m['torch_threads']} torch thread(s), "
            f"{m['date']}, 1-min load average {m['loadavg_start'][0]:.1f} at start, {end[0]:.1f} at end")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v}x"


def sweep(d: dict) -> list[str]:
    rows = ["| model | C | N val | forward s | cached s | exact-head s | before s | usual s (extrap.) | "
            "usual / cached | re-rank / cached | cached / forward | before / cached | recomputed | equal |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        t, q = r["times"], r["ratios"]
        before = t.get("cached_legacy", {}).get("median_s", "-")
        usual = sorted(r["usual_total_s"])[len(r["usual_total_s"]) // 2]
        equal = all(r.get(k, True) for k in ("counts_equal_usual", "counts_equal_rerank",
                                               "counts_equal_exact_head", "counts_equal_legacy"))
        rows.append(f"| {r['model']} | {r['channels']} | {r['n_val']} | {t['plain_forward']['median_s']} | "
                    f"{t['cached']['median_s']} | {t['cached_exact_head']['median_s']} | {before} | {usual} | "
                    f"**{q['usual_over_cached']}x** | {q['rerank_over_cached']}x | "
                    f"**{q['cached_over_plain_forward']}** | {_x(q.get('legacy_over_cached'))} | "
                    f"{100 * r['recomputed_fraction']:.2f}% | {equal} |")
    return rows


def scaling(d: dict) -> list[str]:
    rows = ["| N val | C | max_cache_mb | seconds | full cache MB | cached MB | streamed | peak RSS MB | "
            "sweep extra RSS MB | sweep extra live MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        rows.append(f"| {r['n_val']} | {r['channels']} | {r['max_cache_mb'] or '-'} | {r['seconds']} | "
                    f"{r['full_cache_would_be_mb']} | {r['cache_mb']} | {r['streamed_samples']} | "
                    f"{r['rss_peak_mb']} | {r['sweep_peak_extra_mb']} | {r.get('live_extra_mb', '-')} |")
    rows.append(f"\nbounded curves equal the unbounded ones: {d['bounded_equals_unbounded']}")
    return rows


def finetune(d: dict) -> list[str]:
    rows = ["| model | samples | fineprune samples/s | plain loop samples/s | time ratio | identical weights |",
            "|---|---|---|---|---|---|"]
    for r in d["results"]:
        s = r["samples_per_s"]
        rows.append(f"| {r['model']} | {r['n_train']} x {r['epochs']} ep | {s['fineprune_train']} | "
                    f"{s['plain_loop']} | **{r['fineprune_over_plain_time']}** | {r['identical_weights']} |")
    return rows


def defend(d: dict) -> list[str]:
    rows = ["| task | model | C | load s | defend s | sweep s | fine-tune s | evaluate+other s | plot s | "
            "CA before -> after | ASR before -> after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        s, b, a = r["seconds"], r["before"], r["after"]
        asr = "-" if b["asr"] is None else f"{100 * b['asr']:.1f}% -> {100 * a['asr']:.1f}%"
        rows.append(f"| {r['task']} | {r['model']} | {r['channels']} | {s['load']} | {s['defend_total']} | "
                    f"{s['sweep (statistics + all k)']} | {s['fine-tune']} | {s['evaluate + layer + copy']} | "
                    f"{s['report (plot)']} | {100 * b['clean_acc']:.1f}% -> {100 * a['clean_acc']:.1f}% | {asr} |")
    for r in d["results"]:
        rows += ["", f"Top functions by own time, {r['task']}:", "", "| function | calls | own s | cumulative s |",
                 "|---|---|---|---|"]
        rows += [f"| `{f['function']}` | {f['calls']} | {f['tottime_s']} | {f['cumtime_s']} |"
                 for f in r["top_tottime"][:10]]
    return rows


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results"
    for name, fn in (("sweep_speed", sweep), ("defend_profile", defend), ("scaling", scaling),
                     ("finetune_throughput", finetune)):
        path = root / f"{name}.json"
        if not path.is_file():
            continue
        d = json.loads(path.read_text())
        print(f"### {name}\n\nMachine: {_machine(d)}. Command: `{d['machine']['command']}`\n")
        print("\n".join(fn(d)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
