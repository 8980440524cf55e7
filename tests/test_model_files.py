"""Round trips for every accepted model format, load_into errors, and build_arch."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fineprune.errors import BadInputError
from fineprune.io import arch
from fineprune.io.arch import build_arch, register_arch
from fineprune.io.model_files import LoadedModel, load_into, load_weights, save_weights


class TinyCNN(nn.Module):
    """Conv + BatchNorm + Linear: enough to exercise parameters and buffers."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2),
            nn.ReLU(),
        )
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def trained_cnn(seed: int = 0) -> TinyCNN:
    """A CNN whose BN statistics differ from a fresh one, so a failed load would show."""
    torch.manual_seed(seed)
    m = TinyCNN()
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 8, 8))  # updates running stats
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_same_outputs(original: nn.Module, loaded: LoadedModel) -> None:
    fresh = load_into(TinyCNN().eval(), loaded)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), original(X), rtol=0, atol=0)


def single_line(msg: str) -> None:
    assert msg and "\n" not in msg and "\x1b" not in msg and msg == msg.strip()


# ----------------------------------------------------------------- round trips


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    m = trained_cnn()
    path = tmp_path / "out" / "model.safetensors"
    save_weights(m, path, metadata={"pruned_layer": "features.3", "note": "x"})
    loaded = load_weights(path)
    assert loaded.format == "safetensors" and loaded.scripted is None
    assert loaded.metadata["pruned_layer"] == "features.3" and loaded.metadata["note"] == "x"
    assert len(loaded.sha256) == 64
    assert not [p for p in path.parent.iterdir() if p.name != "model.safetensors"]  # no temp left
    assert_same_outputs(m, loaded)


def test_safetensors_detected_by_content_not_extension(tmp_path: Path) -> None:
    m = trained_cnn()
    save_weights(m, tmp_path / "a.safetensors")
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "weights.bin")
    loaded = load_weights(tmp_path / "weights.bin")
    assert loaded.format == "safetensors"
    assert loaded.sha256 == load_weights(tmp_path / "a.safetensors").sha256
    assert_same_outputs(m, loaded)


def test_state_dict_zip_round_trip(tmp_path: Path) -> None:
    m = trained_cnn()
    torch.save(m.state_dict(), tmp_path / "model.pt")
    loaded = load_weights(tmp_path / "model.pt")
    assert loaded.format == "state_dict" and loaded.metadata == {}
    assert_same_outputs(m, loaded)


def test_torch_zip_named_safetensors_is_read_by_content(tmp_path: Path) -> None:
    m = trained_cnn()
    torch.save(m.state_dict(), tmp_path / "model.safetensors")
    assert load_weights(tmp_path / "model.safetensors").format == "state_dict"


def test_legacy_state_dict_round_trip(tmp_path: Path) -> None:
    m = trained_cnn()
    torch.save(m.state_dict(), tmp_path / "model.pth", _use_new_zipfile_serialization=False)
    loaded = load_weights(tmp_path / "model.pth")
    assert loaded.format == "state_dict"
    assert_same_outputs(m, loaded)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "net"])
def test_wrapped_checkpoint_with_module_prefix(tmp_path: Path, key: str) -> None:
    m = trained_cnn()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    checkpoint = {
        "epoch": 7,
        "best_acc": 0.93,
        "args": {"lr": 0.1, "arch": "tiny"},
        "optimizer": opt.state_dict(),
        key: {f"module.{k}": v for k, v in m.state_dict().items()},
    }
    torch.save(checkpoint, tmp_path / "ckpt.pth.tar")
    loaded = load_weights(tmp_path / "ckpt.pth.tar")
    assert not any(k.startswith("module.") for k in loaded.state_dict or {})
    assert_same_outputs(m, loaded)


def test_checkpoint_without_state_dict_lists_keys(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "weights": [torch.ones(2)]}, tmp_path / "ckpt.pt")
    with pytest.raises(BadInputError) as ei:
        load_weights(tmp_path / "ckpt.pt")
    single_line(str(ei.value))
    assert "'epoch'" in str(ei.value) and "'weights'" in str(ei.value)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_weights_round_trip(tmp_path: Path, how: str) -> None:
    m = trained_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
        scripted = torch.jit.script(m) if how == "script" else torch.jit.trace(m, X)
        scripted.save(str(tmp_path / "model.torchscript"))
        # our own trusted file, so jit.load is fine here: it gives the reference key set
        reference_keys = set(torch.jit.load(str(tmp_path / "model.torchscript")).state_dict())
    loaded = load_weights(tmp_path / "model.torchscript")
    assert loaded.format == "torchscript" and loaded.scripted is None
    assert set(loaded.state_dict or {}) == reference_keys == set(m.state_dict())
    assert_same_outputs(m, loaded)


def test_torchscript_needs_an_architecture(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(trained_cnn()).save(str(tmp_path / "m.pt"))
    with pytest.raises(BadInputError, match="`arch`") as ei:
        load_into(None, load_weights(tmp_path / "m.pt"))
    single_line(str(ei.value))


def test_save_weights_handles_tied_and_view_tensors(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied
            self.register_buffer("mid", torch.arange(8.0)[2:6])  # view into a larger storage

    m = Tied()
    save_weights(m, tmp_path / "tied.safetensors")
    loaded = load_weights(tmp_path / "tied.safetensors")
    fresh = load_into(Tied(), loaded)
    torch.testing.assert_close(fresh.b.weight, m.a.weight)
    torch.testing.assert_close(fresh.mid, torch.arange(2.0, 6.0))
    save_weights({"x": torch.ones(3, 4).t()}, tmp_path / "t.safetensors")  # non-contiguous
    torch.testing.assert_close((load_weights(tmp_path / "t.safetensors").state_dict or {})["x"], torch.ones(4, 3))


# ----------------------------------------------------------------- load_into errors


def test_load_into_wrong_num_classes_says_so(tmp_path: Path) -> None:
    save_weights(trained_cnn(), tmp_path / "m.safetensors")
    with pytest.raises(BadInputError) as ei:
        load_into(TinyCNN(num_classes=10), load_weights(tmp_path / "m.safetensors"))
    msg = str(ei.value)
    single_line(msg)
    assert "fc.weight" in msg and "`num_classes`" in msg and "(5, 6)" in msg


def test_load_into_missing_and_unexpected_keys(tmp_path: Path) -> None:
    sd = trained_cnn().state_dict()
    sd["extra.weight"] = torch.ones(1)
    del sd["fc.bias"]
    save_file(sd, str(tmp_path / "m.safetensors"))
    loaded = load_weights(tmp_path / "m.safetensors")
    with pytest.raises(BadInputError) as ei:
        load_into(TinyCNN(), loaded)
    msg = str(ei.value)
    single_line(msg)
    assert "missing from the file: fc.bias" in msg and "unexpected in the file: extra.weight" in msg
    load_into(TinyCNN(), loaded, strict=False)  # tolerated when not strict


def test_load_into_tolerates_missing_num_batches_tracked(tmp_path: Path) -> None:
    m = trained_cnn()
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert_same_outputs(m, load_weights(tmp_path / "m.safetensors"))


# ----------------------------------------------------------------- build_arch


def factory_without_num_classes() -> nn.Module:
    return nn.Linear(2, 3)


def factory_returning_junk(num_classes: int) -> str:
    return "not a model"


def test_build_torchvision_resnet18() -> None:
    m = build_arch("torchvision:resnet18", num_classes=7)
    assert m.fc.out_features == 7
    gray = build_arch("torchvision:resnet18", num_classes=3, in_channels=1)
    assert gray.conv1.in_channels == 1 and gray.conv1.out_channels == 64
    with torch.no_grad():
        assert gray.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)


def test_build_unknown_torchvision_suggests_close_names() -> None:
    with pytest.raises(BadInputError, match="resnet18") as ei:
        build_arch("torchvision:resnet81", num_classes=2)
    single_line(str(ei.value))


def test_build_from_import_path() -> None:
    m = build_arch("torchvision.models:resnet18", num_classes=4)
    assert m.fc.out_features == 4
    assert isinstance(build_arch("torch.nn:Identity", num_classes=4), nn.Identity)
    lin = build_arch(f"{__name__}:factory_without_num_classes", num_classes=4)
    assert isinstance(lin, nn.Linear)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("no_such_module_xyz:make", "cannot import"),
        ("torch.nn:Lnear", "Linear"),
        (f"{__name__}:factory_returning_junk", "not a torch.nn.Module"),
        ("definitely-not-an-arch", "torchvision:NAME"),
        ("", "torchvision:NAME"),
    ],
)
def test_build_errors(spec: str, needle: str) -> None:
    with pytest.raises(BadInputError) as ei:
        build_arch(spec, num_classes=3)
    single_line(str(ei.value))
    assert needle in str(ei.value)


def test_registered_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arch, "BUILTIN", {})

    @register_arch("test-tiny-cnn")
    def make(num_classes: int) -> nn.Module:
        return TinyCNN(num_classes)

    assert build_arch("Test_Tiny_CNN", num_classes=9).fc.out_features == 9
    with pytest.raises(BadInputError, match="test-tiny-cnn") as ei:
        build_arch("test-tiny-cn", num_classes=9)
    single_line(str(ei.value))
    with pytest.raises(ValueError):
        register_arch("test-tiny-cnn")(lambda num_classes: TinyCNN(num_classes))
