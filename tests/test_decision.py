"""Every statement of a run's outcome comes from the recorded decision (issue 25; issue 20: the
learning rate shown is the one the accuracy guard kept). On every path through the guard (kept at
the first rate, kept at a later one, all discarded) and for each method, the report's headline,
the terminal's summary (or --quiet's one-line verdict) and model.json's `decision` say the same,
and --quiet drops the progress only: the warnings and the verdict still reach stderr."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fineprune.cli import main
from fineprune.defense.api import DefenseResult
from fineprune.defense.decision import decision_of, headline
from fineprune.errors import as_flags
from fineprune.evaluation.metrics import Metrics
from fineprune.models.registry import demo_cnn
from fineprune.training import TrainConfig, TrainHistory, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes, each a bright square in its own quadrant over faint noise (28x28, grey)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.2 * torch.rand(n, 1, 28, 28, generator=g)
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, 14 * r + 3:14 * r + 11, 14 * c + 3:14 * c + 11] += 0.7
    return (x.clamp(0, 1) * 255).round() / 255, y


@pytest.fixture(scope="module")
def received(tmp_path_factory) -> Path:
    """A demo-cnn that gets the 4-class task right, and 100 clean images (20 validate)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("decision")
    torch.manual_seed(0)
    model = demo_cnn(num_classes=4)
    train(model, TensorDataset(*_images(200, 0)),
          TrainConfig(epochs=2, lr=1e-3, optimizer="adam", weight_decay=0.0, schedule="constant"),
          device=torch.device("cpu"), seed=0)
    save_file(model.state_dict(), root / "model.safetensors")
    x, y = _images(100, 1)
    np.savez(root / "clean.npz", x=(x * 255).round().to(torch.uint8).numpy(), y=y.numpy())
    return root


# lr 50 wrecks the network (the guard discards it); 50 * 2e-6 = 1e-4 barely moves it (kept).
GENTLE, WRECK, LATER = ["--lr", "0.0001"], ["--lr", "50", "--lr-factors", "1"], ["--lr", "50", "--lr-factors", "1,0.000002"]
# name: method, flags, the guard's outcome, the rate kept, the rates discarded, run with --quiet
CASES = {
    "fine-tune, kept at the first rate": ("fine-tune", GENTLE, "kept", 1e-4, [], False),
    "fine-tune, kept at a later rate": ("fine-tune", LATER, "kept", 1e-4, [50], True),
    "fine-tune, all discarded": ("fine-tune", WRECK, "discarded", None, [50], False),
    "fine-prune, kept at the first rate": ("fine-prune", GENTLE, "kept", 1e-4, [], True),
    "fine-prune, kept at a later rate": ("fine-prune", LATER, "kept", 1e-4, [50], False),
    "fine-prune, all discarded": ("fine-prune", WRECK, "discarded", None, [50], True),  # issue 25's run
    "prune": ("prune", [], None, None, [], False),
}


def _defend(received: Path, out: Path, method: str, *flags: str) -> int:
    return main(["defend", "--model", str(received / "model.safetensors"), "--arch", "demo-cnn",
                 "--data", str(received / "clean.npz"), "--method", method, "--epochs", "1", "--no-compact",
                 "--out", str(out), *flags])


@pytest.mark.parametrize("case", CASES)
def test_headline_summary_and_model_json_say_the_recorded_decision(received, tmp_path, capsys, case):
    method, flags, status, kept_lr, discarded, quiet = CASES[case]
    out = tmp_path / "out"
    rc = _defend(received, out, method, *flags, *(["--quiet"] if quiet else []))
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    info = json.loads((out / "model.json").read_text())
    d, head = info["decision"], info["decision"]["headline"]

    # model.json: the decision is the recorded one, and agrees with the rest of the record.
    assert (d["method"], d["layer"], d["finetune"]) == (method, info["layer"], status)
    assert d["pruned"] == info["pruned_count"] and d["num_channels"] == info["num_channels"]
    assert [a["lr"] for a in d["discarded"]] == discarded
    if method == "prune":
        assert info["finetune"] is None and d["lr"] is None and d["epoch"] is None
    else:
        ft = info["finetune"]
        assert ft["discarded"] == d["discarded"] and ft["lr"] == d["lr"] and ft["best_epoch"] == (d["epoch"] or 0)
        assert ft["config"]["lr"] == float(flags[1])  # configured; never what the sentences say was kept
    if kept_lr is not None:
        assert d["lr"] == pytest.approx(kept_lr) and d["epoch"] >= 1
    else:
        assert d["lr"] is None and d["epoch"] is None

    # The sentence: what happened, never what was configured.
    pruned = f"Pruned {d['pruned']} of {d['num_channels']} channels of {d['layer']}"
    assert (method != "fine-tune") == head.startswith(pruned)
    assert "at lr 50" not in head and "kept lr 50" not in head
    if status == "kept":
        assert f"at lr {kept_lr:g} (epoch {d['epoch']} kept)" in head
        assert head.startswith(f"{pruned}, then fine-tuned" if method == "fine-prune" else "Fine-tuned all weights")
    elif status == "discarded":
        assert "fine-tuned at" not in head.lower() and "discarded fine-tuning at every learning rate tried" in head
        assert head.endswith("so the output is the pruned model, not fine-tuned." if method == "fine-prune"
                             else "so the output is the original model, unchanged.")
    else:
        assert head == f"{pruned}."
    assert ("lr 50 (" in head) == bool(discarded) and ("discarded" in head) == bool(discarded)

    # report.html opens with the same sentence; its fine-tuning row shows the rate kept.
    page = (out / "report.html").read_text(encoding="utf-8")
    verdict = html.unescape(re.search(r"<section class='verdict'>(.*?)</section>", page, re.DOTALL).group(1))
    assert verdict.startswith(head)
    row = html.unescape(re.search(r"fine-tuning</span><span>(.*?)</span>", page).group(1)) if status else None
    if status == "kept":
        assert f"kept lr {kept_lr:g} (epoch {d['epoch']})" in row and ", lr 50," not in row
    elif status == "discarded":
        assert "discarded by the accuracy guard at every learning rate tried, lr 50 (" in row and "kept" not in row

    # The terminal: the summary (stdout) or, with --quiet, every warning and the verdict (stderr).
    before, after = info["metrics"]["before"]["clean_acc"], info["metrics"]["after"]["clean_acc"]
    if quiet:
        assert stdout == ""
        *warned, last = stderr.strip().splitlines()
        assert last.startswith(f"fineprune: {method}: {head} Clean accuracy {100 * before:.1f}% -> "
                               f"{100 * after:.1f}%")
        assert warned == [f"warning: {as_flags(w)}" for w in info["warnings"]]  # all, and no progress
    else:
        assert f"\n{method}: {head}\n" in stdout
        assert all(f"warning: {as_flags(w)}" in stderr for w in info["warnings"])
    if status is not None and discarded:  # the guard's own warning is among them
        key = "fine-tuning discarded" if status == "discarded" else "fine-tuning retried gentler"
        assert any(key in w for w in info["warnings"]) and f"warning: {key}" in stderr


def test_silent_prints_nothing_but_errors(received, tmp_path, capsys):
    out = tmp_path / "out"
    assert _defend(received, out, "fine-tune", *WRECK, "--silent") == 0
    assert capsys.readouterr() == ("", "")
    info = json.loads((out / "model.json").read_text())
    assert info["decision"]["finetune"] == "discarded"
    assert any("fine-tuning discarded" in w for w in info["warnings"])  # kept in the record
    assert _defend(received, tmp_path / "bad", "fine-tune", "--lr-factors", "0", "--silent") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fineprune: error:") and "--lr-factors" in err and "\n" not in err


def _result(method: str, pruned: int, hist: TrainHistory | None) -> DefenseResult:
    return DefenseResult(method=method, model=nn.Identity(), layer=None if method == "fine-tune" else "f",
                         num_channels=0 if method == "fine-tune" else 8, pruned_channels=list(range(pruned)),
                         threshold=4.0, before=Metrics(0.9, 0.95), after=Metrics(0.9, 0.05), finetune=hist)


def test_headline_when_nothing_was_pruned_or_every_rate_diverged():
    """The sentences for the paths the files above do not reach: no channel pruned, and runs that
    diverged (a non-finite loss)."""
    assert headline(_result("prune", 0, None)) == "Pruned 0 of 8 channels of f. The output is the original model, unchanged."
    kept = TrainHistory(best_epoch=3, lr=0.005, attempts=[{"lr": 0.05, "best_val_acc": 0.1, "diverged": True}])
    assert headline(_result("fine-prune", 0, kept)) == (
        "Pruned 0 of 8 channels of f, then fine-tuned at lr 0.005 (epoch 3 kept) after the accuracy guard "
        "discarded lr 0.05 (diverged). The output is the fine-tuned model.")
    # All discarded: the history's lr is the last rate tried, which was not kept.
    gone = TrainHistory(best_epoch=0, lr=0.005, attempts=[{"lr": 0.05, "best_val_acc": 0.1, "diverged": True},
                                                          {"lr": 0.005, "best_val_acc": 0.4, "diverged": False}])
    d = decision_of(_result("fine-tune", 0, gone))
    assert (d.finetune, d.lr, d.epoch, d.output) == ("discarded", None, None, "the original model, unchanged")
    assert headline(d) == (
        "The accuracy guard discarded fine-tuning at every learning rate tried, lr 0.05 (diverged) and lr 0.005 "
        "(best epoch 40.0% on validation data), so the output is the original model, unchanged.")
