"""What a defense decided, and the one sentence that says it.

Every human-readable statement of a run's outcome is built here from the recorded result (a
`DefenseResult`), never from the configuration: the report's headline, the terminal's summary and
its one-line verdict, and `decision` in model.json all call `decision_of` and `headline`. The
configured learning rate is what was asked for, not what happened: the accuracy guard may retry
gentler rates (`TrainHistory.attempts`, the runs it discarded; `TrainHistory.lr`, the rate of the
run it kept) or keep none, and then the output is the model from before fine-tuning.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..evaluation.metrics import Metrics
from .api import DefenseResult

KEPT, DISCARDED = "kept", "discarded"


@dataclass(frozen=True)
class Decision:
    """The defense's decision: how many channels of which layer it pruned; whether the accuracy
    guard kept a fine-tuning run (`finetune`: "kept", "discarded" when it discarded every run, None
    when nothing was fine-tuned), at which learning rate (`lr`) and epoch (`epoch`, the best of that
    run), and the runs it discarded (`discarded`: each {"lr", "best_val_acc", "diverged"})."""

    method: str
    layer: str | None
    num_channels: int
    pruned: int
    finetune: str | None
    lr: float | None
    epoch: int | None
    discarded: tuple[dict, ...]
    # The backdoor scans (None: not scanned): the classes flagged before and after the defense,
    # and the after-scan's one-line verdict.
    scan: str | None = None
    flagged_before: tuple[int, ...] | None = None
    flagged_after: tuple[int, ...] | None = None
    evidence: str | None = None
    selection: str = ""  # why fine-tuning's candidate was kept, when the scan took part in choosing

    @property
    def evidence_remains(self) -> bool:
        """The scan of the defended model still flags a class."""
        return bool(self.flagged_after)

    @property
    def output(self) -> str:
        """Which model the written output is, in words."""
        pruned, tuned = self.pruned > 0, self.finetune == KEPT
        if pruned and tuned:
            return "the pruned and fine-tuned model"
        if tuned:
            return "the fine-tuned model"
        if pruned:
            return "the pruned model, not fine-tuned" if self.finetune == DISCARDED else "the pruned model"
        return "the original model, unchanged"

    def to_dict(self) -> dict:
        """For model.json: the fields, `output` and the `headline` sentence."""
        return {**asdict(self), "discarded": [dict(a) for a in self.discarded], "output": self.output,
                "evidence_remains": self.evidence_remains if self.scan else None, "headline": headline(self)}


def decision_of(result: DefenseResult) -> Decision:
    """The decision recorded in `result` (its pruned channels and fine-tuning history)."""
    hist = result.finetune
    status = lr = epoch = None
    discarded: tuple[dict, ...] = ()
    if hist is not None:
        discarded = tuple(dict(a) for a in hist.attempts)
        # A kept run's best epoch is 1 or later; epoch 0 is the model before fine-tuning, which the
        # guard returns when it discarded every run (then `hist.lr` is the last rate tried, not kept).
        if hist.best_epoch:
            status, lr, epoch = KEPT, hist.lr, hist.best_epoch
        else:
            status = DISCARDED
    scans = getattr(result, "scans", None) or {}
    before, after = scans.get("before"), scans.get("after")
    return Decision(method=result.method, layer=result.layer, num_channels=result.num_channels,
                    pruned=len(result.pruned_channels), finetune=status, lr=lr, epoch=epoch,
                    discarded=discarded, scan=after.method if after is not None else None,
                    flagged_before=tuple(before.flagged) if before is not None else None,
                    flagged_after=tuple(after.flagged) if after is not None else None,
                    evidence=after.verdict() if after is not None else None,
                    selection=getattr(hist, "selection", "") if hist is not None else "")


def _run_words(attempt: dict) -> str:
    lr = f"lr {attempt['lr']:g}"
    if attempt.get("diverged"):
        return f"{lr} (diverged)"
    if attempt.get("reason") == "evidence":
        return (f"{lr} (best epoch {100 * attempt['best_val_acc']:.1f}% on validation data, within the tolerance, "
                f"but the scan still flags class {', '.join(map(str, attempt.get('evidence', [])))})")
    return f"{lr} (best epoch {100 * attempt['best_val_acc']:.1f}% on validation data)"


def discarded_words(d: Decision) -> str:
    """The discarded runs, e.g. "lr 0.05 (diverged) and lr 0.005 (best epoch 41.0% on validation data)"."""
    runs = [_run_words(a) for a in d.discarded]
    return runs[0] if len(runs) == 1 else ", ".join(runs[:-1]) + " and " + runs[-1]


def finetune_words(d: Decision) -> str:
    """What happened to fine-tuning, e.g. "kept lr 0.005 (epoch 7) after the accuracy guard discarded
    lr 0.05 (diverged)"; "" when nothing was fine-tuned."""
    if d.finetune == KEPT:
        words = f"kept lr {d.lr:g} (epoch {d.epoch})"
        return words + (f" after the accuracy guard discarded {discarded_words(d)}" if d.discarded else "")
    if d.finetune == DISCARDED:
        return f"discarded by the accuracy guard at every learning rate tried, {discarded_words(d)}"
    return ""


def evidence_words(d: Decision) -> str:
    """What the scans say, one sentence ("" when not scanned). Evidence left after the defense
    comes first and plainly: a result must never hide it."""
    if d.scan is None:
        return ""
    before = (f"classes {', '.join(map(str, d.flagged_before))}" if d.flagged_before and len(d.flagged_before) > 1
              else f"class {d.flagged_before[0]}" if d.flagged_before else "")
    if d.evidence_remains:
        return (f"Backdoor evidence remains after the defense ({d.scan}): {d.evidence.removeprefix('backdoor evidence: ')}."
                + (f" Before it, the scan flagged {before}." if before else " The scan flagged nothing before it."))
    if before:
        return (f"{d.scan} flagged {before} before the defense and nothing after it; that is not proof the "
                "backdoor is gone (the scan misses some kinds of backdoor).")
    return (f"{d.scan} found no backdoor evidence before or after the defense; that does not show the model "
            "is clean (it misses blended triggers, all-to-all attacks and physical triggers).")


def headline(d: Decision | DefenseResult) -> str:
    """The decision as one sentence (two with the scans' evidence): the report's headline, the
    terminal summary's first line, model.json's `decision.headline`."""
    if isinstance(d, DefenseResult):
        d = decision_of(d)
    text = _action(d)
    evidence = evidence_words(d)
    return f"{text} {evidence}" if evidence else text


def _action(d: Decision) -> str:
    """What the defense did to the model, from the recorded decision."""
    pruned = f"Pruned {d.pruned} of {d.num_channels} channels of {d.layer}" if d.layer is not None else ""
    if d.finetune is None:  # prune
        return f"{pruned}." + (f" The output is {d.output}." if not d.pruned else "")
    if d.finetune == KEPT:
        tuned = (f"then fine-tuned at lr {d.lr:g} (epoch {d.epoch} kept)" if pruned
                 else f"Fine-tuned all weights on the clean data at lr {d.lr:g} (epoch {d.epoch} kept)")
        if d.discarded:
            tuned += f" after {_not_kept(d)} {discarded_words(d)}"
        return (f"{pruned}, {tuned}." if pruned else f"{tuned}.") + \
            (f" The output is {d.output}." if pruned and not d.pruned else "")
    gone = f"{_not_kept(d)} fine-tuning at every learning rate tried, {discarded_words(d)}"
    if pruned:
        return f"{pruned}; {gone}, so the output is {d.output}."
    return f"{gone[0].upper()}{gone[1:]}, so the output is {d.output}."


def _not_kept(d: Decision) -> str:
    """Who set the runs aside: the accuracy guard alone, or with the scan's evidence."""
    if any(a.get("reason") == "evidence" for a in d.discarded):
        return "the accuracy guard and the backdoor scan set aside"
    return "the accuracy guard discarded"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def outcome(before: Metrics, after: Metrics) -> str:
    """The measured change, one sentence: clean accuracy, and attack success rate when measured."""
    words = (f"Clean accuracy {_pct(before.clean_acc)} -> {_pct(after.clean_acc)} "
             f"({100 * (after.clean_acc - before.clean_acc):+.1f} points)")
    if before.asr is None or after.asr is None:
        return words + "; attack success rate not measured (no triggered set)."
    return words + f"; attack success rate {_pct(before.asr)} -> {_pct(after.asr)}."

