"""Transformers (timm ViT / DeiT / MLP-Mixer, torchvision VisionTransformer): the pruned layer is
the last block's MLP hidden units (channels last), and every part of fineprune handles that layout
exactly: the cached sweep equals full masked passes at every k, masks hold through fine-tuning,
the compact export equals the masked model, and `--arch timm:NAME` loads a safetensors file."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import assert_same_curve, labels_near_model
from torch import nn

from fineprune import TrainConfig, TriggeredSet, defend
from fineprune.data.types import make_dataset
from fineprune.defense.bake import bake_masks
from fineprune.defense.compact import compact_model, load_compact, save_compact
from fineprune.purify.criteria import anp_mask, anp_order, channel_order, clp_order, uclc
from fineprune.defense.layer import find_prune_layer, layer_reason
from fineprune.defense.mask import CHANNEL_DIM_ATTR, pruned_channels, set_pruned
from fineprune.defense.persist import load_pruned, save_pruned
from fineprune.defense.sweep import cached_sweep, full_sweep, layer_means
from fineprune.errors import BadInputError
from fineprune.io.arch import build_arch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# Tiny models on a shared 2-core machine run far faster on one thread.
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
TIMM_SPEC = "timm:vit_tiny_patch16_224," + ",".join(f"{k}={v}" for k, v in SMALL_VIT.items())


def _vit(classes: int = 5) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=classes, **SMALL_VIT)


def _vit_avg(classes: int = 5) -> nn.Module:
    """A ViT whose head averages the tokens (global_pool='avg'): every token reaches the logits."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=classes,
                             global_pool="avg", **SMALL_VIT)


def _deit(classes: int = 5) -> nn.Module:
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=classes, **SMALL_VIT)


def _mixer(classes: int = 5) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=classes, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)


def _tv_vit(classes: int = 5) -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=classes)


# builder, expected layer, expected hidden units, first and second Linear of that MLP
MODELS = {
    "timm-vit": (_vit, "blocks.1.mlp.act", 128, "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"),
    "timm-vit-avg": (_vit_avg, "blocks.1.mlp.act", 128, "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"),
    "timm-deit": (_deit, "blocks.1.mlp.act", 128, "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"),
    "timm-mixer": (_mixer, "blocks.1.mlp_channels.act", 128, "blocks.1.mlp_channels.fc1",
                   "blocks.1.mlp_channels.fc2"),
    "torchvision-vit": (_tv_vit, "encoder.layers.encoder_layer_1.mlp.1", 64,
                        "encoder.layers.encoder_layer_1.mlp.0", "encoder.layers.encoder_layer_1.mlp.3"),
}


def _model(key: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[key][0]().eval()
    with torch.no_grad():  # louder hidden units and head, so pruning units moves the predictions
        model.get_submodule(MODELS[key][4]).weight.mul_(10.0)
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features == 5:  # timm's Mixer starts with a zero head
                m.weight.copy_(torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(2)))
    return model


def _inputs(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


def _units(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output (after its mask) on `x`."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("key", list(MODELS))
def test_layer_is_the_last_blocks_mlp_hidden_units(key):
    _, name, hidden, _, _ = MODELS[key]
    model = _model(key)
    choice = find_prune_layer(model, _inputs(2))
    assert choice.name == name and choice.channel_dim == -1 and choice.channels == hidden
    assert choice.output_shape[0] == 2 and choice.output_shape[-1] == hidden
    assert "MLP hidden units" in choice.reason and "no convolution ends" in choice.reason
    assert layer_reason(model, name) == choice.reason
    # Channel means are over batch and tokens, per hidden unit.
    x = _inputs(6)
    h = _units(model, name, x)
    means = layer_means(model, name, x, batch_size=4)
    assert means.shape == (hidden,)
    assert torch.allclose(means, h.double().mean(dim=(0, 1)).cpu(), atol=1e-9)


def test_a_named_layer_after_a_linear_has_channels_last():
    model = _model("timm-vit")
    choice = find_prune_layer(model, _inputs(2), "blocks.0.mlp.act")
    assert choice.channel_dim == -1 and choice.channels == 128
    assert "named by the user" in choice.reason
    assert find_prune_layer(model, _inputs(2), "patch_embed.proj").channel_dim == 1


# The tokens the cut proves to reach the logits (class-token pooling: token 0 only; DeiT without
# distillation pools like ViT). None: the logits read every token (the Mixer's and a ViT with
# global_pool='avg' average them), so no slicing may happen.
SLICED_TOKENS = {"timm-vit": [0], "timm-deit": [0], "timm-mixer": None, "torchvision-vit": [0],
                 "timm-vit-avg": None}


@pytest.mark.parametrize("key", list(MODELS))
def test_cached_sweep_equals_full_masked_passes_at_every_k(key):
    """Sliced (class-token pooling) or not, the cached sweep counts what full masked passes do."""
    _, name, hidden, _, _ = MODELS[key]
    model = _model(key)
    x = _inputs(48)
    y = labels_near_model(model, x, classes=5)
    trig = TriggeredSet(x[:20].clone(), y[:20], (y[:20] + 1) % 5)
    cached = cached_sweep(model, name, x, y, trig, batch_size=16, budget_mb=4)
    full = full_sweep(model, name, x, y, trig, batch_size=16)
    assert cached.mode == "cached" and len(cached.clean_correct) == hidden + 1
    assert cached.extra["tokens"] == SLICED_TOKENS[key]  # the path under test
    assert_same_curve(cached, full)
    assert cached.channel_means == full.channel_means  # ranked over every token, sliced or not
    assert len(set(cached.clean_correct)) > 1  # pruning does change predictions here
    assert not pruned_channels(model, name)  # the sweep leaves no mask behind
    if SLICED_TOKENS[key] is not None:
        every_token = cached_sweep(model, name, x, y, trig, batch_size=16, budget_mb=4, tokens=False)
        assert every_token.extra["tokens"] is None
        assert_same_curve(every_token, full)
        assert every_token.channel_means == cached.channel_means


@pytest.mark.parametrize("key", ["timm-vit", "torchvision-vit", "timm-vit-avg"])
def test_token_slice_replays_the_head_exactly(key):
    """The sliced head on the sliced boundary gives the full head's logits (same operations on the
    same values), and the cached values hold one token of 17, not all of them."""
    from fineprune.defense.cut import cut_at

    _, name, hidden, _, _ = MODELS[key]
    model = _model(key)
    x = _inputs(6)
    cut = cut_at(model, name, x[:1])
    if SLICED_TOKENS[key] is None:
        assert cut.tokens is None
        return
    with torch.no_grad():
        boundary = cut.pre(x)
        sliced = cut.tokens.narrow(boundary)
        assert torch.equal(cut.tokens.head(*sliced), cut.head(*boundary))
        assert torch.equal(cut.head(*boundary), model(x))
    assert boundary[0].shape == (6, hidden, 17) and sliced[0].shape == (6, hidden, 1)
    assert [tuple(s.shape[:2]) for s in sliced[1:]] == [(6, 1)] * (len(sliced) - 1)  # the residual stream


def test_masked_units_stay_zero_through_fine_tuning():
    model = _model("timm-vit").train()
    layer = find_prune_layer(model, _inputs(2)).name
    pruned = [0, 5, 17, 64, 127]
    set_pruned(model, layer, pruned, 128)
    x = _inputs(32)
    y = torch.arange(32) % 5
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        fc1 = model.blocks[1].mlp.fc1
        assert torch.equal(fc1.bias.grad[pruned], torch.zeros(len(pruned)))  # no gradient either
        opt.step()
    h = _units(model.eval(), layer, x)
    assert torch.equal(h[..., pruned], torch.zeros_like(h[..., pruned]))
    assert h[..., [1, 2, 3]].abs().sum() > 0  # the kept units still work


@pytest.mark.parametrize("key", ["timm-vit", "timm-mixer", "torchvision-vit"])
def test_compact_model_equals_the_masked_model(key, tmp_path):
    _, name, hidden, fc1, fc2 = MODELS[key]
    model = _model(key)
    find_prune_layer(model, _inputs(2))
    removed = list(range(0, hidden, 3))
    set_pruned(model, name, removed, hidden)
    x = _inputs(10)
    res = compact_model(model, name, x[:1], real_inputs=x)
    assert res.exported, res.note
    assert res.anchor == fc1 and set(res.coupled_modules) == {fc1, fc2}
    small = res.model
    assert small.get_submodule(fc1).out_features == hidden - len(removed)
    assert small.get_submodule(fc2).in_features == hidden - len(removed)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5
    save_compact(res, tmp_path / "c.safetensors")
    again = load_compact(MODELS[key][0]().eval(), tmp_path / "c.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    baked = bake_masks(model, x[:1], real_inputs=x)  # fc1's rows and biases zeroed: GELU(0) == 0
    assert baked.baked, baked.note
    assert baked.anchors == {name: fc1}


def test_masks_round_trip_with_their_channel_dim(tmp_path):
    model = _model("timm-vit")
    layer = find_prune_layer(model, _inputs(2)).name
    set_pruned(model, layer, [1, 2, 3], 128)
    save_pruned(model, tmp_path / "m.safetensors")
    fresh = _vit().eval()  # no annotation: the file's metadata says channels last
    load_pruned(fresh, tmp_path / "m.safetensors")
    x = _inputs(4)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert pruned_channels(fresh, layer) == [1, 2, 3]


def test_defend_fine_prune_end_to_end():
    model = _model("timm-vit")
    x = _inputs(120, seed=3)
    y = labels_near_model(model, x, classes=5, every=4)
    train, val = make_dataset(x[:80], y[:80]), make_dataset(x[80:], y[80:])
    res = defend(model, train, val, method="fine-prune", threshold=10.0,
                 finetune=TrainConfig(epochs=1, batch_size=32, lr=0.01))
    assert res.layer == "blocks.1.mlp.act" and res.num_channels == 128
    assert res.layer_reason == find_prune_layer(_model("timm-vit"), x[:2]).reason
    assert "MLP hidden units" in res.layer_reason
    assert res.pruned_channels and res.finetune is not None
    h = _units(res.model, res.layer, x[:8])
    assert torch.equal(h[..., res.pruned_channels], torch.zeros_like(h[..., res.pruned_channels]))


def test_cli_defend_loads_a_timm_safetensors_file(tmp_path):
    import safetensors.torch

    from fineprune.cli import main

    torch.manual_seed(0)
    net = _vit(classes=3).eval()
    with torch.no_grad():
        net.blocks[1].mlp.fc2.weight.mul_(10.0)
        net.head.weight.normal_(0.0, 1.0)
    safetensors.torch.save_file(net.state_dict(), str(tmp_path / "vit.safetensors"))
    x = torch.rand((60, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    y = labels_near_model(net, x, classes=3, every=5)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    out = tmp_path / "out"
    assert main(["defend", "--model", str(tmp_path / "vit.safetensors"), "--arch", TIMM_SPEC,
                 "--num-classes", "3", "--data", str(tmp_path / "data.npz"), "--method", "prune",
                 "--threshold", "10", "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["layer"] == "blocks.1.mlp.act" and info["num_channels"] == 128
    assert 0 < info["pruned_count"] < 128
    assert info["compact"]["exported"], info["compact"]["note"]
    assert info["plain_load_is_defended"] is True  # fc1's rows zeroed: GELU(0) == 0
    page = (out / "report.html").read_text()
    assert "why this layer" in page and "MLP hidden units" in page
    masked = load_pruned(build_arch(TIMM_SPEC, 3), out / "model.safetensors").eval()
    gone = pruned_channels(masked, "blocks.1.mlp.act")
    assert gone == sorted(info["pruned_channels"])
    h = _units(masked, "blocks.1.mlp.act", x[:4])
    assert torch.equal(h[..., gone], torch.zeros_like(h[..., gone]))
    compact = load_compact(build_arch(TIMM_SPEC, 3), out / "model-compact.safetensors").eval()
    with torch.no_grad():
        assert (compact(x[:8]) - masked(x[:8])).abs().max() <= 1e-5


def test_timm_arch_spec_builds_without_download_and_explains_errors(monkeypatch):
    m = build_arch(TIMM_SPEC, 4)
    assert m.head.out_features == 4 and m.patch_embed.proj.kernel_size == (8, 8) and len(m.blocks) == 2
    assert build_arch(TIMM_SPEC, 4, in_channels=1).patch_embed.proj.in_channels == 1
    with pytest.raises(BadInputError, match="vit_tiny_patch16_224"):
        build_arch("timm:vit_tiny_patch16_244", 4)
    with pytest.raises(BadInputError, match="pretrained"):
        build_arch("timm:vit_tiny_patch16_224,pretrained=True", 4)
    with pytest.raises(BadInputError, match="key=value"):
        build_arch("timm:vit_tiny_patch16_224,img_size", 4)
    with pytest.raises(BadInputError, match="cannot be built"):
        build_arch("timm:vit_tiny_patch16_224,no_such_argument=3", 4)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(BadInputError, match=r"pip install 'fineprune\[timm\]'"):
        build_arch("timm:vit_tiny_patch16_224", 4)


# The criteria beside the paper's on channels-last hidden units: one score per hidden unit (not per
# token), from the MLP's first Linear for CLP and a mask broadcast over the last dim for ANP.
CRITERIA_MODELS = ["timm-vit", "torchvision-vit"]


@pytest.mark.parametrize("key", CRITERIA_MODELS)
def test_clp_scores_hidden_units_by_the_first_linears_row_norms(key):
    _, name, hidden, fc1, _ = MODELS[key]
    model = _model(key)  # not annotated yet: the layout is read from the structure
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs(4)
    order = clp_order(model, name, x)
    assert sorted(order) == list(range(hidden))
    assert not hasattr(model.get_submodule(name), CHANNEL_DIM_ATTR)  # CLP leaves the model alone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = model.get_submodule(fc1).weight.detach().double()
    assert torch.allclose(uclc(model, name, x), torch.linalg.vector_norm(rows, dim=1))
    assert torch.allclose(uclc(model, name, x), torch.linalg.matrix_norm(rows[:, None, :], ord=2))
    # Data-free and seed-free; the same once find_prune_layer has annotated the layer.
    assert channel_order("clp", model, name, torch.zeros(3, 3, 32, 32), seed=5) == order
    find_prune_layer(model, x[:2])
    assert clp_order(model, name, x) == order
    with torch.no_grad():  # a unit whose row is scaled up is the most suspicious
        model.get_submodule(fc1).weight[order[-1]] *= 10
    assert clp_order(model, name, x)[0] == order[-1]


def test_clp_refuses_units_behind_a_layernorm():
    model = _model("timm-vit")
    with pytest.raises(ValueError, match="CLP"):  # each token normalised by its own statistics
        clp_order(model, "blocks.1.norm2", _inputs(2))


@pytest.mark.parametrize("key", CRITERIA_MODELS)
def test_anp_masks_hidden_units_not_tokens(key):
    _, name, hidden, _, _ = MODELS[key]
    model = _model(key)
    x = _inputs(32)
    y = labels_near_model(model, x, classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = anp_mask(model, name, x, y, iterations=6, batch_size=16, seed=3)
    b = anp_mask(model, name, x, y, iterations=6, batch_size=16, seed=3)
    c = anp_mask(model, name, x, y, iterations=6, batch_size=16, seed=4)
    assert a.shape == (hidden,)  # not the 17 tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and float(a.min()) < 1
    order = anp_order(model, name, x, y, iterations=6, batch_size=16, seed=3)
    assert order == torch.sort(a, stable=True).indices.tolist() and sorted(order) == list(range(hidden))
    assert not hasattr(model.get_submodule(name), CHANNEL_DIM_ATTR)  # only the copy was annotated
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A Dataset (clean_y None) is read in the same order: the same mask.
    assert torch.equal(anp_mask(model, name, make_dataset(x, y), None, iterations=6, batch_size=16, seed=3), a)


@pytest.mark.parametrize("criterion", ["clp", "anp"])
@pytest.mark.parametrize("key", CRITERIA_MODELS)
def test_defend_fine_prune_with_other_criteria(key, criterion):
    _, name, hidden, _, _ = MODELS[key]
    model = _model(key)
    x = _inputs(90, seed=3)
    y = labels_near_model(model, x, classes=5, every=4)
    train, val = make_dataset(x[:60], y[:60]), make_dataset(x[60:], y[60:])
    res = defend(model, train, val, method="fine-prune", threshold=10.0, criterion=criterion,
                 finetune=TrainConfig(epochs=1, batch_size=32, lr=0.01))
    assert res.layer == name and res.num_channels == hidden and res.finetune is not None
    expected = channel_order(criterion, _model(key), name, val, None, seed=0)
    assert res.sweep.order == expected and sorted(expected) == list(range(hidden))
    assert res.pruned_channels == expected[:res.stop_k]
    h = _units(res.model, res.layer, x[:4])
    assert torch.equal(h[..., res.pruned_channels], torch.zeros_like(h[..., res.pruned_channels]))
