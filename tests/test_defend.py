import copy

import torch
from conftest import labels_near_model

from fineprune import FinePruning, Pruning, TrainConfig, TriggeredSet, defend
from fineprune.data.types import make_dataset
from fineprune.defense.mask import pruned_channels
from fineprune.evaluation.metrics import accuracy
from fineprune.models.small import SmallCNN


def _setup(scale: float = 1.0):
    """`scale` > 1 strengthens the classifier so the features, not the biases, decide."""
    torch.manual_seed(0)
    m = SmallCNN(width=8).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(scale)
    x = torch.rand(200, 1, 28, 28)
    y = labels_near_model(m, x, every=4, shift=3)
    return m, make_dataset(x[:120], y[:120]), make_dataset(x[120:], y[120:])


def test_pruning_returns_exactly_the_model_at_the_stop_point():
    model, _, val = _setup()
    original = copy.deepcopy(model.state_dict())
    res = Pruning(threshold=4.0).fit(model, val)
    k = res.stop_k
    assert res.pruned_channels == res.sweep.order[:k]
    assert pruned_channels(res.model, res.layer) == sorted(res.pruned_channels)
    assert res.layer_reason.startswith("last convolutional feature map")  # the report's "why this layer"
    # Its accuracy is the sweep's accuracy at k (not at k+1), and within the threshold.
    acc = accuracy(res.model, val)
    assert acc == res.sweep.clean_acc[k]
    assert res.sweep.clean_acc[0] - acc <= 0.04 + 1e-9
    if k < res.num_channels:
        assert res.sweep.clean_acc[0] - res.sweep.clean_acc[k + 1] > 0.04
    # The caller's model is untouched.
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in original.items())
    assert pruned_channels(model, res.layer) == []


def test_fine_pruning_keeps_masks_and_picks_best_epoch():
    model, train, val = _setup()
    trig = TriggeredSet(val.tensors[0][:30], val.tensors[1][:30], torch.zeros(30, dtype=torch.long))
    res = FinePruning(threshold=10.0, finetune=TrainConfig(epochs=3, lr=0.05, batch_size=32)).fit(
        model, train, val, trig)
    assert len(res.finetune.epochs) == 3 and res.finetune.best_epoch in (1, 2, 3)
    best = max(e.val_acc for e in res.finetune.epochs)
    assert res.after.clean_acc == best
    assert pruned_channels(res.model, res.layer) == sorted(res.pruned_channels)
    assert res.after.asr is not None and res.before.asr is not None


def test_defend_dispatches_and_validates():
    model, train, val = _setup()
    r = defend(model, train, val, "fine-tune", finetune=TrainConfig(epochs=1))
    assert r.method == "fine-tune" and r.pruned_channels == [] and r.sweep is None
    assert r.layer is None and r.layer_reason is None
    for bad in ("prune-fine", ""):
        try:
            defend(model, train, val, bad)
        except ValueError as exc:
            assert "method must be one of" in str(exc)
        else:
            raise AssertionError("bad method accepted")
    try:
        defend(model, None, val, "fine-prune")
    except ValueError as exc:
        assert "clean training data" in str(exc)
    else:
        raise AssertionError("fine-prune without training data accepted")


def test_fine_tuning_that_wrecks_accuracy_is_discarded_by_the_guard():
    """Labels the model predicts (75%) are what a defender's data looks like to a good model; a
    learning rate far too high destroys it (the face network at lr 0.05). The accuracy guard then
    keeps the model from before fine-tuning, says so, and never returns the wrecked one."""
    model, train, val = _setup()
    wild = defend(model, train, val, "fine-tune", finetune=TrainConfig(epochs=2, lr=50.0, batch_size=32), lr_factors=(1.0,))
    assert all(e.val_acc < wild.before.clean_acc - 0.04 for e in wild.finetune.epochs)  # every epoch wrecked
    assert wild.after.clean_acc == wild.before.clean_acc  # the original model, unchanged
    for a, b in zip(wild.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert wild.finetune.best_epoch == 0
    assert len(wild.warnings) == 1 and "fine-tuning discarded" in wild.warnings[0]
    calm = defend(model, train, val, "fine-tune", finetune=TrainConfig(epochs=1, lr=1e-4, batch_size=32))
    assert abs(calm.before.clean_acc - calm.after.clean_acc) <= 0.04 and calm.warnings == []
    model, train, val = _setup(scale=20.0)  # pruning stops early and fine-tuning has work
    pruned = defend(model, train, val, "fine-prune", threshold=4.0,
                    finetune=TrainConfig(epochs=2, lr=50.0, batch_size=32), lr_factors=(1.0,))
    assert 0 < pruned.stop_k < pruned.num_channels
    assert all(e.val_acc < pruned.before.clean_acc - 0.04 for e in pruned.finetune.epochs)
    assert 100 * (pruned.before.clean_acc - pruned.after.clean_acc) <= 4.0 + 1e-9  # within the guard
    n = len(val)
    assert round(pruned.after.clean_acc * n) == pruned.sweep.clean_correct[pruned.stop_k]
    assert "the pruned model" in pruned.warnings[0]
    assert Pruning(threshold=4.0).fit(model, val).warnings == []  # no fine-tuning, nothing to flag


def test_discarded_fine_tuning_is_retried_gentler_and_divergence_stops_early():
    """The guard's second half: a run it discards is retried from the same start at a gentler
    learning rate, and the first run within the threshold is kept (chosen on validation data);
    a run whose loss becomes non-finite stops at once and counts as diverged."""
    model, train, val = _setup()
    res = defend(model, train, val, "fine-tune", finetune=TrainConfig(epochs=2, lr=50.0, batch_size=32),
                 lr_factors=(1.0, 1e-6))
    assert [a["lr"] for a in res.finetune.attempts] == [50.0] and res.finetune.lr == 50.0 * 1e-6
    assert res.finetune.best_epoch in (1, 2)  # a fine-tuned epoch is kept, not the original model
    assert 100 * (res.before.clean_acc - res.after.clean_acc) <= 4.0 + 1e-9
    assert len(res.warnings) == 1 and "retried gentler" in res.warnings[0] and "lr 5e-05" in res.warnings[0]
    plain = defend(model, train, val, "fine-tune", finetune=TrainConfig(epochs=2, lr=50.0 * 1e-6, batch_size=32))
    for a, b in zip(res.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)  # the retry starts from the same weights as a first run at that lr
    blown = defend(model, train, val, "fine-tune", finetune=TrainConfig(epochs=5, lr=1e30, batch_size=32),
                   lr_factors=(1.0,))
    assert blown.finetune.attempts[0]["diverged"] and len(blown.finetune.epochs) < 5
    assert "diverged" in blown.warnings[0] and blown.finetune.best_epoch == 0


def test_other_criteria_and_the_bound_stop_rule_run_through_the_same_exact_sweep():
    """The pruning order can come from a trigger-agnostic criterion (CLP: data-free; ANP); the stop
    rule and the masks are the same, so the model returned is the sweep's model at the stop point."""
    model, _, val = _setup(scale=20.0)
    n = len(val)
    for criterion in ("clp", "anp"):
        res = Pruning(threshold=4.0, criterion=criterion).fit(model, val)
        assert res.sweep.criterion == criterion and sorted(res.sweep.order) == list(range(res.num_channels))
        assert res.pruned_channels == res.sweep.order[:res.stop_k]
        assert round(res.after.clean_acc * n) == res.sweep.clean_correct[res.stop_k]
    paper = Pruning(threshold=4.0).fit(model, val)
    bound = Pruning(threshold=4.0, stop_rule="bound").fit(model, val)
    assert bound.sweep.order == paper.sweep.order and bound.stop_k <= paper.stop_k
    for bad in ({"criterion": "magic"}, {"stop_rule": "loose"}):
        try:
            Pruning(**bad)
        except ValueError as exc:
            assert next(iter(bad.values())) in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")


def test_epoch_asr_off_measures_nothing_per_epoch_and_changes_nothing_else():
    """Grid cells turn the per-epoch triggered evaluation off: the same weights and choices, only
    the curve's ASR points are missing."""
    from fineprune import RunOptions

    model, train_ds, val = _setup()
    x, y = val.tensors
    trig = TriggeredSet(x[:40], y[:40], (y[:40] + 1) % 10)
    cfg = TrainConfig(epochs=2, lr=0.01, batch_size=32)
    on = defend(model, train_ds, val, "fine-prune", triggered=trig, finetune=cfg)
    off = defend(model, train_ds, val, "fine-prune", triggered=trig, finetune=cfg, run=RunOptions(epoch_asr=False))
    assert all(e.asr is not None for e in on.finetune.epochs) and all(e.asr is None for e in off.finetune.epochs)
    assert on.after == off.after and on.finetune.best_epoch == off.finetune.best_epoch
    a, b = on.model.state_dict(), off.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
