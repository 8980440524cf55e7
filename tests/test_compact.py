"""Compact export: pruned channels physically removed, outputs equal to the masked model."""
from __future__ import annotations

import pytest
import torch
import torchvision

from fineprune.defense.compact import compact_model, load_compact, save_compact
from fineprune.defense.mask import set_pruned
from fineprune.models.small import SmallCNN

# Tiny models on a shared 2-core machine run far faster on one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def _random_bn_stats(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so zeroing and removing channels can differ."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def test_plain_cnn_compacts_exactly_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN(width=8).eval()
    set_pruned(model, "features.7", [0, 3, 4, 9, 20], 32)
    x = torch.rand(6, 1, 28, 28)
    res = compact_model(model, "features.7", x[:1], real_inputs=x)
    assert res.exported, res.note
    assert res.anchor == "features.6" and set(res.coupled_modules) == {"features.6", "classifier.1"}
    assert res.max_abs_diff <= 1e-5
    assert res.params_after < res.params_before and res.macs_after < res.macs_before
    assert res.model.features[6].out_channels == 27 and res.model.classifier[1].in_features == 27 * 9
    with torch.no_grad():
        assert (res.model(x) - model(x)).abs().max() <= 1e-5

    path = tmp_path / "compact.safetensors"
    save_compact(res, path)
    again = load_compact(SmallCNN(width=8), path).eval()
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max() <= 1e-5


def test_resnet18_inside_a_block_compacts_exactly():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    _random_bn_stats(model)
    set_pruned(model, "layer4.1.bn1", list(range(0, 512, 4)), 512)
    res = compact_model(model, "layer4.1.bn1", torch.rand(1, 3, 32, 32))
    assert res.exported, res.note
    assert res.max_abs_diff <= 1e-5 and res.max_abs_diff_float32 <= 1e-4
    assert res.model.layer4[1].conv1.out_channels == 384 and res.model.layer4[1].conv2.in_channels == 384
    assert res.params_after < res.params_before and res.macs_after < res.macs_before


def test_resnet18_stage_output_is_skipped_with_a_reason():
    """Masking layer4's output leaves the channel alive in the stage's residual stream, so a
    stage-wide removal would change the outputs: no export, a note, no exception."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    _random_bn_stats(model)
    set_pruned(model, "layer4", list(range(0, 512, 4)), 512)
    res = compact_model(model, "layer4", torch.rand(1, 3, 32, 32))
    assert not res.exported and res.model is None
    assert res.max_abs_diff > 1e-5
    assert "residual" in res.note and "layer4.0.downsample.0" in res.coupled_modules


def test_nothing_pruned_is_skipped():
    model = SmallCNN(width=8).eval()
    set_pruned(model, "features.7", [], 32)
    res = compact_model(model, "features.7", torch.rand(1, 1, 28, 28))
    assert not res.exported and "nothing to remove" in res.note
