"""The one progress channel: quiet drops everything, lines reach the caller's stream, and the library
(training, the sweep) reports its bars on whatever Progress it is given."""
from __future__ import annotations

import io

import torch
from torch.utils.data import TensorDataset
from tqdm import tqdm

from fineprune.defense.sweep import cached_sweep
from fineprune.models.small import SmallCNN
from fineprune.progress import QUIET, Progress, as_progress, current, using
from fineprune.training import TrainConfig, train


class _Bar(tqdm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.desc = kwargs["desc"]  # a disabled tqdm keeps only what `set_description_str` sets
        self.updates: list[tuple[str, int]] = []

    def update(self, n=1):
        self.updates.append((self.desc, n))
        return super().update(n)


class Recording(Progress):
    """Records lines and bar updates; shows nothing."""

    def __init__(self):
        super().__init__(io.StringIO())
        self.bars: list[_Bar] = []

    def bar(self, total, desc, unit="it", **kwargs):
        self.bars.append(_Bar(total=total, desc=desc, unit=unit, disable=True, **kwargs))
        return self.bars[-1]


def test_quiet_writes_nothing(capsys):
    QUIET.log("a line")
    with QUIET.bar(10, "work") as bar:
        bar.update(10)
    assert capsys.readouterr() == ("", "")


def test_lines_reach_the_stream(capsys):
    buf = io.StringIO()
    Progress(buf).log("to the buffer")
    assert buf.getvalue() == "to the buffer\n"
    Progress().log("to stderr")  # the default: stderr, looked up when writing
    assert capsys.readouterr() == ("", "to stderr\n")


def test_as_progress_and_current():
    p = Progress()
    assert as_progress(p) is p
    assert as_progress(False) is QUIET and as_progress(None) is QUIET
    assert type(as_progress(True)) is Progress
    assert current() is QUIET
    with using(p) as now:
        assert now is p and current() is p
        with using(False):
            assert current() is QUIET
        assert current() is p
    assert current() is QUIET


def _data(n: int = 50) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_training_reports_every_batch_on_the_given_progress(capsys):
    rec = Recording()
    train(SmallCNN(width=4), _data(), TrainConfig(epochs=2, batch_size=16), device=torch.device("cpu"),
          progress=rec, desc="fit")
    (bar,) = rec.bars
    assert bar.total == 100
    assert bar.updates == [("fit epoch 1/2", n) for n in (16, 16, 16, 2)] + [("fit epoch 2/2", n) for n in (16, 16, 16, 2)]
    assert capsys.readouterr() == ("", "")


def test_sweep_reports_both_passes():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 28, 28, generator=g), torch.randint(0, 10, (20,), generator=g)
    rec, m = Recording(), SmallCNN(width=4).eval()
    plain = cached_sweep(m, "features.7", x, y, batch_size=8)
    seen = cached_sweep(m, "features.7", x, y, batch_size=8, progress=rec)
    assert [(b.desc, sum(n for _, n in b.updates)) for b in rec.bars] == [("cache features", 20), ("sweep", 20)]
    assert seen.clean_correct == plain.clean_correct
