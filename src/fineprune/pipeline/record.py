"""Everything known about one defense run, and the machine-readable files made from it
(model.json, metrics.json, sweep.csv)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from ..defense.api import DefenseResult
from ..defense.bake import BakeResult, TraceResult
from ..defense.compact import CompactResult
from ..defense.decision import decision_of
from ..defense.sweep import SweepCurve
from ..evaluation.metrics import Metrics
from ..io.onnx_export import OnnxExport
from .job import DefendJob

#: The masked model as TorchScript, written when model.safetensors cannot carry the pruning in
#: its plain weights (see defense/bake.py).
TORCHSCRIPT_NAME = "model-masked.torchscript.pt"
#: `export` onnx: the model of model.safetensors, and the compact one where it was exported.
ONNX_NAME, COMPACT_ONNX_NAME = "model.onnx", "model-compact.onnx"


@dataclass
class RunRecord:
    job: DefendJob
    result: DefenseResult
    compact: CompactResult | None
    model_file: dict
    num_classes: int
    num_classes_from: str
    in_channels: int
    input_shape: list[int]
    inputs: dict[str, dict]
    target: int | None
    class_names: list[str]
    split: dict
    sanity: dict
    preprocessing: dict
    device: str
    created: str
    versions: dict
    command: str
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    plain: BakeResult | None = None  # the masks baked into model.safetensors' weights, or why not
    torchscript: TraceResult | None = None  # the masked model traced, when they could not be baked
    onnx: dict[str, OnnxExport] = field(default_factory=dict)  # file name -> export (`export` onnx)
    # A few clean validation inputs and their labels: the scans' triggers are drawn applied to them.
    examples: tuple | None = None

    @property
    def plain_load_is_defended(self) -> bool:
        """Whether model.safetensors loaded with plain `load_state_dict` is the defended model."""
        return self.plain is not None and self.plain.baked

    def load_snippets(self) -> dict[str, str]:
        """Python that loads the outputs (the architecture is built exactly as for this run)."""
        build = f"build_arch({self.job.arch!r}, {self.num_classes}, in_channels={self.in_channels})"
        with_fineprune = ("from fineprune.io.arch import build_arch\n"
                          "from fineprune.defense.persist import load_pruned\n"
                          f"model = load_pruned({build}, 'model.safetensors')  # masks re-applied")
        if self.plain_load_is_defended:
            pruned = bool(self.result.pruned_channels)
            out = {"model.safetensors": (
                ("# the pruning is baked into the weights: plain PyTorch loading gives the defended model\n"
                 if pruned else "")
                + "import safetensors.torch\n"
                "from fineprune.io.arch import build_arch  # or build the same architecture yourself\n"
                f"model = {build}\n"
                "model.load_state_dict(safetensors.torch.load_file('model.safetensors'))\n"
                + ("# or, to fine-tune further with the pruned channels held at zero (masks re-applied):\n"
                   "from fineprune.defense.persist import load_pruned\n"
                   f"model = load_pruned({build}, 'model.safetensors')" if pruned else ""))}
        else:
            out = {"model.safetensors": (
                "# NOT defended under plain load_state_dict (the pruned channels come back):\n"
                "# load it with fineprune, which re-applies the masks\n" + with_fineprune)}
        if self.torchscript is not None and self.torchscript.exported:
            out[TORCHSCRIPT_NAME] = (
                "import torch  # no fineprune needed; the mask is inside. torch.jit.load runs the archive's\n"
                "# code: load only a file you wrote (this one), never one you received\n"
                f"model = torch.jit.load({TORCHSCRIPT_NAME!r})  # eval mode, CPU; .to(device) works")
        if self.compact is not None and self.compact.exported:
            out["model-compact.safetensors"] = (
                "from fineprune.io.arch import build_arch\n"
                "from fineprune.defense.compact import load_compact\n"
                f"model = load_compact({build}, 'model-compact.safetensors')  # cut replayed, then weights")
        for name, exp in self.onnx.items():
            if exp.exported:
                out[name] = ("import onnxruntime as ort  # no fineprune or torch needed; the pruning is inside\n"
                             f"session = ort.InferenceSession({name!r})\n"
                             "# x: float32 numpy array (N, *input_shape), preprocessed as for this run\n"
                             "logits = session.run(['logits'], {'input': x})[0]")
        return out


def metrics_dict(m: Metrics) -> dict[str, float]:
    """clean_acc, plus asr and robust_acc when they were measured."""
    return {k: round(v, 6) for k, v in m.to_dict().items() if v is not None}


def metrics_json(run: RunRecord) -> dict:
    return {"before": metrics_dict(run.result.before), "after": metrics_dict(run.result.after)}


def model_json(run: RunRecord) -> dict:
    r, job = run.result, run.job
    hist = r.finetune
    decision = decision_of(r)
    return {
        "fineprune": run.versions.get("fineprune"),
        "created": run.created,
        "method": r.method,
        # What the defense decided, read off its result (never the configuration), with the one
        # sentence the report's headline and the terminal's summary both say (defense/decision.py).
        "decision": decision.to_dict(),
        # Trigger-free backdoor evidence: the scan of the received model and of the defended one.
        "scan": {when: s.to_json() for when, s in r.scans.items()} or None,
        "layer": r.layer,
        "layer_reason": r.layer_reason,
        "num_channels": r.num_channels,
        "pruned_channels": sorted(r.pruned_channels),
        "pruning_order": list(r.pruned_channels),
        "pruned_count": len(r.pruned_channels),
        "threshold_points": r.threshold,
        "fractions": {"pruned": r.pruned_fraction,
                      "validation_holdout": run.split.get("val_fraction")},
        "metrics": {**metrics_json(run), "measured_on": {
            "clean": f"validation part ({run.split['val_samples']} samples; it also chose the stop "
                     "point and the fine-tuning epoch)",
            "triggered": (f"triggered set ({run.inputs['triggered']['samples_used']} inputs whose true "
                          "label is not the target; it chose nothing)") if "triggered" in run.inputs else None}},
        "sanity": run.sanity,
        "sweep": None if r.sweep is None else {
            "mode": r.sweep.mode, "stop_k": r.stop_k, "seconds": round(r.sweep.seconds, 3),
            **{k: r.sweep.extra[k] for k in ("streamed_samples", "cache_mb") if k in r.sweep.extra},
            "max_cache_mb": job.max_cache_mb,
            # the full resolved specs (name and every option) the defense used
            "criterion": r.methods.get("criterion"), "stop_rule": r.methods.get("stop_rule")},
        "finetune": None if hist is None else {
            "config": r.finetune_config.to_dict(),  # as run: a recipe may set its own optimizer and lr
            "recipe": r.methods.get("recipe"),
            "precision": job.precision,  # the sweep and all evaluation run in fp32 regardless
            "best_epoch": hist.best_epoch,
            "lr": decision.lr,  # the rate kept (the guard may retry gentler); None when it kept no run
            "discarded": hist.attempts,  # runs the accuracy guard discarded: lr, best_val_acc, diverged
            "epochs": [vars(e) for e in hist.epochs]},
        "compact": None if run.compact is None else run.compact.to_dict(),
        "plain_load_is_defended": run.plain_load_is_defended,
        "plain_load": None if run.plain is None else run.plain.to_dict(),
        "torchscript": None if run.torchscript is None else {
            **run.torchscript.to_dict(), "file": TORCHSCRIPT_NAME if run.torchscript.exported else None},
        "onnx": None if job.export != "onnx" else {
            name: {**exp.to_dict(), "file": name if exp.exported else None} for name, exp in run.onnx.items()},
        "model": {**run.model_file, "arch": job.arch, "num_classes": run.num_classes,
                  "num_classes_from": run.num_classes_from, "input_shape": run.input_shape},
        "data": run.inputs,
        "target": run.target,
        "target_name": run.class_names[run.target] if run.target is not None
        and run.target < len(run.class_names) else None,
        "class_names": run.class_names,
        "split": run.split,
        "preprocessing": run.preprocessing,
        "seed": job.seed,
        "device": run.device,
        "versions": run.versions,
        "command": run.command,
        "warnings": run.warnings,
        "timings_seconds": {k: round(v, 3) for k, v in run.timings.items()},
        "how_to_load": run.load_snippets(),
    }


def sweep_csv(curve: SweepCurve, stop_k: int | None) -> str:
    """One row per number of pruned channels k = 0..C (the channel pruned at step k, its means,
    and the metrics with the first k pruned)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["k", "fraction_pruned", "channel", "channel_mean_clean", "channel_mean_triggered",
                "clean_acc", "asr", "robust_acc", "chosen"])
    asr, robust = curve.asr, curve.robust_acc
    for k in range(curve.num_channels + 1):
        ch = curve.order[k - 1] if k else None
        w.writerow([
            k, f"{k / curve.num_channels:.6f}", "" if ch is None else ch,
            "" if ch is None else f"{curve.channel_means[ch]:.6g}",
            "" if ch is None or curve.triggered_means is None else f"{curve.triggered_means[ch]:.6g}",
            f"{curve.clean_acc[k]:.6f}", "" if asr is None else f"{asr[k]:.6f}",
            "" if robust is None else f"{robust[k]:.6f}", "1" if k == stop_k else "",
        ])
    return buf.getvalue()
