"""``skip_air: true`` runs the subset of the whole grid's windows that touch the body's box: inside the box the
logits are the whole grid's bit for bit, any voxel that lost a window is background. A fixed convolution plus each
window's mean stands in for the network: its output depends on where the window lies, so a moved grid shows."""
import logging

import numpy as np
import pytest
import torch
from torch import nn

from lightning_flare.inference import AIR_LOGIT, sliding_window_logits

PATCH = (16, 16, 16)
BOX = (slice(20, 30), slice(10, 20), slice(0, 16))


class StandIn(nn.Module):
    """Two classes: a 3x3x3 convolution with seeded weights, plus the window's mean (a term of the window's place),
    computed window by window."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x):
        # one window at a time: a window's logits must not depend on the batch it shares (a batch's size can change
        # the kernels or the threads' split, and so the rounding, on some CPUs); the test is about the grid
        return torch.cat([self.conv(w) + 3.0 * w.mean(dim=(2, 3, 4), keepdim=True) for w in x.split(1)])


def _image(shape=(64, 48, 16), seed=0):
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


def _run(image, body=None, **kwargs):
    counts = {}
    kwargs = dict(dict(patch_size=PATCH, overlap=0.5, batch_size=2, autocast=False, channels_last=False), **kwargs)
    return sliding_window_logits(StandIn().eval(), image, body=body, counts=counts, **kwargs), counts


def _is_air(logits):
    return (logits[0] == 0) & (logits[1:] == -AIR_LOGIT).all(0)


@pytest.mark.parametrize("steps", ["torchio", "nnunet"])
@pytest.mark.parametrize("weighting", ["hann", "gaussian"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("mirror_axes", [(), (0, 2)])
def test_inside_the_box_the_logits_are_the_whole_grids(steps, weighting, batch_size, mirror_axes):
    image = _image()
    options = dict(steps=steps, weighting=weighting, batch_size=batch_size, mirror_axes=mirror_axes)
    full, full_counts = _run(image, **options)
    subset, counts = _run(image, BOX, **options)
    # 7 x 5 x 1 windows of 16 at steps of 8; those touching x 20-30 start at 8, 16, 24, y 10-20 at 0, 8, 16
    assert full_counts == {"windows": 35, "windows_total": 35} and counts == {"windows": 9, "windows_total": 35}
    torch.testing.assert_close(subset[(slice(None), *BOX)], full[(slice(None), *BOX)], rtol=0, atol=0)
    same = (subset == full).all(0)
    assert bool((same | _is_air(subset)).all())  # elsewhere: the whole grid's logits, or background
    assert (~same).any() and torch.isfinite(subset).all()


def test_a_moved_grid_changes_the_stand_ins_logits():
    """The stand-in notices the grid's phase: a grid laid over a crop (what ``box_grid`` does) differs from the whole
    grid's inside the crop, where the subset does not (above)."""
    image = _image()
    region = (slice(None), slice(20, 44), slice(10, 34), slice(0, 16))
    full, _ = _run(image)
    moved, _ = _run(image[region])
    assert not torch.equal(moved, full[region])


@pytest.mark.parametrize("box", [(slice(0, 10), slice(40, 48), slice(0, 16)),  # a corner of the volume
                                 (slice(56, 64), slice(0, 48), slice(0, 16))])  # the last slab along x
def test_a_box_at_the_volumes_edge(box):
    image = _image()
    full, _ = _run(image)
    subset, counts = _run(image, box)
    assert 0 < counts["windows"] < counts["windows_total"] == 35
    torch.testing.assert_close(subset[(slice(None), *box)], full[(slice(None), *box)], rtol=0, atol=0)


def test_a_box_over_the_whole_volume_runs_every_window_and_changes_nothing():
    image = _image()
    full, _ = _run(image)
    subset, counts = _run(image, (slice(0, 64), slice(0, 48), slice(0, 16)))
    assert counts == {"windows": 35, "windows_total": 35}
    torch.testing.assert_close(subset, full, rtol=0, atol=0)


def test_a_volume_smaller_than_the_window_is_padded_and_the_box_kept_exact():
    image = _image((64, 10, 12))  # y and z shorter than the window: padded about the centre, cropped back
    box = (slice(40, 50), slice(2, 6), slice(0, 12))
    full, _ = _run(image)
    subset, counts = _run(image, box)
    assert subset.shape == full.shape == (2, 64, 10, 12)
    assert counts == {"windows": 3, "windows_total": 7}  # x starts 32, 40, 48 touch 40-50
    torch.testing.assert_close(subset[(slice(None), *box)], full[(slice(None), *box)], rtol=0, atol=0)


def test_a_box_that_touches_no_window_runs_the_whole_grid_and_says_so(caplog):
    image = _image()
    full, _ = _run(image)
    with caplog.at_level(logging.WARNING, logger="lightning_flare.inference"):
        subset, counts = _run(image, (slice(80, 90), slice(0, 4), slice(0, 4)))
    assert counts == {"windows": 35, "windows_total": 35} and "touches none" in caplog.text
    torch.testing.assert_close(subset, full, rtol=0, atol=0)


def _predictor(skip_air):
    from lightning_flare.plan import IntensityStats, Plan
    from lightning_flare.predictor import InferenceSettings, Predictor

    stats = IntensityStats(clip_low=-900.0, clip_high=600.0, mean=-50.0, std=250.0)
    plan = Plan((8.0, 8.0, 8.0), PATCH, stats)  # 8 mm voxels: a margin of 8 mm is one voxel
    settings = InferenceSettings(skip_air=skip_air, body_margin_mm=8.0, sw_batch_size=3, autocast=False,
                                 sw_channels_last=False)
    return Predictor(StandIn().eval(), plan, settings, device="cpu"), stats


def _normalised(hu, stats):
    return torch.from_numpy((np.clip(hu, stats.clip_low, stats.clip_high) - stats.mean) / stats.std)[None].float()


def test_predictor_without_a_body_runs_the_whole_grid_and_says_so(caplog):
    whole, stats = _predictor(False)
    skipping, _ = _predictor(True)
    image = _normalised(np.full((64, 48, 16), -1000.0), stats)
    with caplog.at_level(logging.WARNING, logger="lightning_flare.predictor"):
        logits = skipping.logits(image)
    assert "no body found" in caplog.text
    torch.testing.assert_close(logits, whole.logits(image), rtol=0, atol=0)
    assert skipping.counts == whole.counts == {"windows": 35, "windows_total": 35}


def test_predictor_skips_air_exactly_inside_the_body_box():
    from lightning_flare.body_box import body_box, body_threshold

    whole, stats = _predictor(False)
    skipping, _ = _predictor(True)
    hu = np.full((64, 48, 16), -1000.0)
    hu[22:30, 12:20, 2:14] = 40.0  # 64 x 64 x 96 mm of soft tissue in a field of view of air
    image = _normalised(hu, stats)
    box = body_box(image, body_threshold(stats), (8.0, 8.0, 8.0), 8.0)
    full, subset = whole.logits(image), skipping.logits(image)
    assert box is not None and 0 < skipping.counts["windows"] < skipping.counts["windows_total"] == 35
    torch.testing.assert_close(subset[(slice(None), *box)], full[(slice(None), *box)], rtol=0, atol=0)
    assert bool(((subset == full).all(0) | _is_air(subset)).all())
