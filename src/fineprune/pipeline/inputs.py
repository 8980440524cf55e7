"""The defender's data files, loaded and preprocessed the way the model expects.

Loading itself is `fineprune.data.generic` (ImageFolder, .npz, wav folders); this module adds what
a defense run needs on top: resizing and normalisation from the command line, built-in task
splits (`task:NAME`), labels of a triggered folder mapped onto the clean data's classes by name,
and the attack's target given as an index or a class name.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..data import stream
from ..data.generic import load_data
from ..data.types import TaskData, make_dataset
from ..errors import BadInputError
from ..evaluation.metrics import TriggeredSet
from .provenance import sha256_path


def task_ref(spec: object) -> str | None:
    """NAME when `spec` names a built-in task's data as `task:NAME`; None for a file or folder."""
    text = str(spec)
    return text.removeprefix("task:") if text.startswith("task:") else None


@dataclass
class Preprocessing:
    """Applied to every input set alike: resize (images), then (x - mean) / std per channel."""

    mean: list[float] | None = None
    std: list[float] | None = None
    input_size: tuple[int, int] | None = None
    audio_length: int | None = None
    sample_rate: int | None = None
    image_mode: str | None = None  # "rgb" or "grey" for image folders; None: the loader's default
    # How an image folder's files are checked when listed ("decode", "headers", "none": see
    # `data.generic.ImageFolderData`). Not in the repr: a lazy folder's fingerprint holds the
    # transform's repr, and the check changes no item (the file list, which it may change, is keyed).
    image_check: str = field(default="decode", repr=False)

    def apply(self, x: torch.Tensor, source: str) -> torch.Tensor:
        if self.input_size is not None:
            if x.dim() != 4:
                raise BadInputError(f"{source}: `input_size` applies to images (N,C,H,W) but this data "
                                    f"has shape {tuple(x.shape)}; leave it out")
            if tuple(x.shape[-2:]) != tuple(self.input_size):
                x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False,
                                  antialias=True)
        if self.mean is not None and self.std is not None:
            c = x.shape[1]
            if len(self.mean) not in (1, c):
                raise BadInputError(f"{source}: the inputs have {c} channels but `mean`/`std` give "
                                    f"{len(self.mean)} values; give 1 or {c}")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
            std = torch.tensor(self.std, dtype=x.dtype).view(shape)
            x = (x - mean) / std
        return x

    def per_item(self, source: str) -> ItemPreprocessing:
        """This preprocessing as a lazy dataset's per-item transform."""
        return ItemPreprocessing(self, source)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std,
                "input_size": list(self.input_size) if self.input_size else None,
                "audio_length": self.audio_length, "sample_rate": self.sample_rate,
                "image_mode": self.image_mode}


@dataclass
class ItemPreprocessing:
    """`Preprocessing.apply` on one decoded item (a batch of one: the same arithmetic per sample as
    on a whole TensorDataset, so lazy and eager inputs are equal bit for bit). A dataclass, so it
    pickles into DataLoader workers and its repr (without `source`) keys a lazy folder's
    fingerprint."""

    prep: Preprocessing
    source: str = field(default="", repr=False, compare=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.prep.apply(x[None], self.source)[0]


@dataclass
class DataInput:
    """One loaded input set and where it came from. `dataset`: a TensorDataset (.npz, task:NAME)
    or a lazy folder dataset (decoded and preprocessed per item, see `data.generic`)."""

    dataset: Dataset
    class_names: list[str]
    source: str
    sha256: str | None
    from_folder: bool = False
    info: dict = field(default_factory=dict)
    groups: torch.Tensor | None = None  # near-duplicate groups (task:traffic tracks): hold out whole groups

    def describe(self) -> dict:
        return {"path": self.source, "sha256": self.sha256, "samples": len(self.dataset),
                "input_shape": list(stream.sample_shape(self.dataset)), **self.info}


class TaskSource:
    """Built-in tasks (`task:NAME`), each loaded once per run: the validation split is clean
    data, and the task's own attack on its test split is a triggered set."""

    def __init__(self, data_root: str | None, seed: int) -> None:
        self.data_root = data_root or os.environ.get("FINEPRUNE_DATA") or ""
        self.seed = seed
        self._loaded: dict[str, tuple[object, TaskData]] = {}

    def get(self, name: str) -> tuple[object, TaskData]:
        if name not in self._loaded:
            try:
                tasks = importlib.import_module("fineprune.tasks")
            except ImportError:
                raise BadInputError(f"built-in tasks are not available in this installation; pass a "
                                    f"data file or folder instead of task:{name}") from None
            spec = tasks.get_task(name)
            self._loaded[name] = (spec, spec.load(self.data_root, seed=self.seed))
        return self._loaded[name]

    def clean(self, name: str) -> tuple[TensorDataset, list[str], dict, torch.Tensor | None]:
        _, data = self.get(name)
        info = {"task": name, "split": "val", "seed": self.seed}
        return data.val, list(data.class_names) or [str(i) for i in range(data.num_classes)], info, data.val_groups

    def triggered(self, name: str) -> tuple[TriggeredSet, dict]:
        spec, data = self.get(name)
        attack = spec.make_attack(seed=self.seed, data=data)
        info = {"task": name, "split": "test", "seed": self.seed, "attack": attack.describe()}
        return attack.triggered(data.test), info


def load_input(spec: str | Path, prep: Preprocessing, role: str, tasks: TaskSource) -> DataInput:
    """Load `spec` (an .npz, an image or wav folder, or `task:NAME`) and preprocess it. A folder
    is read lazily (files listed now, each decoded and preprocessed when read, in DataLoader
    workers); its first item is decoded here, so a preprocessing mistake fails now, not mid-run."""
    text, task = str(spec), task_ref(spec)
    if task is not None:
        ds, names, info, groups = tasks.clean(task)
        sha, folder = None, False
    else:
        path = Path(text).expanduser()
        mode = {"rgb": "RGB", "grey": "L"}.get(prep.image_mode or "")
        opts = {"size": prep.input_size, "mode": mode, "length": prep.audio_length,
                "sample_rate": prep.sample_rate}
        lazy = path.is_dir()
        try:
            ds, names = load_data(path, lazy=lazy, transform=prep.per_item(f"{role} data {text}") if lazy else None,
                                  check=prep.image_check, **opts)
            if lazy:
                stream.sample_shape(ds)  # decode and preprocess one item now: errors before the long phases
        except BadInputError as exc:
            raise BadInputError(f"{role} data: {exc}") from None
        sha, folder, info, groups = sha256_path(path), path.is_dir(), {}, None
        skipped = getattr(ds, "skipped", 0)
        if skipped:
            info["skipped_unreadable_files"] = int(skipped)
        if lazy:
            return DataInput(ds, list(names), text, sha, folder, info, groups)
    x, y = ds.tensors
    x = prep.apply(x, f"{role} data {text}")
    return DataInput(make_dataset(x, y), list(names), text, sha, folder, info, groups)


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
    mapping = torch.tensor([index[n] for n in data.class_names], dtype=torch.long)
    if isinstance(data.dataset, TensorDataset):
        x, y = data.dataset.tensors
        ds: Dataset = make_dataset(x, mapping[y])
    else:
        ds = data.dataset.relabel(mapping)  # a lazy folder: its labels, not its files, change
    return DataInput(ds, list(classes), data.source, data.sha256, data.from_folder, data.info)


def resolve_target(target: int | str, classes: list[str], num_classes: int) -> int:
    """The attack's target as a label index: an integer, or a class name that is not a number.
    A number that also names a class at another index (folders "0", "1", "10", "2" sort as text)
    is refused as ambiguous rather than guessed."""
    text = str(target).strip()
    if not text.lstrip("-").isdigit():
        if text in classes:
            return classes.index(text)
        raise BadInputError(f"`target` {target!r} is neither a label index nor a class name "
                            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    t = int(text)
    if text in classes and classes.index(text) != t:
        raise BadInputError(f"`target` {t} is ambiguous: class {text!r} has label index "
                            f"{classes.index(text)}; pass the index you mean "
                            "(classes are indexed in sorted folder-name order)")
    if not 0 <= t < num_classes:
        raise BadInputError(f"`target` {t} is not a label of a {num_classes}-class model (0..{num_classes - 1})")
    return t


def load_triggered(spec: str | Path, target: int | str | None, prep: Preprocessing,
                   classes: list[str], num_classes: int, tasks: TaskSource
                   ) -> tuple[TriggeredSet, DataInput, int | None]:
    """The triggered set and its description; the target is resolved against the clean classes.

    From a file or folder, every input gets `target` as the attack's label (inputs already
    labelled `target` are dropped: their 'attack success' would be the model's clean skill).
    `task:NAME` applies the task's own attack to its test split (its policy gives the targets)."""
    text, task = str(spec), task_ref(spec)
    if task is not None:
        trig, info = tasks.triggered(task)
        trig.x = prep.apply(trig.x, f"triggered data {text}")
        desc = DataInput(make_dataset(trig.x, trig.y_true), classes, text, None, False, info)
        targets = torch.unique(trig.y_target).tolist()
        return trig, desc, int(targets[0]) if len(targets) == 1 else None
    if target is None:
        raise BadInputError("`triggered` needs `target`: the label the attack sends triggered inputs to")
    data = relabel_by_name(load_input(spec, prep, "triggered", tasks), classes)
    t = resolve_target(target, classes, num_classes)
    y = stream.labels_of(data.dataset)
    x = data.dataset.tensors[0] if isinstance(data.dataset, TensorDataset) else data.dataset
    trig = TriggeredSet(x, y, torch.full_like(y, t))
    if len(trig) == 0:
        raise BadInputError(f"{data.source}: every triggered input is labelled {t} (the target); "
                            "label triggered inputs with their true class")
    return trig, data, t
