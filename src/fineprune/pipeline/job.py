"""What `fineprune defend` was asked to do, checked once, in one dataclass.

Every option the command line or a config file can set is a field here, so the CLI is a thin
parser and a Python caller gets the same validation and the same recorded command line.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..defense.api import DEFAULT_FINETUNE, METHODS, format_lr_factors, parse_lr_factors
from ..errors import BadInputError
from ..precision import DEFAULT_PRECISION, PRECISIONS
from ..purify.registry import canonical, default, load_plugins
from ..purify.stop_rules import DEFAULT_THRESHOLD, check_threshold
from ..training import TrainConfig
from .inputs import task_ref

#: The method families a job names by spec (`purify.registry`), as its fields.
METHOD_FIELDS = ("recipe", "criterion", "stop_rule")
#: Whether `defend` scans for backdoor evidence before and after the defense when neither `scan`
#: nor `no_scan` is given. On: a result must never hide evidence that a backdoor remains (issue 21);
#: the test suite turns it off for the runs that are not about scanning (tests/conftest.py).
SCAN_BY_DEFAULT = True
#: The exit code of `fineprune defend --fail-on-evidence` when the scan still flags a class after
#: the defense (0: done; 1: unexpected error; 2: bad input).
EXIT_EVIDENCE = 3
#: What `export` can write besides the safetensors files.
EXPORTS = ("onnx",)


@dataclass
class DefendJob:
    """Inputs and options of one defense run (paths may be str or Path).

    `data` is a file/folder of clean data (or `task:NAME` for a built-in task's validation
    split, read from `data_root`, default $FINEPRUNE_DATA); unless `val` is given, a seeded
    stratified `val_fraction` of it is held out to choose the stop point and the fine-tuning
    epoch. `triggered` + `target` only measure the attack (`triggered="task:NAME"`: the task's
    own attack on its test split, no target needed).
    """

    model: str | Path
    arch: str
    data: str | Path
    out: str | Path
    num_classes: int | None = None
    val: str | Path | None = None
    triggered: str | Path | None = None
    target: int | str | None = None
    layer: str | None = None
    method: str = "fine-prune"
    threshold: float = DEFAULT_THRESHOLD
    mean: list[float] | None = None
    std: list[float] | None = None
    input_size: tuple[int, int] | None = None
    audio_length: int | None = None
    sample_rate: int | None = None
    image_mode: str | None = None
    image_check: str = "decode"  # how image folders are checked when listed (data.generic.IMAGE_CHECKS)
    data_root: str | Path | None = None
    val_fraction: float = 0.2
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    # Method specs, NAME[,key=value...] (`fineprune.purify`); None: the family's default. `validate`
    # makes each the canonical spec text.
    recipe: str | None = None  # how fine-tuning trains
    criterion: str | None = None  # the pruning order
    stop_rule: str | None = None  # how many channels the sweep's order prunes
    tolerance: float | None = None  # the fine-tuning accuracy guard's tolerance, points (None: `threshold`)
    lr_factors: str | None = None  # "1,0.3,0.1": fine-tuning rates tried, strongest first (None: LR_FACTORS)
    seed: int = 0
    device: str | None = None
    force: bool = False
    compact: bool = True
    resume: bool = False  # continue from the checkpoints an interrupted run left in `out`
    max_cache_mb: float | None = None  # bound on the sweep's cached features (None: keep them all)
    workers: int | None = None  # DataLoader processes decoding folder data (None: 0, the main process)
    precision: str = DEFAULT_PRECISION  # fine-tuning arithmetic: fp32, bf16 or fp16 (fineprune.precision)
    channels_last: bool = False  # fine-tune 4-D image models in channels-last memory layout
    export: str | None = None  # "onnx": also model.onnx (and model-compact.onnx), checked with onnxruntime
    plugins: list[str] | None = None  # Python files imported first (they may register methods or tasks)
    scan: str | None = None  # the backdoor scan before and after, a spec (None: the scan family's default)
    no_scan: bool = False  # skip the scans
    fail_on_evidence: bool = False  # exit EXIT_EVIDENCE when the scan still flags a class after the defense
    select: str = "evidence"  # with the scan: how fine-tuning's kept candidate is chosen (defense.api.SELECTIONS)

    def validate(self) -> "DefendJob":
        """Raise BadInputError (one line, with the fix) for any unusable option; return self."""
        for name in ("model", "arch", "data", "out"):
            if getattr(self, name) in (None, ""):
                raise BadInputError(f"`{name}` is required")
        if self.method not in METHODS:
            raise BadInputError(f"`method` must be one of {', '.join(METHODS)}, not {self.method!r}")
        for name in ("threshold", "tolerance"):
            if getattr(self, name) is None and name == "tolerance":
                continue
            try:
                setattr(self, name, check_threshold(getattr(self, name)))
            except (TypeError, ValueError) as exc:
                raise BadInputError(f"`{name}`: {exc}") from None
        if self.plugins:
            self.plugins = [str(p) for p in ([self.plugins] if isinstance(self.plugins, (str, Path)) else self.plugins)]
            load_plugins(self.plugins)
        for family in METHOD_FIELDS:
            setattr(self, family, canonical(family, getattr(self, family)))
        from ..defense.api import SELECTIONS

        if self.select not in SELECTIONS:
            raise BadInputError(f"`select` must be one of {', '.join(SELECTIONS)}, not {self.select!r}")
        if self.no_scan and self.scan is not None:
            raise BadInputError("`scan` and `no_scan` contradict each other; give one")
        if self.fail_on_evidence and self.no_scan:
            raise BadInputError("`fail_on_evidence` needs the scan; drop `no_scan`")
        if self.scan is not None or (not self.no_scan and SCAN_BY_DEFAULT) or self.fail_on_evidence:
            self.scan = canonical("scan", self.scan, what="`scan`")
        else:
            self.no_scan = True
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise BadInputError(f"`val_fraction` must lie strictly between 0 and 1, got {self.val_fraction}")
        if self.max_cache_mb is not None:
            try:
                mb = float(self.max_cache_mb)
            except (TypeError, ValueError):
                mb = float("nan")
            if not 0 < mb < float("inf"):
                raise BadInputError(f"`max_cache_mb` must be a positive number of MiB, got {self.max_cache_mb!r}")
            self.max_cache_mb = mb
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise BadInputError(f"`workers` must be a whole number >= 0, got {self.workers!r}")
        if self.num_classes is not None and int(self.num_classes) < 2:
            raise BadInputError(f"`num_classes` must be at least 2, got {self.num_classes}")
        self._check_normalisation()
        if self.input_size is not None:
            size = tuple(int(s) for s in self.input_size)
            if len(size) != 2 or min(size) < 1:
                raise BadInputError(f"`input_size` takes two positive integers H W, got {self.input_size}")
            self.input_size = size  # type: ignore[assignment]
        if self.target is not None and self.triggered is None:
            raise BadInputError("`target` needs `triggered`: a set of triggered inputs to measure "
                                "the attack on")
        if self.triggered is not None and self.target is None and task_ref(self.triggered) is None:
            raise BadInputError("`triggered` needs `target`: the label the attack sends triggered "
                                "inputs to (an index or a class name)")
        from ..data.generic import IMAGE_CHECKS

        if self.image_check not in IMAGE_CHECKS:
            raise BadInputError(f"`image_check` must be one of {', '.join(IMAGE_CHECKS)}, not {self.image_check!r}")
        if self.image_mode is not None and self.image_mode not in ("rgb", "grey"):
            raise BadInputError(f"`image_mode` must be rgb or grey, not {self.image_mode!r}")
        if self.epochs is not None and int(self.epochs) < 0:
            raise BadInputError(f"`epochs` must be >= 0, got {self.epochs}")
        if self.lr is not None and not float(self.lr) > 0:
            raise BadInputError(f"`lr` must be positive, got {self.lr}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise BadInputError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.optimizer is not None and self.optimizer not in ("sgd", "adam"):
            raise BadInputError(f"`optimizer` must be sgd or adam, not {self.optimizer!r}")
        if self.lr_factors is not None:
            self.lr_factors = format_lr_factors(parse_lr_factors(self.lr_factors))
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise BadInputError(f"`precision` must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.export is not None and self.export not in EXPORTS:
            raise BadInputError(f"`export` must be one of {', '.join(EXPORTS)}, not {self.export!r}")
        if self.export == "onnx":
            from ..io.onnx_export import require_onnx

            require_onnx()  # fail before any work, not after the defense
        return self

    def _check_normalisation(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise BadInputError("`mean` and `std` go together (one value, or one per input channel)")
        if self.mean is None:
            return
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]  # type: ignore[union-attr]
        if len(self.mean) != len(self.std) or not self.mean:
            raise BadInputError(f"`mean` has {len(self.mean)} values but `std` has {len(self.std)}; "
                                "give one per input channel (or one for all)")
        if min(self.std) <= 0:
            raise BadInputError(f"`std` values must be positive, got {self.std}")

    def finetune_config(self) -> TrainConfig:
        """The fine-tuning recipe with this job's overrides: the generic default, or a built-in
        task's own (chosen on its validation data) when the clean data is `task:NAME`."""
        base = DEFAULT_FINETUNE
        if (task := task_ref(self.data)) is not None:
            from ..tasks import TASKS

            spec = TASKS.get(task.strip().lower())
            if spec is not None and spec.finetune is not None:
                base = spec.finetune
        overrides = {k: getattr(self, k) for k in ("epochs", "lr", "batch_size", "optimizer")
                     if getattr(self, k) is not None}
        return dataclasses.replace(base, **overrides, precision=self.precision, channels_last=bool(self.channels_last))

    def command_line(self) -> str:
        """An equivalent `fineprune defend` command (every effective option spelled out; options
        added after the first runs only when they differ from their defaults, so earlier runs'
        command lines stay as they were)."""
        later = {**{f: default(f).spec() for f in (*METHOD_FIELDS, "scan")}, "precision": DEFAULT_PRECISION,
                 "channels_last": False, "image_check": "decode", "select": "evidence"}
        args = ["fineprune", "defend"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name in later and value == later[f.name]:
                continue
            if f.name == "plugins":
                for plugin in value or []:
                    args += ["--plugin", str(plugin)]
                continue
            if f.name == "compact":
                if not value:
                    args.append("--no-compact")
            elif isinstance(value, bool):
                if value:
                    args.append(flag)
            elif value is None:
                continue
            elif isinstance(value, (list, tuple)):
                args += [flag, *[str(v) for v in value]]
            else:
                args += [flag, str(value)]
        return shlex.join(args)
