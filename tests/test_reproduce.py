"""`fineprune reproduce` at reduced size: every task x attack x defense row, the table, the figures
and the report; and a run killed mid-training that, rerun, ends as an uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fineprune.experiment import ATTACKS, DEFENSES

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FIELDS = ("task", "attack", "defense", "clean_acc", "asr", "robust_acc", "pruned_fraction", "seconds")


def _cmd(out: Path, epochs: int = 1) -> list[str]:
    return [sys.executable, "-m", "fineprune.cli", "reproduce", "--task", "mnist", "--subsample", "0.15",
            "--epochs", str(epochs), "--finetune-epochs", "1", "--device", "cpu", "--out", str(out), "--quiet",
            "--threads", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted reduced run (3 attacker epochs, so a kill can land mid-training)."""
    out = tmp_path_factory.mktemp("repro") / "ref"
    proc = subprocess.run(_cmd(out, epochs=3), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_results_json_is_complete(reference):
    rows = json.loads((reference / "results.json").read_text())
    keys = [(r["task"], r["attack"], r["defense"]) for r in rows]
    assert sorted(keys) == sorted(("mnist", a, d) for a in ATTACKS for d in DEFENSES)  # each exactly once
    for r in rows:
        assert all(f in r for f in FIELDS), r
        for f in ("clean_acc", "asr", "robust_acc", "pruned_fraction"):
            assert 0.0 <= r[f] <= 1.0, (f, r)
        assert r["seconds"] >= 0 and math.isfinite(r["seconds"])
        # Only the pruning defenses remove channels: exactly the sweep's stop point.
        if r["defense"] in ("pruning", "fine-pruning"):
            assert 0 <= r["stop_k"] <= r["num_channels"]
            assert r["pruned_fraction"] == pytest.approx(r["stop_k"] / r["num_channels"])
        else:
            assert r["pruned_fraction"] == 0.0 and "stop_k" not in r
    # The undefended rows of an attacked model show the attack worked at all (else the table is moot).
    by = {(r["attack"], r["defense"]): r for r in rows}
    assert by[("badnets", "none")]["asr"] > by[("none", "none")]["asr"]


def test_table_figures_and_report(reference):
    table = (reference / "table.md").read_text()
    for attack in ATTACKS:
        assert f"| mnist | {attack} |" in table
    head = next(line for line in table.splitlines() if line.startswith("| task |"))
    assert head == "| task | attack | " + " | ".join(DEFENSES) + " |"
    figs = sorted(p.name for p in (reference / "figures").glob("*.png"))
    for attack in ATTACKS:
        assert f"mnist-{attack}-pruning.png" in figs and f"mnist-{attack}-channels.png" in figs
        assert (reference / "figures" / f"mnist-{attack}-pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((reference / "run.json").read_text())
    assert run["settings"]["seed"] == 0 and run["settings"]["tasks"] == ["mnist"] and run["threads"] == 1
    assert run["versions"]["torch"] and run["device"] == "cpu"
    channels = json.loads((reference / "channels.json").read_text())
    assert sorted(c["attack"] for c in channels) == sorted(ATTACKS)
    assert all(c["num_channels"] > 0 and 0 <= c["dormant_clean"] <= c["num_channels"] for c in channels)
    html = (reference / "report.html").read_text()
    assert html.count("<img") == len(figs) and "<table>" in html
    # Nothing half-written is left: no checkpoint or temporary file survives a completed run.
    left = [p.name for p in reference.rglob("*") if ".ckpt" in p.name or p.name.endswith(".tmp")]
    assert left == []


def test_sigkill_mid_training_then_rerun(reference, tmp_path, sigkill_when):
    out = tmp_path / "out"
    models = out / "models"
    sigkill_when(_cmd(out, epochs=3), lambda: models.is_dir() and any(models.glob("*.ckpt")), ENV)
    # Nothing that looks complete: no results, and the model in training has no weights file yet.
    assert not (out / "results.json").exists() and not (out / "report.html").exists()
    assert not list((out / "models").glob("*.json"))

    proc = subprocess.run(_cmd(out, epochs=3), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (reference, out))
    assert _strip(ra) == _strip(rb)
    assert not list((out / "models").glob("*.ckpt*"))


def test_a_row_does_not_depend_on_what_ran_before_it():
    """Models reused from an earlier run must give the rows a fresh run gives: the defense seeds
    its own random draws (dropout) instead of inheriting the process's RNG state."""
    import torch
    from torch import nn

    from fineprune.experiment import defend_one, load_task_data, prepare_task
    from fineprune.tasks import get_task

    task = get_task("mnist")
    data = load_task_data(task, "", 0, 0.1)
    setup = prepare_task(task, data, data_root=".", seed=0, subsample=0.1, finetune_epochs=1, device="cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 26 * 26, 10))
    rows = []
    for burn in (0, 1000):
        torch.rand(burn)  # as if a model had just been trained in this process
        row, _ = defend_one(setup, "badnets", model, {}, "fine-tuning", 4.0)
        rows.append({k: v for k, v in row.items() if "seconds" not in k})
    assert rows[0] == rows[1]


def test_attacker_validation_is_held_out_of_what_its_models_train_on(tmp_path, monkeypatch, one_thread):
    """The pruning-aware attacker chooses on its own validation data: no sample of it may be in
    the data any attacker model (clean, BadNets, pruning-aware, and the clean model the attack
    starts from) trains on, and the recipe names the split (so models trained before are not reused)."""
    import torch

    import fineprune.attack.pruning_aware as pa_mod
    import fineprune.experiment as rep
    import fineprune.experiment.models as models_mod
    from fineprune.tasks import get_task

    seen: list[tuple[str, torch.Tensor]] = []

    def recording(where, real):
        def train(model, data, cfg, **kw):
            seen.append((where, data.tensors[0]))
            return real(model, data, cfg, **kw)
        return train

    monkeypatch.setattr(models_mod, "train", recording("reproduce", models_mod.train))
    monkeypatch.setattr(pa_mod, "train", recording("pruning-aware", pa_mod.train))
    task = get_task("mnist")
    data = rep.load_task_data(task, "", 0, 0.1)
    setup = rep.prepare_task(task, data, data_root=".", seed=0, subsample=0.1, epochs=1, device="cpu")
    store = rep.ModelStore(tmp_path / "models")
    clean = rep.get_model(setup, "none", store)
    rep.get_model(setup, "badnets", store)
    rep.get_model(setup, "pruning-aware", store, clean=lambda: clean[:2])
    assert {w for w, _ in seen} == {"reproduce", "pruning-aware"}  # all three models trained here

    def rows(x: torch.Tensor) -> set[bytes]:
        return {r.numpy().tobytes() for r in x.flatten(1)}

    val = rows(setup.attacker_val.tensors[0])
    assert len(val) == len(setup.attacker_val) > 0  # distinct images, so a hit is a shared sample
    assert val & rows(data.train.tensors[0]) == val  # (the check below can see them)
    for where, x in seen:
        shared = val & rows(x)
        assert not shared, f"{len(shared)} attacker-validation samples in the {where} training data"
    for name in ("none", "badnets", "pruning-aware"):
        assert rep.model_provenance(setup, name)[1]["attacker_split"]["val"] == len(val)


def test_blend_trigger_setup_names_its_own_models():
    """`trigger="blend"`: the task's policy and rate with a seeded pattern blended over the whole
    input; the models it makes have their own recipe, so they never reuse the task trigger's."""
    import torch

    from fineprune.experiment import load_task_data, model_provenance, prepare_task
    from fineprune.experiment.setup import BLEND_ALPHA
    from fineprune.tasks import get_task

    task = get_task("mnist")
    data = load_task_data(task, "", 0, 0.05)
    plain = prepare_task(task, data, data_root="", seed=0, subsample=0.05, device="cpu")
    blend = prepare_task(task, data, data_root="", seed=0, subsample=0.05, device="cpu", trigger="blend")
    x = data.test.tensors[0][:8]
    diff = (blend.attack.trigger(x) - x).abs()
    assert (diff.flatten(1) > 0).float().mean() > 0.9  # everywhere, not a patch
    assert torch.allclose(blend.attack.trigger(x), (1 - BLEND_ALPHA) * x + BLEND_ALPHA * blend.attack.trigger.pattern)
    assert blend.attack.policy.describe() == plain.attack.policy.describe() and blend.attack.rate == plain.attack.rate
    assert model_provenance(blend, "badnets")[1] != model_provenance(plain, "badnets")[1]
    assert model_provenance(blend, "none")[1] == model_provenance(plain, "none")[1]  # the clean twin is shared
    with pytest.raises(ValueError):
        prepare_task(task, data, data_root="", seed=0, device="cpu", trigger="sticker")
