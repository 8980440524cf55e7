"""`fineprune grid` on a real local Ray cluster (no mocks): a tiny grid on 2 worker processes, a grid
killed midway and resumed, failing cells reported after one retry; plus the config / results
logic without Ray.

The fixture starts `ray start --head --block` on 127.0.0.1 in its own session (temp dir, free port,
2 CPUs, no dashboard) and at teardown stops exactly that session's processes (not `ray stop`,
which would also stop other Ray instances of this user on the machine), then checks none is left.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

from fineprune.errors import BadInputError
from fineprune.grid import expand, parse_config, run_grid
from fineprune.grid.results import ResultsLog, summarize, summary_markdown
from fineprune.progress import Progress

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
FINEPRUNE = str(VENV_BIN / "fineprune")
# Token authentication with a throwaway token in the environment (never ~/.ray/auth_token); no
# uv runtime env (it would need the network); no usage stats; no memory monitor (it kills workers
# when the whole machine runs short, whoever uses the memory: this machine is shared).
RAY_ENV = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_memory_monitor_refresh_ms": "0"}
ENV = {**os.environ, **RAY_ENV, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}

TINY = {"task": "mnist", "subsample": 0.2, "epochs": 2, "finetune_epochs": 1}


# ---- the cluster ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (every process the `ray start` we launched spawned keeps it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def ray_cluster():
    if not Path(RAY).exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    temp = tempfile.mkdtemp(prefix="fpray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats", "--block"],
        stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    address = f"127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    for k, v in RAY_ENV.items():  # for the tests that drive the grid in this process
        mp.setenv(k, v)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (Path(temp) / "ray-start.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start failed:\n" + (Path(temp) / "ray-start.log").read_text()[-3000:])
            time.sleep(0.3)
        yield address
    finally:
        mp.undo()
        sid = proc.pid  # start_new_session: the session id is the leader's pid
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 15
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _session_pids(sid):  # stragglers of our session only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        time.sleep(0.5)
        log.close()
        left = _session_pids(sid)
        subprocess.run(["rm", "-rf", temp], check=False)
        assert not left, f"Ray processes left running: {left}"


def _rows(out: Path) -> list[dict]:
    return ResultsLog(out / "results.jsonl").read()


# ---- Ray: real runs ----------------------------------------------------------------------------


def test_tiny_grid_on_two_workers(ray_cluster, tmp_path):
    cfg = parse_config({"name": "tiny", "axes": {**TINY, "attack": "badnets", "defense": ["pruning", "fine-pruning"],
                                                 "threshold": [2, 8], "seed": [0, 1]}})
    cells = expand(cfg)
    assert len(cells) == 8
    buf = io.StringIO()
    outcome = run_grid(cfg, tmp_path / "g", ray_cluster, progress=Progress(buf))
    lines = buf.getvalue().splitlines()
    rows = _rows(tmp_path / "g")
    assert sorted(r["cell"] for r in rows) == sorted(c.id for c in cells)  # every cell, once
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in rows)
    assert outcome.ok == 8 and outcome.failed == 0
    assert len({r["pid"] for r in rows}) >= 2, "cells should run in 2 worker processes"
    # two models (one per seed), trained once each and shared by their 4 cells
    assert len({r["model"] for r in rows}) == 2
    assert len(list((tmp_path / "g" / "models").glob("*.safetensors"))) == 2
    for r in rows:
        assert 0.0 <= r["clean_acc"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 and r["threshold"] in (2.0, 8.0)
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["ok"] == 8 and len(summary["groups"]) == 4
    assert all(g["n"] == 2 and g["seeds"] == [0, 1] and g["clean_acc"]["std"] is not None for g in summary["groups"])
    md = (tmp_path / "g" / "summary.md").read_text()
    assert "| mnist | badnets | fine-pruning | 8 | 2 |" in md and "±" in md
    assert (tmp_path / "g" / "threshold.png").stat().st_size > 5000
    progress = [ln for ln in lines if ln.startswith("[")]
    assert len(progress) == 8 and "done 8/8" in progress[-1] and "failed 0" in progress[-1] and "left" in progress[-1]


def test_killed_grid_resumes_without_redoing_cells(ray_cluster, tmp_path):
    cfg_path = tmp_path / "grid.yaml"
    # retries: 2 here, so a worker lost to the shared machine's load cannot fail this resume test
    cfg_path.write_text(json.dumps({"name": "resume", "retries": 2, "axes": {
        **TINY, "attack": "badnets", "defense": ["none", "pruning", "fine-pruning"],
        "threshold": [1, 2, 4, 8], "seed": [0, 1]}}))  # JSON is YAML
    out = tmp_path / "g"
    total = len(expand(parse_config(json.loads(cfg_path.read_text()))))
    assert total == 18
    cmd = [FINEPRUNE, "grid", str(cfg_path), "--ray-address", ray_cluster, "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_text().count("\n") >= 1):
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no cell finished in time"
        time.sleep(0.05)
    first.kill()  # SIGKILL: no chance to clean up, as a crash or a lost node
    first.wait(timeout=30)
    first.stdout.close()
    before = _rows(out)
    assert 1 <= len(before) < total, f"the kill came too late ({len(before)} of {total} rows)"
    assert len({r["cell"] for r in before}) == len(before)

    second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    failed = [r for r in _rows(out) if r["status"] != "ok"]
    assert second.returncode == 0, (second.stdout[-3000:] + second.stderr[-3000:]
                                    + "\nfailed rows:\n" + json.dumps(failed, indent=1)[-4000:])
    assert f"{len(before)} already done" in second.stdout
    after = _rows(out)
    assert after[:len(before)] == before  # the first run's rows are kept as they were
    ids = [r["cell"] for r in after]
    assert len(ids) == len(set(ids)) == total  # every cell exactly once: nothing redone, nothing dropped
    assert all(r["status"] == "ok" for r in after)
    # the models trained before the kill are reused from OUT/models, not trained again
    assert len(list((out / "models").glob("*.safetensors"))) == 2
    assert any(r["model_reused"] for r in after[len(before):])
    assert "18 of 18 cells done" in second.stdout

    third = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)  # all done: no Ray work
    assert third.returncode == 0 and "18 already done" in third.stdout and len(_rows(out)) == total


PLUGIN = '''
"""Test-only tasks for the grid (a plugin file: imported in the driver and in every Ray worker)."""
import dataclasses
from fineprune import tasks
from fineprune.training import TrainConfig

_mnist = tasks.get_task("mnist")


def _no_data(root, seed=0, **kw):
    raise RuntimeError("test plugin: this task's data cannot be loaded")


# the data loads and models train, but the defender's fine-tuning raises (an unknown optimizer)
tasks.register_task(dataclasses.replace(_mnist, name="mnist-badft",
                                    finetune=TrainConfig(epochs=1, optimizer="no-such-optimizer")))
# the model cannot even be trained: every cell on it fails
tasks.register_task(dataclasses.replace(_mnist, name="mnist-nodata", loader=_no_data))
'''


def test_failing_cells_are_retried_once_then_reported(ray_cluster, tmp_path):
    (tmp_path / "plugin.py").write_text(PLUGIN)
    cfg = parse_config({"name": "fail", "plugins": ["plugin.py"], "retries": 1,
                        "axes": {**TINY, "epochs": 1, "task": ["mnist-badft", "mnist-nodata"], "attack": "badnets",
                                 "defense": ["none", "fine-tuning"]}}, base_dir=tmp_path)
    buf = io.StringIO()
    outcome = run_grid(cfg, tmp_path / "g", ray_cluster, progress=Progress(buf))
    lines = buf.getvalue().splitlines()
    rows = {(r["task"], r["defense"]): r for r in _rows(tmp_path / "g")}
    assert len(rows) == 4 and outcome.ok == 1 and outcome.failed == 3
    assert rows[("mnist-badft", "none")]["status"] == "ok"
    bad = rows[("mnist-badft", "fine-tuning")]
    assert bad["status"] == "failed" and bad["stage"] == "cell" and bad["attempts"] == 2
    assert len(bad["errors"]) == 2 and all("no-such-optimizer" in e for e in bad["errors"])
    for defense in ("none", "fine-tuning"):
        r = rows[("mnist-nodata", defense)]
        assert r["status"] == "failed" and r["stage"] == "model"
        assert len(r["errors"]) == 2 and "cannot be loaded" in r["error"]  # the model was tried twice
    assert any("retrying" in ln for ln in lines)
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["failed"] == 3 and summary["ok"] == 1
    md = (tmp_path / "g" / "summary.md").read_text()
    assert "## Failed cells" in md and "no-such-optimizer" in md and "cannot be loaded" in md


def test_without_an_address_ray_starts_locally_and_stops(tmp_path):
    """No --ray-address: the grid starts its own Ray on this machine and stops it at the end."""
    cfg_path = tmp_path / "grid.yaml"
    cfg_path.write_text("axes: {task: mnist, attack: badnets, defense: none, subsample: 0.2, epochs: 1, seed: [0, 1]}\n")
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([FINEPRUNE, "grid", str(cfg_path), "--out", str(tmp_path / "g"), "--num-cpus", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert "1 CPUs" in output and "2 of 2 cells done" in output
    rows = _rows(tmp_path / "g")
    assert len(rows) == 2 and all(r["status"] == "ok" and r["defense"] == "none" for r in rows)
    deadline = time.monotonic() + 20
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_pids(proc.pid), "the local Ray was not stopped"


# ---- without Ray ---------------------------------------------------------------------------------


def test_config_expansion_collapses_irrelevant_axes():
    cfg = parse_config({"axes": {"task": "mnist", "attack": ["none", "badnets", "pruning-aware"],
                                 "poison_rate": [0.05, 0.1], "defense": ["none", "fine-tuning", "pruning"],
                                 "threshold": [2, 4.0], "seed": [0, 1]},
                        "exclude": [{"attack": "pruning-aware", "poison_rate": 0.05}]})
    cells = expand(cfg)
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    # clean: no poison rate -> 1 rate; none / fine-tuning: no threshold
    count = {}
    for c in cells:
        count[(c.params["attack"], c.params["defense"])] = count.get((c.params["attack"], c.params["defense"]), 0) + 1
    assert count[("none", "none")] == 2 and count[("none", "pruning")] == 4
    assert count[("badnets", "fine-tuning")] == 4 and count[("badnets", "pruning")] == 8
    assert count[("pruning-aware", "pruning")] == 4  # rate 0.05 excluded
    assert all(c.params["threshold"] in (2.0, 4.0) for c in cells if c.params["defense"] == "pruning")
    # models are shared: cells differing only in defense / threshold use the same one
    keys = {c.model_key() for c in cells}
    assert len(keys) == 2 + 4 + 2  # clean per seed, badnets per (rate, seed), pruning-aware per seed
    # 4 and 4.0 are the same cell
    same = parse_config({"axes": {"task": "mnist", "threshold": 4}})
    assert expand(same)[0].id == expand(parse_config({"axes": {"task": "mnist", "threshold": 4.0}}))[0].id


def test_cell_ids_and_model_keys_without_a_recipe_are_those_from_before_the_axis():
    # Computed before the recipe axis existed: a grid that does not mention it keeps its cells'
    # ids (its results.jsonl resumes) and its models' keys (OUT/models is reused).
    cells = expand(parse_config({"axes": {"task": "mnist", "attack": ["none", "badnets", "pruning-aware"],
                                          "defense": ["none", "fine-tuning", "pruning", "fine-pruning"]}}))
    assert [(c.id, c.model_key()) for c in cells if c.params["attack"] != "none"] == [
        ("mnist.badnets.none.483ae070b91c", "mnist-badnets-b71af912ec"),
        ("mnist.badnets.fine-tuning.077ea8aab9fd", "mnist-badnets-b71af912ec"),
        ("mnist.badnets.pruning.ef21656b6ddf", "mnist-badnets-b71af912ec"),
        ("mnist.badnets.fine-pruning.f8c1cd71817b", "mnist-badnets-b71af912ec"),
        ("mnist.pruning-aware.none.da3c33cea581", "mnist-pruning-aware-04bc0cd164"),
        ("mnist.pruning-aware.fine-tuning.9525adf03261", "mnist-pruning-aware-04bc0cd164"),
        ("mnist.pruning-aware.pruning.b252495c4aa5", "mnist-pruning-aware-04bc0cd164"),
        ("mnist.pruning-aware.fine-pruning.4d56e1abc369", "mnist-pruning-aware-04bc0cd164")]
    assert [c.id for c in cells if c.params["attack"] == "none"] == [
        "mnist.none.none.ec2307ab6878", "mnist.none.fine-tuning.203121c2c55a",
        "mnist.none.pruning.ec22c11b1775", "mnist.none.fine-pruning.9e292cec2979"]
    # Naming the default recipe changes nothing either.
    plain = expand(parse_config({"axes": {"task": "mnist", "attack": ["none", "badnets", "pruning-aware"],
                                          "defense": ["none", "fine-tuning", "pruning", "fine-pruning"],
                                          "recipe": "plain"}}))
    assert [c.id for c in plain] == [c.id for c in cells]
    # Nor does naming the default criterion and stop rule.
    paper = expand(parse_config({"axes": {"task": "mnist", "attack": ["none", "badnets", "pruning-aware"],
                                          "defense": ["none", "fine-tuning", "pruning", "fine-pruning"],
                                          "criterion": "activation", "stop_rule": "paper"}}))
    assert [(c.id, c.model_key()) for c in paper] == [(c.id, c.model_key()) for c in cells]


def test_recipe_axis_expands_and_collapses_where_nothing_is_fine_tuned():
    cfg = parse_config({"axes": {"task": "mnist", "defense": ["none", "pruning", "fine-tuning", "fine-pruning"],
                                 "recipe": ["plain", "augment"], "seed": [0, 1]}})
    cells = expand(cfg)
    recipes = {}
    for c in cells:
        recipes.setdefault(c.params["defense"], []).append(c.params["recipe"])
    assert recipes["none"] == [None, None] and recipes["pruning"] == [None, None]
    assert sorted(recipes["fine-tuning"]) == sorted(recipes["fine-pruning"]) == ["augment"] * 2 + ["plain"] * 2
    assert len({c.id for c in cells}) == len(cells) == 12
    assert len({c.model_key() for c in cells}) == 2  # the recipe never changes the trained model
    assert any("recipe=augment" in c.label() for c in cells)
    latest = {c.id: {"cell": c.id, "status": "ok", "clean_acc": 0.9, "asr": 0.1, "robust_acc": 0.5,
                     "pruned_fraction": 0.0} for c in cells}
    table = summary_markdown(summarize(cells, latest))
    header = table.splitlines()[4]
    assert "| recipe |" in header
    assert any("| augment |" in line for line in table.splitlines())
    # one recipe only: no recipe column
    single = expand(parse_config({"axes": {"task": "mnist", "defense": ["pruning", "fine-pruning"]}}))
    assert "recipe" not in summary_markdown(summarize(single, {})).splitlines()[4]


def test_criterion_and_stop_rule_axes_expand_and_collapse_where_nothing_is_pruned():
    cfg = parse_config({"axes": {"task": "mnist", "defense": ["none", "pruning", "fine-tuning", "fine-pruning"],
                                 "criterion": ["activation", "clp", "anp"], "stop_rule": ["paper", "bound"]}})
    cells = expand(cfg)
    by_defense = {}
    for c in cells:
        by_defense.setdefault(c.params["defense"], []).append((c.params["criterion"], c.params["stop_rule"]))
    assert by_defense["none"] == by_defense["fine-tuning"] == [(None, None)]
    assert len(by_defense["pruning"]) == len(by_defense["fine-pruning"]) == 6
    assert len({c.id for c in cells}) == len(cells) == 14
    assert len({c.model_key() for c in cells}) == 1  # neither changes the trained model
    labels = [c.label() for c in cells]
    assert any("criterion=clp" in lb and "stop_rule=bound" in lb for lb in labels)
    assert not any("criterion=activation" in lb or "stop_rule=paper" in lb for lb in labels)
    # the paper's values keep the id of the cell that does not name them
    default_ids = {c.id for c in expand(parse_config({"axes": {"task": "mnist", "defense": "pruning"}}))}
    assert default_ids <= {c.id for c in cells}
    latest = {c.id: {"cell": c.id, "status": "ok", "clean_acc": 0.9, "asr": 0.1, "robust_acc": 0.5,
                     "pruned_fraction": 0.0} for c in cells}
    lines = summary_markdown(summarize(cells, latest)).splitlines()
    assert "| criterion | stop_rule |" in lines[4]
    assert any("| clp | bound |" in line for line in lines)
    single = expand(parse_config({"axes": {"task": "mnist", "defense": ["pruning", "fine-pruning"],
                                           "criterion": "clp"}}))
    header = summary_markdown(summarize(single, {})).splitlines()[4]
    assert "criterion" not in header and "stop_rule" not in header


@pytest.mark.parametrize("raw, words", [
    ({"axes": {"task": "mnist", "recipe": ["plain", "sam"]}}, "axis recipe: unknown fine-tuning recipe .sam. .did you mean .*ft-sam.*choose one of plain, augment, ft-sam, fst"),
    ({"axes": {"task": "mnist", "criterion": "lipschitz"}}, "axis criterion: unknown pruning criterion .lipschitz.; choose one of activation, clp, anp"),
    ({"axes": {"task": "mnist", "stop_rule": ["paper", 3]}}, "axis stop_rule must be a spec NAME.*got 3"),
    ({"axes": {"attack": "badnets"}}, "task"),
    ({"axes": {"task": "nope"}}, "unknown task"),
    ({"axes": {"task": "mnist", "threshold": [4, 200]}}, "threshold"),
    ({"axes": {"task": "mnist", "colour": "red"}}, "unknown axis"),
    ({"axes": {"task": "mnist", "defense": "magic"}}, "defense"),
    ({"axes": {"task": "mnist"}, "retries": -1}, "retries"),
    ({"axes": {"task": "mnist"}, "resources": {"cpus": 1}}, "resources"),
    ({"axes": {"task": "mnist"}, "plugins": ["/no/such/plugin.py"]}, "plugin"),
    ({"axes": {"task": "mnist", "seed": []}}, "empty"),
])
def test_config_errors_name_the_problem(raw, words):
    with pytest.raises(BadInputError, match=words):
        parse_config(raw)


def test_results_log_skips_a_torn_line_and_appends_on_a_fresh_one(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"cell": "a", "status": "ok"}) + "\n" + '{"cell": "b", "sta')  # a crash mid-write
    log = ResultsLog(path)
    assert [r["cell"] for r in log.read()] == ["a"] and log.skipped_lines == 1
    log.append({"cell": "b", "status": "ok"})
    log.close()
    assert [r["cell"] for r in log.read()] == ["a", "b"]
    assert path.read_text().endswith("\n")


def test_summary_mean_and_sample_std_over_seeds():
    cfg = parse_config({"axes": {"task": "mnist", "defense": "pruning", "seed": [0, 1, 2]}})
    cells = expand(cfg)
    latest = {c.id: {"cell": c.id, "status": "ok", "clean_acc": acc, "asr": 0.1, "robust_acc": None,
                     "pruned_fraction": 0.5} for c, acc in zip(cells, (0.9, 0.8, 0.7))}
    latest[cells[2].id] = {"cell": cells[2].id, "status": "failed", "error": "boom", "attempts": 2}
    s = summarize(cells, latest)
    g = s["groups"][0]
    assert g["n"] == 2 and g["failed_seeds"] == [2]
    assert g["clean_acc"]["mean"] == pytest.approx(0.85) and g["clean_acc"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert g["robust_acc"]["mean"] is None
    assert s["failed"] == 1 and s["failed_cells"][0]["error"] == "boom"


def test_cli_rejects_a_bad_config(tmp_path, capsys):
    from fineprune.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: {task: mnist, threshold: [4, -1]}\n")
    assert main(["grid", str(bad)]) == 2
    assert "threshold" in capsys.readouterr().err


def test_run_cell_passes_the_criterion_and_stop_rule_on(monkeypatch):
    from fineprune import experiment
    from fineprune.defense import persist
    from fineprune.grid import work

    seen = {}

    def fake_defend_one(setup, attack, net, info, defense, threshold, **kw):
        seen.update(kw, threshold=threshold)
        return {"task": "mnist", "attack": attack, "defense": defense, "clean_acc": 1.0}, None

    monkeypatch.setattr(work, "_setup", lambda *a, **k: types.SimpleNamespace(fresh=lambda: None))
    monkeypatch.setattr(persist, "load_pruned", lambda net, path: net)
    monkeypatch.setattr(experiment, "defend_one", fake_defend_one)
    cells = expand(parse_config({"axes": {"task": "mnist", "defense": ["fine-tuning", "pruning"],
                                          "criterion": "anp", "stop_rule": "bound"}}))
    for cell in cells:
        seen.clear()
        work.run_cell({"id": cell.id, "params": cell.params, "data_root": "."}, {"path": "unused"})
        pruned = cell.params["defense"] == "pruning"
        assert (seen["criterion"], seen["stop_rule"]) == (("anp", "bound") if pruned else ("activation", "paper"))


def test_trigger_axis_makes_its_own_models_and_keeps_the_clean_twin_shared():
    cfg = parse_config({"axes": {"task": "mnist", "attack": ["none", "badnets"], "trigger": ["task", "blend"],
                                 "defense": "fine-pruning"}})
    cells = expand(cfg)
    assert sorted((c.params["attack"], c.params["trigger"]) for c in cells) == [
        ("badnets", "blend"), ("badnets", "task"), ("none", None)]
    keys = {c.params["trigger"]: c.model_key() for c in cells}
    assert len(set(keys.values())) == 3
    plain = expand(parse_config({"axes": {"task": "mnist", "attack": "badnets", "defense": "fine-pruning"}}))
    assert keys["task"] == plain[0].model_key()  # the task's own trigger keeps the key it had
    with pytest.raises(BadInputError):
        parse_config({"axes": {"task": "mnist", "trigger": "sticker"}})


@pytest.mark.parametrize("name", ["grid-small.yaml", "grid-paper.yaml", "grid-purification.yaml"])
def test_example_configs_parse_and_expand(name):
    from fineprune.grid.config import load_config

    cells = expand(load_config(Path(__file__).resolve().parents[1] / "examples" / name))
    assert cells and len({c.id for c in cells}) == len(cells)
    if name == "grid-purification.yaml":  # the paper's fine-pruning is in every block
        paper = [c for c in cells if c.params["defense"] == "fine-pruning" and c.params["recipe"] == "plain"
                 and c.params["criterion"] == "activation" and c.params["stop_rule"] == "paper"]
        blocks = {(c.params["task"], c.params["attack"], c.params["poison_rate"], c.params["trigger"]) for c in cells}
        assert {(c.params["task"], c.params["attack"], c.params["poison_rate"], c.params["trigger"]) for c in paper} == blocks


def test_lr_factors_axis_is_canonical_and_keeps_old_ids():
    cfg = parse_config({"axes": {"task": "mnist", "defense": ["pruning", "fine-pruning"],
                                 "lr_factors": ["1, 0.1, 0.01", "3,1,0.3,0.1"]}})
    cells = expand(cfg)
    values = sorted(str(c.params["lr_factors"]) for c in cells)
    assert values == ["1,0.1,0.01", "3,1,0.3,0.1", "None"]  # pruning: nothing is fine-tuned
    old = expand(parse_config({"axes": {"task": "mnist", "defense": ["pruning", "fine-pruning"]}}))
    assert {c.id for c in old} <= {c.id for c in cells}  # the default keeps the id it had
    assert any("lr_factors=3,1,0.3,0.1" in c.label() for c in cells)
    for bad in ("0,1", "fast", "1,-2"):
        with pytest.raises(BadInputError):
            parse_config({"axes": {"task": "mnist", "lr_factors": bad}})
