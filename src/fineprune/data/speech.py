"""Free Spoken Digit Dataset: the speech task (10 digits, 6 speakers, 8 kHz).

Waveforms are read with the standard library's `wave` module plus numpy: PCM WAV needs nothing more,
and an audio dependency (soundfile, torchaudio backends) is a frequent install failure. Audio is
never resampled: a file at another rate is refused by name, because silently resampling would
change what a model trained at 8 kHz sees.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
import wave

import numpy as np
import torch

from fineprune.data.archive import Source, resolve_source
from fineprune.data.cache import cached_arrays
from fineprune.data.splits import stratified_split
from fineprune.data.types import TaskData, make_dataset
from fineprune.errors import BadInputError

log = logging.getLogger(__name__)

STEM = "speech_fsdd"
MARKER = "recordings"
SAMPLE_RATE = 8000
#: FSDD's official split: recordings with index 0-4 (of 0-49 per speaker and digit) are the test set.
TEST_INDICES = range(0, 5)
_PATTERN = re.compile(r"(?:^|/)recordings/(\d)_([A-Za-z]+)_(\d+)\.wav$")


class WavReadError(ValueError):
    """A file that is not a PCM WAV we can read (skipped and counted by the loaders)."""


def read_wav_int16(data: bytes, name: str, sample_rate: int | None = SAMPLE_RATE) -> np.ndarray:
    """Mono int16 samples of a PCM WAV held in memory.

    8/24/32-bit PCM is converted to 16 bits and channels are averaged. A different sample rate
    raises BadInputError naming the file; unreadable bytes raise WavReadError.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError, ValueError, OSError) as exc:
        raise WavReadError(f"{name}: not a readable PCM WAV ({exc})") from exc
    if sample_rate is not None and rate != sample_rate:
        raise BadInputError(
            f"{name} is sampled at {rate} Hz, expected {sample_rate} Hz. Resample it (e.g. "
            f"`sox in.wav -r {sample_rate} out.wav`) or pass sample_rate={rate} if the model was "
            "trained at that rate."
        )
    raw = np.frombuffer(frames, dtype=np.uint8)
    usable = len(raw) - len(raw) % (width * channels)
    raw = raw[:usable]
    if width == 1:  # 8-bit WAV is unsigned
        a = (raw.astype(np.int16) - 128) << 8
    elif width == 2:
        a = raw.view("<i2").astype(np.int16)
    elif width == 3:
        b = raw.reshape(-1, 3).astype(np.int32)
        a = (((b[:, 2] << 24) | (b[:, 1] << 16) | (b[:, 0] << 8)) >> 16).astype(np.int16)
    elif width == 4:
        a = (raw.view("<i4") >> 16).astype(np.int16)
    else:
        raise WavReadError(f"{name}: unsupported sample width {width} bytes")
    if channels > 1:
        a = a.reshape(-1, channels).astype(np.int32).mean(axis=1).astype(np.int16)
    return a


def fit_length(wave_: np.ndarray, length: int) -> np.ndarray:
    """Centre-crop or zero-pad (centred) to `length` samples: the spoken word stays mid-window."""
    n = len(wave_)
    if n >= length:
        start = (n - length) // 2
        return wave_[start : start + length]
    out = np.zeros(length, dtype=wave_.dtype)
    start = (length - n) // 2
    out[start : start + n] = wave_
    return out


def pack_waves(waves: list[np.ndarray], length: int) -> torch.Tensor:
    """int16 waveforms -> float (N,1,length) in [-1,1)."""
    out = np.zeros((len(waves), length), dtype=np.int16)
    for i, a in enumerate(waves):
        out[i] = fit_length(a, length)
    return torch.from_numpy(out).unsqueeze(1).float().div_(32768.0)

#: Arrays a cache file must hold (an older layout without them is decoded again).
_KEYS = ("samples", "offsets", "y", "speaker", "index", "files", "skipped")


def _select(name: str) -> bool:
    return _PATTERN.search(name) is not None


def _decode(source: Source) -> dict[str, np.ndarray]:
    """All recordings, raw length, concatenated (int16) with offsets: any `length` reuses the cache."""
    items: list[tuple[str, int, str, int, np.ndarray]] = []
    bad: list[str] = []
    for name, data in source.members(_select):
        m = _PATTERN.search(name)
        assert m is not None
        try:
            a = read_wav_int16(data, name, SAMPLE_RATE)
        except WavReadError as exc:
            log.warning("skipping %s", exc)
            bad.append(name)
            continue
        items.append((name, int(m.group(1)), m.group(2), int(m.group(3)), a))
    if not items:
        raise BadInputError(f"no readable recordings/{{digit}}_{{speaker}}_{{index}}.wav files in {source}")
    items.sort(key=lambda t: t[0])
    lengths = np.array([len(t[4]) for t in items], dtype=np.int64)
    return {
        "samples": np.concatenate([t[4] for t in items]).astype(np.int16),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "y": np.array([t[1] for t in items], dtype=np.int64),
        "speaker": np.array([t[2] for t in items]),
        "index": np.array([t[3] for t in items], dtype=np.int64),
        "files": np.array([t[0] for t in items]),
        "skipped": np.array(bad, dtype=str),
    }


def load_speech(
    root: str | os.PathLike[str],
    length: int = 8192,
    seed: int = 0,
    val_fraction: float = 0.2,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TaskData:
    """Speech task: x (N,1,length) waveforms in [-1,1], labels = spoken digit.

    Official FSDD split: index 0-4 is the test set; indices 5-49 are split per digit (stratified,
    seeded) into train and val (the defender's clean data) with `val_fraction` in val.
    """
    length = int(length)
    if length < 1:
        raise BadInputError(f"length must be a positive number of samples, got {length}")
    if not 0.0 < val_fraction < 1.0:
        raise BadInputError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    source = resolve_source(root, STEM, MARKER)
    t0 = time.perf_counter()
    arrays, path, hit = cached_arrays(
        "speech",
        source.fingerprint(_select),
        {"sample_rate": SAMPLE_RATE},
        lambda: _decode(source),
        cache_dir,
        required=_KEYS,
    )
    offsets, samples = arrays["offsets"], arrays["samples"]
    waves = [samples[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    x = pack_waves(waves, length)
    y = torch.from_numpy(arrays["y"]).long()
    is_test = torch.from_numpy(np.isin(arrays["index"], list(TEST_INDICES)))
    test_idx = torch.nonzero(is_test).flatten()
    rest_idx = torch.nonzero(~is_test).flatten()
    train_part, val_part = stratified_split(y[rest_idx], (1.0 - val_fraction, val_fraction), seed)
    train_idx, val_idx = rest_idx[train_part], rest_idx[val_part]
    train = make_dataset(x[train_idx], y[train_idx])
    val = make_dataset(x[val_idx], y[val_idx])
    test = make_dataset(x[test_idx], y[test_idx])
    seconds = time.perf_counter() - t0
    info = {
        "sample_rate": SAMPLE_RATE,
        "length": length,
        "source": str(source.path),
        "cache_file": str(path),
        "cache_hit": hit,
        "load_seconds": round(seconds, 3),
        "cropped": int((offsets[1:] - offsets[:-1] > length).sum()),
        "speakers": sorted({str(s) for s in arrays["speaker"]}),
        "skipped_files": [str(s) for s in arrays["skipped"]],
    }
    return TaskData(
        name="speech",
        train=train,
        val=val,
        test=test,
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        input_kind="audio",
        info=info,
    )
