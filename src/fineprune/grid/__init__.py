"""Experiment grids on Ray: `fineprune grid CONFIG.yaml` (see `config` for the file format).

- `config`: read a grid YAML, expand its axes into cells;
- `work`: what a Ray worker runs (train one model, defend one cell);
- `runner`: the driver (scheduling, retries, resume, results as cells finish);
- `results`: results.jsonl, summary.md / summary.json, threshold.png;
- `progress`: the progress lines.
"""
from .config import Cell, GridConfig, expand, load_config, parse_config
from .runner import GridOutcome, run_grid, summarize_only

__all__ = ["Cell", "GridConfig", "GridOutcome", "expand", "load_config", "parse_config", "run_grid",
           "summarize_only"]
