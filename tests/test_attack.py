import pytest
import torch

from fineprune.attack.badnets import BadNets
from fineprune.attack.policy import AllToAll, AllToOne, SourceSpecific
from fineprune.attack.triggers import BlendTrigger, PatchTrigger
from fineprune.data.types import make_dataset


def test_patch_changes_only_its_region():
    x = torch.rand(5, 3, 16, 16)
    t = PatchTrigger(size=(3, 4), position=(-1, -1), color=(1.0, 1.0, 0.0))
    out = t.apply(x)
    changed = (out != x).any(dim=(0, 1))
    assert not changed[:13].any() and not changed[:, :12].any()
    assert torch.equal(out[:, :, 13:, 12:], torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(5, 3, 3, 4))
    fp = t.footprint((3, 16, 16))
    assert int(fp.sum()) == 3 * 3 * 4
    assert torch.equal(x, x.clone())  # input untouched (apply copies)


def test_blend_mixes_everywhere():
    x = torch.zeros(2, 1, 4, 4)
    t = BlendTrigger(pattern=torch.ones(1, 4, 4), alpha=0.25)
    assert torch.allclose(t.apply(x), torch.full_like(x, 0.25))
    with pytest.raises(ValueError):
        t.apply(torch.zeros(2, 3, 4, 4))


def test_policies():
    y = torch.arange(10)
    assert torch.equal(AllToAll(10).target_of(y), (y + 1) % 10)
    assert AllToOne(3).eligible(y).sum() == 9
    s = SourceSpecific(sources=(4,), target=1)
    assert torch.equal(s.target_of(y), torch.where(y == 4, 1, y))
    assert s.eligible(y).tolist() == [v == 4 for v in range(10)]


def test_poisoning_rate_and_relabel_exact():
    x = torch.rand(200, 1, 8, 8)
    y = torch.arange(200) % 10
    attack = BadNets(PatchTrigger(size=(2, 2), position=(-1, -1)), AllToOne(0), rate=0.1, seed=3)
    p = attack.poison(make_dataset(x, y))
    px, py = p.dataset.tensors
    assert p.poisoned_rows.numel() == 20
    assert (py[p.poisoned_rows] == 0).all() and (y[p.poisoned_rows] != 0).all()
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[p.poisoned_rows] = False
    assert torch.equal(px[untouched], x[untouched]) and torch.equal(py[untouched], y[untouched])
    assert torch.equal(px[p.poisoned_rows][:, :, -2:, -2:], torch.ones(20, 1, 2, 2))
    assert torch.equal(attack.poison(make_dataset(x, y)).poisoned_rows, p.poisoned_rows)  # seeded
    added = BadNets(PatchTrigger(size=(2, 2)), AllToOne(0), rate=0.1, mode="add").poison(make_dataset(x, y))
    assert len(added.dataset) == 220
    trig = attack.triggered(make_dataset(x, y))
    assert len(trig) == 180 and (trig.y_true != 0).all()


def test_source_specific_poisoning_needs_enough_sources():
    y = torch.arange(100) % 10
    with pytest.raises(ValueError, match="eligible"):
        BadNets(PatchTrigger(), SourceSpecific((4,), 1), rate=0.2).poison(make_dataset(torch.rand(100, 1, 8, 8), y))
