import json

from fineprune.cli import main
from fineprune.experiment.demo import DemoConfig, run_demo


def test_demo_pipeline_plants_and_removes_backdoor(tmp_path):
    rows = run_demo(tmp_path, DemoConfig(seed=0, attacker_epochs=6, finetune_epochs=8), progress=False)
    by = {(r["model"], r["defense"]): r for r in rows}
    bad = by[("backdoored", "none")]
    fp = by[("backdoored", "fine-prune")]
    assert bad["asr"] >= 0.90, bad
    assert fp["asr"] <= 0.10, fp
    assert bad["clean_acc"] - fp["clean_acc"] <= 0.03, (bad, fp)
    assert 0 < fp["pruned_fraction"] < 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["defense"] for r in saved] == ["none", "none", "fine-tune", "prune", "fine-prune"]
    assert set(saved[0]) >= {"defense", "clean_acc", "asr", "robust_acc", "pruned_fraction", "seconds"}
    png = (tmp_path / "pruning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_rejects_bad_threshold(capsys):
    assert main(["demo", "--threshold", "150", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "threshold" in err[0]


def test_cli_unknown_flag_is_exit_2(capsys):
    assert main(["demo", "--no-such-flag"]) == 2
