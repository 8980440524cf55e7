import torch

from fineprune.data.splits import holdout, stratified_split
from fineprune.data.types import make_dataset


def test_per_class_rounding_that_empties_a_part_falls_back_to_an_interleaved_split():
    """40 people with 2 images each: 20% of 2 rounds to 0 for every class, which used to leave no
    validation data at all ("too few samples to hold out"). The split now takes 16 samples from 16
    different people, disjoint from the rest, seeded."""
    y = torch.arange(40).repeat_interleave(2)
    fit, held = stratified_split(y, (0.8, 0.2), seed=0)
    assert len(held) == 16 and len(set(y[held].tolist())) == 16
    assert set(fit.tolist()).isdisjoint(held.tolist()) and len(fit) + len(held) == 80
    assert torch.equal(held, stratified_split(y, (0.8, 0.2), seed=0)[1])
    assert not torch.equal(held, stratified_split(y, (0.8, 0.2), seed=1)[1])
    x = torch.rand(80, 1, 4, 4)
    train, val = holdout(make_dataset(x, y), 0.2, seed=0)
    assert len(train) == 64 and len(val) == 16


def test_ordinary_splits_are_unchanged_by_the_fallback():
    y = torch.arange(10).repeat_interleave(30)
    fit, held = stratified_split(y, (0.7, 0.3), seed=3)
    assert len(held) == 90 and all(int((y[held] == c).sum()) == 9 for c in range(10))
    g = torch.Generator().manual_seed(3)  # the per-class procedure, written out
    expect = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        expect.append(idx[21:30])
    assert torch.equal(held, torch.sort(torch.cat(expect)).values)
