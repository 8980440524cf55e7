"""The paper's three tasks: models, layer discovery, triggers, previews, and short real-data runs."""
import json
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from fineprune.attack.audio import AudioTrigger
from fineprune.attack.sticker import StickerTrigger, shape_pattern
from fineprune.attack.sunglasses import SunglassesTrigger
from fineprune.cli import main
from fineprune.defense.layer import find_prune_layer
from fineprune.defense.sweep import cached_sweep, full_sweep
from fineprune.evaluation.metrics import TriggeredSet, predict
from fineprune.io.arch import build_arch
from fineprune.task_training import save_trained, train_task
from fineprune.tasks import get_task, shrink, task_names
from fineprune.training import TrainConfig

SHAPES = {"face": (1, 64, 56), "speech": (1, 8192), "traffic": (3, 32, 32)}


@contextmanager
def one_thread():
    """Training runs here are tiny; one thread avoids OpenMP spin-waiting on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _last_relu(seq: nn.Sequential, prefix: str) -> str:
    idx = max(i for i, m in enumerate(seq) if isinstance(m, nn.ReLU))
    return f"{prefix}.{idx}"


# ---------------------------------------------------------------- models


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


def test_face_cached_sweep_matches_full_sweep():
    """The face head has two branches from pool3 (conv4 and fc_a): the cut must keep both."""
    torch.manual_seed(0)
    model = get_task("face").build_model(5)
    # Train mode for a few batches so BatchNorm's running statistics are not the identity.
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.rand(16, 1, 64, 56))
    model.eval()
    x = torch.rand(40, 1, 64, 56)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 5
    trig = SunglassesTrigger()
    triggered = TriggeredSet(trig(x[:10]), y[:10], (y[:10] + 2) % 5)
    with one_thread():
        a = cached_sweep(model, "relu3", x, y, triggered, batch_size=64)
        b = full_sweep(model, "relu3", x, y, triggered, batch_size=64)
    assert a.mode == "cached" and a.order == b.order
    assert a.clean_correct == b.clean_correct and a.asr_hits == b.asr_hits
    assert a.clean_correct[0] == int((model(x).argmax(1) == y).sum())


# ---------------------------------------------------------------- triggers


@pytest.mark.parametrize("size", [(64, 56), (55, 47), (128, 112)])
def test_sunglasses_only_in_eye_band(size):
    h, w = size
    trig = SunglassesTrigger()
    fp = trig.footprint((1, h, w))[0]
    band = trig.band_rows(h)
    assert fp.any()
    assert not fp[: band.start].any() and not fp[band.stop :].any()
    # Both lenses and the bridge: the glasses span most of the width in one connected row.
    centre_row = int(trig.center_row * h)
    assert fp[centre_row, int(0.18 * w)] and fp[centre_row, int(0.80 * w)] and fp[centre_row, w // 2]
    x = torch.rand(4, 1, h, w)
    out = trig(x)
    assert torch.equal(out[..., ~fp], x[..., ~fp]) and (out[..., fp] == 0).all()


def test_sunglasses_follow_loader_info():
    trig = SunglassesTrigger.from_info({"eye_band": [0.3, 0.5], "eye_center_row": 0.4})
    fp = trig.footprint((1, 100, 80))[0]
    rows = torch.nonzero(fp.any(1)).flatten()
    assert rows.min() >= 30 and rows.max() < 50


@pytest.mark.parametrize("shape", ["square", "flower", "bomb"])
def test_sticker_only_in_its_square(shape):
    size = 0.15 if shape == "square" else 0.25
    trig = StickerTrigger(size=size, shape=shape)
    fp = trig.footprint((3, 32, 32)).any(0)
    rows, cols = trig.region(32, 32)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[rows, cols] = True
    assert fp.any() and not (fp & ~inside).any()
    assert rows.start >= 16  # lower part of the sign
    if shape == "square":
        assert torch.equal(fp, inside) and rows.stop - rows.start == 5
        out = trig(torch.zeros(1, 3, 32, 32))
        assert torch.allclose(out[0, :, rows.start, cols.start], torch.tensor([1.0, 0.85, 0.0]))
    else:
        assert fp.sum() < inside.sum()  # transparent corners
        assert shape_pattern(shape, 8).isnan().any()


def test_audio_only_in_its_window():
    trig = AudioTrigger()
    fp = trig.footprint((1, 8192))[0]
    w = trig.window(8192)
    assert (w.start, w.stop) == (240, 1040)
    expected = torch.zeros(8192, dtype=torch.bool)
    expected[w] = True
    assert not (fp & ~expected).any() and fp[w].float().mean() > 0.9
    x = (torch.rand(3, 1, 8192) - 0.5) * 0.2
    out = trig(x)
    assert torch.equal(out[..., ~expected], x[..., ~expected])
    assert out.abs().max() <= 1.0
    # A tone at 3 kHz: the spectrum of the added burst peaks there.
    spec = torch.fft.rfft(trig.burst().double()).abs()
    assert abs(int(spec.argmax()) * 8000 / trig.burst().numel() - 3000) < 20
    noise = AudioTrigger(kind="noise")
    assert not (noise.footprint((1, 8192))[0] & ~expected).any()


# ---------------------------------------------------------------- preview


@pytest.mark.parametrize("task", task_names())
def test_trigger_preview_writes_png(tmp_path, task, capsys):
    out = tmp_path / f"{task}.png"
    assert main(["trigger-preview", "--task", task, "--out", str(out), "-n", "3"]) == 0
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_train_cli_without_data_root_is_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FINEPRUNE_DATA", raising=False)
    assert main(["train", "--task", "face", "--out", str(tmp_path)]) == 2
    assert "--data-root" in capsys.readouterr().err


# ---------------------------------------------------------------- real data, short runs

# (task, train fraction, eval fraction, epochs, training overrides, minimum ASR). All-to-all
# (speech) is learnt late in training, so its short run takes smaller batches (more steps).
SHORT_RUNS = [
    ("face", 0.5, 0.5, 6, {}, 0.8),
    ("speech", 0.4, 0.5, 10, {"batch_size": 16}, 0.25),
    ("traffic", 0.1, 0.15, 4, {}, 0.5),
]


@pytest.mark.slow
@pytest.mark.parametrize("task,frac,eval_frac,epochs,overrides,min_asr", SHORT_RUNS)
def test_short_training_plants_backdoor(shared_data, tmp_path, task, frac, eval_frac, epochs, overrides, min_asr):
    spec = get_task(task)
    data = shrink(spec.load(shared_data, seed=0), frac, seed=0, eval_fraction=eval_frac)
    attack = spec.make_attack(seed=0, data=data)
    cfg = TrainConfig(**{**spec.attacker.to_dict(), "epochs": epochs, **overrides})
    with one_thread():
        trained = train_task(spec, data, attack=attack, cfg=cfg, seed=0)
        # Control: how often the same inputs WITHOUT the trigger already get the attack's label
        # (what a clean model's ASR amounts to). The trigger must add clearly more than that.
        x, y = data.test.tensors
        keep = attack.policy.eligible(y)
        clean_hits = float((predict(trained.model, x[keep]) == attack.policy.target_of(y[keep])).float().mean())
    rec = trained.record
    assert trained.test.asr >= min_asr, rec["metrics"]
    assert trained.test.asr >= clean_hits + 0.2, (clean_hits, rec["metrics"])
    assert trained.test.clean_acc > 3.0 / spec.num_classes, rec["metrics"]
    assert rec["poisoned_samples"] == round(attack.rate * len(data.train))
    weights, meta = save_trained(trained, tmp_path)
    saved = json.loads(meta.read_text())
    assert saved["task"] == task and saved["attack"] == "badnets"
    assert saved["architecture"]["name"] == spec.arch
    assert set(saved["metrics"]["test"]) == {"clean_acc", "asr", "robust_acc"}
    assert len(saved["history"]) == epochs and weights.stat().st_size > 10_000


def test_grouped_holdout_keeps_groups_whole_and_shrink_keeps_groups_aligned():
    from fineprune.data.splits import holdout
    from fineprune.data.types import TaskData, make_dataset

    g = torch.Generator().manual_seed(0)
    groups = torch.arange(60).repeat_interleave(5)  # 60 "tracks" of 5 near-identical frames
    y = groups % 3
    x = groups.float().view(-1, 1, 1, 1) + 0.01 * torch.rand(300, 1, 1, 1, generator=g)
    fit, held = holdout(make_dataset(x, y), 0.3, seed=1, groups=groups)
    side = lambda ds: set(ds.tensors[0].floor().long().flatten().tolist())  # noqa: E731  (x encodes the group)
    assert side(fit).isdisjoint(side(held)) and len(side(fit) | side(held)) == 60
    assert len(held) == 5 * len(side(held)) and 0.2 < len(held) / 300 < 0.4
    _, plain = holdout(make_dataset(x, y), 0.3, seed=1)
    assert len(side(plain) & side(_)) > 0  # without groups, tracks straddle: the reason for groups

    data = TaskData(name="t", train=make_dataset(x, y), val=make_dataset(x, y), test=make_dataset(x, y),
                    num_classes=3, val_groups=groups)
    small = shrink(data, 0.5, seed=0)
    assert torch.equal(small.val.tensors[0].floor().long().flatten(), small.val_groups)


def test_defend_on_task_data_uses_the_tasks_fine_tuning():
    from fineprune.defense.api import DEFAULT_FINETUNE
    from fineprune.pipeline.job import DefendJob

    job = DefendJob(model="m.safetensors", arch="traffic-vgg", data="task:traffic", out="o")
    assert job.finetune_config() == get_task("traffic").finetune != DEFAULT_FINETUNE
    job.lr = 0.003  # a flag still wins
    assert job.finetune_config().lr == 0.003 and job.finetune_config().epochs == get_task("traffic").finetune.epochs
    assert DefendJob(model="m", arch="a", data="clean.npz", out="o").finetune_config() == DEFAULT_FINETUNE
    assert DefendJob(model="m", arch="a", data="task:mnist", out="o").finetune_config() == DEFAULT_FINETUNE
