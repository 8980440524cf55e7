"""What a new user hits first: --version, a leftover training checkpoint, progress output, threads."""
from __future__ import annotations

import importlib.metadata
import io
import tarfile

import numpy as np
import torch
from torch.utils.data import TensorDataset

import fineprune.runtime as runtime
from fineprune.cli import main
from fineprune.commands.train import TRAIN_CHECKPOINT
from fineprune.data.archive import Source
from fineprune.data.cache import cached_arrays
from fineprune.models.small import SmallCNN
from fineprune.progress import using
from fineprune.training import TrainConfig, train, train_one_epoch


def test_version_exit_code_and_output(capsys):
    rc = main(["--version"])
    out = capsys.readouterr().out.strip()
    assert rc == 0
    assert out == f"fineprune {importlib.metadata.version('fineprune')}"


# --- fineprune train and a killed run's checkpoint -------------------------------------------------


def _train_args(out, *extra: str) -> list[str]:
    return ["train", "--task", "mnist", "--epochs", "1", "--device", "cpu", "--threads", "1", "--out", str(out),
            "--quiet", *extra]


def test_train_refuses_a_leftover_checkpoint_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / TRAIN_CHECKPOINT
    ckpt.write_bytes(b"epochs a killed run paid for")
    rc = main(_train_args(out))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "--resume" in err and "--force" in err
    assert ckpt.read_bytes() == b"epochs a killed run paid for"  # untouched
    assert sorted(p.name for p in out.iterdir()) == [TRAIN_CHECKPOINT]


def test_train_force_starts_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / TRAIN_CHECKPOINT).write_bytes(b"junk of an older run")
    rc = main(_train_args(out, "--force"))
    assert rc == 0, capsys.readouterr().err
    assert (out / "model.json").is_file() and not (out / TRAIN_CHECKPOINT).exists()


# --- progress ----------------------------------------------------------------------------------------


def _data(n: int = 50) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_train_one_epoch_reports_every_batch():
    x, y = _data(50).tensors
    model = SmallCNN(width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[int] = []
    train_one_epoch(model, x, y, opt, 16, torch.Generator().manual_seed(0), torch.device("cpu"), on_batch=seen.append)
    assert seen == [16, 16, 16, 2]


def test_training_progress_bar_only_when_asked(capsys):
    cfg = TrainConfig(epochs=2, batch_size=16)
    train(SmallCNN(width=4), _data(), cfg, device=torch.device("cpu"), progress=False)
    assert capsys.readouterr() == ("", "")
    train(SmallCNN(width=4), _data(), cfg, device=torch.device("cpu"), progress=True, desc="fit")
    assert "sample" in capsys.readouterr().err  # per batch, by epoch: see test_progress.py


def _archive(tmp_path) -> Source:
    path = tmp_path / "toy.tar.xz"
    with tarfile.open(path, "w:xz") as tf:
        for i in range(5):
            blob = bytes([i]) * 1000
            info = tarfile.TarInfo(f"toy/{i}.bin")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return Source(path, "archive")


def test_archive_decode_progress_is_quiet_unless_enabled(tmp_path, capsys):
    src = _archive(tmp_path)
    assert len(list(src.members(lambda n: n.endswith(".bin")))) == 5
    assert capsys.readouterr().err == ""
    with using(True):
        names = [n for n, _ in src.members(lambda n: n.endswith(".bin"))]
    assert names == [f"toy/{i}.bin" for i in range(5)]
    err = capsys.readouterr().err
    assert "reading toy.tar.xz" in err and "100%" in err and "files=5" in err


def test_cache_miss_says_it_decodes_once(tmp_path, capsys):
    arrays = {"x_train": np.zeros((7, 2), np.uint8), "y_train": np.zeros(7), "y_test": np.zeros(3)}
    decode = lambda: arrays  # noqa: E731
    with using(True):
        _, path, hit = cached_arrays("toy", "fp", {}, decode, cache_dir=tmp_path)
        assert not hit
        err = capsys.readouterr().err
        assert "decoding it once" in err and str(path) in err and "(10 samples)" in err
        assert cached_arrays("toy", "fp", {}, decode, cache_dir=tmp_path)[2]  # a hit says nothing
        assert capsys.readouterr().err == ""
    cached_arrays("toy", "fp2", {}, decode, cache_dir=tmp_path)
    assert capsys.readouterr().err == ""  # progress off: silent


# --- threads -----------------------------------------------------------------------------------------


def test_default_threads_never_exceeds_cores_or_usable_cpus(monkeypatch):
    monkeypatch.setattr(runtime, "physical_cores", lambda: 8)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 3)
    assert runtime.default_threads() == 3
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 16)
    assert runtime.default_threads() == 8
    monkeypatch.setattr(runtime, "physical_cores", lambda: None)
    assert runtime.default_threads() == 16


def test_busy_hint_follows_the_load(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.9, 1.0, 0.5))
    hint = runtime.busy_hint(2)
    assert hint is not None and "set_threads(1)" in hint and "load 1.9" in hint
    assert runtime.busy_hint(1) is None  # already as few as can help
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert runtime.busy_hint(2) is None


def test_cli_applies_the_default_thread_count(monkeypatch, tmp_path, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)
    monkeypatch.setattr(runtime, "busy_hint", lambda n, how="": f"busy, try {how.format(n=1)}")
    import fineprune.cli as cli

    monkeypatch.setattr(cli, "_interactive", lambda: True)  # the note is for a terminal only
    out = tmp_path / "run"
    out.mkdir()
    (out / TRAIN_CHECKPOINT).write_bytes(b"x")  # refused before any training: fast
    try:
        torch.set_num_threads(2)
        rc = main(["train", "--task", "mnist", "--out", str(out)])
        assert rc == 2 and torch.get_num_threads() == 1
        assert "fineprune: note: busy, try --threads 1" in capsys.readouterr().err
        monkeypatch.setattr(cli, "_interactive", lambda: False)  # scripts, logs, tests: same stderr anywhere
        assert main(["train", "--task", "mnist", "--out", str(out)]) == 2
        assert "note" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
