import pytest
import torch
import torchvision
from torch import nn

from fineprune.defense.layer import find_prune_layer
from fineprune.errors import LayerNotFoundError
from fineprune.models.small import AudioCNN1d, SmallCNN


def _check_output(model, name, x):
    """The chosen module's output is the last conv feature map: (N, C, ...) with spatial dims."""
    outs = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: outs.setdefault("o", o))
    model.eval()
    with torch.no_grad():
        model(x)
    h.remove()
    return outs["o"]


def test_plain_cnn_picks_relu_after_last_conv():
    m = SmallCNN()
    choice = find_prune_layer(m, torch.rand(2, 1, 28, 28))
    assert choice.name == "features.7"
    assert isinstance(choice.module, nn.ReLU)
    assert choice.output_shape == (2, 64, 7, 7)


def test_resnet18_picks_last_stage_output():
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    choice = find_prune_layer(m, torch.rand(2, 3, 32, 32))
    assert choice.name == "layer4"
    assert choice.channels == 512
    out = _check_output(m, "layer4", torch.rand(2, 3, 32, 32))
    assert (out >= 0).all()  # after the stage's ReLU


def test_vgg11_bn_picks_last_relu():
    m = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    choice = find_prune_layer(m, torch.rand(2, 3, 32, 32))
    last_relu = [n for n, mod in m.features.named_children() if isinstance(mod, nn.ReLU)][-1]
    assert choice.name == f"features.{last_relu}"
    assert choice.channels == 512


def test_mobilenet_v3_small_picks_last_feature_map():
    m = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    choice = find_prune_layer(m, torch.rand(2, 3, 64, 64))
    assert choice.name in ("features", "features.12")
    assert choice.channels == 576
    assert len(choice.output_shape) == 4


def test_conv1d_audio_model():
    m = AudioCNN1d()
    choice = find_prune_layer(m, torch.rand(2, 1, 800))
    assert choice.name == "features"  # the Sequential returns the last ReLU's output itself
    assert choice.channels == 64 and len(choice.output_shape) == 3


def test_no_conv_raises_with_candidates():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(LayerNotFoundError) as err:
        find_prune_layer(mlp, torch.rand(2, 16))
    msg = str(err.value)
    assert "no convolutional layer" in msg and "1 (Linear" in msg and "`layer`=NAME" in msg


def test_named_layer_and_bad_names():
    m = SmallCNN()
    x = torch.rand(2, 1, 28, 28)
    assert find_prune_layer(m, x, "features.4").channels == 32
    with pytest.raises(LayerNotFoundError, match="no module named"):
        find_prune_layer(m, x, "nope")
    r = torchvision.models.resnet18(weights=None)
    with pytest.raises(LayerNotFoundError, match="runs 2 times"):
        find_prune_layer(r, torch.rand(2, 3, 32, 32), "layer4.1.relu")


def test_model_declared_prune_layer_is_used():
    m = SmallCNN()
    m.prune_layer = "features.4"
    assert find_prune_layer(m, torch.rand(2, 1, 28, 28)).name == "features.4"
    assert find_prune_layer(m, torch.rand(2, 1, 28, 28), "features.1").name == "features.1"
