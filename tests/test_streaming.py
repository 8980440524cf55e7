"""Streaming data (`fineprune.data.stream`): a lazy folder, an unknown Dataset and the equivalent
TensorDataset give the same batches, so the same sweep, the same fine-tuned weights and the same
accuracy; the sweep's memory stays bounded; the CLI reads folders lazily with workers."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_curve, labels_near_model, on_sys_path
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from fineprune import FinePruning, TrainConfig, TriggeredSet, defend
from fineprune.data import stream
from fineprune.data.generic import ImageFolderData, WavFolderData, load_data, load_image_folder, load_wav_folder
from fineprune.data.splits import holdout
from fineprune.defense.api import RunOptions
from fineprune.defense.sweep import _Data, _sweep_key, full_sweep, sweep
from fineprune.errors import BadInputError
from fineprune.evaluation.metrics import accuracy
from fineprune.models.small import SmallCNN
from fineprune.training import _run_key, train

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "features.7"
FACTORY = '''
from fineprune.models.small import SmallCNN

def small16(num_classes=3, in_channels=1):
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=4, image_size=16)
'''


def _model() -> SmallCNN:
    """A tiny CNN whose classifier is strengthened, so the features, not the biases, decide."""
    torch.manual_seed(0)
    m = SmallCNN(in_channels=1, num_classes=3, width=4, image_size=16).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(8)
    return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """60 grey 16x16 PNGs in 3 class folders, labelled near the model's own predictions (so the
    pruning curve moves)."""
    root = tmp_path_factory.mktemp("stream") / "clean"
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (60, 1, 16, 16), generator=g, dtype=torch.uint8)
    u8 = (u8.float() * torch.rand(60, 1, 1, 1, generator=g)).to(torch.uint8)  # brightness varies
    y = labels_near_model(_model(), u8.float() / 255, classes=3, every=3)
    for i, (img, label) in enumerate(zip(u8, y.tolist())):
        d = root / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), mode="L").save(d / f"{i:03d}.png")
    return root


class Plain(Dataset):
    """A user's own dataset: __getitem__ and __len__, nothing else (no fingerprint, no targets)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _pair(folder: Path) -> tuple[ImageFolderData, TensorDataset]:
    return ImageFolderData(folder, mode="L"), load_image_folder(folder, mode="L")[0]


def test_lazy_items_equal_the_eager_rows_and_fingerprint_follows_the_files(folder, tmp_path):
    lazy, eager = _pair(folder)
    x, y = eager.tensors
    assert len(lazy) == 60 and torch.equal(stream.labels_of(lazy), y)
    assert all(torch.equal(lazy[i][0], x[i]) and lazy[i][1] == int(y[i]) for i in range(60))
    assert stream.sample_shape(lazy) == (1, 16, 16)
    batches = list(stream.iter_batches(lazy, 7, order=torch.randperm(60)))
    assert sum(len(b[1]) for b in batches) == 60 and all(b[0].dtype == torch.float32 for b in batches)
    # Fingerprints: stable, cheap (stat only), changed by a touched file or other decode settings.
    fp = stream.fingerprint(lazy)
    assert fp == stream.fingerprint(ImageFolderData(folder, mode="L"))
    assert fp != stream.fingerprint(ImageFolderData(folder, mode="RGB"))
    assert stream.fingerprint(eager) == stream.fingerprint(load_image_folder(folder, mode="L")[0])
    assert stream.fingerprint(Plain(x, y)) is None and stream.key_tensors(Plain(x, y)) is None
    f = lazy.files[0]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert stream.fingerprint(lazy) != fp
    finally:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    # load_data's switch; an .npz stays eager.
    ds, names = load_data(folder, lazy=True, mode="L")
    assert isinstance(ds, ImageFolderData) and names == ["c0", "c1", "c2"]


def test_keys_of_tensor_data_are_unchanged():
    """Checkpoint keys for tensors are what they were before datasets streamed."""
    m = _model()
    x, y = torch.rand(10, 1, 16, 16), torch.randint(0, 3, (10,))
    cfg = TrainConfig(epochs=1)
    assert _run_key(m, TensorDataset(x, y), None, cfg, 0) == _run_key(m, x, y, cfg, 0)
    from fineprune.runtime import run_digest
    settings = {"batch_size": 256}
    old = run_digest({"layer": LAYER, **settings}, [*m.state_dict().values(), x, y])
    assert _sweep_key(m, LAYER, [_Data(TensorDataset(x, y), [y])], settings) == old
    assert _sweep_key(m, LAYER, [_Data(x, [y])], settings) == old
    assert _sweep_key(m, LAYER, [_Data(Plain(x, y), [y])], settings) is None


def test_sweep_curves_equal_cached_full_and_memory_bounded(folder):
    lazy, eager = _pair(folder)
    x, y = eager.tensors
    m = _model()
    trig_lazy = TriggeredSet(lazy, y, (y + 1) % 3)
    trig_eager = TriggeredSet(x, y, (y + 1) % 3)
    ref = sweep(m, LAYER, x, y, trig_eager, batch_size=16)
    assert len(set(ref.clean_correct)) > 2  # the curve really moves
    ref_full = full_sweep(m, LAYER, x, y, trig_eager, batch_size=16)
    for curve, same in ((sweep(m, LAYER, lazy, None, trig_lazy, batch_size=16), ref),
                        (full_sweep(m, LAYER, lazy, None, trig_lazy, batch_size=16), ref_full),
                        # a tiny cache: almost everything is recomputed chunk by chunk from the files
                        (sweep(m, LAYER, lazy, None, trig_lazy, batch_size=16, max_cache_mb=0.002), ref)):
        assert_same_curve(curve, ref)
        assert curve.channel_means == same.channel_means and curve.triggered_means == same.triggered_means
        assert curve.num_clean == 60 and curve.mode == same.mode
    bounded = sweep(m, LAYER, lazy, None, trig_lazy, batch_size=16, max_cache_mb=0.002)
    assert bounded.extra["streamed_samples"] > 60 and bounded.extra["cache_mb"] <= 0.002
    # A triggered set drops inputs already labelled as the target: a Subset, not a copy.
    t = TriggeredSet(lazy, y, torch.zeros_like(y))
    assert isinstance(t.x, Subset) and t.x.dataset is lazy and len(t) == int((y != 0).sum())


def test_fine_pruning_lazy_equals_tensors_and_holdout_is_by_index(folder):
    lazy, eager = _pair(folder)
    fit_l, val_l = holdout(lazy, 0.3, seed=1)
    fit_e, val_e = holdout(eager, 0.3, seed=1)
    # The lazy hold-out is two Subsets of the folder (indices, no copies), labelled as the copies.
    assert isinstance(fit_l, Subset) and fit_l.dataset is lazy and val_l.dataset is lazy
    assert isinstance(fit_e, TensorDataset) and isinstance(val_e, TensorDataset)
    assert torch.equal(stream.labels_of(val_l), val_e.tensors[1])
    assert torch.equal(stream.labels_of(fit_l), fit_e.tensors[1])
    assert sorted(fit_l.indices + val_l.indices) == list(range(60))
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=8)
    defense = FinePruning(threshold=10.0, finetune=cfg, lr_factors=(1.0,))
    a = defense.fit(_model(), fit_l, val_l)
    b = defense.fit(_model(), fit_e, val_e)
    assert a.pruned_channels == b.pruned_channels and a.stop_k == b.stop_k
    assert_same_curve(a.sweep, b.sweep)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert a.after == b.after and a.before == b.before
    assert accuracy(a.model, val_l) == accuracy(b.model, val_e)


def test_workers_give_the_same_batches_and_weights(folder):
    lazy, _ = _pair(folder)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    one = list(stream.iter_batches(lazy, 16, order=order, start=5, stop=50))
    two = list(stream.iter_batches(lazy, 16, order=order, start=5, stop=50, workers=2))
    assert len(one) == len(two) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, two))
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=16)
    m0, m2 = _model(), _model()
    train(m0, lazy, cfg, device=torch.device("cpu"), seed=4)
    train(m2, lazy, cfg, device=torch.device("cpu"), seed=4, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m2.state_dict().values()))


def test_an_unknown_dataset_runs_end_to_end_without_resume(folder, tmp_path):
    _, eager = _pair(folder)
    x, y = eager.tensors
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=16)
    ckpt = tmp_path / "ft.ckpt"
    run = RunOptions(checkpoint_path=ckpt, sweep_checkpoint_path=tmp_path / "sweep.ckpt", max_cache_mb=0.002)
    with pytest.warns(UserWarning, match="no fingerprint"):
        res = defend(_model(), Plain(x[:40], y[:40]), Plain(x[40:], y[40:]), "fine-prune",
                     threshold=10.0, finetune=cfg, lr_factors=(1.0,), run=run)
    assert not ckpt.exists() and not (tmp_path / "sweep.ckpt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tensors: resumable, no warning
        ref = defend(_model(), TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:]), "fine-prune",
                     threshold=10.0, finetune=cfg, lr_factors=(1.0,), run=RunOptions(max_cache_mb=0.002))
    assert res.pruned_channels == ref.pruned_channels and res.after == ref.after
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), ref.model.state_dict().values()))


def test_wav_folder_lazy_equals_eager(tmp_path):
    import wave

    rng = np.random.default_rng(0)
    for i in range(6):
        path = tmp_path / ("yes" if i % 2 else "no") / f"{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(rng.integers(-3000, 3000, 20 + 7 * i, dtype="<i2").tobytes())
    (tmp_path / "no" / "bad.wav").write_bytes(b"RIFFxxxxWAVEjunk")
    eager, names = load_wav_folder(tmp_path, length=32)
    lazy = WavFolderData(tmp_path, length=32)
    assert lazy.class_names == names and lazy.skipped == eager.skipped == 1
    assert torch.equal(torch.stack([lazy[i][0] for i in range(len(lazy))]), eager.tensors[0])
    assert torch.equal(stream.labels_of(lazy), eager.tensors[1])


def test_cli_defend_reads_an_image_folder_lazily_with_workers(folder, tmp_path):
    from safetensors.torch import save_file

    from fineprune.cli import main

    with on_sys_path(tmp_path, "nets_for_streaming"):
        (tmp_path / "nets_for_streaming.py").write_text(FACTORY)
        save_file(_model().state_dict(), tmp_path / "model.safetensors")
        out = tmp_path / "out"
        args = ["defend", "--model", tmp_path / "model.safetensors", "--arch", "nets_for_streaming:small16",
                "--data", folder, "--workers", 1, "--epochs", 1, "--batch-size", 16, "--threshold", 10,
                "--lr-factors", 1, "--out", out, "--quiet"]
        assert main([str(a) for a in args]) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["data"]["clean"]["samples"] == 60 and info["data"]["clean"]["input_shape"] == [1, 16, 16]
    assert "--workers 1" in info["command"]


def test_anp_and_resume_on_a_lazy_folder(folder, tmp_path):
    from fineprune.purify.criteria import anp_mask
    from fineprune.errors import BadInputError
    from fineprune.pipeline.job import DefendJob

    lazy, eager = _pair(folder)
    x, y = eager.tensors
    m = _model()
    a = anp_mask(m, LAYER, lazy, None, iterations=6, batch_size=16, seed=2)
    assert torch.equal(a, anp_mask(m, LAYER, x, y, iterations=6, batch_size=16, seed=2))
    # A folder's checkpoint is keyed by its fingerprint: a fresh listing of the same files resumes it.
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16)
    ckpt = tmp_path / "train.ckpt"
    m1 = _model()
    h1 = train(m1, lazy, cfg, device=torch.device("cpu"), seed=1, checkpoint_path=ckpt)
    m2 = _model()
    h2 = train(m2, ImageFolderData(folder, mode="L"), cfg, device=torch.device("cpu"), seed=1,
               checkpoint_path=ckpt, resume=True)
    assert [e.train_loss for e in h2.epochs] == [e.train_loss for e in h1.epochs]
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(BadInputError, match="`workers`"):
        DefendJob(model="m", arch="a", data="d", out="o", workers=-1).validate()


def test_inference_batch_bounds_bytes_not_small_inputs():
    """Evaluation batches shrink for large inputs (memory) and stay as asked for small ones (so
    every built-in task's numbers are unchanged)."""
    from fineprune.data.stream import INFERENCE_BATCH_BYTES, inference_batch

    small = torch.zeros(4, 3, 32, 32)
    assert inference_batch(small, 512) == 512
    big = torch.zeros(2, 3, 224, 224)
    b = inference_batch(big, 512)
    assert 1 <= b < 512 and b * 3 * 224 * 224 * 4 <= INFERENCE_BATCH_BYTES
    assert inference_batch(torch.zeros(1, 3, 4096, 4096), 256) == 1


# --- Persistent workers, and how a lazy image folder checks its files (issue 24, item 3) --------

class _Pids(Dataset):
    """Items carry the id of the process that read them (a worker's, with workers > 0)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.tensor([float(os.getpid())]), i


def _read(data, **kw) -> tuple[set[int], list[int]]:
    batches = list(stream.iter_batches(data, 4, **kw))
    return {int(v) for x, _ in batches for v in x.flatten()}, [int(v) for _, y in batches for v in y]


def test_workers_persist_across_passes_and_leave_the_global_generator_alone():
    data = _Pids()
    stream.close_workers()
    try:
        rng = torch.get_rng_state()
        pids, labels = _read(data, workers=2)
        assert labels == list(range(12)) and os.getpid() not in pids and len(pids) == 2
        again, labels = _read(data, workers=2, order=torch.arange(11, -1, -1), start=2)
        assert again == pids and labels == list(range(9, -1, -1))  # the same processes, new positions
        assert _read(data)[0] == {os.getpid()}  # workers=0: read in this process
        assert torch.equal(rng, torch.get_rng_state())  # no pass drew from torch's global generator
        # A pass started while another over the same data is under way gets its own loader.
        outer = stream.iter_batches(data, 4, workers=2)
        first = next(outer)
        nested_pids, nested = _read(data, workers=2)
        assert nested == list(range(12)) and nested_pids.isdisjoint(pids)
        assert first[1].tolist() + [int(v) for _, y in outer for v in y] == list(range(12))
        assert _read(data, workers=2)[0] == pids  # the pool is still there afterwards
    finally:
        stream.close_workers()
    assert _read(data, workers=2)[0].isdisjoint(pids)  # closed: a new pool
    stream.close_workers()


class _DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.5), torch.nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("workers", [0, 1])
def test_lazy_training_with_dropout_equals_tensors(folder, workers):
    """Dropout draws from torch's global generator; reading a folder (any workers) must not move
    it, or the lazy run's dropout masks, hence its weights, differ from the tensor run's."""
    lazy, eager = _pair(folder)
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16)
    a, b = _DropoutNet(), _DropoutNet()
    torch.manual_seed(5)
    train(a, lazy, cfg, device=torch.device("cpu"), seed=3, workers=workers)
    stream.close_workers()
    torch.manual_seed(5)
    train(b, eager, cfg, device=torch.device("cpu"), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _truncated_png(path: Path, size=(16, 16)) -> None:
    """A PNG whose header reads fine but whose pixel data is cut short."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), 77, np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) - 30])


@pytest.fixture
def folder_with_truncated(folder, tmp_path) -> Path:
    import shutil

    root = tmp_path / "clean"
    shutil.copytree(folder, root)
    _truncated_png(root / "c1" / "zz_truncated.png")
    return root


def test_decode_check_skips_what_the_eager_loader_skips(folder_with_truncated):
    eager, _ = load_image_folder(folder_with_truncated, mode="L")
    lazy = ImageFolderData(folder_with_truncated, mode="L")  # check="decode" by default
    assert eager.skipped == lazy.skipped == 1 and len(lazy) == len(eager) == 60
    assert all(f.name != "zz_truncated.png" for f in lazy.files)
    assert torch.equal(torch.stack([lazy[i][0] for i in range(60)]), eager.tensors[0])
    assert torch.equal(stream.labels_of(lazy), eager.tensors[1])


@pytest.mark.parametrize("check", ["headers", "none"])
def test_a_file_failing_at_decode_time_stops_the_run_naming_it(folder_with_truncated, check):
    lazy, _ = load_data(folder_with_truncated, lazy=True, mode="L", check=check)
    assert lazy.skipped == 0 and len(lazy) == 61  # its header was fine / not read
    bad = next(i for i, f in enumerate(lazy.files) if f.name == "zz_truncated.png")
    with pytest.raises(BadInputError, match="zz_truncated.png: cannot decode.*check='decode'"):
        lazy[bad]
    with pytest.raises(BadInputError, match="zz_truncated.png"):
        list(stream.iter_batches(lazy, 16, workers=0))


def test_check_none_opens_no_file_when_listing(folder, monkeypatch):
    import PIL.Image

    opened = []
    real = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda f, *a, **k: (opened.append(f), real(f, *a, **k))[1])
    lazy = ImageFolderData(folder, size=(16, 16), mode="L", check="none")
    assert opened == [] and len(lazy) == 60
    ImageFolderData(folder, mode="L", check="none")  # no size: one header gives the size to hold to
    assert len(opened) == 1
    opened.clear()
    ImageFolderData(folder, mode="L", check="headers")
    assert len(opened) == 60
    monkeypatch.setattr(PIL.Image, "open", real)
    eager = load_image_folder(folder, mode="L")[0]
    assert torch.equal(torch.stack([lazy[i][0] for i in range(60)]), eager.tensors[0])
    with pytest.raises(BadInputError, match="mode 'RGB' or 'L'"):
        ImageFolderData(folder, mode=None, check="none")
    with pytest.raises(BadInputError, match="check must be one of"):
        load_data(folder, lazy=True, check="quick")


def test_check_none_refuses_a_second_size_when_it_is_decoded(folder, tmp_path):
    import shutil

    root = tmp_path / "clean"
    shutil.copytree(folder, root)
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(root / "c0" / "zz_tall.png")
    lazy = ImageFolderData(root, mode="L", check="none")
    odd = next(i for i, f in enumerate(lazy.files) if f.name == "zz_tall.png")
    with pytest.raises(BadInputError, match="zz_tall.png is 20x16 .* one size"):
        lazy[odd]
    with pytest.raises(BadInputError, match="different sizes"):
        ImageFolderData(root, mode="L")  # the other checks refuse the folder when listing it
