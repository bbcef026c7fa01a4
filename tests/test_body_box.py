"""The body's bounding box on a preprocessed CT, and the windows that touch it."""
import numpy as np
import pytest
import torch

from lightning_flare.body_box import body_box, body_threshold, windows_touching
from lightning_flare.plan import IntensityStats

STATS = IntensityStats(clip_low=-900.0, clip_high=600.0, mean=-50.0, std=250.0)


def _normalised(hu: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((np.clip(hu, STATS.clip_low, STATS.clip_high) - STATS.mean) / STATS.std)[None].float()


def test_threshold_in_normalised_units():
    assert body_threshold(STATS) == pytest.approx((-500 + 50) / 250)
    high_clip = IntensityStats(clip_low=-200.0, clip_high=600.0, mean=0.0, std=100.0)
    assert body_threshold(high_clip) == pytest.approx(-2.0)  # air and fat below -200 are clipped alike


def test_box_covers_torso_and_arm_grown_by_the_margin_and_ignores_specks():
    hu = np.full((40, 30, 20), -1000.0)
    hu[10:25, 8:20, 2:18] = 40.0  # torso (15 x 12 x 16 voxels of 2 mm = 23 ml)
    hu[12:18, 11:16, 5:15] = -850.0  # lung inside the torso: still inside the box
    hu[30:34, 10:14, 4:16] = 60.0  # an arm apart from the torso (4 x 4 x 12 = 1.5 ml at 2 mm)
    hu[2, 2, 2] = 300.0  # a speck of noise in the air
    box = body_box(_normalised(hu), body_threshold(STATS), spacing_mm=(2.0, 2.0, 2.0), margin_mm=4.0, min_part_ml=1.0)
    assert box == (slice(8, 36), slice(6, 22), slice(0, 20))  # margin 2 voxels, clipped at z = 0 and 20


def test_no_body_gives_none_and_windows_touching_none_keeps_all():
    air = _normalised(np.full((10, 10, 10), -1000.0))
    assert body_box(air, body_threshold(STATS), (1.0, 1.0, 1.0)) is None
    locations = np.array([[0, 0, 0, 4, 4, 4], [4, 0, 0, 8, 4, 4]])
    assert windows_touching(locations, None).tolist() == [True, True]


def test_windows_touching_the_box():
    locations = np.array([[0, 0, 0, 4, 4, 4],   # ends where the box starts: does not touch
                          [2, 0, 0, 6, 4, 4],   # overlaps
                          [8, 0, 0, 12, 4, 4],  # starts where the box ends: does not touch
                          [2, 5, 0, 6, 9, 4]])  # beside it in y
    box = (slice(4, 8), slice(0, 4), slice(0, 4))
    assert windows_touching(locations, box).tolist() == [False, True, False, False]


def test_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        body_box(np.zeros((2, 3)), 0.0, (1.0, 1.0, 1.0))
