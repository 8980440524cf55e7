"""Mixed-precision fine-tuning (fineprune.precision): fp32 keys and ids unchanged, bf16 trains on a
CPU with the masks held at zero and about fp32's accuracy, fp16's loss scaling works through the
recipes and checkpoints, and the combinations that cannot work are refused with one clear line."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from fineprune.defense.api import DEFAULT_FINETUNE, FinePruning, FineTuning, defend
from fineprune.defense.mask import keep_mask, pruned_channels, set_pruned
from fineprune.errors import BadInputError
from fineprune.models.small import SmallCNN
from fineprune.pipeline.job import DefendJob
from fineprune.precision import Precision, check_precision, make_precision
from fineprune.purify.recipes import FST, FTSAM, Plain
from fineprune.runtime import fingerprint
from fineprune.training import TrainConfig, _run_key, make_optimizer, train, train_one_epoch

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
LAYER, PRUNED = "features.7", [0, 2, 5, 9]


def _easy(n: int, seed: int) -> TensorDataset:
    """4 classes: which quadrant of a 16x16 image holds a bright square (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 16, 16, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, 8 * r + 2: 8 * r + 6, 8 * col + 2: 8 * col + 6] += 0.7
    return TensorDataset(x, y)


def _masked_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(width=4, image_size=16, num_classes=4)
    set_pruned(model, LAYER, PRUNED, 16)
    return model


def _acc(model, ds: TensorDataset) -> float:
    x, y = ds.tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _layer_out(model, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    h = model.get_submodule(LAYER).register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return seen["o"]


# --- fp32 stays exactly what it was -------------------------------------------------------------

OLD_KEYS = {"epochs": 10, "lr": 0.05, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9,
            "weight_decay": 5e-4, "schedule": "cosine"}


def test_fp32_config_dict_run_key_and_ids_are_byte_identical():
    """TrainConfig.to_dict feeds checkpoint run keys and stored-model/grid ids: in fp32 (and without
    channels_last) it is the seven-key dict it always was, so every existing key and id holds."""
    d = DEFAULT_FINETUNE.to_dict()
    assert d == OLD_KEYS and list(d) == list(OLD_KEYS)
    assert json.dumps(d, sort_keys=True) == json.dumps(OLD_KEYS, sort_keys=True)
    assert fingerprint(TrainConfig().to_dict()) == fingerprint(
        {"epochs": 10, "lr": 0.01, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9,
         "weight_decay": 5e-4, "schedule": "cosine"})
    # A mixed-precision run is another run: its checkpoint is never resumed as an fp32 one.
    bf = TrainConfig(precision="bf16")
    assert bf.to_dict() == {**TrainConfig().to_dict(), "precision": "bf16"}
    assert TrainConfig(**bf.to_dict()) == bf and TrainConfig(**TrainConfig().to_dict()) == TrainConfig()
    model, ds = _masked_cnn(), _easy(8, 0)
    x, y = ds.tensors
    assert _run_key(model, x, y, TrainConfig(), 0) != _run_key(model, x, y, bf, 0)
    assert _run_key(model, x, y, TrainConfig(), 0) == _run_key(model, x, y, TrainConfig(precision="fp32"), 0)


def test_fp32_precision_object_is_the_plain_loop_bit_for_bit():
    ds = _easy(48, 1)
    a, b = _masked_cnn(), _masked_cnn()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05)
    for m, prec in ((a, None), (b, make_precision("fp32", CPU))):
        opt = make_optimizer(m, cfg)
        train_one_epoch(m, *ds.tensors, opt, 16, torch.Generator().manual_seed(0), CPU, precision=prec)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# --- bf16 on a CPU --------------------------------------------------------------------------------

def test_bf16_finetuning_on_cpu_keeps_masks_and_matches_fp32_accuracy():
    train_ds, test_ds = _easy(256, 0), _easy(256, 1)
    accs = {}
    for name in ("fp32", "bf16"):
        model = _masked_cnn()
        hist = train(model, train_ds, TrainConfig(epochs=8, batch_size=32, lr=1e-2, optimizer="adam",
                                                       weight_decay=0.0, precision=name),
                     device=CPU, seed=0)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
        assert pruned_channels(model, LAYER) == PRUNED and keep_mask(model, LAYER) is not None
        out = _layer_out(model, test_ds.tensors[0])
        assert torch.count_nonzero(out[:, PRUNED]) == 0 and torch.count_nonzero(out) > 0
        assert all(torch.isfinite(torch.tensor(e.train_loss)) for e in hist.epochs)
        accs[name] = _acc(model, test_ds)
    print("easy-task accuracy:", accs)
    assert accs["fp32"] > 0.9 and accs["bf16"] > 0.9
    assert abs(accs["fp32"] - accs["bf16"]) <= 0.05


def test_bf16_runs_are_deterministic_and_channels_last_changes_only_the_layout():
    ds = _easy(64, 2)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, precision="bf16")
    runs = []
    for c in (cfg, cfg, TrainConfig(epochs=1, batch_size=16, lr=0.05, channels_last=True)):
        m = _masked_cnn()
        train(m, ds, c, device=CPU, seed=3)
        runs.append(m)
    a, b, cl = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = _masked_cnn()
    train(ref, ds, TrainConfig(epochs=1, batch_size=16, lr=0.05), device=CPU, seed=3)
    # channels_last: the same arithmetic up to summation order, weights back to the plain layout
    assert all(t.is_contiguous() for t in cl.values())
    assert all(torch.allclose(cl[k], v, atol=1e-4) for k, v in ref.state_dict().items())
    assert TrainConfig(channels_last=True).to_dict()["channels_last"] is True


# --- fp16's loss scaling (CUDA-only in use; its plumbing is exercised on a CPU here) --------------

@pytest.mark.parametrize("recipe", [Plain(), FST()], ids=["plain", "fst"])
def test_fp16_loss_scaling_steps_through_single_pass_recipes(recipe):
    ds = _easy(32, 3)
    model = _masked_cnn()
    before = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    recipe.prepare(model, ds.tensors[0][:2], gen)
    prec = Precision("fp16", "cpu", torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    loss = train_one_epoch(model, *ds.tensors, opt, 16, gen, CPU, recipe=recipe, precision=prec)
    assert math.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it stepped
    assert prec.state_dict()["scale"] > 0
    assert torch.count_nonzero(_layer_out(model, ds.tensors[0])[:, PRUNED]) == 0


def test_fp16_checkpoint_resume_restores_the_loss_scale(tmp_path, monkeypatch):
    """The GradScaler's state is part of the checkpoint: a resumed fp16 run ends where an
    uninterrupted one does. (fp16 is refused on CPU in use; the refusal is lifted for this test.)"""
    from fineprune import precision

    monkeypatch.setattr(precision, "check_precision", lambda *a, **k: None)
    ds = _easy(32, 4)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, precision="fp16")
    full = _masked_cnn()
    train(full, ds, cfg, device=CPU, seed=1)
    ckpt = tmp_path / "ft.ckpt"

    class Stop(Exception):
        pass

    def stop(rec) -> None:  # a kill after epoch 1 (its checkpoint is written before on_epoch)
        if rec.epoch == 1:
            raise Stop

    part = _masked_cnn()
    with pytest.raises(Stop):
        train(part, ds, cfg, device=CPU, seed=1, checkpoint_path=ckpt, on_epoch=stop)
    state = torch.load(ckpt, weights_only=True)
    assert state["scaler"]["scale"] > 0
    resumed = _masked_cnn()
    train(resumed, ds, cfg, device=CPU, seed=1, checkpoint_path=ckpt, resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- refusals ---------------------------------------------------------------------------------------

def test_refused_combinations_say_what_to_use_instead():
    with pytest.raises(BadInputError, match=r"`precision` fp16 needs a CUDA device.*bf16"):
        check_precision("fp16", "cpu")
    with pytest.raises(BadInputError, match=r"`precision` fp16 cannot be used with `recipe` ft-sam.*bf16"):
        check_precision("fp16", "cuda", FTSAM())
    check_precision("fp16", "cuda", FST())  # single-pass recipes take the scaler
    check_precision("bf16", "cpu", FTSAM())  # bf16 needs no scaler: every recipe
    with pytest.raises(BadInputError, match=r"`precision` must be one of fp32, bf16, fp16, not 'fp8'"):
        train(_masked_cnn(), _easy(4, 0), TrainConfig(precision="fp8"), device=CPU)
    with pytest.raises(BadInputError, match="`precision` must be one of"):
        FineTuning(precision="half")
    with pytest.raises(BadInputError, match="`precision` must be one of"):
        DefendJob(model="m", arch="a", data="d", out="o", precision="half").validate()


def test_defend_refuses_fp16_on_cpu_before_the_sweep(monkeypatch):
    from fineprune.defense import api

    def no_sweep(*a, **k):
        raise AssertionError("the sweep ran before the precision was checked")

    monkeypatch.setattr(api, "sweep", no_sweep)
    ds = _easy(16, 5)
    with pytest.raises(BadInputError, match="`precision` fp16 needs a CUDA device"):
        defend(SmallCNN(width=4, image_size=16, num_classes=4), ds, ds, "fine-prune", precision="fp16")


def test_defend_api_takes_precision():
    train_ds, val_ds = _easy(128, 6), _easy(64, 7)
    assert FinePruning(precision="bf16")._finetune_config().precision == "bf16"
    assert FinePruning(finetune=TrainConfig(precision="bf16"))._finetune_config().precision == "bf16"
    assert FineTuning()._finetune_config() == DEFAULT_FINETUNE
    res = defend(_masked_cnn(), train_ds, val_ds, "fine-tune", precision="bf16",
                 finetune=TrainConfig(epochs=1, batch_size=32, lr=0.02), lr_factors=(1.0,))
    assert res.finetune is not None and len(res.finetune.epochs) == 1
    assert pruned_channels(res.model, LAYER) == PRUNED


def test_precision_and_export_as_config_keys_and_on_the_command_line(tmp_path):
    from fineprune.pipeline.config import read_config

    cfg = tmp_path / "defend.toml"
    cfg.write_text('model = "m.safetensors"\narch = "a"\ndata = "d.npz"\nout = "o"\n'
                   '[finetune]\nprecision = "bf16"\nexport = "onnx"\n')
    job = DefendJob(**read_config(cfg)).validate()
    assert job.precision == "bf16" and job.export == "onnx"
    assert job.finetune_config().to_dict() == {**DEFAULT_FINETUNE.to_dict(), "precision": "bf16"}
    assert "--precision bf16" in job.command_line() and "--export onnx" in job.command_line()
    plain = DefendJob(model="m", arch="a", data="d", out="o").validate()
    assert "--precision" not in plain.command_line() and "--export" not in plain.command_line()
    assert plain.finetune_config() == DEFAULT_FINETUNE and plain.finetune_config().to_dict() == OLD_KEYS


def test_channels_last_as_flag_config_key_and_recorded_setting(tmp_path):
    from fineprune.cli import build_parser
    from fineprune.pipeline.config import read_config

    args = build_parser().parse_args(["defend", "--model", "m", "--arch", "a", "--data", "d", "--out", "o",
                                      "--channels-last"])
    assert args.channels_last is True
    cfg = tmp_path / "defend.toml"
    cfg.write_text('model = "m.safetensors"\narch = "a"\ndata = "d.npz"\nout = "o"\nchannels_last = true\n')
    job = DefendJob(**read_config(cfg)).validate()
    assert job.finetune_config().to_dict() == {**DEFAULT_FINETUNE.to_dict(), "channels_last": True}
    assert "--channels-last" in job.command_line()
    plain = DefendJob(model="m", arch="a", data="d", out="o").validate()
    assert "--channels-last" not in plain.command_line()
