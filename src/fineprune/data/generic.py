"""Loaders for a user's own clean data: an image folder, an `.npz`, or a folder of WAV files.

The defender brings "some clean data" in whatever shape they have; these turn the common shapes
into a TensorDataset (float inputs, int64 labels) with errors that say how to fix the input.
Folders can also be read lazily (`load_data(..., lazy=True)`): `ImageFolderData` and
`WavFolderData` list the files up front (labels come from the paths) and decode one item at a
time, so a folder larger than memory can be defended and DataLoader workers do the decoding.
An `.npz` is one array file and stays eager. (The built-in tasks' archives, `.tar.xz`, are read
eagerly too, by `fineprune.data.archive`: they must be extracted anyway.)
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import wave
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset

from fineprune.data.speech import WavReadError, pack_waves, read_wav_int16
from fineprune.data.types import make_dataset
from fineprune.errors import BadInputError

# Per-file decoding problems go to the standard logger, not the progress channel: they are detail
# for whoever runs the loader, often deep inside a DataLoader worker where no channel is set; the
# count of skipped files reaches the user through the pipeline's record (model.json inputs).
log = logging.getLogger(__name__)

#: What torchvision's ImageFolder accepts, so folders prepared for it load the same here.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WAV_EXTENSIONS = (".wav",)
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _files_under(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files with these extensions below `folder` (recursively, like ImageFolder), sorted, no hidden."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(extensions):
                out.append(Path(dirpath) / name)
    return out


def _normalise_size(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise BadInputError(f"size must be (height, width) in pixels or one int, got {size!r}")
    return int(size[0]), int(size[1])


def _image_classes(path: str | os.PathLike[str], size, mode: str | None
                   ) -> tuple[Path, list[Path], tuple[int, int] | None]:
    """The checked root, its class subfolders (sorted, as ImageFolder) and the target size."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BadInputError(f"{root} is not a folder; expected one subfolder per class holding images")
    if mode not in ("RGB", "L", None):
        raise BadInputError(f"mode must be 'RGB', 'L' or None, got {mode!r}")
    hw = _normalise_size(size)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not class_dirs:
        loose = _files_under(root, IMAGE_EXTENSIONS)
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise BadInputError(
            f"{root} has no class subfolders{hint}: put each class's images in its own subfolder "
            "(path/<class name>/<image>), as for torchvision's ImageFolder."
        )
    return root, class_dirs, hw


def _pick_mode(mode: str | None, modes: set[str]) -> str:
    """`mode`, or for None "L" when every image is greyscale, else "RGB"."""
    if mode is not None:
        return mode
    return "L" if modes and all(m in _GREY_MODES for m in modes) else "RGB"


def _one_size(root: Path, sizes: set[tuple[int, int]]) -> None:
    """Without `size`, every image must already have the same size (PIL's (W, H) here)."""
    if len(sizes) > 1:
        (w1, h1), (w2, h2) = sorted(sizes)[:2]
        raise BadInputError(
            f"images in {root} have {len(sizes)} different sizes (e.g. {h1}x{w1} and {h2}x{w2}, "
            "HxW); pass size=(H, W) (the model's input size) to resize them all."
        )


def _image_tensor(im: Image.Image, mode: str, hw: tuple[int, int] | None) -> np.ndarray:
    """One decoded image as uint8 (H, W, C), converted and resized as the loaders do."""
    im = im.convert(mode)
    if hw is not None and im.size != (hw[1], hw[0]):
        im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    a = np.array(im, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def load_image_folder(
    path: str | os.PathLike[str],
    size: int | tuple[int, int] | None = None,
    mode: str | None = "RGB",
) -> tuple[TensorDataset, list[str]]:
    """ImageFolder layout (`path/<class>/**/<image>`): x (N,C,H,W) float in [0,1], labels by sorted
    class name (torchvision's order, so indices match a model trained with ImageFolder).

    Images are not resized unless `size` (H, W) is given, because silently resizing would change
    what the model sees. `mode` "RGB" / "L" converts; None picks "L" if every image is greyscale,
    else "RGB". Unreadable image files are skipped, logged, and counted in `dataset.skipped`.
    """
    root, class_dirs, hw = _image_classes(path, size, mode)
    class_names = [p.name for p in class_dirs]
    images: list[Image.Image] = []
    labels: list[int] = []
    skipped: list[str] = []
    for label, cdir in enumerate(class_dirs):
        files = _files_under(cdir, IMAGE_EXTENSIONS)
        if not files:
            log.warning("class folder %s holds no images; class %d will have no samples", cdir, label)
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    images.append(im.copy())
                labels.append(label)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
                log.warning("skipping unreadable image %s: %s", f, exc)
                skipped.append(str(f))
    if not images:
        raise BadInputError(
            f"no readable images in {root} (skipped {len(skipped)} unreadable files); "
            f"expected {', '.join(IMAGE_EXTENSIONS)} files in class subfolders"
        )
    mode = _pick_mode(mode, {im.mode for im in images})
    if hw is None:
        _one_size(root, {im.size for im in images})
    arrays = [_image_tensor(im, mode, hw) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    if skipped:
        log.warning("skipped %d unreadable image files in %s", len(skipped), root)
    ds = make_dataset(x, torch.tensor(labels, dtype=torch.long))
    ds.skipped = len(skipped)  # type: ignore[attr-defined]
    return ds, class_names


def _npz_x(x: np.ndarray, path: Path) -> torch.Tensor:
    """Inputs as float32 channels-first; see load_npz for the accepted layouts."""
    if x.ndim == 3 and x.shape[1] == 1:
        pass  # (N, 1, L): waveforms, already channels-first
    elif x.ndim == 3:
        x = x[:, None]  # (N, H, W) grey
    elif x.ndim == 4:
        channel_like = (1, 3, 4)
        last, second = x.shape[3] in channel_like, x.shape[1] in channel_like
        # Tiny images can look like both (e.g. 4x4 RGB): then the smaller dim is the channels.
        if last and (not second or x.shape[3] < x.shape[1]):
            x = np.transpose(x, (0, 3, 1, 2))  # NHWC -> NCHW
    else:
        raise BadInputError(
            f"{path}: x has shape {x.shape}; expected images (N,C,H,W), (N,H,W,C) or (N,H,W), "
            "or waveforms (N,1,L)"
        )
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    elif x.dtype == np.int16:
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(32768.0)  # PCM audio
    elif np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not torch.isfinite(t).all():
            raise BadInputError(f"{path}: x contains NaN or infinite values; clean or drop those samples")
    else:
        raise BadInputError(
            f"{path}: x has dtype {x.dtype}; save images as uint8 (0-255) or float (0-1), "
            "audio as int16 PCM or float (-1..1)"
        )
    return t


#: Largest label accepted: class names and model heads are sized by it, so a hostile huge label
#: (2**40) must not turn into a trillion-entry class list.
MAX_LABEL = 1_000_000


def _npz_y(y: np.ndarray, n: int, path: Path) -> torch.Tensor:
    """Labels as int64, refusing anything that is not a non-negative integer per sample."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise BadInputError(
            f"{path}: y has shape {y.shape}; expected one integer class label per sample, shape ({n},) "
            "(one-hot labels: save y.argmax(1))"
        )
    if len(y) != n:
        raise BadInputError(f"{path}: x has {n} samples but y has {len(y)} labels; they must match")
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)) \
            and (not len(y) or np.abs(y).max() <= MAX_LABEL):
        y = y.astype(np.int64)  # whole numbers saved as float are still class indices
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(
            f"{path}: y has non-integer labels (dtype {y.dtype}); labels must be class indices 0..K-1"
        )
    if len(y) and y.min() < 0:
        raise BadInputError(f"{path}: y has negative labels (min {y.min()}); labels must be class indices 0..K-1")
    if len(y) and y.max() > MAX_LABEL:  # also keeps uint64 from wrapping round to negative int64
        raise BadInputError(f"{path}: y has a label {y.max()}, beyond any plausible class index "
                            f"(at most {MAX_LABEL}); labels must be class indices 0..K-1")
    return torch.from_numpy(y.astype(np.int64))


def _open_npz(path: str | os.PathLike[str]) -> tuple[Path, dict[str, np.ndarray]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"{p} does not exist or is not a file; expected an .npz with arrays x and y")
    if not zipfile.is_zipfile(p):
        raise BadInputError(f"{p} is not an .npz archive; save the data with np.savez(path, x=..., y=...)")
    try:
        with np.load(p, allow_pickle=False) as npz:
            return p, {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise BadInputError(
                f"{p} contains object arrays, which would need pickle (unsafe, refused); "
                "save plain numeric arrays: np.savez(path, x=x.astype(np.uint8 or float32), y=y.astype(int))"
            ) from exc
        raise BadInputError(f"cannot read {p} as .npz: {exc}") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BadInputError(f"cannot read {p} as .npz ({exc}); save it with np.savez(path, x=..., y=...)") from exc


def load_npz(path: str | os.PathLike[str]) -> TensorDataset:
    """An `.npz` with arrays `x` and `y`, read without pickle.

    x: (N,C,H,W) or (N,H,W,C) (channels-last is detected when the last dim is 1/3/4 and the second
    is not, or is larger), or (N,H,W) grey; (N,1,L) is taken as waveforms. uint8 is divided by 255, int16 by
    32768, float kept as is (assumed already in [0,1] / [-1,1]). y: non-negative integer labels.
    """
    p, arrays = _open_npz(path)
    return _npz_dataset(p, arrays)


def _npz_dataset(p: Path, arrays: dict[str, np.ndarray]) -> TensorDataset:
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise BadInputError(
            f"{p} lacks array(s) {missing} (found {sorted(arrays)}); save inputs as x and labels as y: "
            "np.savez(path, x=inputs, y=labels)"
        )
    x = arrays["x"]
    if x.ndim == 0 or len(x) == 0:
        raise BadInputError(f"{p}: x is empty; it needs at least one sample")
    if x.size == 0:
        raise BadInputError(f"{p}: x has shape {x.shape}, with a zero-size dimension; each sample needs data")
    return make_dataset(_npz_x(x, p), _npz_y(arrays["y"], len(x), p))


_WAV_LABEL = re.compile(r"^([^_]+)_.+\.wav$", re.IGNORECASE)


def _label_order(names: set[str]) -> tuple[list[str], dict[str, int]]:
    """Class names and label indices. All-integer names ("0".."9") keep their value as the label,
    so `3_x.wav` is class 3 even when some digit is missing; other names are indexed sorted."""
    if names and all(n.isdigit() for n in names):
        top = max(int(n) for n in names)
        if top > MAX_LABEL:
            raise BadInputError(f"wav label {top} is beyond any plausible class index (at most {MAX_LABEL}); "
                                "name files <label>_<anything>.wav with labels 0..K-1")
        return [str(i) for i in range(top + 1)], {n: int(n) for n in names}
    ordered = sorted(names)
    return ordered, {n: i for i, n in enumerate(ordered)}


def _wav_files(path: str | os.PathLike[str], length: int) -> tuple[Path, list[tuple[str, Path]]]:
    """The checked root and its wav files with their label names (subfolder or name prefix)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BadInputError(f"{root} is not a folder of .wav files")
    if int(length) < 1:
        raise BadInputError(f"length must be a positive number of samples, got {length}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p) and _files_under(p, WAV_EXTENSIONS))
    labelled: list[tuple[str, Path]] = []
    if subdirs:
        for d in subdirs:
            labelled += [(d.name, f) for f in _files_under(d, WAV_EXTENSIONS)]
    else:
        files = [f for f in sorted(root.iterdir()) if f.is_file() and _visible(f) and f.suffix.lower() == ".wav"]
        unlabelled = [f.name for f in files if not _WAV_LABEL.match(f.name)]
        if unlabelled or not files:
            raise BadInputError(
                f"{root}: cannot tell the labels of its wav files (e.g. {unlabelled[:3] or 'none found'}); "
                "put them in one subfolder per label, or name them <label>_<anything>.wav"
            )
        labelled = [(_WAV_LABEL.match(f.name).group(1), f) for f in files]  # type: ignore[union-attr]
    return root, labelled


def load_wav_folder(
    path: str | os.PathLike[str], length: int = 8192, sample_rate: int = 8000
) -> tuple[TensorDataset, list[str]]:
    """WAV files labelled by subfolder (`path/<label>/*.wav`) or by name prefix (`<label>_*.wav`,
    FSDD style): x (N,1,length) in [-1,1] (centre crop / centre zero-pad), int64 labels.

    Files at another sample rate are refused by name (no silent resampling); unreadable files are
    skipped, logged and counted in `dataset.skipped`.
    """
    root, labelled = _wav_files(path, length)
    class_names, index = _label_order({name for name, _ in labelled})
    waves, labels, skipped = [], [], []
    for name, f in labelled:
        try:
            waves.append(read_wav_int16(f.read_bytes(), str(f), sample_rate))
            labels.append(index[name])
        except WavReadError as exc:
            log.warning("skipping %s", exc)
            skipped.append(str(f))
    if not waves:
        raise BadInputError(f"no readable PCM .wav files in {root} ({len(skipped)} unreadable)")
    if skipped:
        log.warning("skipped %d unreadable wav files in %s", len(skipped), root)
    ds = make_dataset(pack_waves(waves, int(length)), torch.tensor(labels, dtype=torch.long))
    ds.skipped = len(skipped)  # type: ignore[attr-defined]
    return ds, class_names


#: A per-item transform of lazy folder data: one decoded input (C, H, W) or (1, L) in, one out.
ItemTransform = Callable[[torch.Tensor], torch.Tensor]


class _FolderData(Dataset):
    """Files listed up front with their labels; each item decoded (and `transform`ed) on access,
    in whichever process reads it (DataLoader workers). `targets`: all labels, known without
    decoding. `fingerprint()`: a cheap key for resuming (paths, sizes, mtimes, settings)."""

    kind = ""

    def __init__(self, root: Path, files: list[Path], targets: torch.Tensor, class_names: list[str],
                 settings: dict, transform: ItemTransform | None, skipped: int) -> None:
        self.root, self.files, self.targets = root, files, targets
        self.class_names, self.settings, self.transform = class_names, settings, transform
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, path: Path) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self._decode(self.files[i])
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def fingerprint(self) -> str:
        """SHA-256 of the decode settings, the transform's repr, the labels, and each file's
        relative path, size and modification time: stat calls only, no file is read."""
        h = hashlib.sha256(json.dumps({"kind": self.kind, "settings": self.settings,
                                       "transform": repr(self.transform)}, sort_keys=True).encode())
        h.update(self.targets.numpy().tobytes())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.relative_to(self.root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def relabel(self, mapping: torch.Tensor) -> _FolderData:
        """A copy whose label l becomes mapping[l] (a triggered folder's classes mapped by name)."""
        new = copy.copy(self)
        new.targets = mapping[self.targets]
        return new


#: How a lazy image folder checks its files when it lists them (`ImageFolderData(check=...)`).
IMAGE_CHECKS = ("decode", "headers", "none")
_IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def _probe(path: Path, decode: bool) -> tuple[str, tuple[int, int]] | Exception:
    """(mode, size) of one image, reading its header (and with `decode`, all its pixels, as the
    eager loader does), or the error that makes it unreadable."""
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            return im.mode, im.size
    except _IMAGE_ERRORS as exc:
        return exc


class ImageFolderData(_FolderData):
    """An ImageFolder-layout folder read lazily: the same files, labels, conversion and resizing
    as `load_image_folder`, so its items equal that TensorDataset's rows bit for bit.

    `check` says how the files are checked when listed, before any long phase:
    * "decode" (default): every image is decoded once (in `threads` threads; pixels are not
      kept), and those that cannot be read -- a bad header, or pixel data that fails to decode,
      such as a truncated file -- are skipped, logged and counted in `skipped`, exactly as the
      eager loader does: the same files, hence the same results. The colour mode (for `mode`
      None) and the one-size check (without `size`) are settled too.
    * "headers": each file's header only is opened (no pixel decoding): unreadable headers are
      skipped and counted, mode and size settled; a file whose pixels fail to decode later raises
      BadInputError naming it.
    * "none": no file is opened (for folders on network storage, where opening every file
      before the run is slow): `mode` must be given ("RGB" or "L"); without `size`, the first
      image's header gives the size every image must have, checked as each is decoded. Any file
      that cannot be decoded raises BadInputError naming it when it is read.
    A file that fails at decoding time is never skipped silently mid-run: skipping it then would
    change the positions, splits and counts of passes already made."""

    kind = "images"

    def __init__(self, path: str | os.PathLike[str], size: int | tuple[int, int] | None = None,
                 mode: str | None = "RGB", transform: ItemTransform | None = None, *,
                 check: str = "decode", threads: int | None = None) -> None:
        if check not in IMAGE_CHECKS:
            raise BadInputError(f"check must be one of {', '.join(IMAGE_CHECKS)}, not {check!r}")
        root, class_dirs, hw = _image_classes(path, size, mode)
        if check == "none" and mode is None:
            raise BadInputError(
                "mode None picks the colour mode from every image's header, but check='none' opens "
                "no file: pass mode 'RGB' or 'L' (--image-mode rgb|grey)")
        listed: list[tuple[Path, int]] = []
        for label, cdir in enumerate(class_dirs):
            found = _files_under(cdir, IMAGE_EXTENSIONS)
            if not found:
                log.warning("class folder %s holds no images; class %d will have no samples", cdir, label)
            listed += [(f, label) for f in found]
        if check == "none":
            probes: list = [None] * len(listed)
        else:
            workers = max(1, threads or min(8, os.cpu_count() or 1))
            decode = check == "decode"
            with ThreadPoolExecutor(workers) as pool:  # PIL decodes with the GIL released
                probes = list(pool.map(lambda f: _probe(f, decode), [f for f, _ in listed]))
        files: list[Path] = []
        labels: list[int] = []
        modes: set[str] = set()
        sizes: set[tuple[int, int]] = set()
        skipped = 0
        for (f, label), probe in zip(listed, probes):
            if isinstance(probe, Exception):
                log.warning("skipping unreadable image %s: %s", f, probe)
                skipped += 1
                continue
            if probe is not None:
                modes.add(probe[0])
                sizes.add(probe[1])
            files.append(f)
            labels.append(label)
        if not files:
            raise BadInputError(
                f"no readable images in {root} (skipped {skipped} unreadable files); "
                f"expected {', '.join(IMAGE_EXTENSIONS)} files in class subfolders"
            )
        if skipped:
            log.warning("skipped %d unreadable image files in %s", skipped, root)
        self.one_size: tuple[int, int] | None = None  # check="none" without `size`: (W, H) of the first
        if hw is None:
            if check == "none":
                first = _probe(files[0], decode=False)
                if isinstance(first, Exception):
                    raise BadInputError(f"{files[0]}: cannot read the image header ({first}); "
                                        "remove or replace the file")
                self.one_size = first[1]
            else:
                _one_size(root, sizes)
        self.mode, self.hw, self.check = _pick_mode(mode, modes), hw, check
        super().__init__(root, files, torch.tensor(labels, dtype=torch.long), [p.name for p in class_dirs],
                         {"mode": self.mode, "size": hw}, transform, skipped)

    def _decode(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as im:
                im.load()
                got = im.size
                a = _image_tensor(im, self.mode, self.hw)
        except _IMAGE_ERRORS as exc:
            hint = "" if self.check == "decode" else (
                "; or list the folder with check='decode' (the default), which skips unreadable "
                "files up front as the eager loader does")
            raise BadInputError(f"{path}: cannot decode the image ({exc}); remove or replace the file{hint}") from None
        if self.one_size is not None and got != self.one_size:
            (w1, h1), (w2, h2) = self.one_size, got
            raise BadInputError(
                f"{path} is {h2}x{w2} (HxW) but {self.files[0]} is {h1}x{w1}; images must have one size: "
                "pass size=(H, W) (the model's input size, --input-size) to resize them all")
        return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0).contiguous()


class WavFolderData(_FolderData):
    """A wav folder read lazily: the same files, labels, crop / pad and scaling as
    `load_wav_folder`, so its items equal that TensorDataset's rows bit for bit.

    Listing reads each file's header only: unreadable files are skipped and counted, and a file
    at another sample rate is refused by name before any long phase, as by the eager loader."""

    kind = "wavs"

    def __init__(self, path: str | os.PathLike[str], length: int = 8192, sample_rate: int = 8000,
                 transform: ItemTransform | None = None) -> None:
        root, labelled = _wav_files(path, length)
        class_names, index = _label_order({name for name, _ in labelled})
        files: list[Path] = []
        labels: list[int] = []
        skipped = 0
        for name, f in labelled:
            try:
                with wave.open(str(f), "rb") as w:
                    rate = w.getframerate()
            except (wave.Error, EOFError, ValueError, OSError) as exc:
                log.warning("skipping %s: not a readable PCM WAV (%s)", f, exc)
                skipped += 1
                continue
            if sample_rate is not None and rate != sample_rate:
                read_wav_int16(f.read_bytes(), str(f), sample_rate)  # raises the loader's own message
            files.append(f)
            labels.append(index[name])
        if not files:
            raise BadInputError(f"no readable PCM .wav files in {root} ({skipped} unreadable)")
        if skipped:
            log.warning("skipped %d unreadable wav files in %s", skipped, root)
        self.length, self.sample_rate = int(length), sample_rate
        super().__init__(root, files, torch.tensor(labels, dtype=torch.long), class_names,
                         {"length": self.length, "sample_rate": sample_rate}, transform, skipped)

    def _decode(self, path: Path) -> torch.Tensor:
        try:
            a = read_wav_int16(path.read_bytes(), str(path), self.sample_rate)
        except (WavReadError, OSError) as exc:
            raise BadInputError(f"{path}: cannot decode the wav file ({exc}); remove or replace it") from None
        return pack_waves([a], self.length)[0]


def _folder_kind(root: Path) -> str:
    has_img = has_wav = False
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            low = name.lower()
            has_img = has_img or low.endswith(IMAGE_EXTENSIONS)
            has_wav = has_wav or low.endswith(WAV_EXTENSIONS)
        if has_img and has_wav:
            raise BadInputError(f"{root} mixes images and .wav files; point to a folder holding only one kind")
    if has_img:
        return "images"
    if has_wav:
        return "wavs"
    raise BadInputError(
        f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .wav files; "
        "expected class subfolders of images, wav files, or an .npz file"
    )


_IMAGE_OPTS = ("size", "mode")
_WAV_OPTS = ("length", "sample_rate")


def load_data(path: str | os.PathLike[str], *, lazy: bool = False, transform: ItemTransform | None = None,
              check: str | None = None, **opts: Any) -> tuple[Dataset, list[str]]:
    """Load clean data from whatever `path` is: an `.npz`, a folder of images, or of wavs.

    Options that do not apply to the kind found (e.g. `length` for images) are ignored, so one
    command line can carry both; options no loader knows raise TypeError; None means "default".
    For an `.npz`, class names come from an optional `class_names` array, else "0".."K-1".
    `lazy`: a folder becomes an `ImageFolderData` / `WavFolderData` (decoded per item, with
    `transform` applied to each decoded item) instead of a TensorDataset; an `.npz` is always
    read whole (a TensorDataset; `transform` does not apply to it).
    `check`: how a lazy image folder checks its files when listing them, "decode" (default:
    unreadable files skipped and counted, as the eager loader does), "headers" or "none" (no
    file opened, for network folders): see `ImageFolderData`. Ignored where it does not apply
    (an eager folder decodes every file anyway; wav folders and `.npz` files).
    """
    if check is not None and check not in IMAGE_CHECKS:
        raise BadInputError(f"check must be one of {', '.join(IMAGE_CHECKS)}, not {check!r}")
    unknown = set(opts) - set(_IMAGE_OPTS) - set(_WAV_OPTS)
    if unknown:
        raise TypeError(f"unknown data option(s): {sorted(unknown)}")
    opts = {k: v for k, v in opts.items() if v is not None}
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".npz":
        _, arrays = _open_npz(p)
        ds = _npz_dataset(p, arrays)
        names = arrays.get("class_names")
        k = int(ds.tensors[1].max()) + 1
        if names is not None and names.ndim == 1 and len(names) >= k:
            return ds, [str(n) for n in names]
        return ds, [str(i) for i in range(k)]
    if p.is_dir():
        if _folder_kind(p) == "images":
            image_opts = {k: opts[k] for k in _IMAGE_OPTS if k in opts}
            if lazy:
                ds = ImageFolderData(p, transform=transform, check=check or "decode", **image_opts)
                return ds, list(ds.class_names)
            return load_image_folder(p, **image_opts)
        wav_opts = {k: opts[k] for k in _WAV_OPTS if k in opts}
        if lazy:
            ds = WavFolderData(p, transform=transform, **wav_opts)
            return ds, list(ds.class_names)
        return load_wav_folder(p, **wav_opts)
    if not p.exists():
        raise BadInputError(f"{p} does not exist; pass an .npz file or a folder of images or wav files")
    raise BadInputError(f"{p} is not an .npz file or a folder; save the data with np.savez(path, x=..., y=...)")
