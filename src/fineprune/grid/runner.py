"""The grid driver: schedule model training and cells as Ray tasks, record each result as it comes.

- every distinct model is one Ray task (`work.train_model`), run once; its result is a path in
  `OUT/models` (the same recipe fingerprints as `fineprune reproduce`, so models on disk are reused);
  a pruning-aware model starts after its clean model;
- every cell is one Ray task (`work.run_cell`) submitted once its model is ready;
- tasks request `resources` / `train_resources`; the driver keeps no more in flight than the cluster
  can run at once (so "running" is what runs), re-reading the cluster's size as nodes come and go;
- a failed task (an exception, a worker or node lost) runs again up to `retries` times (Ray's own
  retries are off, so every attempt is counted here); then the cell is written as failed, with
  the error; cells whose model failed are written as failed too;
- cells with an "ok" row in `OUT/results.jsonl` are skipped, so an interrupted grid resumes.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BadInputError
from ..runtime import write_text_atomic
from . import work
from .config import Cell, GridConfig, clean_params, expand, model_key, model_params
from .progress import Progress
from .results import ResultsLog, write_outputs


@dataclass
class GridOutcome:
    out: Path
    cells: int
    skipped: int  # finished by an earlier run
    ok: int  # finished ok in this run
    failed: int  # failed in this run (after retries)
    summary: dict


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _error_text(exc: BaseException) -> tuple[str, str]:
    """(one-line message, traceback) of a task's failure."""
    cause = getattr(exc, "cause", None)
    tb = str(exc)
    if isinstance(cause, BaseException):
        msg = f"{type(cause).__name__}: {cause}"
    else:
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return msg.strip().splitlines()[0][:500] if msg.strip() else type(exc).__name__, tb[-4000:]


class _Lock:
    """One driver per output folder (an flock, released by the kernel if the driver dies)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".grid.lock"
        self.fd: int | None = None

    def __enter__(self) -> "_Lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise BadInputError(f"another `fineprune grid` is writing to {self.path.parent}; "
                                f"wait for it or use another --out") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _init_ray(address: str | None, num_cpus: int | None, verbose: bool) -> bool:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start Ray on this machine (stopped again
    at the end). Returns whether this call connected (and so must disconnect)."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # never rebuild a uv env (network)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    kw = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kw)
    else:  # "local": a new Ray on this machine, never a cluster some other `ray start` left running
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kw)
    return True


def run_grid(cfg: GridConfig, out: str | Path | None = None, address: str | None = None, *,
             num_cpus: int | None = None, verbose: bool = False, log=print) -> GridOutcome:
    """Run every cell of `cfg` not finished yet in `out` on Ray; write results, summary and plot."""
    out = Path(out or cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        return _run_locked(cfg, out, address, num_cpus, verbose, log)


def _run_locked(cfg: GridConfig, out: Path, address: str | None, num_cpus: int | None, verbose: bool,
                log) -> GridOutcome:
    cells = expand(cfg)
    results = ResultsLog(out / "results.jsonl")
    latest = results.latest()
    if results.skipped_lines:
        log(f"note: {results.skipped_lines} unreadable line(s) in {results.path} skipped (a crash mid-write); "
            f"those cells run again")
    done = {c.id for c in cells if latest.get(c.id, {}).get("status") == "ok"}
    todo = [c for c in cells if c.id not in done]
    if cfg.source:
        write_text_atomic(out / "grid.yaml", cfg.source)
    log(f"grid {cfg.name}: {len(cells)} cells, {len(done)} already done in {out}, {len(todo)} to run")
    if todo and not Path(cfg.data_root).exists() and any(c.params["task"] != "mnist" for c in todo):
        log(f"warning: data root {cfg.data_root} does not exist here; the workers must find it at that path")
    ok = failed = 0
    if todo:
        ok, failed = _schedule(cfg, out, todo, len(cells), len(done), results, address, num_cpus, verbose, log)
    latest = results.latest()
    summary = write_outputs(out, cells, latest, title=cfg.name)
    return GridOutcome(out=out, cells=len(cells), skipped=len(done), ok=ok, failed=failed, summary=summary)


class _SigtermAsInterrupt:
    """Let `kill PID` stop the driver like Ctrl-C: Ray tasks are cancelled, finished rows stay."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise KeyboardInterrupt
            self.old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _schedule(cfg: GridConfig, out: Path, todo: list[Cell], total: int, already: int, results: ResultsLog,
              address: str | None, num_cpus: int | None, verbose: bool, log) -> tuple[int, int]:
    import ray

    models_dir = out / "models"
    # --- the models these cells need (pruning-aware ones need their clean model first)
    specs: dict[str, dict] = {}
    needs: dict[str, str | None] = {}  # model key -> the clean model key it starts from
    cells_of: dict[str, list[Cell]] = {}
    common = {"models_dir": str(models_dir), "data_root": cfg.data_root, "device": cfg.device,
              "plugins": cfg.plugins}

    def add_model(params: dict) -> str:
        key = model_key(params)
        if key not in specs:
            specs[key] = {"key": key, "params": model_params(params), **common}
            needs[key] = None
            if params["attack"] == "pruning-aware":
                needs[key] = add_model(clean_params(params))
        return key

    for cell in todo:
        cells_of.setdefault(add_model(cell.params), []).append(cell)

    with _SigtermAsInterrupt():
        started = _init_ray(address, num_cpus, verbose)
        try:
            return _loop(cfg, todo, total, already, results, specs, needs, cells_of, models_dir, log)
        finally:
            results.close()
            if started:
                ray.shutdown()


def _loop(cfg, todo, total, already, results, specs, needs, cells_of, models_dir, log) -> tuple[int, int]:
    import ray

    cell_res = dict(cfg.resources)
    train_res = dict(cfg.train_resources or cfg.resources)

    def options(res: dict) -> dict:
        o = {"num_cpus": res.get("num_cpus", 1), "num_gpus": res.get("num_gpus", 0),
             "max_retries": 0, "retry_exceptions": False}
        if res.get("memory"):
            o["memory"] = int(res["memory"])
        return o

    train_fn = ray.remote(work.train_model).options(**options(train_res))
    cell_fn = ray.remote(work.run_cell).options(**options(cell_res))

    cluster = {"t": 0.0, "cpu": 0.0, "gpu": 0.0}

    def refresh(force: bool = False) -> None:
        if force or time.monotonic() - cluster["t"] > 10:
            r = ray.cluster_resources()
            cluster.update(t=time.monotonic(), cpu=float(r.get("CPU", 0)), gpu=float(r.get("GPU", 0)))

    refresh(True)
    where = ray.get_runtime_context().gcs_address
    log(f"Ray at {where}: {cluster['cpu']:g} CPUs, {cluster['gpu']:g} GPUs; "
        f"{len(specs)} model(s) to train or find in {models_dir}")
    for what, res in (("cells", cell_res), ("models", train_res)):
        if res.get("num_gpus", 0) > cluster["gpu"] or res.get("num_cpus", 1) > cluster["cpu"]:
            log(f"warning: {what} ask for {res} but the cluster has {cluster['cpu']:g} CPUs and "
                f"{cluster['gpu']:g} GPUs; they wait until such a node joins")

    progress = Progress(total, already, log)
    models: dict[str, dict] = {}  # key -> train_model result
    model_state = {k: "waiting" for k in specs}
    attempts: dict[str, int] = {}
    errors: dict[str, list[str]] = {}
    model_queue: deque[str] = deque(k for k in specs if needs[k] is None)
    cell_queue: deque[Cell] = deque()
    in_flight: dict = {}  # ObjectRef -> (kind, key or cell, resources)
    used = {"cpu": 0.0, "gpu": 0.0}

    def fits(res: dict) -> bool:
        if not in_flight:
            return True  # never stall: Ray queues it until the cluster can run it
        return (used["cpu"] + res.get("num_cpus", 1) <= cluster["cpu"] + 1e-9
                and used["gpu"] + res.get("num_gpus", 0) <= cluster["gpu"] + 1e-9)

    def launch(ref, kind, item, res) -> None:
        in_flight[ref] = (kind, item, res)
        used["cpu"] += res.get("num_cpus", 1)
        used["gpu"] += res.get("num_gpus", 0)

    def base_row(cell: Cell) -> dict:
        return {"cell": cell.id, **cell.params}

    def fail_cell(cell: Cell, stage: str, msg: str, tb: str | None, n_attempts: int, errs: list[str]) -> None:
        row = {**base_row(cell), "status": "failed", "stage": stage, "error": msg, "errors": errs,
               "attempts": n_attempts, "traceback": tb, "finished": _now()}
        results.append(row)
        progress.cell_finished(False, f"FAILED {cell.label()}: {msg}")

    def model_failed(key: str, msg: str, tb: str | None) -> None:
        model_state[key] = "failed"
        n = attempts.get(key, 0)
        for cell in cells_of.get(key, []):
            fail_cell(cell, "model", f"model {key} failed after {n} attempt(s): {msg}", tb, 0,
                      errors.get(key, []))
        for other, clean in needs.items():  # pruning-aware models waiting for this clean one
            if clean == key and model_state[other] == "waiting":
                attempts[other] = 0
                model_failed(other, f"its clean model {key} failed: {msg}", tb)

    def model_ready(key: str, result: dict) -> None:
        model_state[key] = "ready"
        models[key] = result
        how = "found on disk" if result["reused"] else f"trained in {result['seconds']:.1f}s"
        progress.note(f"model {key} {how} ({Path(result['path']).name}, {result['node']})")
        cell_queue.extend(cells_of.get(key, []))
        for other, clean in needs.items():
            if clean == key and model_state[other] == "waiting":
                model_queue.append(other)

    max_attempts = 1 + cfg.retries
    while model_queue or cell_queue or in_flight:
        refresh()
        # models first: they unblock cells
        while model_queue and fits(train_res):
            key = model_queue.popleft()
            model_state[key] = "running"
            attempts[key] = attempts.get(key, 0) + 1
            clean = models.get(needs[key]) if needs[key] else None
            launch(train_fn.remote(specs[key], clean), "model", key, train_res)
        while cell_queue and fits(cell_res):
            cell = cell_queue.popleft()
            attempts[cell.id] = attempts.get(cell.id, 0) + 1
            key = cell.model_key()
            payload = {"id": cell.id, "params": cell.params, "data_root": cfg.data_root, "device": cfg.device,
                       "plugins": cfg.plugins}
            launch(cell_fn.remote(payload, models[key]), "cell", cell, cell_res)
            progress.running += 1
        progress.flush()
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=2.0)
        for ref in ready:
            kind, item, res = in_flight.pop(ref)
            used["cpu"] -= res.get("num_cpus", 1)
            used["gpu"] -= res.get("num_gpus", 0)
            try:
                value = ray.get(ref)
                exc = None
            except Exception as e:  # the task raised, or its worker / node died
                value, exc = None, e
            if kind == "model":
                key = item
                if exc is None:
                    model_ready(key, value)
                    continue
                msg, tb = _error_text(exc)
                errors.setdefault(key, []).append(msg)
                if attempts[key] < max_attempts:
                    progress.note(f"model {key} failed ({msg}); retrying")
                    model_queue.appendleft(key)
                else:
                    model_failed(key, msg, tb)
                continue
            cell = item
            progress.running -= 1
            if exc is None:
                model = models[cell.model_key()]
                row = {**base_row(cell), "status": "ok", **value,
                       "model": os.path.relpath(model["path"], models_dir.parent),
                       "model_reused": model["reused"], "attempts": attempts[cell.id], "finished": _now()}
                if errors.get(cell.id):
                    row["errors"] = errors[cell.id]
                results.append(row)
                asr = "-" if row.get("asr") is None else f"{100 * row['asr']:.1f}%"
                progress.cell_finished(True, f"{cell.label()}: CA {100 * row['clean_acc']:.1f}% ASR {asr} "
                                             f"pruned {100 * row['pruned_fraction']:.0f}% ({row['cell_seconds']:.1f}s)")
                continue
            msg, tb = _error_text(exc)
            errors.setdefault(cell.id, []).append(msg)
            if attempts[cell.id] < max_attempts:
                progress.note(f"{cell.label()} failed ({msg}); retrying")
                cell_queue.appendleft(cell)
            else:
                fail_cell(cell, "cell", msg, tb, attempts[cell.id], errors[cell.id])
    progress.flush()
    return progress.ok, progress.failed


def summarize_only(cfg: GridConfig, out: str | Path | None = None) -> dict:
    """Rewrite summary.md / summary.json / threshold.png from results.jsonl (no Ray)."""
    out = Path(out or cfg.out)
    if not (out / "results.jsonl").exists():
        raise BadInputError(f"{out / 'results.jsonl'} does not exist: run the grid first")
    return write_outputs(out, expand(cfg), ResultsLog(out / "results.jsonl").latest(), title=cfg.name)


__all__ = ["GridOutcome", "run_grid", "summarize_only"]
