"""Each benchmark script runs end to end at a tiny size and writes valid JSON (not a benchmark)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, args: list[str]) -> None:
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
        assert mod.main(args) == 0
    finally:
        sys.path.remove(str(BENCH))
        torch.set_num_threads(threads)


@pytest.mark.parametrize("script,extra,keys", [
    ("sweep_speed", ["--models", "traffic"], ["ratios", "counts_equal_usual", "times"]),
    ("finetune_throughput", ["--models", "traffic"], ["samples_per_s", "identical_weights"]),
    ("scaling", [], ["seconds", "rss_peak_mb", "streamed_samples"]),
    ("defend_profile", ["--tasks", "demo"], ["seconds", "top_tottime"]),
])
def test_bench_script_tiny(tmp_path, script, extra, keys):
    out = tmp_path / f"{script}.json"
    _run(script, ["--tiny", "--out", str(out), *extra])
    data = json.loads(out.read_text())
    assert data["machine"]["nproc"] >= 1 and data["machine"]["torch"]
    row = data["results"][0]
    for k in keys:
        assert k in row
    if script == "sweep_speed":
        assert row["counts_equal_usual"] and row["counts_equal_exact_head"]
    if script == "finetune_throughput":
        assert row["identical_weights"]
    if script == "scaling":
        assert data["bounded_equals_unbounded"]


def test_streaming_memory_tiny(tmp_path):
    """The streaming benchmark on a tiny image folder: both modes run; streamed == in memory."""
    from PIL import Image

    folder = tmp_path / "folder"
    gen = torch.Generator().manual_seed(0)
    for c in range(3):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(8):
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"c{c}" / f"{i}.png")
    eq = tmp_path / "equal.json"
    _run("streaming_memory", ["equal", "--arch", "torchvision:resnet18", "--folder", str(folder),
                              "--val-fraction", "0.5", "--out", str(eq)])
    assert json.loads(eq.read_text())["same_curve_and_channels"] is True
    run = tmp_path / "run.json"
    _run("streaming_memory", ["run", "--arch", "torchvision:resnet18", "--method", "prune", "--workers", "0",
                              "--folders", str(folder), "--out", str(run)])
    row = json.loads(run.read_text())["rows"][0]
    assert row["rc"] == 0 and row["images"] == 24 and row["peak_rss_tree_mb"] > 0
    assert "model.safetensors" in row["outputs"]


def test_vit_sweep_tiny(tmp_path):
    """The ViT sweep benchmark (issue 24) on a 2-block ViT: the cut slices to token 0, and the
    sliced sweep counts what the every-token sweep counts."""
    pytest.importorskip("timm")
    out = tmp_path / "vit_sweep.json"
    _run("vit_sweep", ["--tiny", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["tokens_replayed"] == [0] and data["tokens_total"] == 17
    assert data["equal_counts_sliced_vs_today_on_n_slow"] is True
    assert data["sliced_sweep_s"] > 0 and "today_sweep_s_extrapolated_to_n_fast" in data


def test_scan_zoo_tiny(tmp_path, capsys):
    """The scan detection zoo (issue 21 item 4) on the mnist task at a tiny size: one JSON line per
    (model, scan), a rerun adds none (resumable), and the summary prints the FPR / TPR table."""
    out = tmp_path / "zoo"
    spec = "neural-cleanse,steps=10,samples=50"
    args = ["run", "--out", str(out), "--tasks", "mnist", "--attacks", "clean", "badnets", "--seeds", "0",
            "--subsample", "0.1", "--epochs", "1", "--scans", spec, "--quiet"]
    _run("scan_zoo", args)
    lines = (out / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["task"], r["attack"], r["seed"], r["scan"]) for r in rows] == [
        ("mnist", "clean", 0, spec), ("mnist", "badnets", 0, spec)]
    clean, bad = rows
    for r in rows:
        assert {"trigger", "rate", "flagged", "target", "exact", "target_flagged", "max_anomaly_index",
                "seconds", "clean_acc", "asr", "model_fingerprint"} <= set(r)
        assert r["seconds"] > 0 and r["threads"] == 1 and r["device"] == "cpu" and r["steps"] <= 10 * 10
    assert clean["target"] is None and clean["trigger"] is None and not clean["exact"]
    assert bad["target"] == 0 and bad["trigger"] == "task" and bad["rate"] == 0.1
    assert bad["exact"] == (bad["flagged"] == [0]) and bad["target_flagged"] == (0 in bad["flagged"])
    assert bad["model_fingerprint"] != clean["model_fingerprint"]
    _run("scan_zoo", args)  # resumed: every (model, scan) is there already
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert not list(out.glob(".*.tmp"))
    capsys.readouterr()
    _run("scan_zoo", ["summary", "--out", str(out)])
    text = capsys.readouterr().out
    fpr = f"{100 * clean['detected']:.0f}%"
    assert f"| mnist | clean | {spec} | 1 | - | {fpr} | - |" in text
    assert f"| mnist | badnets | {spec} | 1 | {100 * bad['detected']:.0f}% | - | " in text
    _run("scan_zoo", ["summary", "--out", str(out), "--json"])
    table = json.loads(capsys.readouterr().out)
    assert [(e["attack"], e["models"]) for e in table] == [("clean", 1), ("badnets", 1)]
    assert table[1]["target_id_rate"] == float(bad["target_flagged"])
