"""The tasks' triggers stay inside their footprints (sunglasses, sticker, audio burst), and
`trigger-preview` draws them."""
import pytest
import torch

from fineprune.attack.audio import AudioTrigger
from fineprune.attack.sticker import StickerTrigger, shape_pattern
from fineprune.attack.sunglasses import SunglassesTrigger
from fineprune.cli import main
from fineprune.tasks import task_names


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


@pytest.mark.parametrize("task", task_names())
def test_trigger_preview_writes_png(tmp_path, task, capsys):
    out = tmp_path / f"{task}.png"
    assert main(["trigger-preview", "--task", task, "--out", str(out), "-n", "3"]) == 0
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
