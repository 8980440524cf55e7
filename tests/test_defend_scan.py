"""`fineprune defend` with the backdoor scan before and after: model.json records both scans, the
report shows the verdicts, tables and reversed triggers, the headline and the terminal say plainly
when evidence remains, and --fail-on-evidence turns that into exit status 3. The planted model is
test_scan's: a tiny CNN on synthetic 16x16 inputs with a 3x3 patch backdoor (target 3)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import on_sys_path
from test_scan import TARGET, TRIGGER, synthetic, train_planted

from fineprune import defend
from fineprune.attack.badnets import BadNets
from fineprune.attack.policy import AllToOne
from fineprune.cli import main
from fineprune.io.saving import save_weights
from fineprune.pipeline.job import EXIT_EVIDENCE
from fineprune.training import TrainConfig

FAST_SCAN = "neural-cleanse,steps=100,samples=100"
FACTORY = "from test_scan import tiny_cnn\n\ndef make(num_classes=10, in_channels=1):\n    return tiny_cnn()\n"


@pytest.fixture(scope="module")
def planted(one_thread, tmp_path_factory):
    model, attack = train_planted()
    root = tmp_path_factory.mktemp("defend-scan")
    save_weights(model.state_dict(), root / "model.safetensors")
    x, y = synthetic(300, 3).tensors
    np.savez(root / "clean.npz", x=x.numpy(), y=y.numpy())
    trig = attack.triggered(synthetic(200, 2))
    np.savez(root / "trig.npz", x=trig.x.numpy(), y=trig.y_true.numpy())
    (root / "scan_nets.py").write_text(FACTORY)
    with on_sys_path(root, "scan_nets"):
        yield model, root


def _defend(root, out, *extra) -> int:
    return main(["defend", "--model", str(root / "model.safetensors"), "--arch", "scan_nets:make",
                 "--data", str(root / "clean.npz"), "--triggered", str(root / "trig.npz"), "--target", str(TARGET),
                 "--no-compact", "--out", str(out), *map(str, extra)])


def test_prune_that_leaves_the_backdoor_says_so_and_fails_on_evidence(planted, tmp_path, capsys):
    """Pruning nothing (threshold 0) leaves the backdoor: the scan flags the target before and
    after, the headline and the terminal say evidence remains, and --fail-on-evidence exits 3."""
    _, root = planted
    out = tmp_path / "out"
    rc = _defend(root, out, "--method", "prune", "--threshold", "0", "--scan", FAST_SCAN, "--fail-on-evidence")
    captured = capsys.readouterr()
    assert rc == EXIT_EVIDENCE, captured.err[-3000:]
    info = json.loads((out / "model.json").read_text())
    assert TARGET in info["scan"]["before"]["flagged"] and TARGET in info["scan"]["after"]["flagged"]
    assert info["scan"]["after"]["method"]["name"] == "neural-cleanse" and info["scan"]["after"]["method"]["steps"] == 100
    decision = info["decision"]
    assert decision["evidence_remains"] is True and decision["flagged_after"] == info["scan"]["after"]["flagged"]
    assert "Backdoor evidence remains after the defense" in decision["headline"]
    assert f"class {TARGET}" in decision["headline"]
    assert "Backdoor evidence remains after the defense" in captured.out  # the summary's first line
    line = next(ln for ln in captured.out.splitlines() if ln.strip().startswith("backdoor evidence"))
    assert f"class {TARGET}" in line and " -> " in line, line
    assert "WARNING: backdoor evidence" in captured.out, captured.out
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Backdoor evidence (trigger-free scan)" in html and "data:image/png;base64" in html
    assert html.count("backdoor evidence: class") >= 2  # both verdicts
    for when in ("before", "after"):
        for part in ("mask", "pattern", "applied"):
            assert (out / f"scan-{when}-class{TARGET}-{part}.png").stat().st_size > 100
    assert "--scan" in info["command"] and "--fail-on-evidence" in info["command"]


def test_without_fail_on_evidence_the_exit_is_0_and_quiet_still_says_it(planted, tmp_path, capsys):
    _, root = planted
    rc = _defend(root, tmp_path / "out", "--method", "prune", "--threshold", "0", "--scan", FAST_SCAN, "--quiet")
    err = capsys.readouterr().err
    assert rc == 0
    assert "Backdoor evidence remains after the defense" in err.splitlines()[-1]


def test_no_scan_and_the_api_switch(planted, tmp_path):
    model, root = planted
    out = tmp_path / "out"
    assert _defend(root, out, "--method", "prune", "--no-scan") == 0
    info = json.loads((out / "model.json").read_text())
    assert info["scan"] is None and info["decision"]["evidence_remains"] is None
    assert not list(out.glob("scan-*.png"))
    assert _defend(root, tmp_path / "bad", "--no-scan", "--fail-on-evidence") == 2  # contradictory
    # The Python API has the same switch: defend(scan=...), off unless asked for.
    x, y = synthetic(300, 3).tensors
    val = torch.utils.data.TensorDataset(x, y)
    assert defend(model, None, val, "prune", threshold=0).scans == {}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    res = defend(model, None, val, "prune", threshold=0, scan=FAST_SCAN)
    assert set(res.scans) == {"before", "after"} and TARGET in res.scans["before"].flagged
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # the input model is untouched


@pytest.mark.default_scan
def test_defend_scans_by_default(planted, tmp_path, monkeypatch):
    from fineprune.purify.scan.base import Scan

    monkeypatch.setattr(Scan, "default_spec", FAST_SCAN)  # the family's default, made cheap for the test
    _, root = planted
    out = tmp_path / "out"
    assert _defend(root, out, "--method", "prune", "--threshold", "0", "--quiet") == 0
    info = json.loads((out / "model.json").read_text())
    assert info["scan"]["before"]["spec"] == FAST_SCAN and "after" in info["scan"]
    assert "--scan" not in info["command"]  # the default is not spelled out


def _api(model, recipe, factors, select="evidence", epochs=20):
    ft, val = synthetic(200, 3), synthetic(100, 4)
    return defend(model, ft, val, "fine-tune", recipe=recipe, lr_factors=factors, scan=FAST_SCAN, select=select,
                  finetune=TrainConfig(epochs=epochs, lr=0.01, batch_size=32),
                  triggered=BadNets(TRIGGER, AllToOne(TARGET), rate=0.1).triggered(synthetic(300, 2)))


def test_the_scan_chooses_among_candidates_within_the_tolerance(planted):
    """SAU at a hundredth of its rate keeps accuracy and the backdoor: the scan still flags the
    target, so the next rate is tried and kept where the evidence is gone. With select=accuracy
    the first run within the tolerance is kept, evidence and all."""
    model, _ = planted
    res = _api(model, "sau,lr=0.003", (0.01, 1.0))
    hist = res.finetune
    assert hist.lr == pytest.approx(0.003) and res.scans["after"].flagged == []
    assert hist.attempts[0]["reason"] == "evidence" and TARGET in hist.attempts[0]["evidence"]
    assert "finds no backdoor evidence" in hist.selection
    assert res.after.asr < 0.2  # measured only: the triggered set chose nothing
    accuracy_only = _api(model, "sau,lr=0.003", (0.01, 1.0), select="accuracy", epochs=5)
    assert accuracy_only.finetune.lr == pytest.approx(0.00003) and TARGET in accuracy_only.scans["after"].flagged


def test_when_nothing_within_the_tolerance_removes_the_evidence_it_says_so(planted):
    model, _ = planted
    res = _api(model, "plain", (0.001,), epochs=2)
    assert TARGET in res.scans["after"].flagged
    assert any("backdoor evidence remains in every candidate within the" in w for w in res.warnings)
    from fineprune.defense.decision import headline

    assert "Backdoor evidence remains after the defense" in headline(res)
