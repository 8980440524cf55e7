"""model.safetensors written by `fineprune defend` is the defended model under plain PyTorch loading
where that can be exact (the pruning baked into the weights), and says so, with a TorchScript file
of the masked model, where it cannot (a ResNet stage output, fed by the shortcut)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import on_sys_path
from torch import nn

from fineprune import AllToOne, BadNets, PatchTrigger
from fineprune.cli import main
from fineprune.data.embedded import load_mnist5k
from fineprune.defense.bake import bake_masks, trace_masked
from fineprune.defense.mask import clear_mask, pruned_channels, set_pruned
from fineprune.defense.persist import load_pruned, save_pruned
from fineprune.evaluation.metrics import predict
from fineprune.models.small import SmallCNN
from fineprune.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

NETS = '''
from torch import nn
from fineprune.models.small import SmallCNN


def small8(num_classes=10, in_channels=1):
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=8)


def bnnet(num_classes=10, in_channels=1):
    """conv -> BatchNorm -> ReLU twice: the pruned layer's channels come out of a BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, num_classes))
'''


class Workspace:
    """Backdoored small8 and bnnet models as safetensors, clean and triggered npz files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "nets_for_plain_load.py").write_text(NETS)
        import nets_for_plain_load as nets

        self.nets = nets
        data = load_mnist5k(seed=0)
        attack = BadNets(PatchTrigger(size=(3, 3)), AllToOne(0), rate=0.1, seed=0)
        poisoned = attack.poison(data.train).dataset
        cfg = TrainConfig(epochs=2, lr=2e-3, optimizer="adam", weight_decay=0.0, schedule="constant")
        self.models = {}
        for name in ("small8", "bnnet"):
            torch.manual_seed(0)
            model = getattr(nets, name)()
            train(model, poisoned, cfg, device=torch.device("cpu"), seed=0)
            self.models[name] = model.eval()
            safetensors.torch.save_file(model.state_dict(), str(root / f"{name}.safetensors"))
        g = torch.Generator().manual_seed(0)
        x, y = data.val.tensors
        perm = torch.randperm(len(y), generator=g)[:300]
        trig = attack.triggered(data.test)
        tperm = torch.randperm(len(trig), generator=g)[:200]
        self.x_trig = trig.x[tperm]
        u8 = (x[perm] * 255).round().to(torch.uint8)
        np.savez(root / "clean.npz", x=u8.numpy(), y=y[perm].numpy())
        np.savez(root / "trig.npz", x=self.x_trig.numpy(), y=trig.y_true[tperm].numpy())
        # What the comparisons run on: triggered inputs (they wake the backdoor channels), clean
        # ones, and random ones.
        self.x_check = torch.cat([self.x_trig[:64], (u8[:32].float() / 255),
                                  torch.rand((16, 1, 28, 28), generator=g)])


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    with on_sys_path(tmp_path_factory.mktemp("plain_load"), "nets_for_plain_load") as root:
        yield Workspace(root)


def defend(ws: Workspace, net: str, method: str, out: Path, *extra) -> dict:
    args = ["defend", "--model", ws.root / f"{net}.safetensors", "--arch", f"nets_for_plain_load:{net}",
            "--data", ws.root / "clean.npz", "--triggered", ws.root / "trig.npz", "--target", 0,
            "--method", method, "--epochs", 1, "--out", out, "--quiet", *extra]
    assert main([str(a) for a in args]) == 0
    return json.loads((out / "model.json").read_text())


def plain_load(model: nn.Module, path: Path) -> nn.Module:
    """What a user without fineprune does."""
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    return model.eval()


@pytest.mark.parametrize("net,method", [("small8", "prune"), ("small8", "fine-prune"), ("small8", "fine-tune"),
                                        ("bnnet", "prune"), ("bnnet", "fine-prune")])
def test_plain_load_is_the_masked_model(ws, tmp_path, net, method):
    out = tmp_path / "out"
    info = defend(ws, net, method, out)
    build = getattr(ws.nets, net)
    masked = load_pruned(build(), out / "model.safetensors").eval()
    plain = plain_load(build(), out / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(plain(ws.x_check), masked(ws.x_check))
    assert info["plain_load_is_defended"] is True and info["torchscript"] is None
    assert not (out / "model-masked.torchscript.pt").exists()
    meta = safetensors.safe_open(str(out / "model.safetensors"), "pt").metadata()
    assert meta["fineprune.plain_load_is_defended"] == "true"
    if method == "fine-tune":
        assert info["plain_load"]["zeroed"] == [] and "fineprune.masks" in meta
        return
    layer = info["layer"]
    pruned = info["pruned_channels"]
    assert pruned and pruned_channels(masked, layer) == pruned  # the masks travel too
    # The check is not vacuous: the received model's pruned channels do fire on these inputs.
    received, acts = ws.models[net], []
    hook = received.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.append(o.clone()))
    with torch.no_grad():
        received(ws.x_check)
    hook.remove()
    assert bool(acts[0][:, pruned].ne(0).any())
    anchor = {"small8": "features.6", "bnnet": "4"}[net]  # the conv, or the BatchNorm after it
    assert info["plain_load"]["anchors"] == {layer: anchor}
    assert info["plain_load"]["zeroed"] == [f"{anchor}.weight", f"{anchor}.bias"]
    assert info["plain_load"]["max_abs_diff"] == 0.0 and info["plain_load"]["checked_inputs"] > 8
    sd = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert (sd[f"{anchor}.weight"][pruned] == 0).all() and (sd[f"{anchor}.bias"][pruned] == 0).all()
    if method == "prune":
        # Only the pruned channels' producing parameters changed, so the ASR under plain loading is
        # the reported one (today's fineprune gave back the backdoored model here).
        orig = ws.models[net].state_dict()
        for k, v in sd.items():
            if k not in (f"{anchor}.weight", f"{anchor}.bias"):
                assert torch.equal(v, orig[k]), k
        kept = [c for c in range(info["num_channels"]) if c not in pruned]
        assert torch.equal(sd[f"{anchor}.weight"][kept], orig[f"{anchor}.weight"][kept])
        asr = float((predict(plain, ws.x_trig) == 0).float().mean())
        assert asr == pytest.approx(info["metrics"]["after"]["asr"], abs=1e-6)
        with torch.no_grad():
            assert not torch.equal(received(ws.x_check), plain(ws.x_check))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Loading without fineprune" in page and "defended (plain_load_is_defended: true)" in page
    assert "model.load_state_dict(safetensors.torch.load_file(" in info["how_to_load"]["model.safetensors"]


def test_resnet_stage_output_is_not_baked_and_gets_torchscript(tmp_path):
    """A torchvision ResNet's pruned layer is a stage output, also fed by the shortcut: no bake,
    plain_load_is_defended false, and a TorchScript file that computes the masked model."""
    torchvision = pytest.importorskip("torchvision")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=g.random((60, 3, 32, 32), dtype=np.float32), y=np.arange(60) % 3)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    safetensors.torch.save_file(net.state_dict(), str(tmp_path / "rn.safetensors"))
    out = tmp_path / "out"
    assert main(["defend", "--model", str(tmp_path / "rn.safetensors"), "--arch", "torchvision:resnet18",
                 "--num-classes", "3", "--data", str(tmp_path / "data.npz"), "--method", "prune",
                 "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["layer"] == "layer4" and info["pruned_count"] > 0
    assert info["plain_load_is_defended"] is False and info["plain_load"]["baked"] is False
    assert "shortcut" in info["plain_load"]["note"] and info["plain_load"]["zeroed"] == []
    assert info["torchscript"]["exported"] and info["torchscript"]["file"] == "model-masked.torchscript.pt"
    assert not info["compact"]["exported"]  # so the TorchScript file is the safe standalone output
    meta = safetensors.safe_open(str(out / "model.safetensors"), "pt").metadata()
    assert meta["fineprune.plain_load_is_defended"] == "false"

    x = torch.rand((12, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    masked = load_pruned(torchvision.models.resnet18(num_classes=3), out / "model.safetensors").eval()
    plain = plain_load(torchvision.models.resnet18(num_classes=3), out / "model.safetensors")
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(out / "model-masked.torchscript.pt"))  # our own file
    with torch.no_grad():
        ref = masked(x)
        assert torch.equal(scripted(x), ref)
        assert torch.equal(plain(x), net(x))  # weights left as they were: not defended
        assert not torch.equal(plain(x), ref)
    assert "model-masked.torchscript.pt" in info["how_to_load"]
    assert "NOT defended" in info["how_to_load"]["model.safetensors"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<section class='warn'><h2>Loading without fineprune" in page
    assert "NOT defended" in page and "model-masked.torchscript.pt" in page


def test_force_removes_a_previous_runs_torchscript(ws, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-masked.torchscript.pt").write_bytes(b"stale")
    info = defend(ws, "small8", "prune", out, "--force", "--no-compact")
    assert info["plain_load_is_defended"] and not (out / "model-masked.torchscript.pt").exists()


def _sigmoid_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def test_bake_refuses_when_zero_does_not_stay_zero():
    """sigmoid(0) = 0.5: zeroing the conv cannot reproduce the mask, and the check catches it."""
    torch.manual_seed(0)
    model = _sigmoid_net().eval()
    set_pruned(model, "1", [0, 2], 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = bake_masks(model, torch.randn(1, 1, 8, 8))
    assert not res.baked and res.model is None and res.zeroed == []
    assert res.anchors == {"1": "0"} and "not zero at 1" in res.note
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    traced = trace_masked(model, torch.randn(1, 1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert traced.exported and torch.equal(traced.module(x), model(x))


def test_bake_copies_and_leaves_the_input_model_alone():
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    set_pruned(model, "features.7", [1, 5, 9], 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = bake_masks(model, torch.randn(1, 1, 28, 28), real_inputs=torch.rand(4, 1, 28, 28))
    assert res.baked and res.model is not model and res.checked_inputs == 12
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert pruned_channels(res.model, "features.7") == [1, 5, 9]  # masks still on the baked copy
    x = torch.randn(6, 1, 28, 28)
    plain = SmallCNN(width=4).eval()
    plain.load_state_dict(res.model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_bake_with_nothing_pruned(tmp_path):
    """An empty mask (nothing pruned) and no mask at all: the weights are already the model."""
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    set_pruned(model, "features.7", [], 16)
    res = bake_masks(model, torch.randn(1, 1, 28, 28))
    assert res.baked and res.zeroed == [] and res.max_abs_diff == 0.0
    clear_mask(model, "features.7")
    res = bake_masks(model, torch.randn(1, 1, 28, 28))
    assert res.baked and res.model is model


def test_save_pruned_keeps_the_pruned_weights(tmp_path):
    """The internal model store (reproduce/grid) and the pruning-aware attack need the pruned
    channels' original weights back: save_pruned never bakes."""
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    set_pruned(model, "features.7", [0, 3], 16)
    save_pruned(model, tmp_path / "m.safetensors")
    again = load_pruned(SmallCNN(width=4), tmp_path / "m.safetensors")
    clear_mask(again, "features.7")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert bool(again.features[6].weight[[0, 3]].ne(0).any())
