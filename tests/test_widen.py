"""Widening the pruned layer (the pruning-aware attacker's "add neurons"): the network computes
the same function until trained, the defense runs on the widened model, and the width is recorded
so a stored widened model is rebuilt and reused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fineprune import RunOptions, defend
from fineprune.attack.widen import WidenError, widen_layer
from fineprune.defense.layer import find_prune_layer
from fineprune.defense.mask import pruned_channels, set_pruned
from fineprune.io.arch import build_arch


@pytest.mark.parametrize("arch, shape", [
    ("demo-cnn", (1, 28, 28)),  # consumer: Linear after nn.Flatten
    ("face-deepid-bn", (1, 64, 56)),  # BatchNorm before the ReLU; consumers: conv4 and Linear after .flatten(1)
])
def test_widening_keeps_the_function_and_the_mask(arch, shape, one_thread):
    torch.manual_seed(0)
    model = build_arch(arch, 10)
    x = torch.rand(16, *shape)
    choice = find_prune_layer(model, x[:2])
    set_pruned(model, choice.name, [0, 3], choice.channels)
    model.eval()
    with torch.no_grad():
        before = model(x)
    info = widen_layer(model, choice.name, 6, x[:2])
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before)
    assert info.channels_after == choice.channels + 6 == find_prune_layer(model, x[:2]).channels
    assert pruned_channels(model, choice.name) == [0, 3]  # the mask follows; new channels are kept
    # The new channels are live and their consumers learn: the consumer's new weights get gradients.
    model.train()
    model(x).sum().backward()
    consumer = model.get_submodule(info.consumers[-1])
    grad_new = consumer.weight.grad.view(consumer.weight.shape[0], info.channels_after, -1)[:, choice.channels:]
    assert grad_new.abs().sum() > 0


def test_layouts_that_cannot_be_widened_exactly_are_refused():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
            self.skip = nn.Conv2d(3, 8, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            h = self.relu(self.conv(x)) + self.skip(x)  # the channels meet another branch
            return self.fc(h.mean((2, 3)))

    model = Residual()
    x = torch.rand(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WidenError, match="relu"):
        widen_layer(model, "relu", 2, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # left as it was


def test_widened_pruning_aware_model_is_recorded_defended_and_reused(tmp_path, one_thread):
    from fineprune.experiment import ModelStore, get_model, load_task_data, model_provenance, prepare_task
    from fineprune.tasks import get_task

    task = get_task("mnist")
    data = load_task_data(task, "", 0, 0.1)
    setup = prepare_task(task, data, data_root=".", seed=0, subsample=0.1, epochs=1, device="cpu")
    store = ModelStore(tmp_path / "models")
    clean, clean_info, _ = get_model(setup, "none", store)
    model, info, reused = get_model(setup, "pruning-aware", store, clean=lambda: (clean, clean_info), pa_widen=5)
    assert not reused
    channels = find_prune_layer(clean, setup.attacker_val.tensors[0][:2]).channels
    assert info["widen"]["extra"] == 5 and info["widen"]["channels_after"] == channels + 5
    name, recipe = model_provenance(setup, "pruning-aware", pa_widen=5)
    assert recipe["pa_widen"] == 5 and name.endswith("widen5")
    assert recipe != model_provenance(setup, "pruning-aware")[1]  # the unwidened model has its own files
    # The decoys are the pruned original channels; the new ones are live.
    assert info["decoys"] and max(info["decoys"]) < channels

    # Stored and rebuilt: the loader widens a fresh network the same way and gives the same outputs.
    again, _, reused = get_model(setup, "pruning-aware", store, clean=lambda: (clean, clean_info), pa_widen=5)
    assert reused
    x = setup.defender_val.tensors[0]
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))

    for method in ("prune", "fine-prune"):
        res = defend(again, setup.defender_train, setup.defender_val, method,
                     finetune=setup.ft_cfg.__class__(**{**setup.ft_cfg.to_dict(), "epochs": 1}),
                     run=RunOptions(device="cpu"))
        assert res.num_channels == channels + 5
        assert set(info["decoys"]) <= set(res.pruned_channels)  # dormant decoys go first
