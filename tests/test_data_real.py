"""Real-dataset loaders (faces, speech, traffic), their cache, and the spectrogram front end.

Tests on the real archives skip when the shared data folder is absent; the small hand-made
datasets at the end exercise the same loaders without it.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fineprune.data import cache as cache_mod
from fineprune.data import faces as faces_mod
from fineprune.data import speech as speech_mod
from fineprune.data import traffic as traffic_mod
from fineprune.data.archive import resolve_source
from fineprune.data.faces import load_faces
from fineprune.data.speech import load_speech
from fineprune.data.traffic import load_traffic
from fineprune.errors import BadInputError
from fineprune.models.spectrogram import LogSpectrogram


def _data_dir() -> Path:
    env = os.environ.get("FINEPRUNE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


DATA = _data_dir()


def _need(archive: str) -> Path:
    path = DATA / archive
    if not path.is_file():
        pytest.skip(f"real dataset {path} not present (set FINEPRUNE_DATA to the folder holding it)")
    return DATA


@pytest.fixture(scope="module")
def cache_dir() -> None:
    """The default cache ($FINEPRUNE_CACHE or ~/.cache/fineprune), as users get it: the first run
    decodes (GTSRB: ~15 s), later runs are fast. Keys are content hashes, so it cannot go stale;
    the decoders themselves are exercised by the small hand-made datasets below."""
    return None


@pytest.fixture(scope="module")
def faces(cache_dir: Path):
    return load_faces(_need("faces_extendedyaleb_cropped.tar.xz"), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def speech(cache_dir: Path):
    return load_speech(_need("speech_fsdd.tar.xz"), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def traffic(cache_dir: Path):
    return load_traffic(_need("traffic_gtsrb32.tar.xz"), cache_dir=cache_dir)


def _row_hashes(x: torch.Tensor) -> list[str]:
    return [hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in x]


def _assert_partition(task, total: int, shared_with_test: int = 0) -> None:
    """Splits are disjoint and together hold every sample. Samples are told apart by content, which
    works because no dataset has duplicate images, except `shared_with_test` test images that the
    distribution itself copied from training frames."""
    parts = [task.train, task.val, task.test]
    hashes = [set(_row_hashes(p.tensors[0])) for p in parts]
    assert sum(len(p) for p in parts) == total
    assert sum(len(h) for h in hashes) == total  # no duplicate inside a split
    assert not hashes[0] & hashes[1]
    assert len((hashes[0] | hashes[1]) & hashes[2]) == shared_with_test


def _assert_stratified(task) -> None:
    for part in (task.train, task.val, task.test):
        assert set(part.tensors[1].tolist()) == set(range(task.num_classes))


# --- faces -------------------------------------------------------------------------------------


def test_faces_counts_shapes_ranges(faces) -> None:
    assert faces.num_classes == 38 and len(faces.class_names) == 38
    assert faces.class_names[0] == "yaleB01" and "yaleB14" not in faces.class_names
    total = len(faces.train) + len(faces.val) + len(faces.test)
    assert total == 2414  # the lit crops: no *_Ambient, no *.pgm.bad
    assert (len(faces.train), len(faces.val), len(faces.test)) == (1436, 488, 490)
    x, y = faces.train.tensors
    assert x.shape[1:] == (1, 64, 56) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    lo, hi = faces.info["eye_band"]
    assert 0.1 < lo < faces.info["eye_center_row"] < hi < 0.4
    assert faces.info["skipped_files"] == []
    assert Path(faces.info["cache_file"]).is_file()


def test_faces_partition_and_stratification(faces) -> None:
    _assert_partition(faces, 2414)
    _assert_stratified(faces)


def test_faces_eye_band_is_dark_in_the_mean_face(faces) -> None:
    """The recorded band must hold the eyes: in bright images the band is darker than the cheeks."""
    x = faces.train.tensors[0][:, 0]
    bright = x[x.mean((1, 2)) > x.mean((1, 2)).quantile(0.7)].mean(0)
    h = bright.shape[0]
    r0, r1 = faces.info["eye_band_rows"]
    eyes = bright[r0:r1].mean(1).min()
    cheeks = bright[int(0.4 * h) : int(0.5 * h)].mean(1).mean()
    assert eyes < cheeks


def test_faces_determinism_seed_and_cache_hit(faces, cache_dir, monkeypatch) -> None:
    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache should hit")

    monkeypatch.setattr(faces_mod, "_decode", no_decode)
    again = load_faces(DATA, cache_dir=cache_dir)
    assert again.info["cache_hit"] is True
    assert torch.equal(again.train.tensors[0], faces.train.tensors[0])
    assert torch.equal(again.test.tensors[1], faces.test.tensors[1])
    other = load_faces(DATA, seed=1, cache_dir=cache_dir)
    assert not torch.equal(other.train.tensors[0], faces.train.tensors[0])
    try:  # another size is another cache entry: decoded (refused here) unless an earlier run did
        small = load_faces(DATA, size=(32, 28), cache_dir=cache_dir)
    except AssertionError as exc:
        assert "decoded again" in str(exc)
    else:
        assert small.train.tensors[0].shape[-2:] == (32, 28)


# --- speech ------------------------------------------------------------------------------------


def test_speech_counts_shapes_ranges(speech) -> None:
    assert speech.input_kind == "audio" and speech.info["sample_rate"] == 8000
    assert speech.num_classes == 10 and speech.class_names == [str(d) for d in range(10)]
    assert len(speech.test) == 300
    assert (len(speech.train), len(speech.val)) == (2160, 540)
    x, y = speech.train.tensors
    assert x.shape[1:] == (1, 8192) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 <= float(x.min()) and float(x.max()) < 1.0
    assert float(x.abs().max()) > 0.1
    assert speech.info["cropped"] == 17  # recordings longer than 8192 samples (1.02 s)
    assert speech.info["speakers"] == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]


def test_speech_official_test_split(speech) -> None:
    """Test = index 0-4 of each (digit, speaker): 5 x 10 x 6 = 300, 30 per digit."""
    assert torch.bincount(speech.test.tensors[1]).tolist() == [30] * 10
    _assert_partition(speech, 3000)
    _assert_stratified(speech)


def test_speech_pad_and_crop_are_centred(speech, cache_dir) -> None:
    arrays = np.load(speech.info["cache_file"], allow_pickle=False)
    offsets, samples = arrays["offsets"], arrays["samples"]
    n = int(offsets[1] - offsets[0])
    raw = samples[offsets[0] : offsets[1]]
    short = speech_mod.fit_length(raw, n + 10)
    assert short[:5].tolist() == [0] * 5 and short[-5:].tolist() == [0] * 5
    assert np.array_equal(short[5:-5], raw)
    assert np.array_equal(speech_mod.fit_length(raw, n - 4), raw[2:-2])
    longer = load_speech(DATA, length=16384, cache_dir=cache_dir)
    assert longer.train.tensors[0].shape[-1] == 16384 and longer.info["cache_hit"] is True
    assert longer.info["cropped"] == 2  # the longest recordings are 18262 samples (2.28 s)


def test_speech_determinism_and_cache_hit(speech, cache_dir, monkeypatch) -> None:
    monkeypatch.setattr(speech_mod, "_decode", lambda *a, **k: pytest.fail("decoded again"))
    again = load_speech(DATA, cache_dir=cache_dir)
    assert again.info["cache_hit"] is True
    assert torch.equal(again.val.tensors[0], speech.val.tensors[0])
    other = load_speech(DATA, seed=3, cache_dir=cache_dir)
    assert torch.equal(other.test.tensors[0], speech.test.tensors[0])  # official test fixed
    assert not torch.equal(other.val.tensors[0], speech.val.tensors[0])


def test_speech_from_archive_folder_and_root_agree(speech, tmp_path, cache_dir) -> None:
    """The extracted folder (any of the ways to point at it) gives exactly the archive's data."""
    with tarfile.open(DATA / "speech_fsdd.tar.xz", "r:xz") as tf:
        tf.extractall(tmp_path / "data", filter="data")
    root = tmp_path / "data"
    for path in (root / "speech_fsdd", root, root / "speech_fsdd" / "recordings"):
        # a private cache: a fresh folder has a new fingerprint every run
        task = load_speech(path, cache_dir=tmp_path / "cache")
        assert resolve_source(path, "speech_fsdd", "recordings").kind == "dir"
        assert torch.equal(task.train.tensors[0], speech.train.tensors[0])
        assert torch.equal(task.test.tensors[1], speech.test.tensors[1])
    assert load_speech(DATA / "speech_fsdd.tar.xz", cache_dir=cache_dir).info["cache_hit"] is True


def test_log_spectrogram_on_real_speech(speech) -> None:
    spec = LogSpectrogram()
    x = speech.train.tensors[0][:4]
    out = spec(x)
    assert out.shape == (4, 1, 129, 129) == (4, 1, *spec.output_shape(8192))
    assert torch.isfinite(out).all() and float(out.min()) >= 0.0


# --- traffic -----------------------------------------------------------------------------------


def test_traffic_counts_shapes_ranges(traffic) -> None:
    assert traffic.num_classes == 43 and len(traffic.class_names) == 43
    assert len(traffic.train) + len(traffic.val) == 39209
    assert len(traffic.test) == 12630
    x, y = traffic.train.tensors
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert int((traffic.test.tensors[1] == 14).sum()) == 270  # stop signs, as documented
    stop_trainval = int((traffic.train.tensors[1] == 14).sum() + (traffic.val.tensors[1] == 14).sum())
    assert stop_trainval == 780


def test_traffic_split_by_track(traffic) -> None:
    train_tracks, val_tracks = set(traffic.info["train_tracks"]), set(traffic.info["val_tracks"])
    assert not train_tracks & val_tracks and len(train_tracks | val_tracks) == 1307
    # Check the samples themselves, not only the recorded ids: map each image to its track.
    arrays = np.load(traffic.info["cache_file"], allow_pickle=False)
    x_u8 = torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2)
    track_of = dict(zip(_row_hashes(x_u8), arrays["track"].tolist()))

    def tracks(part) -> set[int]:
        u8 = (part.tensors[0] * 255).round().to(torch.uint8)
        return {track_of[h] for h in _row_hashes(u8)}

    assert tracks(traffic.train) == train_tracks and tracks(traffic.val) == val_tracks
    # val_groups names each val sample's own track (the defender's hold-out keeps tracks whole).
    u8 = (traffic.val.tensors[0] * 255).round().to(torch.uint8)
    assert traffic.val_groups.tolist() == [track_of[h] for h in _row_hashes(u8)]
    _assert_partition(traffic, 39209 + 12630, shared_with_test=8)
    assert len(traffic.info["test_duplicates_of_train"]) == 8
    _assert_stratified(traffic)


def test_defend_task_traffic_holds_out_whole_tracks(traffic) -> None:
    from fineprune.data.splits import holdout
    from fineprune.pipeline.inputs import Preprocessing, TaskSource, load_input

    clean = load_input("task:traffic", Preprocessing(), "clean", TaskSource(str(_need("traffic_gtsrb32.tar.xz")), 0))
    assert torch.equal(clean.groups, traffic.val_groups)
    fit, held = holdout(clean.dataset, 0.2, 0, groups=clean.groups)
    track = {h: g for h, g in zip(_row_hashes((clean.dataset.tensors[0] * 255).round().to(torch.uint8)),
                                 clean.groups.tolist())}
    side = lambda ds: {track[h] for h in _row_hashes((ds.tensors[0] * 255).round().to(torch.uint8))}  # noqa: E731
    assert side(fit).isdisjoint(side(held))


def test_traffic_determinism_and_cache_hit(traffic, cache_dir, monkeypatch) -> None:
    monkeypatch.setattr(traffic_mod, "_decode", lambda *a, **k: pytest.fail("decoded again"))
    again = load_traffic(DATA / "traffic_gtsrb32.tar.xz", cache_dir=cache_dir)
    assert again.info["cache_hit"] is True
    assert again.info["train_tracks"] == traffic.info["train_tracks"]
    assert torch.equal(again.val.tensors[1], traffic.val.tensors[1])
    other = load_traffic(DATA, seed=5, cache_dir=cache_dir)
    assert other.info["train_tracks"] != traffic.info["train_tracks"]


# --- without the real data: path resolution, cache, tiny hand-made datasets --------------------


def test_resolve_source_errors(tmp_path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        load_speech(tmp_path / "nope")
    with pytest.raises(BadInputError, match="no speech_fsdd dataset found"):
        load_speech(tmp_path)
    junk = tmp_path / "speech_fsdd.tar.xz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(BadInputError, match="not a tar archive"):
        load_speech(junk)


def _wav_bytes(samples: np.ndarray, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _mini_fsdd(folder: Path, rate_of_odd: int = 8000) -> None:
    rec = folder / "speech_fsdd" / "recordings"
    rec.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for digit in range(10):
        for index in range(8):
            rate = rate_of_odd if (digit, index) == (3, 7) else 8000
            wav = _wav_bytes(rng.integers(-3000, 3000, 100 + 10 * index), rate)
            (rec / f"{digit}_alice_{index}.wav").write_bytes(wav)
    (rec / "0_alice_9.wav").write_bytes(b"RIFF broken")


def test_mini_speech_folder_and_archive(tmp_path) -> None:
    _mini_fsdd(tmp_path / "d")
    cache = tmp_path / "cache"
    from_dir = load_speech(tmp_path / "d", length=64, val_fraction=0.5, cache_dir=cache)
    assert len(from_dir.test) == 50 and len(from_dir.train) + len(from_dir.val) == 30
    assert from_dir.info["skipped_files"] == ["recordings/0_alice_9.wav"]  # relative to the source
    archive = tmp_path / "speech_fsdd.tar.xz"
    with tarfile.open(archive, "w:xz") as tf:
        tf.add(tmp_path / "d" / "speech_fsdd", arcname="speech_fsdd")
    from_tar = load_speech(archive, length=64, val_fraction=0.5, cache_dir=cache)
    assert from_tar.info["cache_hit"] is False  # other source, other key
    assert torch.equal(from_tar.train.tensors[0], from_dir.train.tensors[0])


def test_mini_speech_wrong_rate_is_refused_by_name(tmp_path) -> None:
    _mini_fsdd(tmp_path, rate_of_odd=16000)
    with pytest.raises(BadInputError, match=r"3_alice_7\.wav is sampled at 16000 Hz"):
        load_speech(tmp_path, cache_dir=tmp_path / "cache")


def _pgm(value: int, size: tuple[int, int] = (168, 192)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PPM")
    return buf.getvalue()


def test_mini_faces_skips_ambient_bad_and_leftovers(tmp_path) -> None:
    archive = tmp_path / "faces_extendedyaleb_cropped.tar.xz"
    with tarfile.open(archive, "w:xz") as tf:
        for p in (1, 2):
            base = f"faces_extendedyaleb_cropped/CroppedYale/yaleB0{p}/yaleB0{p}"
            for i in range(5):
                _add(tf, f"{base}_P00A+0{i}0E+00.pgm", _pgm(40 * i + p))
            _add(tf, f"{base}_P00_Ambient.pgm", _pgm(3, (640, 480)))
            _add(tf, f"{base}_P00A+050E-40.pgm.bad", _pgm(7))
            _add(tf, f"{base}_P00.info", b"yaleB01_P00A+000E+00.pgm\n")
        _add(tf, "faces_extendedyaleb_cropped/CroppedYale/yaleB01/WS_FTP.LOG", b"log")
        _add(tf, "faces_extendedyaleb_cropped/CroppedYale/yaleB01/DEADJOE", b"joe")
        _add(tf, "faces_extendedyaleb_cropped/CroppedYale/yaleB02/yaleB02_P00A+999E+00.pgm", b"P5 junk")
    task = load_faces(tmp_path, size=(32, 28), cache_dir=tmp_path / "cache")
    assert task.class_names == ["yaleB01", "yaleB02"]
    assert len(task.train) + len(task.val) + len(task.test) == 10
    assert task.train.tensors[0].shape[1:] == (1, 32, 28)
    assert task.info["skipped_files"] == ["faces_extendedyaleb_cropped/CroppedYale/yaleB02/yaleB02_P00A+999E+00.pgm"]
    assert task.info["eye_band_rows"][0] < task.info["eye_band_rows"][1] <= 32


def test_mini_traffic_labels_from_csv_and_tracks(tmp_path) -> None:
    root = tmp_path / "traffic_gtsrb32" / "GTSRB"
    colours = {}
    for cls in (0, 1, 2):
        folder = root / "Final_Training" / "Images" / f"{cls:05d}"
        folder.mkdir(parents=True)
        for track in range(3):
            for frame in range(2):
                v = 10 * cls + 3 * track + frame
                Image.new("RGB", (32, 32), (v, 0, 0)).save(folder / f"{track:05d}_{frame:05d}.ppm")
                colours[v] = cls * traffic_mod.TRACK_BASE + track
    test = root / "Final_Test" / "Images"
    test.mkdir(parents=True)
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(6):
        Image.new("RGB", (40, 36), (200, i, 0)).save(test / f"{i:05d}.ppm")  # not 32x32: resized
        lines.append(f"{i:05d}.ppm;40;36;1;1;30;30;{i % 3}")
    (root / "Final_Test" / "GT-final_test.csv").write_text("\n".join(lines) + "\n")
    task = load_traffic(tmp_path, val_fraction=1 / 3, cache_dir=tmp_path / "cache")
    assert len(task.train) == 12 and len(task.val) == 6 and task.num_classes == 43
    assert task.test.tensors[1].tolist() == [0, 1, 2, 0, 1, 2]
    assert task.test.tensors[0].shape == (6, 3, 32, 32)
    for part, tracks in ((task.train, task.info["train_tracks"]), (task.val, task.info["val_tracks"])):
        red = (part.tensors[0][:, 0, 0, 0] * 255).round().long().tolist()
        assert {colours[v] for v in red} == set(tracks)
    assert not set(task.info["train_tracks"]) & set(task.info["val_tracks"])
    (root / "Final_Test" / "GT-final_test.csv").write_text(lines[0] + "\n")
    with pytest.raises(BadInputError, match="no row in GT-final_test.csv"):
        load_traffic(tmp_path, cache_dir=tmp_path / "cache2")


def test_cache_roundtrip_refuses_objects_and_survives_corruption(tmp_path) -> None:
    path = cache_mod.cache_file("t", "src", {"a": 1}, tmp_path)
    assert path != cache_mod.cache_file("t", "src", {"a": 2}, tmp_path)
    with pytest.raises(TypeError, match="pickle"):
        cache_mod.write_arrays(path, {"x": np.array([{"a": 1}], dtype=object)})
    calls = []

    def decode() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"x": np.arange(3, dtype=np.uint8), "names": np.array(["a", "b"])}

    arrays, p, hit = cache_mod.cached_arrays("t", "src", {"a": 1}, decode, tmp_path)
    assert not hit and p == path and list(tmp_path.iterdir()) == [path]  # no temporary left over
    arrays, _, hit = cache_mod.cached_arrays("t", "src", {"a": 1}, decode, tmp_path)
    assert hit and calls == [1] and arrays["names"].tolist() == ["a", "b"]
    path.write_bytes(b"truncated")
    arrays, _, hit = cache_mod.cached_arrays("t", "src", {"a": 1}, decode, tmp_path)
    assert not hit and calls == [1, 1] and arrays["x"].tolist() == [0, 1, 2]
    _, _, hit = cache_mod.cached_arrays("t", "src", {"a": 1}, decode, tmp_path, required=["x", "new"])
    assert not hit and calls == [1, 1, 1]  # an older layout lacking a key is decoded again


def test_default_cache_dir_honours_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FINEPRUNE_CACHE", str(tmp_path))
    assert cache_mod.default_cache_dir() == tmp_path
    monkeypatch.delenv("FINEPRUNE_CACHE")
    assert cache_mod.default_cache_dir() == Path.home() / ".cache" / "fineprune"


def test_log_spectrogram_fx_traceable_and_buffer_not_saved() -> None:
    spec = LogSpectrogram(n_fft=256, hop_length=64)
    traced = torch.fx.symbolic_trace(spec)
    x = torch.randn(2, 1, 1000)
    assert torch.allclose(traced(x), spec(x))
    assert spec(x).shape == (2, 1, 129, 1000 // 64 + 1)
    assert "window" not in spec.state_dict() and "window" in dict(spec.named_buffers())
    assert float(spec(torch.zeros(1, 1, 512)).abs().max()) == 0.0  # silence -> 0, not log(eps)
