"""The defender's data files, loaded and preprocessed the way the model expects.

Loading itself is `fineprune.data.generic` (ImageFolder, .npz, wav folders); this module adds what
a defense run needs on top: resizing and normalisation from the command line, built-in task
splits (`task:NAME`), labels of a triggered folder mapped onto the clean data's classes by name,
and the attack's target given as an index or a class name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..data.generic import load_data
from ..data.types import make_dataset, tensors
from ..errors import BadInputError
from ..evaluation.metrics import TriggeredSet
from .provenance import sha256_path

TASK_PREFIX = "task:"


@dataclass
class Preprocessing:
    """Applied to every input set alike: resize (images), then (x - mean) / std per channel."""

    mean: list[float] | None = None
    std: list[float] | None = None
    input_size: tuple[int, int] | None = None
    audio_length: int | None = None
    sample_rate: int | None = None

    def apply(self, x: torch.Tensor, source: str) -> torch.Tensor:
        if self.input_size is not None:
            if x.dim() != 4:
                raise BadInputError(f"{source}: --input-size applies to images (N,C,H,W) but this data "
                                    f"has shape {tuple(x.shape)}; leave it out")
            if tuple(x.shape[-2:]) != tuple(self.input_size):
                x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False,
                                  antialias=True)
        if self.mean is not None and self.std is not None:
            c = x.shape[1]
            if len(self.mean) not in (1, c):
                raise BadInputError(f"{source}: the inputs have {c} channels but --mean/--std give "
                                    f"{len(self.mean)} values; give 1 or {c}")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
            std = torch.tensor(self.std, dtype=x.dtype).view(shape)
            x = (x - mean) / std
        return x

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std,
                "input_size": list(self.input_size) if self.input_size else None,
                "audio_length": self.audio_length, "sample_rate": self.sample_rate}


@dataclass
class DataInput:
    """One loaded input set and where it came from."""

    dataset: TensorDataset
    class_names: list[str]
    source: str
    sha256: str | None
    from_folder: bool = False
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        x, y = tensors(self.dataset)
        return {"path": self.source, "sha256": self.sha256, "samples": int(y.shape[0]),
                "input_shape": list(x.shape[1:]), **self.info}


def _load_task(name: str) -> tuple[TensorDataset, list[str], dict]:
    """A built-in task's validation split (the defender's clean data for that task)."""
    try:
        tasks = importlib.import_module("fineprune.tasks")
    except ImportError:
        raise BadInputError(f"built-in tasks are not available in this installation; pass a data "
                            f"file or folder instead of {TASK_PREFIX}{name}") from None
    loader = getattr(tasks, "load_task", None) or getattr(tasks, "get_task", None)
    if loader is None:
        raise BadInputError(f"fineprune.tasks offers no load_task(); pass a data file instead of "
                            f"{TASK_PREFIX}{name}")
    try:
        task = loader(name)
    except (KeyError, ValueError) as exc:
        raise BadInputError(f"unknown built-in task {name!r} ({exc})") from None
    data = getattr(task, "data", task)
    if callable(data):
        data = data()
    val = getattr(data, "val", None)
    if val is None:
        raise BadInputError(f"built-in task {name!r} has no validation split to use as clean data")
    names = list(getattr(data, "class_names", []) or [])
    return val, names, {"task": name}


def load_input(spec: str | Path, prep: Preprocessing, role: str) -> DataInput:
    """Load `spec` (an .npz, an image or wav folder, or `task:NAME`) and preprocess it."""
    text = str(spec)
    if text.startswith(TASK_PREFIX):
        ds, names, info = _load_task(text[len(TASK_PREFIX):])
        sha, folder = None, False
    else:
        path = Path(text).expanduser()
        opts = {"size": prep.input_size, "length": prep.audio_length, "sample_rate": prep.sample_rate}
        try:
            ds, names = load_data(path, **opts)
        except BadInputError as exc:
            raise BadInputError(f"{role} data: {exc}") from None
        sha, folder, info = sha256_path(path), path.is_dir(), {}
        skipped = getattr(ds, "skipped", 0)
        if skipped:
            info["skipped_unreadable_files"] = int(skipped)
    x, y = tensors(ds)
    x = prep.apply(x, f"{role} data {text}")
    return DataInput(make_dataset(x, y), list(names), text, sha, folder, info)


def relabel_by_name(data: DataInput, classes: list[str]) -> DataInput:
    """Map a folder's labels (its own sorted subfolder names) onto `classes`, by name, so a
    triggered folder that lacks the target's subfolder still gets the right label indices."""
    if not data.from_folder or not classes or data.class_names == classes:
        return data
    index = {name: i for i, name in enumerate(classes)}
    unknown = [n for n in data.class_names if n not in index]
    if unknown:
        raise BadInputError(f"{data.source}: class folder(s) {unknown[:5]} are not classes of the clean "
                            f"data ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    x, y = tensors(data.dataset)
    mapping = torch.tensor([index[n] for n in data.class_names], dtype=torch.long)
    return DataInput(make_dataset(x, mapping[y]), list(classes), data.source, data.sha256,
                     data.from_folder, data.info)


def resolve_target(target: int | str, classes: list[str], num_classes: int) -> int:
    """The attack's target as a label index: an integer, or a class name that is not a number.
    A number that also names a class at another index (folders "0", "1", "10", "2" sort as text)
    is refused as ambiguous rather than guessed."""
    text = str(target).strip()
    if not text.lstrip("-").isdigit():
        if text in classes:
            return classes.index(text)
        raise BadInputError(f"--target {target!r} is neither a label index nor a class name "
                            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    t = int(text)
    if text in classes and classes.index(text) != t:
        raise BadInputError(f"--target {t} is ambiguous: class {text!r} has label index "
                            f"{classes.index(text)}; pass the index you mean "
                            "(classes are indexed in sorted folder-name order)")
    if not 0 <= t < num_classes:
        raise BadInputError(f"--target {t} is not a label of a {num_classes}-class model (0..{num_classes - 1})")
    return t


def triggered_set(data: DataInput, target: int) -> TriggeredSet:
    """Triggered inputs with their true labels; inputs already labelled `target` are dropped
    (their 'attack success' would be the model's clean skill)."""
    x, y = tensors(data.dataset)
    trig = TriggeredSet(x, y, torch.full_like(y, target))
    if len(trig) == 0:
        raise BadInputError(f"{data.source}: every triggered input is labelled {target} (the target); "
                            "label triggered inputs with their true class")
    return trig
