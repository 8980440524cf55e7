"""`fineprune defend` end to end, in process: model formats, unsafe files, data formats, outputs."""
from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import on_sys_path
from PIL import Image

from fineprune import AllToOne, BadNets, PatchTrigger
from fineprune.cli import main
from fineprune.data.embedded import load_mnist5k
from fineprune.defense.compact import load_compact
from fineprune.defense.mask import pruned_channels
from fineprune.defense.persist import load_pruned
from fineprune.errors import as_flags
from fineprune.evaluation.metrics import predict
from fineprune.models.small import SmallCNN
from fineprune.training import TrainConfig, train

FACTORY = '''
from fineprune.models.small import SmallCNN

def small8(num_classes=10, in_channels=1):
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=8)
'''


# Tiny models on a shared 2-core machine run far faster on one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


class Workspace:
    """A backdoored model in every format, clean and triggered data, an architecture factory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        data = load_mnist5k(seed=0)
        attack = BadNets(PatchTrigger(size=(3, 3)), AllToOne(0), rate=0.1, seed=0)
        torch.manual_seed(0)
        model = SmallCNN(width=8)
        train(model, attack.poison(data.train).dataset,
              TrainConfig(epochs=3, lr=2e-3, optimizer="adam", weight_decay=0.0, schedule="constant"),
              device=torch.device("cpu"), seed=0)
        self.model = model.eval()
        # The splits are ordered by class; shuffle so that any prefix holds every class.
        g = torch.Generator().manual_seed(0)
        x, y = data.val.tensors
        perm = torch.randperm(len(y), generator=g)
        self.x_val, self.y_val = x[perm], y[perm]
        trig = attack.triggered(data.test)
        perm = torch.randperm(len(trig), generator=g)
        self.x_trig, self.y_trig = trig.x[perm], trig.y_true[perm]
        (root / "nets_for_defend.py").write_text(FACTORY)
        self.arch = "nets_for_defend:small8"
        from safetensors.torch import save_file

        save_file(model.state_dict(), root / "model.safetensors")
        torch.save(model.state_dict(), root / "model.pt")
        with warnings.catch_warnings():  # torch.jit.script is deprecated, TorchScript files are not
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(model).save(str(root / "model-script.pt"))
        # Clean data as uint8 channels-last (NHWC), triggered as float channels-first.
        u8 = (self.x_val * 255).round().to(torch.uint8)
        np.savez(root / "clean.npz", x=u8.permute(0, 2, 3, 1).numpy(), y=self.y_val.numpy())
        np.savez(root / "small.npz", x=u8[:200].numpy(), y=self.y_val[:200].numpy())
        np.savez(root / "trig.npz", x=self.x_trig.numpy(), y=self.y_trig.numpy())

    def val_u8(self, n: int | None = None) -> torch.Tensor:
        x = (self.x_val * 255).round() / 255
        return x if n is None else x[:n]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    with on_sys_path(tmp_path_factory.mktemp("defend"), "nets_for_defend") as root:
        yield Workspace(root)


def run_cli(*args: Any) -> int:
    return main(["defend", *[str(a) for a in args]])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fineprune: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_end_to_end_fine_prune_cuts_asr(ws, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "clean.npz",
                 "--triggered", ws.root / "trig.npz", "--target", 0, "--out", out, "--quiet")
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "model.json", "metrics.json", "sweep.csv", "pruning_curve.png",
                     "report.html", "model-compact.safetensors"}

    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    print("end-to-end metrics:", metrics)
    assert set(before) == set(after) == {"clean_acc", "asr", "robust_acc"}
    assert before["asr"] > 0.8 and after["asr"] < 0.5 and after["asr"] < before["asr"] - 0.4
    assert after["clean_acc"] > before["clean_acc"] - 0.06

    info = json.loads((out / "model.json").read_text())
    assert info["layer"] == "features.7" and info["method"] == "fine-prune"
    assert "convolutional" in info["layer_reason"]
    assert info["pruned_count"] == len(info["pruned_channels"]) > 0
    assert info["fractions"]["pruned"] == pytest.approx(info["pruned_count"] / 32)
    assert info["threshold_points"] == 4.0 and info["seed"] == 0
    assert info["model"]["sha256"] == hashlib.sha256((ws.root / "model.safetensors").read_bytes()).hexdigest()
    assert info["data"]["clean"]["sha256"] == hashlib.sha256((ws.root / "clean.npz").read_bytes()).hexdigest()
    assert info["data"]["triggered"]["sha256"]
    assert {"fineprune", "torch"} <= set(info["versions"])
    assert info["metrics"]["before"] == before and info["split"]["val_samples"] == 200
    assert info["compact"]["exported"] and info["compact"]["params_after"] < info["compact"]["params_before"]

    # The saved model reloads with its masks; the compact one computes the same function.
    masked = load_pruned(SmallCNN(width=8), out / "model.safetensors").eval()
    assert pruned_channels(masked, "features.7") == info["pruned_channels"]
    compact = load_compact(SmallCNN(width=8), out / "model-compact.safetensors").eval()
    x = ws.x_trig[:64]
    with torch.no_grad():
        assert (masked(x) - compact(x)).abs().max() <= 1e-5
    # ...and it really is the defended model: its ASR on the triggered set is the reported one.
    asr = float((predict(masked, ws.x_trig) == 0).float().mean())
    assert asr == pytest.approx(after["asr"], abs=1e-6)

    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("k,fraction_pruned,channel") and len(rows) == 1 + 33
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3  # activations, pruning curve, fine-tuning
    assert f"{100 * after['asr']:.1f}%" in page and f"{100 * before['clean_acc']:.1f}%" in page
    assert "features.7" in page and info["model"]["sha256"] in page
    assert (out / "pruning_curve.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("filename,fmt", [("model.safetensors", "safetensors"), ("model.pt", "state_dict"),
                                          ("model-script.pt", "torchscript")])
def test_each_model_format_round_trips(ws, tmp_path, filename, fmt):
    out = tmp_path / "out"
    assert run_cli("--model", ws.root / filename, "--arch", ws.arch, "--data", ws.root / "small.npz",
                   "--method", "prune", "--out", out, "--quiet") == 0
    info = json.loads((out / "model.json").read_text())
    assert info["model"]["format"] == fmt
    # "before" is the received model on all 200 samples (prune holds nothing out): same weights.
    direct = float((predict(ws.model, ws.val_u8(200)) == ws.y_val[:200]).float().mean())
    assert info["metrics"]["before"]["clean_acc"] == pytest.approx(direct, abs=1e-6)
    assert info["split"]["val_samples"] == 200
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "not measured: no triggered set given" in page


def test_fine_tune_only_writes_no_pruning_outputs(ws, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
                   "--method", "fine-tune", "--epochs", 1, "--out", out, "--quiet") == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.json", "metrics.json", "report.html"}
    info = json.loads((out / "model.json").read_text())
    assert info["layer"] is None and info["pruned_channels"] == [] and info["compact"] is None
    assert len(info["finetune"]["epochs"]) == 1
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1 and "No pruning sweep (method fine-tune)" in page


def test_max_cache_mb_streams_to_the_same_result(ws, tmp_path, capsys):
    """A tiny --max-cache-mb makes the sweep stream (with its checkpoint): same sweep, same model."""
    outs = {}
    for name, extra in (("all", ()), ("bounded", ("--max-cache-mb", 0.05))):
        outs[name] = tmp_path / name
        assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
                       "--triggered", ws.root / "trig.npz", "--target", 0, "--method", "prune", "--no-compact",
                       "--out", outs[name], "--quiet", *extra) == 0, capsys.readouterr().err
    assert (outs["all"] / "sweep.csv").read_bytes() == (outs["bounded"] / "sweep.csv").read_bytes()
    a, b = (json.loads((outs[n] / "model.json").read_text()) for n in ("all", "bounded"))
    assert a["pruned_channels"] == b["pruned_channels"] and a["metrics"] == b["metrics"]
    assert "--max-cache-mb 0.05" in b["command"]
    assert a["sweep"]["streamed_samples"] == 0 < b["sweep"]["streamed_samples"]
    assert b["sweep"]["cache_mb"] <= 0.05 == b["sweep"]["max_cache_mb"]
    assert not any(p.name.startswith(".") for p in outs["bounded"].iterdir())  # checkpoint removed
    capsys.readouterr()  # the two runs' verdicts (--quiet still prints them on stderr)
    for bad in ("0", "-3", "nan"):
        assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data",
                       ws.root / "small.npz", "--out", tmp_path / "x", "--max-cache-mb", bad) == 2
        assert "--max-cache-mb must be a positive number" in one_line_error(capsys)


class TouchPayload:
    """Unpickling this calls pathlib.Path.touch(marker): stands in for arbitrary attacker code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_refused_and_never_runs(ws, tmp_path, capsys):
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(TouchPayload(control)))
    assert control.exists()  # the payload is live when unpickled

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    state = {k: v for k, v in ws.model.state_dict().items()}
    state["features.0.weight"] = TouchPayload(marker)
    torch.save(state, evil)
    out = tmp_path / "out"
    rc = run_cli("--model", evil, "--arch", ws.arch, "--data", ws.root / "small.npz", "--out", out, "--quiet")
    assert rc == 2
    err = one_line_error(capsys)
    assert "evil.pt" in err
    assert not marker.exists()
    assert not out.exists()  # refused before anything was written


def _write_image_folder(root: Path, x: torch.Tensor, y: torch.Tensor, skip_class: int | None = None) -> None:
    for i, (img, label) in enumerate(zip(x, y.tolist())):
        if label == skip_class:
            continue
        d = root / str(label)
        d.mkdir(parents=True, exist_ok=True)
        arr = (img[0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(arr, mode="L").save(d / f"{i:04d}.png")


def test_image_folders_as_clean_and_triggered_data(ws, tmp_path):
    """Greyscale PNG folders; the triggered folder lacks the target's class folder, so its labels
    must be mapped onto the clean classes by name, not by position."""
    _write_image_folder(tmp_path / "clean", ws.x_val[:120], ws.y_val[:120])
    _write_image_folder(tmp_path / "trig", ws.x_trig[:150], ws.y_trig[:150], skip_class=0)
    out = tmp_path / "out"
    assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", tmp_path / "clean",
                   "--triggered", tmp_path / "trig", "--target", 0, "--method", "prune",
                   "--out", out, "--quiet") == 0
    info = json.loads((out / "model.json").read_text())
    assert info["data"]["clean"]["samples"] == 120 and info["data"]["clean"]["input_shape"] == [1, 28, 28]
    direct = float((predict(ws.model, ws.val_u8(120)) == ws.y_val[:120]).float().mean())
    assert info["metrics"]["before"]["clean_acc"] == pytest.approx(direct, abs=1e-6)
    xt = (ws.x_trig[:150] * 255).round() / 255
    pred = predict(ws.model, xt)
    assert info["metrics"]["before"]["asr"] == pytest.approx(float((pred == 0).float().mean()), abs=1e-6)
    assert info["metrics"]["before"]["robust_acc"] == pytest.approx(
        float((pred == ws.y_trig[:150]).float().mean()), abs=1e-6)


def test_refuses_to_overwrite_without_force(ws, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
            "--method", "prune", "--out", out, "--quiet"]
    assert run_cli(*args) == 2
    assert "--force" in one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert run_cli(*args, "--force") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.html").exists()


def test_a_killed_runs_checkpoint_is_not_thrown_away_silently(ws, tmp_path, capsys):
    """A folder holding only an interrupted run's checkpoint: refused without --resume or --force."""
    from fineprune.pipeline.outdir import CHECKPOINT_NAME

    out = tmp_path / "out"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b"an interrupted run's state")
    args = ["--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
            "--method", "prune", "--out", out, "--quiet"]
    assert run_cli(*args) == 2
    err = one_line_error(capsys)
    assert "--resume" in err and "--force" in err
    assert (out / CHECKPOINT_NAME).read_bytes() == b"an interrupted run's state"
    assert run_cli(*args, "--force") == 0 and (out / "report.html").exists()


def test_config_file_with_flags_winning(ws, tmp_path):
    cfg = tmp_path / "defend.toml"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "small.npz").write_bytes((ws.root / "small.npz").read_bytes())
    cfg.write_text(f'model = "{ws.root / "model.safetensors"}"\narch = "{ws.arch}"\ndata = "data/small.npz"\n'
                   'out = "result"\nmethod = "fine-prune"\n[finetune]\nepochs = 1\n')
    assert run_cli("--config", cfg, "--method", "prune", "--threshold", 2, "--quiet") == 0
    info = json.loads((tmp_path / "result" / "model.json").read_text())
    assert info["method"] == "prune" and info["threshold_points"] == 2.0
    assert info["data"]["clean"]["path"] == str(tmp_path / "data" / "small.npz")


def test_recipe_flag_runs_and_is_recorded(ws, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
                   "--method", "fine-tune", "--epochs", 1, "--recipe", "augment", "--out", out, "--quiet") == 0
    info = json.loads((out / "model.json").read_text())
    assert info["finetune"]["recipe"]["name"] == "augment" and info["finetune"]["recipe"]["augmentation"]
    assert "--recipe augment" in info["command"]
    assert "recipe augment" in (out / "report.html").read_text(encoding="utf-8")


def test_recipe_from_a_config_file_and_ignored_by_prune(ws, tmp_path):
    cfg = tmp_path / "defend.toml"
    cfg.write_text(f'model = "{ws.root / "model.safetensors"}"\narch = "{ws.arch}"\n'
                   f'data = "{ws.root / "small.npz"}"\nout = "result"\n[finetune]\nrecipe = "ft-sam"\n')
    assert run_cli("--config", cfg, "--method", "prune", "--quiet") == 0
    info = json.loads((tmp_path / "result" / "model.json").read_text())
    assert info["finetune"] is None
    assert any("--recipe ft-sam is ignored by --method prune" in as_flags(w) for w in info["warnings"])


def test_criterion_and_stop_rule_flags_run_and_are_recorded(ws, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
                   "--method", "prune", "--criterion", "clp", "--stop-rule", "bound", "--no-compact",
                   "--out", out, "--quiet") == 0
    info = json.loads((out / "model.json").read_text())
    assert info["sweep"]["criterion"] == {"name": "clp"}
    assert info["sweep"]["stop_rule"] == {"name": "bound", "z": pytest.approx(1.6448536269514722)}
    assert "--criterion clp --stop-rule bound" in info["command"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "clp: decreasing channel Lipschitz upper bound" in html and "bound: stay within" in html


def test_criterion_and_stop_rule_defaults_stay_off_the_command_line():
    from fineprune.pipeline.job import DefendJob

    job = DefendJob(model="m.safetensors", arch="demo-cnn", data="d.npz", out="o").validate()
    assert "--criterion" not in job.command_line() and "--stop-rule" not in job.command_line()
    job.criterion, job.stop_rule = "anp", "bound"
    assert "--criterion anp --stop-rule bound" in job.validate().command_line()


def test_criterion_and_stop_rule_from_a_config_file_and_ignored_by_fine_tune(ws, tmp_path):
    cfg = tmp_path / "defend.toml"
    cfg.write_text(f'model = "{ws.root / "model.safetensors"}"\narch = "{ws.arch}"\n'
                   f'data = "{ws.root / "small.npz"}"\nout = "result"\n[pruning]\ncriterion = "anp"\n'
                   'stop_rule = "bound"\n')
    assert run_cli("--config", cfg, "--method", "fine-tune", "--epochs", 1, "--quiet") == 0
    info = json.loads((tmp_path / "result" / "model.json").read_text())
    assert info["sweep"] is None
    assert any("--criterion anp is ignored by --method fine-tune" in as_flags(w) for w in info["warnings"])
    assert any("--stop-rule bound is ignored by --method fine-tune" in as_flags(w) for w in info["warnings"])


@pytest.mark.parametrize("override,needle", [
    ({"--recipe": ["magic"]}, "--recipe: unknown fine-tuning recipe 'magic'; choose one of plain, augment, ft-sam, fst"),
    ({"--recipe": ["ft-sam,roh=8"]}, "--recipe: ft-sam has no option 'roh' (did you mean rho?)"),
    ({"--criterion": ["anq"]}, "--criterion: unknown pruning criterion 'anq' (did you mean anp?); choose one of "
                               "activation, clp, anp"),
    ({"--stop-rule": ["magic"]}, "--stop-rule: unknown stop rule 'magic'; choose one of paper, bound"),
    ({"--triggered": ["trig.npz"]}, "--target"),
    ({"--arch": ["no_such_module_xyz:f"]}, "no_such_module_xyz"),
    ({"--num-classes": ["7"]}, "--num-classes"),
    ({"--data": ["missing.npz"]}, "missing.npz"),
    ({"--mean": ["0.5", "0.5"], "--std": ["0.2"]}, "--std"),
    ({"--input-size": ["20", "20"]}, "--input-size"),
])
def test_bad_inputs_exit_2_with_one_line(ws, tmp_path, capsys, monkeypatch, override, needle):
    monkeypatch.chdir(ws.root)
    flags = {"--model": ["model.safetensors"], "--arch": [ws.arch], "--data": ["small.npz"],
             "--out": [str(tmp_path / "out")], **override}
    assert run_cli(*[a for flag, values in flags.items() for a in (flag, *values)], "--quiet") == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_two_images_per_class_are_enough_and_a_wrecking_learning_rate_is_retried(ws, tmp_path):
    """A defender with 2 clean images per class: the per-class 20% hold-out rounded every class to
    zero and `defend` refused the data. Now 4 of the 20 images validate (4 classes), and a learning
    rate that wrecks the network is discarded and retried gentler, all recorded in model.json."""
    x, y = ws.val_u8(), ws.y_val
    pick = torch.cat([torch.nonzero(y == c).flatten()[:2] for c in range(10)])
    np.savez(tmp_path / "two.npz", x=(x[pick] * 255).round().to(torch.uint8).numpy(), y=y[pick].numpy())
    out = tmp_path / "out"
    assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", tmp_path / "two.npz",
                   "--method", "fine-tune", "--epochs", 2, "--lr", 50, "--out", out, "--quiet") == 0
    info = json.loads((out / "model.json").read_text())
    assert info["split"]["val_samples"] == 4 and info["split"]["train_samples"] == 16
    ft = info["finetune"]
    assert ft["discarded"] and ft["discarded"][0]["lr"] == 50
    assert any("retried gentler" in w or "fine-tuning discarded" in w for w in info["warnings"])


def test_lr_factors_flag_sets_the_learning_rates_fine_tuning_tries(ws, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
                   "--method", "fine-tune", "--epochs", 1, "--lr", 50, "--lr-factors", "1", "--out", out,
                   "--quiet") == 0
    info = json.loads((out / "model.json").read_text())
    assert [a["lr"] for a in info["finetune"]["discarded"]] == [50] and info["finetune"]["best_epoch"] == 0
    assert "--lr-factors 1" in info["command"] and any("fine-tuning discarded" in w for w in info["warnings"])
    assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
                   "--lr-factors", "1,-0.5", "--out", tmp_path / "bad") == 2
