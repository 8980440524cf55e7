"""Bad clean / validation / triggered data given to `fineprune defend` (in process) and to the loaders.

Every case must end with exit code 2 and one `fineprune: error:` line on stderr, never a traceback.
The rule for unreadable files in folders: they are skipped, logged and counted (model.json records
`skipped_unreadable_files`); a folder with no readable file at all is refused.
See docs/robustness.md for the full table.
"""
from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fineprune.cli import main
from fineprune.data.generic import load_image_folder, load_npz, load_wav_folder
from fineprune.errors import BadInputError
from fineprune.models.small import SmallCNN

# Tiny models on a shared 2-core machine run far faster on one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An (untrained) built-in `demo-cnn`: 1 input channel, 10 classes, 28x28."""
    root = tmp_path_factory.mktemp("robust-model")
    torch.manual_seed(0)
    path = root / "model.safetensors"
    save_file(SmallCNN().state_dict(), path)
    return path


def _npz(path: Path, n: int = 40, classes: int = 10, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
              "y": (np.arange(n) % classes).astype(np.int64)}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def _defend(capsys, model: Path, out: Path, *extra) -> tuple[int, str]:
    rc = main(["defend", "--model", str(model), "--arch", "demo-cnn", "--out", str(out), "--quiet",
               *[str(a) for a in extra]])
    return rc, capsys.readouterr().err.strip()


def _one_line(err: str) -> str:
    assert err.startswith("fineprune: error:"), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _png(path: Path, size=(28, 28), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def _wav(path: Path, rate: int = 8000, n: int = 800) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(np.arange(n) / 5.0) * 8000).astype("<i2").tobytes())
    path.write_bytes(buf.getvalue())


# --- the CLI: exit 2, one line ------------------------------------------------------------------


@pytest.mark.parametrize("arrays,needle", [
    ({"x": np.zeros((0, 28, 28), np.uint8), "y": np.zeros((0,), np.int64)}, "empty"),
    ({"x": np.zeros((4, 28, 28), np.uint8)}, "lacks"),
    ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.array([0, 1, -1, 2])}, "negative"),
    ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.array([0.5, 1, 1, 2])}, "non-integer"),
    ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.array([0, 1, 2])}, "labels"),
    ({"x": np.full((4, 28, 28), np.nan, np.float32), "y": np.array([0, 1, 2, 3])}, "NaN"),
    ({"x": np.zeros((4, 28, 28), np.complex64), "y": np.array([0, 1, 2, 3])}, "dtype"),
    ({"x": np.zeros((4,), np.uint8), "y": np.array([0, 1, 2, 3])}, "shape"),
])
def test_bad_npz_clean_data(model_file, tmp_path, capsys, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "bad.npz", "--method", "prune")
    assert rc == 2, err
    assert needle in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_npz_that_is_not_a_zip(model_file, tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"\x93NUMPY not really")
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "bad.npz")
    assert rc == 2 and "not an .npz" in _one_line(err)


def test_labels_beyond_the_models_classes(model_file, tmp_path, capsys):
    """The model has 10 outputs; a label 12 in the data cannot be one of them."""
    y = np.arange(40) % 10
    y[3] = 12
    data = _npz(tmp_path / "d.npz", y=y)
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--method", "prune")
    assert rc == 2, err
    # Without --num-classes the data implies 13 classes, which the 10-output weights do not fit.
    assert "--num-classes" in _one_line(err)
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--method", "prune",
                      "--num-classes", 10)
    assert rc == 2 and "labels go up to 12" in _one_line(err)


def test_labels_beyond_num_classes_flag(model_file, tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", classes=10)
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--num-classes", 5, "--method", "prune")
    assert rc == 2 and "--num-classes" in _one_line(err)


def test_separate_val_set_with_labels_out_of_range(model_file, tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    val = _npz(tmp_path / "v.npz", n=10, y=np.full(10, 11))
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--val", val, "--method", "prune",
                      "--num-classes", 10)
    assert rc == 2 and "labels go up to 11" in _one_line(err)


@pytest.mark.parametrize("method", ["prune", "fine-prune"])
def test_one_class_validation_set_is_refused(model_file, tmp_path, capsys, method):
    """One class only: accuracy on it says nothing about the model's clean skill (always answering
    that class scores 100%), so the pruning stop rule would be meaningless."""
    data = _npz(tmp_path / "d.npz")
    val = _npz(tmp_path / "v.npz", n=12, y=np.full(12, 3))
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--val", val, "--method", method,
                      "--epochs", 1, "--num-classes", 10)
    assert rc == 2, err
    assert "one class" in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_one_class_clean_data_is_refused(model_file, tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", y=np.full(40, 2))
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--method", "prune",
                      "--num-classes", 10)
    assert rc == 2 and "one class" in _one_line(err)


def test_too_little_data_to_hold_out(model_file, tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", n=1, y=np.array([0]))
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--epochs", 1)
    assert rc == 2, err
    _one_line(err)


@pytest.mark.parametrize("value", ["-1", "100.5", "nan", "inf", "-inf", "1e9"])
def test_threshold_outside_0_100(model_file, tmp_path, capsys, value):
    data = _npz(tmp_path / "d.npz")
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, f"--threshold={value}")
    assert rc == 2 and "threshold" in _one_line(err)


def test_threshold_not_a_number(model_file, tmp_path, capsys):
    """Parse-level errors print argparse's usage, then one error line (the last)."""
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", "x.npz", "--threshold", "four")
    assert rc == 2 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("fineprune: error:") and "--threshold" in last


@pytest.mark.parametrize("value", ["-1", "150"])
def test_reproduce_threshold_outside_0_100(tmp_path, capsys, value):
    rc = main(["reproduce", "--task", "mnist", "--out", str(tmp_path / "o"), f"--threshold={value}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "threshold" in _one_line(err)
    assert not (tmp_path / "o").exists()


def test_image_folder_mixed_sizes_is_refused_with_the_fix(model_file, tmp_path, capsys):
    _png(tmp_path / "imgs" / "a" / "1.png", (28, 28))
    _png(tmp_path / "imgs" / "b" / "2.png", (32, 30))
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "imgs", "--method", "prune")
    assert rc == 2 and "--input-size" in _one_line(err) or "size" in err


def test_image_folder_mixed_sizes_and_modes_load_with_input_size(model_file, tmp_path, capsys):
    """--input-size resizes everything; greyscale, RGB and RGBA images are all read as the model's
    one channel. Two unreadable files among them are skipped and counted."""
    for c in range(10):
        _png(tmp_path / "imgs" / str(c) / "a.png", (28, 28), "L")
        _png(tmp_path / "imgs" / str(c) / "b.png", (40, 36), "RGB")
        _png(tmp_path / "imgs" / str(c) / "c.png", (20, 20), "RGBA")
    (tmp_path / "imgs" / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "imgs" / "1" / "empty.jpg").write_bytes(b"")
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "imgs", "--input-size", 28, 28,
                      "--method", "prune", "--no-compact")
    assert rc == 0, err
    info = json.loads((tmp_path / "out" / "model.json").read_text())
    clean = info["data"]["clean"]
    assert clean["samples"] == 30 and clean["input_shape"] == [1, 28, 28]
    assert clean["skipped_unreadable_files"] == 2


def test_image_folder_with_a_truncated_image_skips_and_counts_it(model_file, tmp_path, capsys):
    """A file whose header reads but whose pixels do not decode (cut short) is skipped when the
    folder is listed, as the eager loader skips it, and counted in model.json; the run goes on
    (a lazy folder used to fail on it at decoding time, mid-run)."""
    for c in range(10):
        _png(tmp_path / "imgs" / str(c) / "a.png", (28, 28), "L")
        _png(tmp_path / "imgs" / str(c) / "b.png", (28, 28), "L")
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(whole, format="PNG")
    (tmp_path / "imgs" / "3" / "cut.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "imgs", "--method", "prune",
                      "--no-compact")
    assert rc == 0, err
    clean = json.loads((tmp_path / "out" / "model.json").read_text())["data"]["clean"]
    assert clean["samples"] == 20 and clean["skipped_unreadable_files"] == 1


def test_image_folder_with_no_readable_file(model_file, tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        (tmp_path / "imgs" / c / "x.png").write_bytes(b"not a png")
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "imgs")
    assert rc == 2 and "no readable images" in _one_line(err) and "skipped 2" in err


def test_image_folder_without_class_folders(model_file, tmp_path, capsys):
    _png(tmp_path / "imgs" / "1.png")
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "imgs")
    assert rc == 2 and "class subfolders" in _one_line(err)


def test_wav_folder_at_another_sample_rate(model_file, tmp_path, capsys):
    for c in ("0", "1"):
        _wav(tmp_path / "wavs" / c / "a.wav", rate=16000)
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "wavs")
    assert rc == 2 and "16000 Hz" in _one_line(err) and "8000" in err


def test_folder_of_neither_images_nor_wavs(model_file, tmp_path, capsys):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "notes.txt").write_text("hi")
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", tmp_path / "d")
    assert rc == 2 and "no images" in _one_line(err)


def test_triggered_with_different_shape(model_file, tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    trig = _npz(tmp_path / "t.npz", x=np.zeros((40, 3, 20, 20), np.uint8))
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--triggered", trig, "--target", 0,
                      "--method", "prune")
    assert rc == 2, err
    _one_line(err)


def test_target_out_of_range(model_file, tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    rc, err = _defend(capsys, model_file, tmp_path / "out", "--data", data, "--triggered", data, "--target", 10,
                      "--method", "prune")
    assert rc == 2 and "--target" in _one_line(err)


# --- the loaders directly --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")  # Pillow warns about the garbage TIFF it then refuses
def test_loader_skips_and_counts_unreadable_images(tmp_path):
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "b" / "2.png")
    (tmp_path / "b" / "3.png").write_bytes(b"garbage")
    (tmp_path / "b" / "4.tif").write_bytes(b"II*\x00garbage")
    ds, names = load_image_folder(tmp_path, mode="L")
    assert names == ["a", "b"] and len(ds) == 2 and ds.skipped == 2


def test_loader_mixed_modes_same_size(tmp_path):
    _png(tmp_path / "a" / "1.png", mode="L")
    _png(tmp_path / "b" / "2.png", mode="RGBA")
    ds, _ = load_image_folder(tmp_path, mode=None)  # not all grey: read as RGB
    assert ds.tensors[0].shape == (2, 3, 28, 28)
    ds, _ = load_image_folder(tmp_path, mode="L")
    assert ds.tensors[0].shape == (2, 1, 28, 28)


def test_loader_mixed_sizes_refused_then_resized(tmp_path):
    _png(tmp_path / "a" / "1.png", (28, 28))
    _png(tmp_path / "b" / "2.png", (10, 50))
    with pytest.raises(BadInputError, match="different sizes"):
        load_image_folder(tmp_path)
    ds, _ = load_image_folder(tmp_path, size=(16, 16))
    assert ds.tensors[0].shape == (2, 3, 16, 16)


def test_loader_wav_rate_mismatch_names_the_file(tmp_path):
    _wav(tmp_path / "0" / "ok.wav", rate=8000)
    _wav(tmp_path / "1" / "odd.wav", rate=22050)
    with pytest.raises(BadInputError, match="odd.wav is sampled at 22050 Hz"):
        load_wav_folder(tmp_path, length=1000)
    (tmp_path / "0" / "ok.wav").unlink()
    ds, _ = load_wav_folder(tmp_path, length=1000, sample_rate=22050)  # the rate the model expects
    assert len(ds) == 1


def test_loader_wav_unreadable_skipped_and_counted(tmp_path):
    _wav(tmp_path / "0" / "ok.wav")
    _wav(tmp_path / "1" / "ok.wav")
    (tmp_path / "1" / "bad.wav").write_bytes(b"RIFF\x00\x00garbage")
    ds, names = load_wav_folder(tmp_path, length=1000)
    assert len(ds) == 2 and ds.skipped == 1 and names == ["0", "1"]
    (tmp_path / "0" / "ok.wav").write_bytes(b"")
    (tmp_path / "1" / "ok.wav").write_bytes(b"junk")
    with pytest.raises(BadInputError, match="no readable"):
        load_wav_folder(tmp_path, length=1000)


def test_loader_empty_npz(tmp_path):
    np.savez(tmp_path / "e.npz")
    with pytest.raises(BadInputError, match="lacks"):
        load_npz(tmp_path / "e.npz")


# --- hostile model files through the CLI (the loader itself: tests/test_hostile_models.py) --------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _hostile_model(kind: str, tmp_path: Path, good: Path) -> Path:
    state = SmallCNN().state_dict()
    path = tmp_path / ("evil.pt" if kind in ("pickle", "torchscript") else "evil.safetensors")
    if kind == "pickle":
        torch.save({**state, "features.0.weight": _Payload(tmp_path / "pwned")}, path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:1000])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "nan":
        state["features.3.weight"][0, 0, 0, 0] = float("nan")
        save_file(state, path)
    elif kind == "shape":
        state["features.0.weight"] = torch.zeros(16, 1, 3, 3)
        save_file(state, path)
    elif kind == "dtype":
        save_file({k: v.to(torch.int32) for k, v in state.items()}, path)
    elif kind == "missing-key":
        save_file({k: v for k, v in state.items() if k != "classifier.3.bias"}, path)
    elif kind == "torchscript":
        import zipfile
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("evil/code/__torch__.py", "import os\nos.system('touch pwned')\n")
            z.writestr("evil/data.pkl", b"garbage")
    return path


@pytest.mark.parametrize("kind", ["pickle", "truncated", "random", "empty", "nan", "shape", "dtype",
                                  "missing-key", "torchscript"])
def test_hostile_model_files_exit_2(model_file, tmp_path, capsys, kind):
    evil = _hostile_model(kind, tmp_path, model_file)
    data = _npz(tmp_path / "d.npz")
    rc = main(["defend", "--model", str(evil), "--arch", "demo-cnn", "--data", str(data),
               "--out", str(tmp_path / "out"), "--quiet", "--method", "prune"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "evil" in _one_line(err)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--model", "--data"])
def test_path_too_long_for_the_os(model_file, tmp_path, capsys, flag):
    paths = {"--model": str(model_file), "--data": str(_npz(tmp_path / "d.npz"))}
    paths[flag] = "x" * 300
    rc = main(["defend", "--model", paths["--model"], "--arch", "demo-cnn", "--data", paths["--data"],
               "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "too long" in _one_line(err)
