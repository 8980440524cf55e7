"""The paper's three tasks' models: registry, forward shapes, layer discovery, and the face sweep."""
import pytest
import torch
from conftest import assert_same_curve, labels_near_model
from torch import nn

from fineprune.attack.sunglasses import SunglassesTrigger
from fineprune.defense.layer import find_prune_layer
from fineprune.defense.sweep import cached_sweep, full_sweep
from fineprune.evaluation.metrics import TriggeredSet
from fineprune.io.arch import build_arch
from fineprune.tasks import get_task

SHAPES = {"face": (1, 64, 56), "speech": (1, 8192), "traffic": (3, 32, 32)}


def _last_relu(seq: nn.Sequential, prefix: str) -> str:
    idx = max(i for i, m in enumerate(seq) if isinstance(m, nn.ReLU))
    return f"{prefix}.{idx}"


@pytest.mark.parametrize("task", ["face", "speech", "traffic"])
def test_model_forward_shape_and_registry(task):
    spec = get_task(task)
    model = spec.build_model().eval()
    assert model is not spec.build_model()
    x = torch.rand(3, *SHAPES[task]) * (2 if task == "speech" else 1) - (1 if task == "speech" else 0)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, spec.num_classes)
    assert type(build_arch(spec.arch, 7)) is type(model)
    assert spec.synthetic_inputs(2).shape == (2, *SHAPES[task])


def test_demo_cnn_is_registered():
    model = build_arch("demo-cnn", 10)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_layer_discovery():
    face = get_task("face").build_model()
    choice = find_prune_layer(face, torch.rand(2, 1, 64, 56))
    assert choice.name == "relu3" and choice.module is face.relu3 and choice.channels == 60

    speech = get_task("speech").build_model()
    choice = find_prune_layer(speech, torch.rand(2, 1, 8192) - 0.5)
    assert choice.name == _last_relu(speech.features, "features")
    assert isinstance(speech.features[int(choice.name.split(".")[1]) - 2], nn.Conv2d)

    traffic = get_task("traffic").build_model()
    choice = find_prune_layer(traffic, torch.rand(2, 3, 32, 32))
    assert choice.name == _last_relu(traffic.features, "features")


def test_face_cached_sweep_matches_full_sweep(one_thread):
    """The face head has two branches from pool3 (conv4 and fc_a): the cut must keep both."""
    torch.manual_seed(0)
    model = get_task("face").build_model(5)
    # Train mode for a few batches so BatchNorm's running statistics are not the identity.
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.rand(16, 1, 64, 56))
    x = torch.rand(40, 1, 64, 56)
    y = labels_near_model(model, x, classes=5)  # back in eval mode from here on
    trig = SunglassesTrigger()
    triggered = TriggeredSet(trig(x[:10]), y[:10], (y[:10] + 2) % 5)
    a = cached_sweep(model, "relu3", x, y, triggered, batch_size=64)
    b = full_sweep(model, "relu3", x, y, triggered, batch_size=64)
    assert a.mode == "cached"
    assert_same_curve(a, b)
    assert a.clean_correct[0] == int((model(x).argmax(1) == y).sum())
