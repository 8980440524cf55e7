"""What the HTML report says about a run: the words and numbers, assembled from a RunRecord."""
from __future__ import annotations

from pathlib import Path

from ..defense.decision import DISCARDED, decision_of, finetune_words, headline
from ..errors import as_flags
from ..purify.registry import paper, resolve, summary
from ..specs import format_value
from ..purify.scan.report import CAVEAT
from ..report.html import EvidenceBlock, FigureBlock, MetricRow, ReportData
from .record import TORCHSCRIPT_NAME, RunRecord

_METHOD_WORDS = {"fine-prune": "fine-pruning (prune, then fine-tune with the pruned channels held at zero)",
                 "prune": "pruning only", "fine-tune": "fine-tuning only"}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _count(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def _verdict(run: RunRecord) -> str:
    r = run.result
    b, a = r.before, r.after
    what = headline(r)  # the recorded decision, as the terminal and model.json say it
    ca = f"clean accuracy {_pct(b.clean_acc)} → {_pct(a.clean_acc)} ({100 * (a.clean_acc - b.clean_acc):+.1f} points)"
    caveat = "" if run.plain_load_is_defended else (
        " Caution: model.safetensors is defended only when loaded with fineprune (see 'Loading without "
        "fineprune').")
    if b.asr is None:
        return (f"{what} Clean accuracy went from {ca[len('clean accuracy '):]}. The attack success rate "
                "was not measured (no triggered set was given), so this report cannot show whether a "
                "backdoor was removed." + caveat)
    return f"{what} Attack success rate {_pct(b.asr)} → {_pct(a.asr)}; {ca}." + caveat


def _method_words(family: str, options: dict) -> str:
    """"spec (the paper's): what it is", from the method registry and the options the defense used."""
    method = resolve(family, options)
    mark = " (the paper's)" if method.spec() == paper(family).spec() else ""
    about = summary(type(method))
    return f"{method.spec()}{mark}: {about[:1].lower()}{about[1:]}{_every_option(method)}"


def _every_option(method) -> str:
    """The resolved options, every field included (what model.json records too)."""
    opts = {k: v for k, v in method.options().items() if k != "name"}
    return f" [{', '.join(f'{k}={format_value(v)}' for k, v in opts.items())}]" if opts else ""


def _stop_rule_words(options: dict, threshold: float) -> str:
    rule = resolve("stop_rule", options)
    return (f"{rule.spec()}: stay within {threshold:g} points of the starting validation accuracy "
            f"({summary(type(rule))}){_every_option(rule)}")


def _summary(run: RunRecord) -> list[tuple[str, str]]:
    r, job = run.result, run.job
    rows = [
        ("model file", f"{Path(str(job.model)).name} ({run.model_file['format']})"),
        ("architecture", f"{job.arch}, {run.num_classes} classes, input {tuple(run.input_shape)}"),
        ("method", _METHOD_WORDS[r.method]),
    ]
    if r.layer is not None:
        rows.append(("pruned layer", f"{r.layer} ({r.num_channels} channels)"))
        # The defense's own record of its choice (`DefenseResult.layer_reason`), not an annotation
        # read off the model: the result is what the report describes.
        if r.layer_reason:
            rows.append(("why this layer", as_flags(r.layer_reason)))
        rows += [("pruned", f"{len(r.pruned_channels)} of {r.num_channels} channels "
                            f"({100 * r.pruned_fraction:.1f}%)"),
                 ("pruning order", _method_words("criterion", r.methods["criterion"])),
                 ("stop rule", _stop_rule_words(r.methods["stop_rule"], r.threshold))]
    if r.finetune is not None:
        cfg = job.finetune_config()
        recipe = _method_words("recipe", r.methods["recipe"]).split(":")[0] + _every_option(
            resolve("recipe", r.methods["recipe"]))
        # The learning rate shown is the one the accuracy guard kept, not the configured one.
        rows.append(("fine-tuning", f"{cfg.epochs} epochs, {cfg.optimizer}, batch {cfg.batch_size}, recipe "
                                    f"{recipe}; {finetune_words(decision_of(r))}"))
    sp = run.split
    rows.append(("clean data", as_flags(sp["description"])))
    if "triggered" in run.inputs:
        n = run.inputs["triggered"]["samples_used"]
        if run.target is None:
            rows.append(("triggered set", f"{n} inputs, targets set by {run.job.triggered}'s attack"))
        else:
            name = run.class_names[run.target] if run.target < len(run.class_names) else ""
            label = f"{run.target}" + (f" ({name})" if name and name != str(run.target) else "")
            rows.append(("triggered set", f"{n} inputs, target label {label}"))
    else:
        rows.append(("triggered set", "none given: attack success not measured"))
    rows += [("device", run.device), ("time", f"{run.timings.get('total', 0.0):.1f} s")]
    return rows


def _metrics(run: RunRecord) -> tuple[list[MetricRow], str]:
    b, a = run.result.before, run.result.after
    missing = as_flags("not measured: no triggered set given (`triggered` FILE `target` T)")
    rows = [
        MetricRow("Clean accuracy", b.clean_acc, a.clean_acc, "higher",
                  help="correct predictions on clean validation inputs"),
        MetricRow("Attack success rate (ASR)", b.asr, a.asr, "lower", missing,
                  help="triggered inputs classified as the attack's target"),
        MetricRow("Robust accuracy", b.robust_acc, a.robust_acc, "higher", missing,
                  help="triggered inputs classified as their true label"),
    ]
    chose = {"fine-prune": "the stop point and the fine-tuning epoch", "prune": "the stop point",
             "fine-tune": "the fine-tuning epoch"}[run.result.method]
    note = (f"Clean accuracy is measured on the validation data ({run.split['val_samples']} samples), "
            f"which also chose {chose}, so 'after' is slightly optimistic; measure on separate test "
            "data for an unbiased number.")
    if "triggered" in run.inputs:
        note += (f" ASR and robust accuracy are measured on the triggered set "
                 f"({run.inputs['triggered']['samples_used']} inputs whose true label is not the "
                 "target), which chose nothing.")
    return rows, note


def _figures(run: RunRecord, pngs: dict[str, bytes]) -> list[FigureBlock]:
    r = run.result
    k, layer = r.stop_k, r.layer
    trig = "triggered" in run.inputs
    d = decision_of(r)
    return [
        FigureBlock(
            f"Activations of the pruned layer ({layer})" if layer else "Activations of the pruned layer",
            pngs.get("activations"),
            f"Left: mean activation of each channel of {layer} on the clean validation inputs, lowest "
            f"first (the order in which channels are pruned); the {k} pruned channels are orange. "
            + ("Purple dots: each channel's mean on triggered inputs; channels that the trigger excites "
               "but clean inputs leave quiet are what pruning is after. " if trig else
               "No triggered set was given, so the triggered activations are not shown. ")
            + "Right: histogram of the same channel means.",
            missing="No layer was pruned (method fine-tune)."),
        FigureBlock(
            "Pruning curve", pngs.get("pruning_curve"),
            "Clean validation accuracy" + (", attack success rate and robust accuracy" if trig else "")
            + " as the lowest-activation channels are pruned one at a time. Dotted: the stop rule's "
            f"floor ({run.job.threshold:g} points below the start); dashed: the stop point, the last k "
            "that stays above it. Also saved as pruning_curve.png, the numbers as sweep.csv.",
            missing="No pruning sweep (method fine-tune)."),
        FigureBlock(
            "Fine-tuning", pngs.get("finetune"),
            "Clean validation accuracy" + (" and attack success rate" if trig else "")
            + " after each fine-tuning epoch (epoch 0: the model fine-tuning started from"
            + (", i.e. after pruning" if r.method == "fine-prune" else "")
            + (f"). The accuracy guard discarded every run, so no epoch was kept: the curves are the last "
               f"run tried (lr {d.discarded[-1]['lr']:g}), and the output is the model at epoch 0 (dashed "
               "line); " if d.finetune == DISCARDED and d.discarded else
               f"). Shown: the run the accuracy guard kept (lr {d.lr:g}); its epoch with the best validation "
               "accuracy is kept (dashed line); " if d.lr is not None else
               "). The epoch with the best validation accuracy is kept (dashed line); ")
            + "grey dotted: training loss (right axis).",
            missing="No fine-tuning (method prune)."),
    ]


def _change(before: int | None, after: int | None) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before and after is not None else ""


def _compact(run: RunRecord) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]], str]:
    c = run.compact
    if c is None:
        return [], [], ("Not attempted: no channel was pruned (method fine-tune)." if run.result.method == "fine-tune"
                        else as_flags("Not attempted (compact export was turned off with `no_compact`)."))
    if not c.exported:
        return [], [("status", "skipped, no model-compact.safetensors written")], as_flags(c.note)
    kept = c.channels_before - len(c.removed)
    table = [
        (f"channels of {c.layer}", f"{c.channels_before:,}", f"{kept:,}", _change(c.channels_before, kept)),
        ("parameters", _count(c.params_before), _count(c.params_after), _change(c.params_before, c.params_after)),
        ("MACs per input", _count(c.macs_before), _count(c.macs_after), _change(c.macs_before, c.macs_after)),
    ]
    rows = [
        ("file", "model-compact.safetensors"),
        ("outputs vs the masked model", f"max |logit difference| {c.max_abs_diff:.1e} in float64, "
                                        f"{c.max_abs_diff_float32:.1e} in float32"),
        ("cut starts at", str(c.anchor)),
        ("modules reshaped", ", ".join(c.coupled_modules)),
    ]
    note = ("The pruned channels are physically removed, with every layer coupled to them "
            "(Torch-Pruning's dependency graph), and the result is checked against the masked model "
            "on random and real inputs. MACs (multiply-accumulates, about half the FLOPs) and "
            f"parameters are counted by Torch-Pruning for one input of shape {tuple(c.input_shape)}. "
            "The file records the cut in its metadata; load it with "
            "fineprune.defense.compact.load_compact (see below).")
    return table, rows, note


def _plain_load(run: RunRecord) -> tuple[bool | None, list[tuple[str, str]], str]:
    """Whether plain `load_state_dict` of model.safetensors gives the defended model, and what to
    use when it does not. Not shown when nothing was pruned."""
    p = run.plain
    if p is None or run.result.layer is None:
        return None, [], ""
    if p.baked:
        return True, [("plain load_state_dict of model.safetensors", "defended (plain_load_is_defended: true)"),
                      ("parameters zeroed", ", ".join(p.zeroed) or "none"),
                      ("check", p.note)], (
            "The pruning is baked into the weights: the pruned channels' producing parameters are zero, so "
            "the plain architecture loaded with plain PyTorch computes the defended model (checked with "
            "the hooks removed). The masks are also kept in the file's metadata, so fineprune's "
            "load_pruned re-applies them (needed to fine-tune further with the channels held at zero).")
    safe = ["fineprune's load_pruned (masks re-applied)"]
    rows = [("plain load_state_dict of model.safetensors",
             "NOT defended: the pruned channels come back (plain_load_is_defended: false)"),
            ("why", p.note)]
    t = run.torchscript
    if t is not None and t.exported:
        safe.append(f"{TORCHSCRIPT_NAME} (TorchScript, mask inside)")
        rows.append((TORCHSCRIPT_NAME, t.note))
    elif t is not None:
        rows.append(("TorchScript", f"not written: {t.note}"))
    if run.compact is not None and run.compact.exported:
        safe.append("model-compact.safetensors (channels removed)")
    rows.append(("safe to use", "; ".join(safe)))
    return False, rows, ("model.safetensors keeps the pruned channels' weights and carries the masks only "
                         "in its metadata, so loading it without fineprune gives a model that is not "
                         "defended. Use one of the outputs listed as safe (see 'Loading the results').")


def _provenance(run: RunRecord) -> list[tuple[str, str]]:
    rows = [("model file", str(run.job.model)), ("model SHA-256", run.model_file["sha256"])]
    for role, d in run.inputs.items():
        rows.append((f"{role} data", f"{d['path']} ({d['samples']} samples)"))
        if d.get("sha256"):
            rows.append((f"{role} SHA-256", d["sha256"]))
    rows += [("seed", str(run.job.seed)), ("created", run.created),
             ("versions", ", ".join(f"{k} {v}" for k, v in run.versions.items()))]
    return rows


def _evidence(run: RunRecord, pngs: dict[str, bytes]) -> list[EvidenceBlock]:
    """The scans before and after the defense (none when scanning was off)."""
    blocks = []
    for when, s in run.result.scans.items():
        rows = []
        for c in sorted(s.classes, key=lambda c: -c.anomaly_index if c.anomaly_index == c.anomaly_index else 0):
            rows.append([str(c.cls), f"{c.anomaly_index:.2f}", f"{c.kept_size:.1f}",
                         f"{100 * c.kept_size / s.mask_elements:.1f}%", f"{100 * c.success:.0f}%",
                         "flagged" if c.flagged else ""])
        pictures = {}
        for k in dict.fromkeys([*s.flagged, *s.smallest(3)]):
            parts = [(part, pngs[f"scan-{when}-class{k}-{part}"]) for part in ("mask", "pattern", "applied")
                     if f"scan-{when}-class{k}-{part}" in pngs]
            if parts:
                pictures[k] = parts
        blocks.append(EvidenceBlock(
            title=f"{'before' if when == 'before' else 'after'} the defense ({s.method}, {s.seconds:.0f} s)",
            verdict=s.verdict(), flagged=bool(s.flagged),
            columns=["class", "anomaly index", s.size_measure, "covers", "success", ""], rows=rows[:12],
            pictures=pictures, note=(f"{len(rows) - 12} more classes in model.json" if len(rows) > 12 else "")))
    return blocks


def report_data(run: RunRecord, pngs: dict[str, bytes]) -> ReportData:
    metrics, note = _metrics(run)
    compact_table, compact_rows, compact_note = _compact(run)
    plain_ok, plain_rows, plain_note = _plain_load(run)
    return ReportData(
        title=f"Fine-Pruning report: {Path(str(run.job.model)).name}",
        subtitle=f"{run.job.arch} · {run.result.method} · written {run.created} by fineprune "
                 f"{run.versions.get('fineprune', '')}",
        verdict=_verdict(run), summary=_summary(run), metrics=metrics, metrics_note=note,
        warnings=[as_flags(w) for w in run.warnings], figures=_figures(run, pngs), compact_table=compact_table, compact_rows=compact_rows,
        compact_note=compact_note, plain_load_ok=plain_ok, plain_load_rows=plain_rows,
        plain_load_note=plain_note, provenance=_provenance(run), command=run.command,
        how_to_load=[(f"load {name}", code) for name, code in run.load_snippets().items()],
        evidence=_evidence(run, pngs), evidence_note=CAVEAT if run.result.scans else "",
    )
