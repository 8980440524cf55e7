"""Extended Yale Face Database B (cropped): the face-recognition task (38 people).

Which files are used, and why:
- `yaleBNN_P00A{az}E{el}.pgm`: the 2414 lit, aligned 168x192 crops. These are the data.
- `*_Ambient.pgm` are skipped: they were taken with the strobe off (near-black ambient frames) and
  28 of the 38 are uncropped 640x480 camera frames, so the face sits elsewhere and at another scale.
  Keeping them would add 38 unaligned near-blank samples and break the fixed eye position that
  the sunglasses trigger relies on.
- `*.pgm.bad` (flagged corrupt by the distributors), `*.info`, `WS_FTP.LOG`, `DEADJOE` are not
  matched by the file pattern at all.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fineprune.data.archive import Source, resolve_source
from fineprune.data.cache import cached_arrays
from fineprune.data.splits import stratified_split
from fineprune.data.types import TaskData, make_dataset
from fineprune.errors import BadInputError

# Per-file decoding problems go to the standard logger, not the progress channel: they are detail
# for whoever runs the loader, often deep inside a DataLoader worker where no channel is set; the
# count of skipped files reaches the user through the pipeline's record (model.json inputs).
log = logging.getLogger(__name__)

STEM = "faces_extendedyaleb_cropped"
MARKER = "CroppedYale"
_PATTERN = re.compile(r"(?:^|/)CroppedYale/(yaleB\d+)/([^/]+)\.pgm$")

#: Eye region of the aligned crops as fractions of the image height / width, measured on the mean
#: of the brightest 30% of the 2414 crops: pupils at row 0.23 (44-45 px of 192), columns 0.18 and
#: 0.80; per-image darkest-eye rows span 0.20-0.29 (inter-quartile 0.20-0.26). The band covers the
#: eyes and lids, i.e. where a pair of sunglasses goes. Crops are aligned, so it holds after any resize.
EYE_BAND = (0.17, 0.31)
EYE_CENTER_ROW = 0.23
EYE_CENTER_COLS = (0.18, 0.80)

#: Arrays a cache file must hold (an older layout without them is decoded again).
_KEYS = ("x", "y", "files", "class_names", "skipped")


def _select(name: str) -> bool:
    m = _PATTERN.search(name)
    return m is not None and not m.group(2).endswith("_Ambient")


def _decode(source: Source, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Decode and resize every lit crop to `size` (H, W), uint8. Unreadable files are counted."""
    h, w = size
    items: list[tuple[str, str, np.ndarray]] = []
    bad: list[str] = []
    for name, data in source.members(_select):
        person = _PATTERN.search(name).group(1)  # type: ignore[union-attr]
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("L")
                if im.size != (w, h):
                    # Pillow's bilinear widens its kernel when shrinking, so this is antialiased
                    # (area-like), not point sampling.
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                items.append((name, person, np.asarray(im, dtype=np.uint8)))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("skipping unreadable face image %s: %s", name, exc)
            bad.append(name)
    if not items:
        raise BadInputError(f"no readable yaleBNN/*.pgm face images in {source}")
    items.sort(key=lambda t: t[0])  # archive and folder give the same order
    people = sorted({p for _, p, _ in items})
    index = {p: i for i, p in enumerate(people)}
    return {
        "x": np.stack([a for _, _, a in items]),
        "y": np.array([index[p] for _, p, _ in items], dtype=np.int64),
        "files": np.array([n for n, _, _ in items]),
        "class_names": np.array(people),
        "skipped": np.array(bad, dtype=str),
    }


def load_faces(
    root: str | os.PathLike[str],
    size: tuple[int, int] = (64, 56),
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TaskData:
    """Faces task: x (N,1,H,W) float in [0,1], labels 0..37 = person ids in sorted order.

    Split per person (stratified, seeded) into train / val (the defender's clean data) / test.
    `info` carries the eye band (fractions of the height) for drawing sunglasses triggers.
    """
    size = (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise BadInputError(f"size must be positive (H, W), got {size}")
    if len(fractions) != 3:
        raise BadInputError(f"fractions must be (train, val, test), got {list(fractions)}")
    source = resolve_source(root, STEM, MARKER)
    t0 = time.perf_counter()
    arrays, path, hit = cached_arrays(
        "faces",
        source.fingerprint(_select),
        {"size": list(size), "resample": "bilinear"},
        lambda: _decode(source, size),
        cache_dir,
        required=_KEYS,
    )
    x = torch.from_numpy(arrays["x"]).unsqueeze(1)
    y = torch.from_numpy(arrays["y"]).long()
    class_names = [str(c) for c in arrays["class_names"]]
    try:
        parts = stratified_split(y, fractions, seed)
    except ValueError as exc:
        raise BadInputError(f"bad split fractions for faces: {exc}") from exc
    train, val, test = (make_dataset(x[i].float().div_(255.0), y[i]) for i in parts)
    seconds = time.perf_counter() - t0
    band = (EYE_BAND[0], EYE_BAND[1])
    info = {
        "source": str(source.path),
        "cache_file": str(path),
        "cache_hit": hit,
        "load_seconds": round(seconds, 3),
        "size": list(size),
        "eye_band": list(band),
        "eye_band_rows": [int(np.floor(band[0] * size[0])), int(np.ceil(band[1] * size[0]))],
        "eye_center_row": EYE_CENTER_ROW,
        "eye_center_cols": list(EYE_CENTER_COLS),
        "skipped_files": [str(s) for s in arrays["skipped"]],
        "excluded": "*_Ambient.pgm (unlit, 28 of 38 uncropped 640x480), *.pgm.bad, non-images",
    }
    return TaskData(
        name="faces",
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        input_kind="image",
        info=info,
    )
