"""Generic loaders for a user's own data: image folders, .npz files, wav folders, the dispatcher."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fineprune.data.generic import load_data, load_image_folder, load_npz, load_wav_folder
from fineprune.errors import BadInputError

# --- image folders -----------------------------------------------------------------------------


def _image_folder(root: Path, size: tuple[int, int] = (6, 8), grey: bool = False) -> dict[str, list[np.ndarray]]:
    """dog/ and cat/ with 2 and 3 PNGs of size (W, H); returns the pixel arrays by class."""
    rng = np.random.default_rng(0)
    made: dict[str, list[np.ndarray]] = {}
    for cls, n in (("dog", 2), ("cat", 3)):
        (root / cls).mkdir(parents=True)
        made[cls] = []
        for i in range(n):
            shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"{i}.png")
            made[cls].append(a)
    return made


def test_image_folder_rgb_values_labels_and_order(tmp_path) -> None:
    made = _image_folder(tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("not an image, ignored")
    ds, names = load_image_folder(tmp_path)
    assert names == ["cat", "dog"]  # sorted, as torchvision's ImageFolder
    x, y = ds.tensors
    assert x.shape == (5, 3, 8, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 0, 1, 1]
    expected = torch.from_numpy(made["cat"][0]).permute(2, 0, 1).float() / 255
    assert torch.equal(x[0], expected)
    assert ds.skipped == 0


def test_image_folder_modes(tmp_path) -> None:
    _image_folder(tmp_path / "grey", grey=True)
    assert load_image_folder(tmp_path / "grey", mode=None)[0].tensors[0].shape[1] == 1
    assert load_image_folder(tmp_path / "grey", mode="RGB")[0].tensors[0].shape[1] == 3
    _image_folder(tmp_path / "rgb")
    assert load_image_folder(tmp_path / "rgb", mode=None)[0].tensors[0].shape[1] == 3
    assert load_image_folder(tmp_path / "rgb", mode="L")[0].tensors[0].shape[1] == 1
    with pytest.raises(BadInputError, match="mode"):
        load_image_folder(tmp_path / "rgb", mode="CMYK")


def test_image_folder_mixed_sizes_need_size(tmp_path) -> None:
    _image_folder(tmp_path)
    Image.new("RGB", (10, 12), (9, 9, 9)).save(tmp_path / "dog" / "big.png")
    with pytest.raises(BadInputError, match=r"size=\(H, W\)"):
        load_image_folder(tmp_path)
    ds, _ = load_image_folder(tmp_path, size=(4, 5))
    assert ds.tensors[0].shape == (6, 3, 4, 5)
    assert load_image_folder(tmp_path, size=7)[0].tensors[0].shape[-2:] == (7, 7)


def test_image_folder_skips_and_counts_unreadable(tmp_path, caplog) -> None:
    _image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "cat" / "empty.jpg").write_bytes(b"")
    ds, _ = load_image_folder(tmp_path)
    assert len(ds) == 5 and ds.skipped == 2
    assert "skipped 2 unreadable" in caplog.text


def test_image_folder_errors(tmp_path) -> None:
    with pytest.raises(BadInputError, match="not a folder"):
        load_image_folder(tmp_path / "missing")
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    with pytest.raises(BadInputError, match="no class subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(BadInputError, match="no readable images"):
        load_image_folder(tmp_path)


# --- npz ---------------------------------------------------------------------------------------


def test_npz_nhwc_uint8(tmp_path) -> None:
    x = np.random.default_rng(1).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 1], dtype=np.int32))
    ds = load_npz(tmp_path / "d.npz")
    assert ds.tensors[0].shape == (4, 3, 5, 6) and ds.tensors[1].dtype == torch.int64
    assert torch.equal(ds.tensors[0], torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)


def test_npz_nchw_float_grey_and_waveforms(tmp_path) -> None:
    x = np.random.default_rng(2).random((3, 1, 7, 7)).astype(np.float64)
    np.savez(tmp_path / "f.npz", x=x, y=np.array([2.0, 0.0, 1.0]))  # whole floats are fine
    ds = load_npz(tmp_path / "f.npz")
    assert ds.tensors[0].dtype == torch.float32 and ds.tensors[0].shape == (3, 1, 7, 7)
    assert torch.allclose(ds.tensors[0], torch.from_numpy(x).float())
    assert ds.tensors[1].tolist() == [2, 0, 1]
    np.savez(tmp_path / "g.npz", x=np.zeros((2, 9, 8), np.uint8), y=np.array([0, 1]))
    assert load_npz(tmp_path / "g.npz").tensors[0].shape == (2, 1, 9, 8)
    np.savez(tmp_path / "w.npz", x=np.full((2, 1, 100), -16384, np.int16), y=np.array([0, 1]))
    w = load_npz(tmp_path / "w.npz").tensors[0]
    assert w.shape == (2, 1, 100) and float(w[0, 0, 0]) == -0.5


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 3, 4, 4))}, r"lacks array\(s\) \['y'\]"),
        ({"inputs": np.zeros((2, 3)), "labels": np.zeros(2)}, r"lacks array\(s\) \['x', 'y'\]"),
        ({"x": np.zeros((3, 1, 4, 4)), "y": np.array([0, 1])}, "3 samples but y has 2"),
        ({"x": np.zeros((2, 1, 4, 4)), "y": np.array([0.5, 1.0])}, "non-integer labels"),
        ({"x": np.zeros((2, 1, 4, 4)), "y": np.array(["a", "b"])}, "non-integer labels"),
        ({"x": np.zeros((2, 1, 4, 4)), "y": np.array([0, -1])}, "negative labels"),
        ({"x": np.zeros((2, 1, 4, 4)), "y": np.eye(2)}, "one-hot"),
        ({"x": np.zeros((2, 4)), "y": np.array([0, 1])}, "expected images"),
        ({"x": np.zeros((2, 1, 4, 4), np.int64), "y": np.array([0, 1])}, "dtype int64"),
        ({"x": np.full((2, 1, 4, 4), np.nan), "y": np.array([0, 1])}, "NaN"),
    ],
)
def test_npz_errors(tmp_path, arrays, message) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInputError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_npz_refuses_pickle_and_junk(tmp_path) -> None:
    np.savez(tmp_path / "obj.npz", x=np.zeros((1, 1, 2, 2)), y=np.array([{"label": 0}], dtype=object))
    with pytest.raises(BadInputError, match="pickle"):
        load_npz(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK not a zip")
    with pytest.raises(BadInputError, match="not an .npz archive"):
        load_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(BadInputError, match="not an .npz archive"):
        load_npz(tmp_path / "single.npy")
    with pytest.raises(BadInputError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


# --- wav folders -------------------------------------------------------------------------------


def _write_wav(path: Path, samples: np.ndarray, rate: int = 8000, width: int = 2, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def test_wav_folder_fsdd_names_pad_crop(tmp_path) -> None:
    _write_wav(tmp_path / "3_bob_0.wav", np.full(10, 16384, "<i2"))
    _write_wav(tmp_path / "0_bob_1.wav", np.arange(30, dtype="<i2") * 100)
    _write_wav(tmp_path / "3_eve_2.wav", np.full(4, -32768, "<i2"))
    ds, names = load_wav_folder(tmp_path, length=20)
    x, y = ds.tensors
    assert names == ["0", "1", "2", "3"]  # numeric names keep their value as the label
    assert y.tolist() == [0, 3, 3] and x.shape == (3, 1, 20)
    assert torch.allclose(x[0, 0], torch.arange(5, 25).float() * 100 / 32768)  # centre crop
    assert x[1, 0, :5].abs().sum() == 0 and float(x[1, 0, 5]) == 0.5  # centre pad
    assert float(x[2].min()) == -1.0


def test_wav_folder_subfolders_formats_and_skips(tmp_path) -> None:
    _write_wav(tmp_path / "yes" / "a.wav", np.full(8, 200, np.uint8), width=1)  # 8-bit unsigned
    _write_wav(tmp_path / "no" / "b.wav", np.full(16, 1 << 30, "<i4"), width=4, channels=2)
    (tmp_path / "no" / "c.wav").write_bytes(b"RIFFxxxxWAVEjunk")
    ds, names = load_wav_folder(tmp_path, length=8)
    assert names == ["no", "yes"] and ds.tensors[1].tolist() == [0, 1] and ds.skipped == 1
    assert float(ds.tensors[0][0, 0, 0]) == 0.5  # 32-bit stereo -> 16-bit mono
    assert float(ds.tensors[0][1, 0, 0]) == 72 * 256 / 32768  # (200 - 128) << 8


def test_wav_folder_errors(tmp_path) -> None:
    _write_wav(tmp_path / "a" / "1_x.wav", np.zeros(10, "<i2"), rate=16000)
    with pytest.raises(BadInputError, match=r"1_x\.wav is sampled at 16000 Hz, expected 8000"):
        load_wav_folder(tmp_path / "a")
    assert len(load_wav_folder(tmp_path / "a", sample_rate=16000)[0]) == 1
    _write_wav(tmp_path / "b" / "nolabel.wav", np.zeros(10, "<i2"))
    with pytest.raises(BadInputError, match="<label>_<anything>.wav"):
        load_wav_folder(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1_x.wav").write_bytes(b"nope")
    with pytest.raises(BadInputError, match="no readable PCM"):
        load_wav_folder(tmp_path / "c")


# --- dispatcher --------------------------------------------------------------------------------


def test_load_data_dispatches(tmp_path) -> None:
    _image_folder(tmp_path / "imgs")
    ds, names = load_data(tmp_path / "imgs", length=123, size=None)  # irrelevant / None ignored
    assert names == ["cat", "dog"] and ds.tensors[0].shape == (5, 3, 8, 6)
    _write_wav(tmp_path / "wavs" / "1_a.wav", np.zeros(10, "<i2"))
    ds, names = load_data(tmp_path / "wavs", length=50, size=(3, 3))
    assert ds.tensors[0].shape == (1, 1, 50) and names == ["0", "1"]
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 2]))
    ds, names = load_data(tmp_path / "d.npz")
    assert ds.tensors[0].shape == (2, 3, 4, 4) and names == ["0", "1", "2"]  # 4x4 RGB: NHWC
    np.savez(tmp_path / "n.npz", x=np.zeros((2, 1, 4, 4)), y=np.array([0, 1]), class_names=np.array(["cat", "dog"]))
    assert load_data(tmp_path / "n.npz")[1] == ["cat", "dog"]


def test_load_data_errors(tmp_path) -> None:
    with pytest.raises(TypeError, match="unknown data option"):
        load_data(tmp_path, colour=True)
    with pytest.raises(BadInputError, match="does not exist"):
        load_data(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadInputError, match="not an .npz file or a folder"):
        load_data(tmp_path / "notes.txt")
    with pytest.raises(BadInputError, match="no images"):
        load_data(tmp_path)
    _image_folder(tmp_path / "mixed")
    _write_wav(tmp_path / "mixed" / "cat" / "1_a.wav", np.zeros(4, "<i2"))
    with pytest.raises(BadInputError, match="mixes images and .wav"):
        load_data(tmp_path / "mixed")
