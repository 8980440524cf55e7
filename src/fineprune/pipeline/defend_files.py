"""Defend a model given as files: load safely, check, run the defense, export, write everything.

This is `fineprune defend` without the argument parsing. Order matters for the user: the output
folder and the model file are checked first (the model file is untrusted and refused before any
other work if it needs unpickling), the data next, and a near-chance clean accuracy is reported
before the long phases start.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..data import stream
from ..data.splits import holdout
from ..defense.api import LR_FACTORS, DefenseResult, RunOptions, defend, parse_lr_factors
from ..defense.bake import BakeResult, TraceResult, bake_masks, trace_masked
from ..defense.compact import CompactResult, compact_model
from ..errors import BadInputError
from ..evaluation.metrics import TriggeredSet, accuracy
from ..io.model_files import load_weights
from ..io.onnx_export import OnnxExport, export_onnx
from ..precision import DEFAULT_PRECISION, check_precision
from ..progress import Progress, as_progress
from ..purify.registry import default, resolve
from ..runtime import pick_device, seed_everything
from .inputs import DataInput, Preprocessing, TaskSource, load_input, load_triggered, relabel_by_name
from .job import METHOD_FIELDS, DefendJob
from .model_input import build_model, check_outputs, first_conv_channels
from .outdir import (
    CHECKPOINT_NAME,
    SWEEP_CHECKPOINT_NAME,
    check_out_dir,
    is_checkpoint_file,
    prepare_out_dir,
    remove_stale,
)
from .outputs import TORCHSCRIPT_NAME, write_outputs
from .provenance import versions
from .record import COMPACT_ONNX_NAME, ONNX_NAME, RunRecord, model_json
from .sanity import accuracy_warnings, chance_level, check_labels, check_val_classes

PHASES = 6
ONNX_CHECK_SAMPLES = 256  # validation inputs an ONNX export is checked on (onnxruntime vs PyTorch)


@dataclass
class DefendFilesResult:
    """The defense's result, the compact export (None when not attempted), the model.json
    content, the warnings raised, the files written, and whether model.safetensors is defended
    under plain loading (`plain`) or a TorchScript file was written instead (`torchscript`)."""

    out: Path
    defense: DefenseResult
    compact: CompactResult | None
    record: dict
    warnings: list[str]
    files: list[Path]
    plain: BakeResult | None = None
    torchscript: TraceResult | None = None


def _same_shape(a: DataInput, b: DataInput) -> None:
    sa, sb = stream.sample_shape(a.dataset), stream.sample_shape(b.dataset)
    if sa != sb:
        raise BadInputError(f"{b.source} has inputs of shape {sb} but {a.source} has {sa}; give both "
                            "in the same layout (or pass `input_size` H W to resize images)")


def _split(job: DefendJob, clean: DataInput, val: DataInput | None) -> tuple[object, object, dict]:
    n = len(clean.dataset)
    if val is not None:
        train_ds, val_ds = (clean.dataset if job.method != "prune" else None), val.dataset
        desc = f"{n} samples fine-tune, {len(val.dataset)} validate (`val`)" if train_ds is not None \
            else f"{len(val.dataset)} samples validate (`val`); pruning needs no fine-tuning data"
        frac = None
    elif job.method == "prune":
        train_ds, val_ds, frac = None, clean.dataset, None
        desc = f"all {n} samples validate (pruning needs no fine-tuning data)"
    else:
        frac = job.val_fraction
        train_ds, val_ds = holdout(clean.dataset, frac, job.seed, groups=clean.groups)
        desc = (f"{n} samples: {len(train_ds)} fine-tune, {len(val_ds)} validate "
                f"(seeded stratified {100 * frac:.0f}% hold-out{' by group' if clean.groups is not None else ''}, "
                f"seed {job.seed})")
    if len(val_ds) == 0 or (train_ds is not None and len(train_ds) == 0):
        raise BadInputError(f"{clean.source}: too few samples ({n}) to hold out a validation part; "
                            "give more clean data or a separate `val` set")
    return train_ds, val_ds, {"description": desc, "val_fraction": frac, "val_samples": len(val_ds),
                              "train_samples": 0 if train_ds is None else len(train_ds)}


def defend_files(job: DefendJob, *, progress: bool | Progress = False) -> DefendFilesResult:
    """Run `job` end to end and write its outputs; raises BadInputError for unusable inputs.

    `progress` (a `Progress`, or True for stderr) gets a bar (with time left) for each long phase
    and one line per phase and each warning.
    """
    progress = as_progress(progress)
    say = progress.log
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    job.validate()
    check_out_dir(job.out, job.force, bool(job.resume))
    seed_everything(job.seed)
    device = pick_device(job.device)
    if job.method != "prune":  # an unusable precision is refused before any work
        check_precision(job.precision, device, resolve("recipe", job.recipe))

    say(f"[1/{PHASES}] reading the model file {job.model}")
    loaded = load_weights(job.model)  # refuses unsafe pickles before anything else happens
    expected_channels = first_conv_channels(job.arch, loaded)

    say(f"[2/{PHASES}] loading the data")
    t0 = time.perf_counter()
    image_mode = job.image_mode or {1: "grey", 3: "rgb"}.get(expected_channels or 0)
    prep = Preprocessing(job.mean, job.std, job.input_size, job.audio_length, job.sample_rate, image_mode,
                         image_check=job.image_check)
    tasks = TaskSource(str(job.data_root) if job.data_root else None, job.seed)
    clean = load_input(job.data, prep, "clean", tasks)
    classes = clean.class_names
    val = relabel_by_name(load_input(job.val, prep, "validation", tasks), classes) if job.val else None
    labels = [stream.labels_of(d.dataset) for d in (clean, val) if d is not None]
    top = max(int(y.max()) for y in labels) + 1
    num_classes = int(job.num_classes) if job.num_classes else max(len(classes), top)
    nc_from = "`num_classes`" if job.num_classes else "the clean data's classes"
    triggered, trig_in, target = (load_triggered(job.triggered, job.target, prep, classes, num_classes, tasks)
                                  if job.triggered else (None, None, None))
    for d in (val, trig_in):
        if d is not None:
            _same_shape(clean, d)
    for d in (clean, val, trig_in):
        if d is not None:
            check_labels(stream.labels_of(d.dataset), num_classes, d.source)
    if triggered is not None:
        check_labels(triggered.y_target, num_classes, f"{job.triggered} (targets)")
    x_clean = stream.take(clean.dataset, 2)  # examples: shapes, checks, tracing (not the whole set)
    in_channels = int(x_clean.shape[1])
    model = build_model(job.arch, num_classes, in_channels, loaded, expected_channels)
    check_outputs(model, x_clean, num_classes)
    train_ds, val_ds, split = _split(job, clean, val)
    check_val_classes(stream.labels_of(val_ds), (val or clean).source)
    timings["load"] = time.perf_counter() - t0

    say(f"[3/{PHASES}] checking the model on the clean data")
    t0 = time.perf_counter()
    acc0 = accuracy(model, val_ds, device, job.workers or 0)
    y_val = stream.labels_of(val_ds)
    warnings = accuracy_warnings(acc0, y_val, job.threshold)
    if job.method == "fine-tune" and job.layer:
        warnings.append("`layer` is ignored by `method` fine-tune (nothing is pruned)")
    ignored = {"prune": (("recipe", "precision"), "nothing is fine-tuned"),
               "fine-tune": (("criterion", "stop_rule"), "nothing is pruned")}.get(job.method, ((), ""))
    defaults = {"precision": DEFAULT_PRECISION, **{f: default(f).spec() for f in METHOD_FIELDS}}
    for option in ignored[0]:
        if getattr(job, option) != defaults[option]:
            warnings.append(f"`{option}` {getattr(job, option)} is ignored by `method` {job.method} ({ignored[1]})")
    for w in warnings:
        say(f"warning: {w}")
    say(f"    clean accuracy before the defense: {100 * acc0:.1f}% on {len(y_val)} validation samples")
    timings["check"] = time.perf_counter() - t0

    say(f"[4/{PHASES}] running {job.method} on {device}")
    options = RunOptions(device=device, seed=job.seed, progress=progress, resume=bool(job.resume),
                         max_cache_mb=job.max_cache_mb, workers=job.workers or 0,
                         checkpoint_path=None if job.method == "prune" else Path(job.out).expanduser() / CHECKPOINT_NAME,
                         sweep_checkpoint_path=None if job.method == "fine-tune"
                         else Path(job.out).expanduser() / SWEEP_CHECKPOINT_NAME)
    result = defend(model, train_ds, val_ds, job.method, triggered=triggered, layer=job.layer,
                    threshold=job.threshold, finetune=job.finetune_config(), recipe=job.recipe,
                    criterion=job.criterion, stop_rule=job.stop_rule, run=options, tolerance=job.tolerance,
                    scan=None if job.no_scan else job.scan, select=job.select,
                    lr_factors=parse_lr_factors(job.lr_factors) if job.lr_factors else LR_FACTORS)
    timings.update(result.timings)
    timings["defense"] = result.seconds
    for w in result.warnings:
        say(f"warning: {w}")
    warnings += result.warnings

    compact = None
    if job.compact and result.method != "fine-tune":
        say(f"[5/{PHASES}] compact export (removing the pruned channels)")
        compact = compact_model(result.model, result.layer, x_clean[:1],
                                real_inputs=stream.take(val_ds, 16), seed=job.seed)
        timings["compact"] = compact.seconds
        say(f"    {'exported' if compact.exported else 'skipped'}: {compact.note}")
    else:
        say(f"[5/{PHASES}] compact export: not applicable")
    plain, traced = _plain_load(result, x_clean, stream.take(val_ds, 16), triggered, job.seed, timings)
    if result.layer is not None:
        if plain.baked:
            say(f"    plain loading: model.safetensors is defended without fineprune too ({plain.note})")
        else:
            say(f"warning: model.safetensors is NOT defended when loaded without fineprune "
                f"(plain load_state_dict brings the pruned channels back): {plain.note}. "
                f"Safe: fineprune's load_pruned, "
                + (f"{TORCHSCRIPT_NAME} (mask inside)" if traced is not None and traced.exported
                   else f"no TorchScript file ({traced.note if traced is not None else 'not attempted'})")
                + (", model-compact.safetensors" if compact is not None and compact.exported else ""))

    onnx = _onnx_exports(result, plain, compact, stream.take(val_ds, ONNX_CHECK_SAMPLES), timings) \
        if job.export == "onnx" else {}
    for name, exp in onnx.items():
        if exp.exported:
            say(f"    {name}: {exp.note}")
        else:
            warnings.append(f"{name} was not written: {exp.note}")
            say(f"warning: {warnings[-1]}")

    out = prepare_out_dir(job.out, job.force)
    say(f"[6/{PHASES}] writing {out}")
    inputs = {"clean": clean.describe()}
    if val is not None:
        inputs["val"] = val.describe()
    if trig_in is not None:
        inputs["triggered"] = {**trig_in.describe(), "samples_used": len(triggered)}
    timings["total"] = time.perf_counter() - t_start
    run = RunRecord(
        job=job, result=result, compact=compact,
        model_file={"path": str(job.model), "sha256": loaded.sha256, "format": loaded.format},
        num_classes=num_classes, num_classes_from=nc_from, in_channels=in_channels,
        input_shape=list(x_clean.shape[1:]), inputs=inputs, target=target, class_names=classes,
        split=split, preprocessing=prep.to_dict(), sanity={"clean_acc_before": round(acc0, 6), "chance": round(chance_level(y_val), 6)},
        device=str(device), created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        versions=versions(), command=job.command_line(), warnings=warnings, timings=timings,
        plain=plain, torchscript=traced, onnx=onnx,
        examples=(stream.take(val_ds, 64).cpu(), y_val[:64].cpu()) if result.scans else None)
    files = write_outputs(out, run)
    for f in out.iterdir():  # the run is complete: nothing left to resume
        if is_checkpoint_file(f):
            f.unlink(missing_ok=True)
    if job.force:
        remove_stale(out, files)
    return DefendFilesResult(out=out, defense=result, compact=compact, record=model_json(run),
                             warnings=warnings, files=files, plain=plain, torchscript=traced)


def _onnx_exports(result: DefenseResult, plain: BakeResult, compact: CompactResult | None,
                  x_val: torch.Tensor, timings: dict[str, float]) -> dict[str, OnnxExport]:
    """model.onnx: the model model.safetensors holds (the baked copy where baking was exact; the
    masks are inside the graph either way); model-compact.onnx: the compact model, where one was
    exported. Each is checked with onnxruntime on the validation inputs."""
    models = {ONNX_NAME: plain.model if plain.baked and plain.model is not None else result.model}
    if compact is not None and compact.exported and compact.model is not None:
        models[COMPACT_ONNX_NAME] = compact.model
    out = {name: export_onnx(model, x_val) for name, model in models.items()}
    timings["onnx"] = sum(e.seconds for e in out.values())
    return out


def _plain_load(result: DefenseResult, x_clean: torch.Tensor, x_val: torch.Tensor,
                triggered: TriggeredSet | None, seed: int,
                timings: dict[str, float]) -> tuple[BakeResult, TraceResult | None]:
    """Bake the masks into the weights where that is exact (checked on random, clean and
    triggered inputs); where it is not, trace the masked model to TorchScript instead."""
    real = [x_val[:16]] + ([stream.take(triggered.x, 16)] if triggered is not None and len(triggered) else [])
    real_inputs = torch.cat([r.detach().cpu().float() for r in real])
    plain = bake_masks(result.model, x_clean[:1], real_inputs=real_inputs, seed=seed)
    timings["bake"] = plain.seconds
    traced = None
    if not plain.baked:
        traced = trace_masked(result.model, x_clean[:1], real_inputs=real_inputs, seed=seed)
        timings["torchscript"] = traced.seconds
    return plain, traced
