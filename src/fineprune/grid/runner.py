"""The grid driver: schedule model training and cells as Ray tasks, record each result as it comes.

- every distinct model is one Ray task (`work.train_model`), run once; its result is a path in
  `OUT/models` (the same provenance fingerprints as `fineprune reproduce`, so models on disk are reused);
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BadInputError
from ..progress import Progress, as_progress
from ..runtime import write_text_atomic
from . import work
from .config import Cell, GridConfig, clean_params, expand, model_key, model_params
from .progress import GridProgress
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
                                f"wait for it or use another `out`") from None
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
             num_cpus: int | None = None, verbose: bool = False, progress: bool | Progress = False) -> GridOutcome:
    """Run every cell of `cfg` not finished yet in `out` on Ray; write results, summary and plot.
    `progress` gets a line per finished cell (with counts and time left) and notes (the CLI: stdout)."""
    out = Path(out or cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        return _run_locked(cfg, out, address, num_cpus, verbose, as_progress(progress).log)


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


@dataclass
class _ModelPlan:
    """The models the cells to run need: a spec per model key, the clean model a pruning-aware one
    starts from, and the cells waiting on each model."""

    specs: dict[str, dict] = field(default_factory=dict)
    needs: dict[str, str | None] = field(default_factory=dict)  # model key -> its clean model's key
    cells_of: dict[str, list[Cell]] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: GridConfig, todo: list[Cell], models_dir: Path) -> "_ModelPlan":
        plan = cls()
        common = {"models_dir": str(models_dir), "data_root": cfg.data_root, "device": cfg.device,
                  "plugins": cfg.plugins}
        for cell in todo:
            plan.cells_of.setdefault(plan._add(cell.params, common), []).append(cell)
        return plan

    def _add(self, params: dict, common: dict) -> str:
        key = model_key(params)
        if key not in self.specs:
            self.specs[key] = {"key": key, "params": model_params(params), **common}
            self.needs[key] = None
            if params["attack"] == "pruning-aware":
                self.needs[key] = self._add(clean_params(params), common)
        return key

    def waiting_on(self, clean_key: str) -> list[str]:
        """Models that start from the clean model `clean_key`."""
        return [k for k, clean in self.needs.items() if clean == clean_key]


def _schedule(cfg: GridConfig, out: Path, todo: list[Cell], total: int, already: int, results: ResultsLog,
              address: str | None, num_cpus: int | None, verbose: bool, log) -> tuple[int, int]:
    import ray

    models_dir = out / "models"
    plan = _ModelPlan.of(cfg, todo, models_dir)
    with _SigtermAsInterrupt():
        started = _init_ray(address, num_cpus, verbose)
        try:
            return _Scheduler(cfg, plan, results, GridProgress(total, already, log), models_dir, log).run()
        finally:
            results.close()
            if started:
                ray.shutdown()


def _ray_options(res: dict) -> dict:
    """Ray task options for `resources`; Ray's own retries are off (every attempt is counted here)."""
    o = {"num_cpus": res.get("num_cpus", 1), "num_gpus": res.get("num_gpus", 0),
         "max_retries": 0, "retry_exceptions": False}
    if res.get("memory"):
        o["memory"] = int(res["memory"])
    return o


@dataclass
class _Flight:
    kind: str  # "model" or "cell"
    item: "str | Cell"  # the model key or the cell
    resources: dict


class _Scheduler:
    """Keeps models and cells in flight on Ray as far as the cluster can run them, models first
    (they unblock cells), and records each result as it comes (retries, failures, progress)."""

    def __init__(self, cfg: GridConfig, plan: _ModelPlan, results: ResultsLog, progress: GridProgress,
                 models_dir: Path, log) -> None:
        import ray

        self.cfg, self.plan, self.results, self.progress = cfg, plan, results, progress
        self.models_dir, self.log = models_dir, log
        self.cell_res = dict(cfg.resources)
        self.train_res = dict(cfg.train_resources or cfg.resources)
        self.train_fn = ray.remote(work.train_model).options(**_ray_options(self.train_res))
        self.cell_fn = ray.remote(work.run_cell).options(**_ray_options(self.cell_res))
        self.max_attempts = 1 + cfg.retries
        self.cluster = {"cpu": 0.0, "gpu": 0.0}
        self.cluster_read = float("-inf")
        self.models: dict[str, dict] = {}  # model key -> train_model's result
        self.model_state = {k: "waiting" for k in plan.specs}
        self.attempts: dict[str, int] = {}  # model key or cell id -> attempts so far
        self.errors: dict[str, list[str]] = {}
        self.model_queue: deque[str] = deque(k for k in plan.specs if plan.needs[k] is None)
        self.cell_queue: deque[Cell] = deque()
        self.in_flight: dict = {}  # ObjectRef -> _Flight
        self.used = {"cpu": 0.0, "gpu": 0.0}

    def run(self) -> tuple[int, int]:
        """(cells ok, cells failed) in this run."""
        import ray

        self._refresh(force=True)
        self._announce(ray.get_runtime_context().gcs_address)
        while self.model_queue or self.cell_queue or self.in_flight:
            self._refresh()
            self._submit()
            self.progress.flush()
            if not self.in_flight:
                break
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=2.0)
            for ref in ready:
                self._finished(ref)
        self.progress.flush()
        return self.progress.ok, self.progress.failed

    # --- the cluster and what runs on it

    def _refresh(self, force: bool = False) -> None:
        """Re-read the cluster's size every 10 s: nodes may join or leave."""
        import ray

        if force or time.monotonic() - self.cluster_read > 10:
            r = ray.cluster_resources()
            self.cluster.update(cpu=float(r.get("CPU", 0)), gpu=float(r.get("GPU", 0)))
            self.cluster_read = time.monotonic()

    def _announce(self, where: str) -> None:
        c = self.cluster
        self.log(f"Ray at {where}: {c['cpu']:g} CPUs, {c['gpu']:g} GPUs; "
                 f"{len(self.plan.specs)} model(s) to train or find in {self.models_dir}")
        for what, res in (("cells", self.cell_res), ("models", self.train_res)):
            if res.get("num_gpus", 0) > c["gpu"] or res.get("num_cpus", 1) > c["cpu"]:
                self.log(f"warning: {what} ask for {res} but the cluster has {c['cpu']:g} CPUs and "
                         f"{c['gpu']:g} GPUs; they wait until such a node joins")

    def _fits(self, res: dict) -> bool:
        if not self.in_flight:
            return True  # never stall: Ray queues it until the cluster can run it
        return (self.used["cpu"] + res.get("num_cpus", 1) <= self.cluster["cpu"] + 1e-9
                and self.used["gpu"] + res.get("num_gpus", 0) <= self.cluster["gpu"] + 1e-9)

    def _launch(self, ref, flight: _Flight) -> None:
        self.in_flight[ref] = flight
        self.used["cpu"] += flight.resources.get("num_cpus", 1)
        self.used["gpu"] += flight.resources.get("num_gpus", 0)

    def _submit(self) -> None:
        while self.model_queue and self._fits(self.train_res):
            key = self.model_queue.popleft()
            self.model_state[key] = "running"
            self.attempts[key] = self.attempts.get(key, 0) + 1
            clean_key = self.plan.needs[key]
            clean = self.models.get(clean_key) if clean_key else None
            self._launch(self.train_fn.remote(self.plan.specs[key], clean),
                         _Flight("model", key, self.train_res))
        while self.cell_queue and self._fits(self.cell_res):
            cell = self.cell_queue.popleft()
            self.attempts[cell.id] = self.attempts.get(cell.id, 0) + 1
            payload = {"id": cell.id, "params": cell.params, "data_root": self.cfg.data_root,
                       "device": self.cfg.device, "plugins": self.cfg.plugins}
            self._launch(self.cell_fn.remote(payload, self.models[cell.model_key()]),
                         _Flight("cell", cell, self.cell_res))
            self.progress.running += 1

    def _finished(self, ref) -> None:
        import ray

        flight = self.in_flight.pop(ref)
        self.used["cpu"] -= flight.resources.get("num_cpus", 1)
        self.used["gpu"] -= flight.resources.get("num_gpus", 0)
        try:
            value, exc = ray.get(ref), None
        except Exception as e:  # the task raised, or its worker / node died
            value, exc = None, e
        if flight.kind == "model":
            self._model_done(flight.item, value, exc)
        else:
            self.progress.running -= 1
            self._cell_done(flight.item, value, exc)

    # --- models

    def _model_done(self, key: str, value: dict | None, exc: BaseException | None) -> None:
        if exc is None:
            self._model_ready(key, value)
            return
        msg, tb = _error_text(exc)
        self.errors.setdefault(key, []).append(msg)
        if self.attempts[key] < self.max_attempts:
            self.progress.note(f"model {key} failed ({msg}); retrying")
            self.model_queue.appendleft(key)
        else:
            self._model_failed(key, msg, tb)

    def _model_ready(self, key: str, result: dict) -> None:
        self.model_state[key] = "ready"
        self.models[key] = result
        how = "found on disk" if result["reused"] else f"trained in {result['seconds']:.1f}s"
        self.progress.note(f"model {key} {how} ({Path(result['path']).name}, {result['node']})")
        self.cell_queue.extend(self.plan.cells_of.get(key, []))
        self.model_queue.extend(k for k in self.plan.waiting_on(key) if self.model_state[k] == "waiting")

    def _model_failed(self, key: str, msg: str, tb: str | None) -> None:
        """Its cells are written as failed, and so are the models (and cells) waiting on it."""
        self.model_state[key] = "failed"
        n = self.attempts.get(key, 0)
        for cell in self.plan.cells_of.get(key, []):
            self._fail_cell(cell, "model", f"model {key} failed after {n} attempt(s): {msg}", tb, 0,
                            self.errors.get(key, []))
        for other in self.plan.waiting_on(key):
            if self.model_state[other] == "waiting":
                self.attempts[other] = 0
                self._model_failed(other, f"its clean model {key} failed: {msg}", tb)

    # --- cells

    def _cell_done(self, cell: Cell, value: dict | None, exc: BaseException | None) -> None:
        if exc is None:
            model = self.models[cell.model_key()]
            row = {"cell": cell.id, **cell.params, "status": "ok", **value,
                   "model": os.path.relpath(model["path"], self.models_dir.parent),
                   "model_reused": model["reused"], "attempts": self.attempts[cell.id], "finished": _now()}
            if self.errors.get(cell.id):
                row["errors"] = self.errors[cell.id]
            self.results.append(row)
            asr = "-" if row.get("asr") is None else f"{100 * row['asr']:.1f}%"
            self.progress.cell_finished(True, f"{cell.label()}: CA {100 * row['clean_acc']:.1f}% ASR {asr} "
                                              f"pruned {100 * row['pruned_fraction']:.0f}% "
                                              f"({row['cell_seconds']:.1f}s)")
            return
        msg, tb = _error_text(exc)
        self.errors.setdefault(cell.id, []).append(msg)
        if self.attempts[cell.id] < self.max_attempts:
            self.progress.note(f"{cell.label()} failed ({msg}); retrying")
            self.cell_queue.appendleft(cell)
        else:
            self._fail_cell(cell, "cell", msg, tb, self.attempts[cell.id], self.errors[cell.id])

    def _fail_cell(self, cell: Cell, stage: str, msg: str, tb: str | None, n_attempts: int,
                   errs: list[str]) -> None:
        row = {"cell": cell.id, **cell.params, "status": "failed", "stage": stage, "error": msg,
               "errors": errs, "attempts": n_attempts, "traceback": tb, "finished": _now()}
        self.results.append(row)
        self.progress.cell_finished(False, f"FAILED {cell.label()}: {msg}")


def summarize_only(cfg: GridConfig, out: str | Path | None = None) -> dict:
    """Rewrite summary.md / summary.json / threshold.png from results.jsonl (no Ray)."""
    out = Path(out or cfg.out)
    if not (out / "results.jsonl").exists():
        raise BadInputError(f"{out / 'results.jsonl'} does not exist: run the grid first")
    return write_outputs(out, expand(cfg), ResultsLog(out / "results.jsonl").latest(), title=cfg.name)


__all__ = ["GridOutcome", "run_grid", "summarize_only"]
