"""The output folder: refuse to overwrite someone's results unless asked, and leave no stale files."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import BadInputError

#: Fine-tuning checkpoint inside --out while a run is under way (deleted when the run completes);
#: hidden, and ignored by the "folder not empty" check so that `--resume` can find it.
CHECKPOINT_NAME = ".fineprune-finetune.ckpt"
#: The sweep's checkpoint when its features do not fit --max-cache-mb (same life cycle).
SWEEP_CHECKPOINT_NAME = ".fineprune-sweep.ckpt"
_CHECKPOINTS = (CHECKPOINT_NAME, SWEEP_CHECKPOINT_NAME)

OUTPUT_FILES = ("model.safetensors", "model.json", "metrics.json", "sweep.csv", "pruning_curve.png",
                "report.html", "model-compact.safetensors", "model-masked.torchscript.pt", "model.onnx",
                "model-compact.onnx")


def is_checkpoint_file(p: Path) -> bool:
    """A checkpoint, or a temporary file of one that a kill interrupted mid-write."""
    return (p.name in _CHECKPOINTS or p.name.startswith(CHECKPOINT_NAME + ".retry")  # a gentler fine-tuning's
            or (p.name.endswith(".tmp") and any(p.name.startswith("." + c) for c in _CHECKPOINTS)))


def check_out_dir(path: str | os.PathLike[str], force: bool, resume: bool = True) -> Path:
    """Refuse a file, or a non-empty folder without `force`, or (with `resume` False) a folder
    holding a killed run's checkpoint without `force`: starting over silently would throw that
    run away. Creates nothing (a run refused later, e.g. for an unsafe model file, leaves no trace)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise BadInputError(f"`out` {out} is a file, not a folder; choose a folder for the results")
    if out.is_dir() and not force:
        if any(not is_checkpoint_file(p) for p in out.iterdir()):
            raise BadInputError(f"`out` {out} exists and is not empty; choose a new folder, or pass `force` "
                                "to overwrite fineprune's files in it")
        if not resume and any(is_checkpoint_file(p) for p in out.iterdir()):
            refuse_interrupted(out)
    return out


def refuse_interrupted(out: Path) -> None:
    """`out` holds an interrupted run's checkpoint and neither --resume nor --force was given:
    starting over silently would throw away the work that run already paid for."""
    raise BadInputError(f"`out` {out} holds the checkpoint of an interrupted run; pass `resume` to "
                        "continue it, or `force` (or another `out` folder) to start over")


def prepare_out_dir(path: str | os.PathLike[str], force: bool, resume: bool = True) -> Path:
    """Check (as `check_out_dir`) and create the folder."""
    out = check_out_dir(path, force, resume)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create `out` {out}: {exc.strerror or exc}") from None
    return out


def remove_stale(out: Path, written: Iterable[Path]) -> list[str]:
    """After a --force run, delete fineprune outputs a previous run left that this one did not
    write (e.g. an old compact export), so the folder never mixes two runs. Returns their names."""
    keep = {Path(p).name for p in written}
    removed = []
    for name in OUTPUT_FILES:
        f = out / name
        if name not in keep and f.is_file():
            f.unlink()
            removed.append(name)
    return removed
