"""ONNX export (fineprune.io.onnx_export, `fineprune defend --export onnx`): the exported file is the
defended model (masks inside), matches PyTorch under onnxruntime with a dynamic batch, is written
only after that check, and a missing onnxruntime is one clear error."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import on_sys_path
from test_defend_cli import Workspace, one_line_error, run_cli

from fineprune.defense.compact import compact_model
from fineprune.defense.mask import set_pruned
from fineprune.defense.persist import load_pruned
from fineprune.errors import BadInputError
from fineprune.io.onnx_export import export_onnx, require_onnx, save_onnx
from fineprune.models.small import SmallCNN
from fineprune.pipeline.job import DefendJob

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")
LAYER, PRUNED = "features.7", [0, 3, 5, 11]


def _pruned_cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN(width=4, image_size=16).eval()
    set_pruned(model, LAYER, PRUNED, 16)
    return model


def _run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_pruned_cnn_exports_with_its_masks_and_matches_pytorch(exporter, tmp_path):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    model = _pruned_cnn()
    x = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    res = export_onnx(model, x, exporters=(exporter,))
    assert res.exported, res.note
    assert res.exporter == exporter and res.opset == 18 and res.checked_samples == 256
    assert res.max_abs_diff is not None and res.max_abs_diff <= res.tolerance <= 1e-3
    # another batch size than the export's example (dynamic batch), and the pruning is in the graph
    xs = x[:7]
    got = _run(res.data, xs)
    with torch.no_grad():
        masked = model(xs)
        unmasked = SmallCNN(width=4, image_size=16).eval()
        unmasked.load_state_dict(model.state_dict())
        plain = unmasked(xs)
    assert (got - masked).abs().max() <= 1e-4 < (got - plain).abs().max()
    save_onnx(res, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == res.data
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left
    assert "data" not in res.to_dict() and json.dumps(res.to_dict())


def test_compact_model_exports_and_matches():
    model = _pruned_cnn()
    x = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    compact = compact_model(model, LAYER, x[:1], real_inputs=x[:16])
    assert compact.exported, compact.note
    res = export_onnx(compact.model, x, exporters=("torchscript",))
    assert res.exported and res.max_abs_diff <= res.tolerance and res.checked_samples == 40
    with torch.no_grad():
        assert (_run(res.data, x) - model(x)).abs().max() <= 1e-4


def test_an_export_that_cannot_be_checked_is_not_kept():
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return {"a": self.fc(x), "b": self.fc(x) + 1}

    res = export_onnx(TwoHeads(), torch.rand(8, 4), exporters=("torchscript",))
    assert not res.exported and res.data is None and "not a tensor of logits" in res.note
    with pytest.raises(ValueError):
        save_onnx(res, "never-written.onnx")


def test_missing_onnxruntime_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(BadInputError, match=r"`export` onnx needs onnxruntime.*pip install 'fineprune\[onnx\]'"):
        require_onnx()
    with pytest.raises(BadInputError, match="pip install 'fineprune"):
        DefendJob(model="m", arch="a", data="d", out="o", export="onnx").validate()
    with pytest.raises(BadInputError, match="`export` must be one of onnx"):
        DefendJob(model="m", arch="a", data="d", out="o", export="tflite").validate()
    assert run_cli("--model", tmp_path / "m.safetensors", "--arch", "x", "--data", tmp_path / "d.npz",
                   "--out", tmp_path / "out", "--export", "onnx") == 2
    err = one_line_error(capsys)
    assert "--export onnx needs onnxruntime" in err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    with on_sys_path(tmp_path_factory.mktemp("onnx"), "nets_for_defend") as root:
        yield Workspace(root)


def test_cli_export_onnx_with_bf16_finetuning(ws, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "clean.npz",
                 "--triggered", ws.root / "trig.npz", "--target", 0, "--epochs", 1, "--precision", "bf16",
                 "--export", "onnx", "--out", out, "--quiet")
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model-compact.safetensors", "model.onnx", "model-compact.onnx"} <= names
    info = json.loads((out / "model.json").read_text())
    assert info["finetune"]["precision"] == "bf16" and info["finetune"]["config"]["precision"] == "bf16"
    assert "--precision bf16" in info["command"] and "--export onnx" in info["command"]
    for name in ("model.onnx", "model-compact.onnx"):
        rec = info["onnx"][name]
        assert rec["exported"] and rec["file"] == name and rec["opset"] == 18
        assert rec["checked_samples"] == info["split"]["val_samples"] == 200
        assert 0 <= rec["max_abs_diff"] <= rec["tolerance"]
        assert name in info["how_to_load"]
    # model.onnx is the defended model the user gets: same logits as model.safetensors reloaded
    masked = load_pruned(SmallCNN(width=8), out / "model.safetensors").eval()
    x = ws.x_trig[:50]
    for name in ("model.onnx", "model-compact.onnx"):
        with torch.no_grad():
            assert (_run((out / name).read_bytes(), x) - masked(x)).abs().max() <= 1e-4
    # a rerun with --force and without --export removes the old ONNX files (no mixed runs)
    assert run_cli("--model", ws.root / "model.safetensors", "--arch", ws.arch, "--data", ws.root / "small.npz",
                   "--method", "prune", "--out", out, "--force", "--quiet") == 0
    assert not any(p.suffix == ".onnx" for p in out.iterdir())
    assert json.loads((out / "model.json").read_text())["onnx"] is None
    assert np.isfinite(info["onnx"]["model.onnx"]["seconds"])
