import torch
import torchvision

from fineprune.data.types import make_dataset
from fineprune.defense.mask import clear_mask, masked_layers, pruned_channels, set_pruned
from fineprune.defense.persist import load_pruned, save_pruned
from fineprune.models.small import SmallCNN
from fineprune.training import TrainConfig, train


def _layer_out(model, layer, x):
    got = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: got.setdefault("o", o.detach().clone()))
    model(x)
    h.remove()
    return got["o"]


def test_pruned_channels_exactly_zero_resnet18():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    pruned = [0, 5, 17, 511]
    set_pruned(m, "layer4", pruned, 512)
    x = torch.randn(4, 3, 32, 32) * 10
    # The hook we observe with runs after the mask (hooks run in registration order).
    out = _layer_out(m, "layer4", x)
    assert (out[:, pruned] == 0).all()
    assert (out[:, [1, 2, 3]] != 0).any()
    assert pruned_channels(m, "layer4") == pruned
    clear_mask(m, "layer4")
    assert pruned_channels(m, "layer4") == [] and masked_layers(m) == {}


def test_mask_zero_even_for_inf_inputs_and_keys_unchanged():
    m = SmallCNN().eval()
    keys = set(m.state_dict())
    set_pruned(m, "features.7", [3], 64)
    x = torch.full((1, 1, 28, 28), float("inf"))
    out = _layer_out(m, "features.7", x)
    assert (out[:, 3] == 0).all()
    assert set(m.state_dict()) == keys


def test_mask_survives_finetuning_and_save_load(tmp_path):
    torch.manual_seed(0)
    m = SmallCNN()
    pruned = list(range(0, 64, 3))
    set_pruned(m, "features.7", pruned, 64)
    data = make_dataset(torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, data, TrainConfig(epochs=2, lr=0.5, batch_size=16), device=torch.device("cpu"))
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())  # it trained
    x = torch.randn(8, 1, 28, 28)
    assert (_layer_out(m.eval(), "features.7", x)[:, pruned] == 0).all()

    path = tmp_path / "m.safetensors"
    save_pruned(m, path)
    fresh = load_pruned(SmallCNN(), path).eval()
    assert pruned_channels(fresh, "features.7") == pruned
    assert (_layer_out(fresh, "features.7", x)[:, pruned] == 0).all()
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_atomic_outputs_honour_umask(tmp_path):
    import os
    import stat

    from fineprune.runtime import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind
