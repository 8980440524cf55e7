"""Fine-tuning recipes (fineprune.recipes): plain is today's loop bit for bit; every recipe is
deterministic, keeps pruned channels at zero and does what its docstring says."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fineprune.defense.mask import pruned_channels, set_pruned
from fineprune.models.small import AudioCNN1d, SmallCNN
from fineprune.purify.recipes import FST, FTSAM, Plain, augment_batch, classifier_head
from fineprune.purify.registry import methods, resolve

RECIPES = methods("recipe")


def get_recipe(name: str, **options):
    return resolve("recipe", {"name": name, **options})
from fineprune.training import TrainConfig, _run_key, batches, make_optimizer, train

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05)
ALL = [("plain", {}), ("augment", {}), ("augment", {"flip": True}), ("ft-sam", {}),
       ("ft-sam", {"augmentation": True}), ("fst", {})]


def _data(n: int = 48, seed: int = 0, shape=(1, 16, 16), classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))


def _cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(width=4, image_size=16)


def _old_train_one_epoch(model, x, y, opt, batch_size, generator, scheduler):
    """training.train_one_epoch as it was before recipes (a verbatim copy of its loop)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    for xb, yb in batches(x, y, batch_size, generator):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * xb.shape[0]
        count += xb.shape[0]
    model.eval()
    return total / max(count, 1)


@pytest.mark.parametrize("make", [_cnn, lambda: (torch.manual_seed(0), AudioCNN1d(width=4))[1]])
def test_plain_is_the_old_loop_bit_for_bit(make):
    data = _data() if isinstance(make(), SmallCNN) else _data(shape=(1, 200))
    ref = make()
    x, y = data.tensors
    opt = make_optimizer(ref, CFG)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=CFG.epochs * 3)
    gen = torch.Generator().manual_seed(5)
    ref_losses = [_old_train_one_epoch(ref, x, y, opt, CFG.batch_size, gen, sched) for _ in range(CFG.epochs)]
    for recipe in (None, get_recipe("plain"), Plain()):
        m = make()
        hist = train(m, data, CFG, device=CPU, seed=5, recipe=recipe)
        assert [r.train_loss for r in hist.epochs] == ref_losses
        for k, v in ref.state_dict().items():
            assert torch.equal(v, m.state_dict()[k]), k


def test_plain_keeps_the_checkpoint_key():
    m, (x, y) = _cnn(), _data().tensors
    base = _run_key(m, x, y, CFG, 0)
    assert _run_key(m, x, y, CFG, 0, Plain()) == base
    assert _run_key(m, x, y, CFG, 0, get_recipe("augment")) != base
    assert _run_key(m, x, y, CFG, 0, get_recipe("fst", alpha=0.1)) != _run_key(m, x, y, CFG, 0, get_recipe("fst"))


@pytest.mark.parametrize("name,opts", ALL)
def test_recipe_deterministic_and_keeps_pruned_channels_zero(name, opts):
    data = _data()
    runs = []
    for _ in range(2):
        m = _cnn()
        set_pruned(m, "features.7", [0, 3, 5], 16)
        hist = train(m, data, CFG, device=CPU, seed=7, recipe=get_recipe(name, **opts))
        assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in hist.epochs)
        assert pruned_channels(m, "features.7") == [0, 3, 5]
        seen = {}
        h = m.features[7].register_forward_hook(lambda mod, i, o, seen=seen: seen.__setitem__("out", o.detach().clone()))
        with torch.no_grad():
            m(data.tensors[0])
        h.remove()
        assert seen["out"][:, [0, 3, 5]].abs().max() == 0 and seen["out"].abs().max() > 0
        runs.append((m.state_dict(), [r.train_loss for r in hist.epochs]))
    (a, la), (b, lb) = runs
    assert la == lb
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,opts", [n for n in ALL if n[0] != "plain"])
def test_each_recipe_differs_from_plain(name, opts):
    data = _data()
    ref, m = _cnn(), _cnn()
    train(ref, data, CFG, device=CPU, seed=7)
    train(m, data, CFG, device=CPU, seed=7, recipe=get_recipe(name, **opts))
    assert any(not torch.equal(v, m.state_dict()[k]) for k, v in ref.state_dict().items())


def _translations(img: torch.Tensor, p: int):
    """Every crop of the zero-padded image (H, W)."""
    h, w = img.shape[-2:]
    padded = F.pad(img, (p, p, p, p))
    return [padded[..., i:i + h, j:j + w] for i in range(2 * p + 1) for j in range(2 * p + 1)]


def test_augment_images_crop_and_flip_only_when_allowed():
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, torch.Generator().manual_seed(1), flip=False)
    assert out.shape == x.shape and not torch.equal(out, x)
    for xi, oi in zip(x, out):  # pad = 16 // 8 = 2: every output is a shifted, never mirrored, input
        assert any(torch.equal(oi, t) for t in _translations(xi, 2))
        assert not any(torch.equal(oi, t) for t in _translations(xi.flip(-1), 2))
    out = augment_batch(x, torch.Generator().manual_seed(1), flip=True)
    flipped = sum(any(torch.equal(oi, t) for t in _translations(xi.flip(-1), 2)) for xi, oi in zip(x, out))
    assert 0 < flipped < 32
    a = augment_batch(x, torch.Generator().manual_seed(3), flip=True)
    assert torch.equal(a, augment_batch(x, torch.Generator().manual_seed(3), flip=True))
    small = torch.rand(4, 1, 4, 4)  # pad at least 1
    assert any(not torch.equal(o, s) for o, s in zip(augment_batch(small, torch.Generator().manual_seed(0)), small))


def test_augment_audio_shift_and_gain():
    x = torch.rand(16, 1, 100, generator=torch.Generator().manual_seed(0)) + 0.5
    out = augment_batch(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    for xi, oi in zip(x, out):
        matches = []
        for s in range(-10, 11):  # T // 10 = 10
            shifted = torch.zeros_like(xi)
            if s >= 0:
                shifted[:, s:] = xi[:, :100 - s]
            else:
                shifted[:, :100 + s] = xi[:, -s:]
            nz = shifted != 0
            gain = (oi[nz] / shifted[nz]).mean()
            if torch.equal(oi == 0, ~nz) and torch.allclose(oi, shifted * gain, atol=1e-6):
                matches.append(float(gain))
        assert matches and all(0.8 - 1e-6 <= g <= 1.2 + 1e-6 for g in matches)
    with pytest.raises(ValueError, match="images"):
        augment_batch(torch.rand(4, 7), torch.Generator())


def test_recipe_augments_only_when_asked():
    x, g = torch.rand(4, 1, 16, 16), torch.Generator()
    assert get_recipe("plain").augment(x, g) is x and get_recipe("fst").augment(x, g) is x
    assert get_recipe("augment").flip is False
    assert not torch.equal(get_recipe("ft-sam", augmentation=True).augment(x, g), x)


def _one_step(model, recipe, x, y, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def closure():
        loss = recipe.loss(model, model(x), y)
        loss.backward()
        return loss

    model.train()
    opt.zero_grad(set_to_none=True)
    return recipe.step(model, opt, closure)


@pytest.mark.parametrize("make,shape", [(_cnn, (1, 16, 16)), (lambda: (torch.manual_seed(0), AudioCNN1d(width=4))[1], (1, 200))])
def test_sam_step(make, shape):
    x, y = _data(16, shape=shape).tensors
    plain, zero, sam = make(), make(), make()
    lp = _one_step(plain, Plain(), x, y)
    lz = _one_step(zero, FTSAM(rho=0.0, label_smoothing=0.0), x, y)
    assert float(lp.detach()) == float(lz.detach())  # rho 0: SAM is plain SGD; BN statistics updated once only
    assert all(torch.equal(v, zero.state_dict()[k]) for k, v in plain.state_dict().items())
    _one_step(sam, FTSAM(rho=0.05, adaptive=False, label_smoothing=0.0), x, y)
    assert any(not torch.equal(v, sam.state_dict()[k]) for k, v in plain.state_dict().items())
    # By hand: w - lr * grad at (w + rho g / ||g||).
    ref = make()
    ref.train()
    F.cross_entropy(ref(x), y).backward()
    params = list(ref.parameters())
    norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
    with torch.no_grad():
        eps = [0.05 * p.grad / norm for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
            p.grad = None
    saved = [(m, m.momentum) for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
            p.sub_(0.1 * p.grad)
    for (n, p), q in zip(sam.named_parameters(), params):
        assert torch.allclose(p, q, atol=1e-6), n
    # Adaptive (the FT-SAM default) also differs from plain and from non-adaptive.
    asam = make()
    _one_step(asam, FTSAM(label_smoothing=0.0), x, y)
    assert any(not torch.equal(v, asam.state_dict()[k]) for k, v in sam.state_dict().items())


def test_ft_sam_defaults_and_label_smoothing():
    r = get_recipe("ft-sam")
    assert (r.rho, r.adaptive, r.label_smoothing, r.augmentation) == (2.0, True, 0.1, False)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.equal(r.loss(None, logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))


def test_fst_reinitialises_head_with_original_norm_and_penalises():
    m = _cnn()
    head = classifier_head(m, 10)
    assert head is m.classifier[3]
    w0 = head.weight.detach().clone()
    r = get_recipe("fst")
    assert r.alpha == 0.2
    r.prepare(m, torch.rand(2, 1, 16, 16), torch.Generator().manual_seed(0))
    assert not torch.allclose(head.weight, w0)
    assert torch.allclose(head.weight.norm(), w0.norm())
    assert torch.equal(r.w_orig, w0)
    x, y = _data(8).tensors
    logits = m(x)
    pen = r.loss(m, logits, y) - F.cross_entropy(logits, y)
    assert torch.allclose(pen, 0.2 * (head.weight * w0).sum(), atol=1e-6)
    # The penalty's gradient reaches the head: plain CE alone gives a different head gradient.
    r.loss(m, logits, y).backward()
    g_fst = head.weight.grad.clone()
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    assert torch.allclose(g_fst - head.weight.grad, 0.2 * w0, atol=1e-6)
    # Training keeps the head at the original norm.
    m2 = _cnn()
    train(m2, _data(), CFG, device=CPU, seed=1, recipe=get_recipe("fst"))
    assert torch.allclose(m2.classifier[3].weight.norm(), w0.norm(), rtol=1e-5)


def test_fst_finds_audio_head_and_refuses_headless_models():
    torch.manual_seed(0)
    a = AudioCNN1d(width=4, num_classes=5)
    train(a, _data(32, shape=(1, 200), classes=5), CFG, device=CPU, seed=0, recipe=FST())
    headless = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="nn.Linear"):
        FST().prepare(headless, torch.rand(2, 1, 8, 8), torch.Generator())
    with pytest.raises(RuntimeError, match="prepare"):
        FST().loss(a, torch.randn(2, 5), torch.tensor([0, 1]))


def test_get_recipe_errors():
    assert set(RECIPES) >= {"plain", "augment", "ft-sam", "fst", "sau", "i-bau", "nc-unlearn"}
    with pytest.raises(ValueError, match="plain, augment, ft-sam, fst"):
        get_recipe("sam")
    with pytest.raises(ValueError, match="rho"):
        get_recipe("fst", rho=1.0)
    assert get_recipe("ft-sam", rho=8.0).options() == {
        "name": "ft-sam", "augmentation": False, "flip": False, "label_smoothing": 0.1, "distill": 0.0,
        "temperature": 4.0, "rho": 8.0, "adaptive": True}
    # a checkpoint's key leaves the distillation options out while distillation is off (old keys hold)
    assert get_recipe("ft-sam", rho=8.0).key_options() == {
        "name": "ft-sam", "augmentation": False, "flip": False, "label_smoothing": 0.1, "rho": 8.0, "adaptive": True}
    for cls in RECIPES.values():
        assert cls.__doc__ and len(cls.__doc__) > 80


@pytest.mark.parametrize("name", ["augment", "fst", "ft-sam"])
def test_resume_with_recipe_equals_uninterrupted(tmp_path, name):
    data, cfg = _data(), TrainConfig(epochs=3, batch_size=16, lr=0.05)
    ref = _cnn()
    train(ref, data, cfg, device=CPU, seed=2, recipe=get_recipe(name, flip=True))
    ckpt, calls = tmp_path / "c.ckpt", {"n": 0}

    def dying(rec):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    m = _cnn()
    start = copy.deepcopy(m.state_dict())
    with pytest.raises(KeyboardInterrupt):
        train(m, data, cfg, device=CPU, seed=2, recipe=get_recipe(name, flip=True), checkpoint_path=ckpt,
              on_epoch=dying)
    m = _cnn()
    m.load_state_dict(start)
    train(m, data, cfg, device=CPU, seed=2, recipe=get_recipe(name, flip=True), checkpoint_path=ckpt, resume=True)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in ref.state_dict().items())
