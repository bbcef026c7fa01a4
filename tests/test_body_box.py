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


def test_box_covers_torso_and_arm_grown_by_the_margin_and_ignores_table_and_specks():
    hu = np.full((60, 50, 24), -1000.0)
    hu[10:34, 8:32, 2:22] = 40.0  # torso (48 x 48 x 40 mm)
    hu[14:24, 14:24, 6:16] = -850.0  # lung inside the torso: still inside the box
    hu[40:54, 12:36, 4:20] = 60.0  # an arm apart from the torso (28 x 48 x 32 mm), lying on the pad below
    hu[0:60, 40:42, 0:24] = 150.0  # the table: 4 mm thick, as wide as the field of view
    hu[2, 46, 2] = 300.0  # a speck of noise in the air
    hu[40:54, 36:40, 4:20] = -100.0  # a pad on the table (table and pad: 12 mm): touching, yet not body
    box = body_box(_normalised(hu), body_threshold(STATS), spacing_mm=(2.0, 2.0, 2.0), margin_mm=0.0,
                   min_part_ml=0.1, min_thickness_mm=16.0)
    # the cores' box grown back by the erosion (2 + 1 coarse voxels of 2): torso and arm; of the table (x 0-60,
    # y 40-41) only what lies under the arm within that growth, not its width
    assert 5 <= box[0].start <= 10 and 54 <= box[0].stop <= 57 and box[1].start <= 8 and 36 <= box[1].stop <= 44, box


def test_erosion_scales_with_spacing_and_keeps_thick_parts():
    hu = np.full((40, 40, 12), -1000.0)
    hu[10:30, 10:30, 2:10] = 40.0  # 20 x 20 x 8 voxels at 1 x 1 x 5 mm: 20 x 20 x 40 mm
    box = body_box(_normalised(hu), body_threshold(STATS), spacing_mm=(1.0, 1.0, 5.0), margin_mm=0.0,
                   min_part_ml=0.1, min_thickness_mm=10.0)
    assert box is not None and box[0].start <= 10 and box[0].stop >= 30  # the core grown back covers the part


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


@pytest.mark.parametrize("steps", ["torchio", "nnunet"])
def test_windows_of_air_skipped_inside_the_box_logits_are_the_whole_grids(steps):
    from lightning_flare.inference import AIR_LOGIT, sliding_window_logits
    from lightning_flare.network import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(features_per_stage=[4, 8, 16, 32], deep_supervision=False).eval()
    hu = np.full((96, 80, 24), -1000.0)
    hu[40:56, 30:46, 4:20] = 40.0  # the body, in the middle of a field of view mostly of air
    image = _normalised(hu)
    box = body_box(image, body_threshold(STATS), spacing_mm=(2.0, 2.0, 2.0), margin_mm=4.0, min_thickness_mm=8.0,
                   min_part_ml=0.5)
    kwargs = dict(patch_size=(16, 16, 16), overlap=0.5, batch_size=2, autocast=False, channels_last=False, steps=steps)
    full_counts, body_counts = {}, {}
    full = sliding_window_logits(net, image, counts=full_counts, **kwargs)
    skipped = sliding_window_logits(net, image, body=box, counts=body_counts, **kwargs)
    assert body_counts["windows_total"] == full_counts["windows"] == full_counts["windows_total"]
    assert 0 < body_counts["windows"] < full_counts["windows"] / 2  # most of this field of view is air
    torch.testing.assert_close(skipped[(slice(None), *box)], full[(slice(None), *box)], rtol=0, atol=0)
    assert torch.isfinite(skipped).all()
    covered_nowhere = (skipped[0] == 0) & (skipped[1] == -AIR_LOGIT)
    assert covered_nowhere.any() and not covered_nowhere[box].any()  # background only outside the box


def test_predictor_skip_air_setting_checks_its_values():
    from lightning_flare.predictor import InferenceSettings

    assert InferenceSettings(skip_air=True).body_margin_mm == 20.0
    with pytest.raises(ValueError, match="skip_air"):
        InferenceSettings(skip_air="yes")
    with pytest.raises(ValueError, match="body_margin_mm"):
        InferenceSettings(body_margin_mm=-1)


def test_grid_region_widens_a_small_box_to_one_window_within_the_volume():
    from lightning_flare.body_box import grid_region

    region = grid_region((slice(10, 30), slice(0, 6), slice(90, 100)), shape=(100, 50, 100), patch_size=(16, 16, 16))
    assert region[0] == slice(10, 30)  # wider than a window: the box itself
    assert region[1] == slice(0, 16)  # at the volume's start: widened inwards
    assert region[2] == slice(84, 100)  # at its end
    assert grid_region((slice(40, 46), slice(2, 8), slice(0, 4)), (100, 50, 10), (16, 16, 16)) == (
        slice(35, 51), slice(0, 16), slice(0, 10))  # about the centre; a volume shorter than the window: all of it


@pytest.mark.parametrize("steps", ["torchio", "nnunet"])
def test_window_locations_are_the_samplers_grid(steps):
    import torchio as tio

    from lightning_flare.inference import _SlicingGridSampler, grid_overlap, window_locations

    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, 70, 40, 16)))
    sampler = _SlicingGridSampler(subject, (32, 16, 16), 0.5, steps)
    assert np.array_equal(window_locations((70, 40, 16), (32, 16, 16), 0.5, steps), sampler.locations)
    if steps == "torchio":
        assert np.array_equal(sampler.locations, tio.GridSampler(subject, (32, 16, 16), grid_overlap((32, 16, 16), 0.5)).locations)
    assert len(window_locations((8, 40, 16), (32, 16, 16), 0.5, steps)) == len(window_locations((32, 40, 16), (32, 16, 16), 0.5, steps))


@pytest.mark.parametrize("steps", ["torchio", "nnunet"])
def test_box_grid_runs_a_fresh_grid_over_the_body_box(steps):
    from lightning_flare.body_box import grid_region
    from lightning_flare.inference import AIR_LOGIT, sliding_window_logits
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.plan import Plan
    from lightning_flare.predictor import InferenceSettings, Predictor

    torch.manual_seed(0)
    net = PlainConvUNet(features_per_stage=[4, 8, 16, 32], deep_supervision=False).eval()
    hu = np.full((96, 80, 24), -1000.0)
    hu[40:66, 30:46, 4:20] = 40.0  # the body, in the middle of a field of view mostly of air
    image = _normalised(hu)
    plan = Plan((8.0, 8.0, 8.0), (16, 16, 16), STATS)  # 8 mm voxels: the predictor's margin of 8 mm is one voxel
    settings = dict(sw_batch_size=2, autocast=False, sw_channels_last=False, sw_steps=steps, body_margin_mm=8.0)
    runs = {}
    for mode in (False, True, "box_grid"):
        predictor = Predictor(net, plan, InferenceSettings(skip_air=mode, **settings), device="cpu")
        runs[mode] = (predictor.logits(image), dict(predictor.counts))
    box = body_box(image, body_threshold(STATS), plan.target_spacing, 8.0)
    region = (slice(None), *grid_region(box, image.shape[1:], plan.patch_size))
    (full, full_counts), (touching, touching_counts), (boxed, boxed_counts) = runs[False], runs[True], runs["box_grid"]
    assert boxed_counts["windows_total"] == touching_counts["windows_total"] == full_counts["windows"]
    assert 0 < boxed_counts["windows"] < touching_counts["windows"] < full_counts["windows"]
    alone = sliding_window_logits(net, image[region], (16, 16, 16), 0.5, 2, autocast=False, channels_last=False, steps=steps)
    torch.testing.assert_close(boxed[region], alone, rtol=0, atol=0)  # the grid over the box, as on a crop of it
    outside = torch.ones(boxed.shape[1:], dtype=torch.bool)
    outside[region[1:]] = False
    assert outside.any() and bool((boxed[0][outside] == 0).all()) and bool((boxed[1][outside] == -AIR_LOGIT).all())
    assert boxed.shape == full.shape and torch.isfinite(boxed).all()


def test_skip_air_accepts_box_grid_only_as_a_string_choice():
    from lightning_flare.predictor import InferenceSettings

    assert InferenceSettings(skip_air="box_grid").skip_air == "box_grid"
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="skip_air"):
            InferenceSettings(skip_air=bad)


def test_box_grid_keeps_the_whole_grids_windows_where_a_fresh_grid_saves_none():
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.plan import Plan
    from lightning_flare.predictor import InferenceSettings, Predictor

    torch.manual_seed(0)
    net = PlainConvUNet(features_per_stage=[4, 8, 16, 32], deep_supervision=False).eval()
    hu = np.full((40, 40, 16), -1000.0)
    hu[6:34, 6:34, 2:14] = 40.0  # the box (grown by one voxel) spans nearly the whole field of view
    plan = Plan((8.0, 8.0, 8.0), (16, 16, 16), STATS)
    settings = dict(sw_batch_size=2, autocast=False, sw_channels_last=False, body_margin_mm=8.0)
    results = []
    for mode in (True, "box_grid"):
        predictor = Predictor(net, plan, InferenceSettings(skip_air=mode, **settings), device="cpu")
        results.append((predictor.logits(_normalised(hu)), dict(predictor.counts)))
    (touching, touching_counts), (boxed, boxed_counts) = results
    assert boxed_counts == touching_counts
    torch.testing.assert_close(boxed, touching, rtol=0, atol=0)
