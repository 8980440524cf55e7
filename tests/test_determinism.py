"""Same command, same seed, on CPU: the same results.

`results.json` (reproduce, with --no-timings) is byte-identical; `model.json` / `metrics.json`
(defend) differ only in wall-clock timings (keys containing "seconds", the "timings" block and the
"created" stamp); see docs/robustness.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fineprune.cli import main
from fineprune.models.small import SmallCNN

TIMING_KEYS = ("timings", "created")


def _drop_timings(obj):
    """`obj` without wall-clock fields: keys containing "seconds", and `timings` / `created`."""
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items() if "seconds" not in k and k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def _reproduce_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "fineprune.cli", "reproduce", "--task", "mnist", "--subsample", "0.15",
            "--epochs", "1", "--finetune-epochs", "1", "--device", "cpu", "--out", str(out), "--quiet",
            "--no-timings"]


def test_reproduce_twice_gives_identical_results(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # Two separate processes, side by side (one thread each: same arithmetic, half the wall time).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_reproduce_cmd(d), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for d in (a, b)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    # With --no-timings (wall-clock fields null) the files are byte-identical.
    assert (a / "results.json").read_bytes() == (b / "results.json").read_bytes()
    ra = json.loads((a / "results.json").read_text())
    assert len(ra) == 12 and all(r["seconds"] is None and r["clean_acc"] > 0 for r in ra)
    assert (a / "channels.json").read_bytes() == (b / "channels.json").read_bytes()
    assert (a / "table.md").read_text() == (b / "table.md").read_text()
    # The trained models (the expensive, cached part) have bit-identical weights.
    models = sorted(p.name for p in (a / "models").glob("*.safetensors"))
    assert models and models == sorted(p.name for p in (b / "models").glob("*.safetensors"))
    for name in models:
        wa, wb = load_file(a / "models" / name), load_file(b / "models" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_defend_twice_gives_identical_outputs(tmp_path):
    """fine-prune (split, sweep, fine-tuning) on a tiny model, twice in one process."""
    torch.manual_seed(1)
    save_file(SmallCNN(width=4).state_dict(), tmp_path / "m.safetensors")
    (tmp_path / "nets_det.py").write_text(
        "from fineprune.models.small import SmallCNN\n"
        "def small4(num_classes=10, in_channels=1):\n"
        "    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=4)\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (80, 28, 28), dtype=np.uint8), y=np.arange(80) % 10)
    np.savez(tmp_path / "t.npz", x=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), y=np.arange(30) % 10)
    sys.path.insert(0, str(tmp_path))
    try:
        outs = []
        for name in ("a", "b"):
            out = tmp_path / name
            rc = main(["defend", "--model", str(tmp_path / "m.safetensors"), "--arch", "nets_det:small4",
                       "--data", str(tmp_path / "d.npz"), "--triggered", str(tmp_path / "t.npz"), "--target", "0",
                       "--epochs", "2", "--threshold", "50", "--device", "cpu", "--out", str(out), "--quiet"])
            assert rc == 0
            outs.append(out)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("nets_det", None)
    a, b = outs
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    assert (a / "sweep.csv").read_bytes() == (b / "sweep.csv").read_bytes()
    ma, mb = (json.loads((d / "model.json").read_text()) for d in (a, b))
    for m in (ma, mb):  # the output folder is named in the command line; it is the one legit difference
        m.pop("command", None)
    assert _drop_timings(ma) == _drop_timings(mb)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
