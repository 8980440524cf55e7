"""The CIFAR-style ResNet-20 and the `traffic-resnet` task (a BatchNorm ResNet, all-to-one patch)."""
import pytest
import torch
from conftest import assert_same_curve, labels_near_model

from fineprune.attack.policy import AllToOne
from fineprune.attack.triggers import PatchTrigger
from fineprune.defense.cut import cut_at
from fineprune.defense.head_plan import plan_head
from fineprune.defense.layer import find_prune_layer
from fineprune.defense.sweep import cached_sweep, full_sweep
from fineprune.evaluation.metrics import TriggeredSet, predict
from fineprune.io.arch import build_arch
from fineprune.models.resnet_cifar import CifarResNet, PadShortcut, resnet20
from fineprune.tasks import get_task, shrink, task_names


def test_forward_shape_and_narrow_width():
    x = torch.rand(3, 3, 32, 32)
    assert resnet20(43).eval()(x).shape == (3, 43)
    narrow = resnet20(10, width=4).eval()
    assert narrow(x).shape == (3, 10) and narrow.fc.in_features == 16
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=21)


def test_parameter_count_is_resnet20s():
    m = resnet20(10)
    n = sum(p.numel() for p in m.parameters())
    assert 0.26e6 < n < 0.28e6  # He et al. 2016, table 6: 0.27M
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 19  # + the linear head: 20 weight layers, option-A shortcuts have none
    assert sum(isinstance(mod, PadShortcut) for mod in m.modules()) == 2
    assert sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules()) == 19


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.rand(2, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_builtin_arch_and_prune_layer():
    m = build_arch("traffic-resnet20", 43).eval()
    assert isinstance(m, CifarResNet) and m.fc.out_features == 43
    assert 0.26e6 < sum(p.numel() for p in m.parameters()) < 0.28e6
    choice = find_prune_layer(m, torch.rand(2, 3, 32, 32))
    # The last stage's output: after the last block's residual add and ReLU (64 channels, 8x8).
    assert choice.name == "layer3" and choice.output_shape == (2, 64, 8, 8)


def test_task_is_registered_and_builds():
    assert "traffic-resnet" in task_names()
    spec = get_task("traffic-resnet")
    traffic = get_task("traffic")
    assert spec.loader is traffic.loader and spec.input_shape == traffic.input_shape == (3, 32, 32)
    assert spec.num_classes == traffic.num_classes == 43
    assert spec.arch == "traffic-resnet20" and spec.finetune is None
    assert (spec.poison_rate, spec.poison_mode) == (0.10, "replace")
    model = spec.build_model().eval()
    assert model(spec.synthetic_inputs(4)).shape == (4, 43)
    policy = spec.make_policy()
    assert isinstance(policy, AllToOne) and policy.target == 1
    attack = spec.make_attack(seed=0)
    x, y = torch.rand(200, 3, 32, 32), torch.arange(200) % 43
    poisoned = attack.poison(torch.utils.data.TensorDataset(x, y))
    rows = poisoned.poisoned_rows
    assert rows.numel() == 20 and bool((poisoned.dataset.tensors[1][rows] == 1).all())


def test_trigger_only_touches_its_patch():
    trigger = get_task("traffic-resnet").make_trigger()
    assert isinstance(trigger, PatchTrigger)
    foot = trigger.footprint((3, 32, 32))
    expected = torch.zeros(3, 32, 32, dtype=torch.bool)
    expected[:, 28:, 28:] = True  # 4x4, flush with the bottom-right corner
    assert torch.equal(foot, expected)
    x = torch.rand(5, 3, 32, 32)
    out = trigger(x)
    assert torch.equal(out[~expected.expand_as(out)], x[~expected.expand_as(x)])
    assert torch.equal(out[:, :, 28:, 28:], torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(5, 3, 4, 4))
    assert not torch.equal(out, x) and torch.equal(trigger(x), out)  # deterministic, not in place


def _nontrivial_bn(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=g))


def test_cached_sweep_equals_full_every_k_on_narrow_resnet20():
    torch.manual_seed(8)
    m = resnet20(43, width=4)
    _nontrivial_bn(m, 8)
    m.eval()
    n, classes = 48, 43
    x = torch.rand(n, 3, 32, 32)
    y = labels_near_model(m, x, classes)
    trig = TriggeredSet(x[: n // 2].clone(), y[: n // 2], (y[: n // 2] + 1) % classes)
    layer = find_prune_layer(m, x[:2]).name
    assert layer == "layer3"
    assert plan_head(cut_at(m, layer)).fast is not None  # the incremental path is what is tested
    full = full_sweep(m, layer, x, y, trig, batch_size=32)
    fast = cached_sweep(m, layer, x, y, trig, batch_size=32)
    assert fast.extra["fast_path"]
    assert_same_curve(fast, full)
    assert_same_curve(cached_sweep(m, layer, x, y, trig, batch_size=32, fast=False), full)
    assert len(full.order) == 16  # every channel of the last stage's output


@pytest.mark.slow
def test_short_training_plants_the_patch_backdoor(shared_data, one_thread):
    from fineprune.experiment.train import train_task
    from fineprune.training import TrainConfig

    spec = get_task("traffic-resnet")
    data = shrink(spec.load(shared_data, seed=0), 0.06, seed=0, eval_fraction=0.1)
    attack = spec.make_attack(seed=0, data=data)
    cfg = TrainConfig(**{**spec.attacker.to_dict(), "epochs": 3})
    trained = train_task(spec, data, attack=attack, cfg=cfg, seed=0)
    x, y = data.test.tensors
    keep = attack.policy.eligible(y)
    # A clean model's "ASR": how often the same inputs without the trigger already get label 1.
    clean_hits = float((predict(trained.model, x[keep]) == 1).float().mean())
    rec = trained.record
    assert rec["architecture"]["prune_layer"] == "layer3"
    assert rec["poisoned_samples"] == round(0.10 * len(data.train))
    # Measured: ASR 98.7% against 9.8% without the trigger.
    assert trained.test.asr >= 0.8 and trained.test.asr >= clean_hits + 0.5, (clean_hits, rec["metrics"])
    assert trained.test.clean_acc > 3.0 / spec.num_classes, rec["metrics"]  # 17% measured (3 epochs, 1.9k images)
