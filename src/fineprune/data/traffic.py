"""GTSRB at 32x32: the traffic-sign task (43 classes).

Training images come in tracks of up to 30 near-identical frames of one physical sign. Splitting
train/val by image would put frames of the same sign on both sides and make validation accuracy
(the defender's pruning signal) meaningless, so the split is by track.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import time

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fineprune.data.archive import Source, resolve_source
from fineprune.data.cache import cached_arrays
from fineprune.data.splits import group_split
from fineprune.data.types import TaskData, make_dataset
from fineprune.errors import BadInputError

# Per-file decoding problems go to the standard logger, not the progress channel: they are detail
# for whoever runs the loader, often deep inside a DataLoader worker where no channel is set; the
# count of skipped files reaches the user through the pipeline's record (model.json inputs).
log = logging.getLogger(__name__)

STEM = "traffic_gtsrb32"
MARKER = "GTSRB"
SIZE = 32
NUM_CLASSES = 43
#: Track ids are only unique within a class; class * TRACK_BASE + track is unique overall.
TRACK_BASE = 100_000
_TRAIN = re.compile(r"(?:^|/)Final_Training/Images/(\d+)/(\d+)_(\d+)\.ppm$")
_TEST = re.compile(r"(?:^|/)Final_Test/Images/(\d+\.ppm)$")
_TEST_CSV = re.compile(r"(?:^|/)Final_Test/GT-final_test\.csv$")

#: Arrays a cache file must hold (an older layout without them is decoded again).
_KEYS = (
    "x_train", "y_train", "track", "files_train", "x_test", "y_test", "files_test", "test_duplicates", "skipped"
)


def _select(name: str) -> bool:
    return bool(_TRAIN.search(name) or _TEST.search(name) or _TEST_CSV.search(name))


def _decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (SIZE, SIZE):  # the distributed copy is all 32x32; tolerate other copies
            im = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _test_labels(data: bytes) -> dict[str, int]:
    rows = csv.DictReader(io.StringIO(data.decode("utf-8-sig")), delimiter=";")
    if rows.fieldnames is None or "Filename" not in rows.fieldnames or "ClassId" not in rows.fieldnames:
        raise BadInputError(
            f"GT-final_test.csv has columns {rows.fieldnames}, expected ';'-separated with Filename "
            "and ClassId: use the labelled test CSV from the GTSRB distribution."
        )
    return {r["Filename"]: int(r["ClassId"]) for r in rows}


def _decode(source: Source) -> dict[str, np.ndarray]:
    """All train and test images (N,32,32,3) uint8, with labels and unique track ids."""
    train: list[tuple[str, int, int, np.ndarray]] = []
    test: list[tuple[str, np.ndarray]] = []
    labels: dict[str, int] | None = None
    bad: list[str] = []
    for name, data in source.members(_select):
        if _TEST_CSV.search(name):
            labels = _test_labels(data)
            continue
        try:
            img = _decode_image(data)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("skipping unreadable traffic-sign image %s: %s", name, exc)
            bad.append(name)
            continue
        if m := _TRAIN.search(name):
            cls, track = int(m.group(1)), int(m.group(2))
            train.append((name, cls, cls * TRACK_BASE + track, img))
        elif m := _TEST.search(name):
            test.append((m.group(1), img))
    if not train:
        raise BadInputError(f"no Final_Training/Images/NNNNN/TTTTT_FFFFF.ppm images in {source}")
    if not test or labels is None:
        raise BadInputError(
            f"{source} lacks the GTSRB test set: expected Final_Test/Images/*.ppm and "
            "Final_Test/GT-final_test.csv (with ClassId)."
        )
    missing = [n for n, _ in test if n not in labels]
    if missing:
        raise BadInputError(
            f"{len(missing)} test images have no row in GT-final_test.csv (e.g. {missing[0]}): "
            "the CSV does not belong to these images."
        )
    train.sort(key=lambda t: t[0])
    test.sort(key=lambda t: t[0])
    # The distributed copy has test images that are pixel-identical to training frames (8, all of
    # one stop-sign track); record them so evaluations can tell, but keep the official test set.
    train_hashes = {hashlib.sha1(t[3].tobytes()).digest() for t in train}
    dups = [n for n, img in test if hashlib.sha1(img.tobytes()).digest() in train_hashes]
    return {
        "x_train": np.stack([t[3] for t in train]),
        "y_train": np.array([t[1] for t in train], dtype=np.int64),
        "track": np.array([t[2] for t in train], dtype=np.int64),
        "files_train": np.array([t[0] for t in train]),
        "x_test": np.stack([t[1] for t in test]),
        "y_test": np.array([labels[n] for n, _ in test], dtype=np.int64),
        "files_test": np.array([n for n, _ in test]),
        "test_duplicates": np.array(dups, dtype=str),
        "skipped": np.array(bad, dtype=str),
    }


def _channels_first(x: np.ndarray) -> torch.Tensor:
    """(N,H,W,3) -> (N,3,H,W) uint8, contiguous (permuting uint8 is 3x cheaper than float)."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)


def load_traffic(
    root: str | os.PathLike[str],
    seed: int = 0,
    val_fraction: float = 0.2,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TaskData:
    """Traffic task: x (N,3,32,32) in [0,1], 43 classes (14 = stop, 1 = speed limit 30).

    Final_Training is split by track (seeded, stratified by the track's class) into train and val
    (the defender's clean data); Final_Test is the test set. `info["train_tracks"]` /
    `info["val_tracks"]` list the track ids (class * 100000 + track) on each side;
    `info["test_duplicates_of_train"]` names the test images that are pixel-identical to a training
    frame (8 in the distributed copy, all stop signs of track 00014/00023).
    """
    if not 0.0 < val_fraction < 1.0:
        raise BadInputError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    source = resolve_source(root, STEM, MARKER)
    t0 = time.perf_counter()
    arrays, path, hit = cached_arrays(
        "traffic",
        source.fingerprint(_select),
        {"size": SIZE},
        lambda: _decode(source),
        cache_dir,
        required=_KEYS,
    )
    x_all = _channels_first(arrays["x_train"])
    y_all = torch.from_numpy(arrays["y_train"]).long()
    groups = torch.from_numpy(arrays["track"]).long()
    train_idx, val_idx = group_split(groups, y_all, (1.0 - val_fraction, val_fraction), seed)
    train = make_dataset(_to_float(x_all[train_idx]), y_all[train_idx])
    val = make_dataset(_to_float(x_all[val_idx]), y_all[val_idx])
    val_groups = groups[val_idx]
    y_test = torch.from_numpy(arrays["y_test"]).long()
    test = make_dataset(_to_float(_channels_first(arrays["x_test"])), y_test)
    seconds = time.perf_counter() - t0
    num_classes = max(NUM_CLASSES, int(y_all.max()) + 1, int(y_test.max()) + 1)
    info = {
        "source": str(source.path),
        "cache_file": str(path),
        "cache_hit": hit,
        "load_seconds": round(seconds, 3),
        "train_tracks": sorted(set(groups[train_idx].tolist())),
        "val_tracks": sorted(set(groups[val_idx].tolist())),
        "stop_class": 14,
        "test_duplicates_of_train": [str(s) for s in arrays["test_duplicates"]],
        "skipped_files": [str(s) for s in arrays["skipped"]],
    }
    return TaskData(
        name="traffic",
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        class_names=[f"{c:05d}" for c in range(num_classes)],
        input_kind="image",
        info=info,
        val_groups=val_groups,
    )
