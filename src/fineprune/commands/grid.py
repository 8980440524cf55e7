"""`fineprune grid`: an experiment grid (tasks x attacks x defenses x thresholds x seeds ...) on Ray."""
from __future__ import annotations

import argparse
import sys
import time

from .registry import command

EXIT_CELLS_FAILED = 3


def _args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run the cartesian product of the axes in CONFIG (YAML) as Ray tasks, one per cell; each distinct "
        "model is trained once (kept in OUT/models) and defended by many cells. Cells already in "
        "OUT/results.jsonl are skipped, so rerunning an interrupted grid resumes it; a failing cell runs "
        "once more, then is reported as failed. Writes OUT/results.jsonl, summary.md, summary.json and "
        "threshold.png. Exit 0: every cell done; 3: some cells failed (see OUT/summary.md); 2: bad input.")
    p.add_argument("config", help="grid YAML file (see README: Experiment grids on Ray)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join the Ray cluster at HOST:PORT (e.g. HEAD:6379); default: start Ray on this machine")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`, else fineprune-grid)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the Ray started on this machine (no --ray-address); default: all")
    p.add_argument("--summarize", action="store_true",
                   help="only rewrite summary.md / summary.json / threshold.png from OUT/results.jsonl")
    p.add_argument("--ray-logs", action="store_true", help="show the Ray workers' own output")


@command("grid", _args)
def run(args: argparse.Namespace) -> int:
    """Run an experiment grid (seeds, thresholds, attacks, tasks) on Ray, locally or on a cluster."""
    from ..errors import BadInputError
    from ..grid import load_config, run_grid, summarize_only
    from ..progress import Progress

    cfg = load_config(args.config)
    if args.num_cpus is not None and args.num_cpus < 1:
        raise BadInputError(f"--num-cpus must be at least 1, got {args.num_cpus}")
    if args.num_cpus is not None and args.ray_address:
        raise BadInputError("--num-cpus sizes the Ray started on this machine; with --ray-address the cluster "
                            "decides (ray start --num-cpus on each node)")
    if args.summarize:
        summary = summarize_only(cfg, args.out)
        print(f"{summary['ok']} of {summary['cells']} cells done, {summary['failed']} failed")
        return EXIT_CELLS_FAILED if summary["failed"] else 0
    t0 = time.perf_counter()
    outcome = run_grid(cfg, args.out, args.ray_address, num_cpus=args.num_cpus, verbose=args.ray_logs,
                       progress=Progress(sys.stdout))  # the driver's lines on stdout, with the summary
    out = outcome.out
    print((out / "summary.md").read_text())
    s = outcome.summary
    print(f"{s['ok']} of {s['cells']} cells done ({outcome.skipped} from earlier runs), {s['failed']} failed; "
          f"wrote {out / 'results.jsonl'}, {out / 'summary.md'}, {out / 'summary.json'}, {out / 'threshold.png'} "
          f"in {time.perf_counter() - t0:.0f}s")
    return EXIT_CELLS_FAILED if s["failed"] or s["missing"] else 0
