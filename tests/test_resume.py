"""Interruptions: fine-tuning checkpoints atomically each epoch; SIGKILL mid fine-tuning, then
`fineprune defend --resume`, ends with the same metrics as an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from fineprune.cli import main
from fineprune.errors import BadInputError
from fineprune.models.small import SmallCNN
from fineprune.pipeline.outdir import CHECKPOINT_NAME
from fineprune.training import TrainConfig, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# Tiny models on a shared 2-core machine run far faster on one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


# --- training.train ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TrainConfig(epochs=4, batch_size=16, lr=0.05),
                                 TrainConfig(epochs=4, batch_size=16, lr=1e-3, optimizer="adam",
                                             schedule="constant")])
def test_train_resume_equals_uninterrupted(tmp_path, cfg):
    data, val = _tiny_data(), _tiny_data(32, seed=1)
    torch.manual_seed(0)
    start = SmallCNN(width=4).state_dict()
    val_fn = lambda m: float((m(val.tensors[0]).argmax(1) == val.tensors[1]).float().mean())  # noqa: E731

    ref = SmallCNN(width=4)
    ref.load_state_dict(start)
    h_ref = train(ref, data, cfg, device=torch.device("cpu"), seed=3, val_fn=val_fn, keep_best=True)

    ckpt = tmp_path / "c.ckpt"
    # A run that dies in epoch 3 (after epoch 2's checkpoint was written).
    calls = {"n": 0}

    def dying_val(m):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return val_fn(m)

    killed = SmallCNN(width=4)
    killed.load_state_dict(start)
    with pytest.raises(KeyboardInterrupt):
        train(killed, data, cfg, device=torch.device("cpu"), seed=3, val_fn=dying_val, keep_best=True,
              checkpoint_path=ckpt)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2

    resumed = SmallCNN(width=4)
    resumed.load_state_dict(start)  # the caller rebuilds the same starting point, as the CLI does
    h_res = train(resumed, data, cfg, device=torch.device("cpu"), seed=3, val_fn=val_fn, keep_best=True,
                  checkpoint_path=ckpt, resume=True)
    assert [(r.epoch, r.train_loss, r.val_acc) for r in h_res.epochs] == \
        [(r.epoch, r.train_loss, r.val_acc) for r in h_ref.epochs]
    assert h_res.best_epoch == h_ref.best_epoch
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_checkpoint_of_another_run_is_refused(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    cfg = TrainConfig(epochs=1, batch_size=32)
    train(SmallCNN(width=4), _tiny_data(), cfg, device=torch.device("cpu"), checkpoint_path=ckpt)
    with pytest.raises(BadInputError, match="different run"):
        train(SmallCNN(width=4), _tiny_data(seed=5), cfg, device=torch.device("cpu"), checkpoint_path=ckpt,
              resume=True)
    ckpt.write_bytes(b"torn file")
    with pytest.raises(BadInputError, match="cannot resume"):
        train(SmallCNN(width=4), _tiny_data(), cfg, device=torch.device("cpu"), checkpoint_path=ckpt, resume=True)


# --- the CLI, with a real SIGKILL ----------------------------------------------------------------


def _defend_cmd(ws: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fineprune.cli", "defend", "--model", str(ws / "m.safetensors"),
            "--arch", "demo-cnn", "--data", str(ws / "d.npz"), "--triggered", str(ws / "t.npz"), "--target", "0",
            "--epochs", "8", "--batch-size", "16", "--threshold", "30", "--no-compact", "--device", "cpu",
            "--out", str(out), "--quiet", "--no-scan", *extra]


def test_sigkill_mid_finetuning_then_resume(tmp_path, sigkill_when):
    torch.manual_seed(0)
    save_file(SmallCNN().state_dict(), tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), y=np.arange(200) % 10)
    np.savez(tmp_path / "t.npz", x=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), y=np.arange(40) % 10)

    ref = tmp_path / "ref"
    proc = subprocess.run(_defend_cmd(tmp_path, ref), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (ref / CHECKPOINT_NAME).exists()  # removed once the run completed

    out = tmp_path / "out"
    sigkill_when(_defend_cmd(tmp_path, out), lambda: (out / CHECKPOINT_NAME).exists(), ENV, timeout=240)
    epoch = torch.load(out / CHECKPOINT_NAME, weights_only=True)["epoch"]
    assert 1 <= epoch < 8
    # Nothing that looks like a finished result is left behind.
    assert not any((out / name).exists() for name in ("model.json", "metrics.json", "model.safetensors",
                                                     "report.html"))

    # The checkpoint alone does not make --out "not empty": the same command plus --resume goes on.
    proc = subprocess.run(_defend_cmd(tmp_path, out, "--resume"), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / CHECKPOINT_NAME).exists()
    assert (out / "metrics.json").read_bytes() == (ref / "metrics.json").read_bytes()
    ma, mb = (json.loads((d / "model.json").read_text()) for d in (ref, out))
    assert [e["val_acc"] for e in ma["finetune"]["epochs"]] == [e["val_acc"] for e in mb["finetune"]["epochs"]]
    assert ma["finetune"]["best_epoch"] == mb["finetune"]["best_epoch"]
    wa, wb = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_flag_without_checkpoint_runs_fresh(tmp_path, capsys):
    torch.manual_seed(0)
    save_file(SmallCNN(width=16).state_dict(), tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), y=np.arange(60) % 10)
    rc = main(["defend", "--model", str(tmp_path / "m.safetensors"), "--arch", "demo-cnn", "--data",
               str(tmp_path / "d.npz"), "--epochs", "1", "--no-compact", "--device", "cpu", "--threshold", "50",
               "--out", str(tmp_path / "o"), "--quiet", "--resume"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "metrics.json").exists() and not (tmp_path / "o" / CHECKPOINT_NAME).exists()


# --- fineprune train, with a real SIGKILL ----------------------------------------------------------


def _train_cmd(out: Path, *extra: str) -> list[str]:
    # mnist ships with the package: no --data-root needed.
    return [sys.executable, "-m", "fineprune.cli", "train", "--task", "mnist", "--epochs", "4", "--device", "cpu",
            "--threads", "1", "--out", str(out), "--quiet", *extra]


def test_sigkill_mid_training_then_resume(tmp_path, sigkill_when):
    from fineprune.commands.train import TRAIN_CHECKPOINT

    ref = tmp_path / "ref"
    proc = subprocess.run(_train_cmd(ref), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (ref / TRAIN_CHECKPOINT).exists()

    out = tmp_path / "out"
    sigkill_when(_train_cmd(out), lambda: (out / TRAIN_CHECKPOINT).exists(), ENV, timeout=240)
    assert 1 <= torch.load(out / TRAIN_CHECKPOINT, weights_only=True)["epoch"] < 4
    assert not (out / "model.json").exists() and not (out / "model.safetensors").exists()

    proc = subprocess.run(_train_cmd(out, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / TRAIN_CHECKPOINT).exists()
    ma, mb = (json.loads((d / "model.json").read_text()) for d in (ref, out))
    assert ma["metrics"] == mb["metrics"]
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(ma["history"]) == strip(mb["history"]) and len(mb["history"]) == 4
    wa, wb = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_disk_full_is_one_clear_line_and_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    import errno

    import fineprune.runtime as runtime

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(runtime.os, "replace", full_disk)
    out = tmp_path / "out"
    rc = main(["train", "--task", "mnist", "--epochs", "1", "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fineprune: error writing") and "No space left on device" in err
    assert "\n" not in err and "Traceback" not in err
    # Neither the model nor its record, nor a temporary file, is left behind.
    assert [p.name for p in out.iterdir()] == []
