"""Write a run's files into the output folder, each one atomically."""
from __future__ import annotations

from pathlib import Path

from ..defense.bake import save_torchscript
from ..defense.compact import save_compact
from ..defense.persist import save_pruned
from ..io.onnx_export import save_onnx
from ..report.html import write_report
from ..report.plots import activation_figure, figure_png, finetune_figure, pruning_curve_figure, save_png
from ..runtime import atomic_path, write_json_atomic, write_text_atomic
from .record import TORCHSCRIPT_NAME, RunRecord, metrics_json, model_json, sweep_csv
from .report_data import report_data


def _weights_metadata(run: RunRecord) -> dict[str, str]:
    return {"fineprune.version": str(run.versions.get("fineprune")), "fineprune.arch": run.job.arch,
            "fineprune.num_classes": str(run.num_classes), "fineprune.method": run.result.method,
            "fineprune.source_sha256": run.model_file["sha256"],
            "fineprune.plain_load_is_defended": "true" if run.plain_load_is_defended else "false"}


def _scan_pictures(run: RunRecord, out: Path, written: list[Path]) -> dict[str, bytes]:
    """The scans' reversed triggers (flagged classes and the 3 smallest) as PNG files,
    scan-{before,after}-class{k}-{mask,pattern,applied}.png; returns them by file stem."""
    from ..purify.scan.report import example_for, pictured_classes, trigger_pngs

    pngs: dict[str, bytes] = {}
    if not run.result.scans or run.examples is None:
        return pngs
    x, y = run.examples
    for when, result in run.result.scans.items():
        for k in pictured_classes(result):
            for part, data in (trigger_pngs(result, k, example_for(k, x, y)) or {}).items():
                stem = f"scan-{when}-class{k}-{part}"
                with atomic_path(out / f"{stem}.png") as tmp:
                    tmp.write_bytes(data)
                written.append(out / f"{stem}.png")
                pngs[stem] = data
    return pngs


def _figures(run: RunRecord, out: Path, written: list[Path]) -> dict[str, bytes]:
    r, pngs = run.result, {}
    if r.sweep is not None:
        k = r.stop_k or 0
        pngs["activations"] = figure_png(activation_figure(r.sweep, k))
        fig = pruning_curve_figure(r.sweep, k, title=f"Pruning {r.layer} (validation data)",
                                   threshold=r.threshold)
        pngs["pruning_curve"] = save_png(fig, out / "pruning_curve.png")
        written.append(out / "pruning_curve.png")
    if r.finetune is not None and r.finetune.epochs:
        if r.sweep is not None:
            k = r.stop_k or 0
            start = (r.sweep.clean_acc[k], r.sweep.asr[k] if r.sweep.asr is not None else None)
        else:
            start = (r.before.clean_acc, r.before.asr)
        pngs["finetune"] = figure_png(finetune_figure(r.finetune, *start))
    return pngs


def write_outputs(out: Path, run: RunRecord) -> list[Path]:
    """model.safetensors, model.json, metrics.json, sweep.csv, pruning_curve.png, report.html,
    model-compact.safetensors when the cut was exact, model-masked.torchscript.pt when the
    masks could not be baked into model.safetensors' weights, and model.onnx / model-compact.onnx
    when ONNX was asked for and the export passed its check. Returns the paths written."""
    written: list[Path] = []
    # The baked copy where baking was exact (plain loading then computes the defended model);
    # either way the masks travel in the metadata too, for fineprune's own loader.
    baked = run.plain.model if run.plain is not None and run.plain.baked and run.plain.model is not None \
        else run.result.model
    save_pruned(baked, out / "model.safetensors", _weights_metadata(run))
    written.append(out / "model.safetensors")
    if run.torchscript is not None and run.torchscript.exported:
        save_torchscript(run.torchscript, out / TORCHSCRIPT_NAME)
        written.append(out / TORCHSCRIPT_NAME)
    if run.compact is not None and run.compact.exported:
        save_compact(run.compact, out / "model-compact.safetensors", _weights_metadata(run))
        written.append(out / "model-compact.safetensors")
    for name, exp in run.onnx.items():
        if exp.exported:
            save_onnx(exp, out / name)
            written.append(out / name)
    if run.result.sweep is not None:
        write_text_atomic(out / "sweep.csv", sweep_csv(run.result.sweep, run.result.stop_k))
        written.append(out / "sweep.csv")
    pngs = _figures(run, out, written)
    pngs.update(_scan_pictures(run, out, written))
    write_json_atomic(out / "metrics.json", metrics_json(run))
    write_json_atomic(out / "model.json", model_json(run))
    write_report(report_data(run, pngs), out / "report.html")
    written += [out / "metrics.json", out / "model.json", out / "report.html"]
    return written
