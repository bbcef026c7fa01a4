"""nnU-Net default augmentation (SPEC.md "Augmentation"): probabilities, effects, label safety, pipeline shapes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchio as tio

from lightning_flare.augmentation import (
    Contrast,
    GaussianBlur,
    MultiplyIntensity,
    RandomBrightness,
    RandomContrast,
    RandomGaussianBlur,
    RandomLowResolution,
    RandomRescaledGamma,
    RandomRotationScaling,
    RescaledGamma,
    RotationScaling,
    SimulateLowResolution,
    build_augmentation,
    gaussian_blur,
    nnunet_transforms,
    spatial_margin,
    time_transforms,
)


def make_subject(shape=(8, 8, 8), channels=1, seed=0) -> tio.Subject:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((channels, *shape), generator=generator)
    label = (torch.rand((1, *shape), generator=generator) < 0.4).to(torch.uint8)
    return tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label))


def applied(subject: tio.Subject, name: str) -> list[dict]:
    return [arguments for transform_name, arguments in subject.applied_transforms if transform_name == name]


# --------------------------------------------------------------------------------------------------------------
# probabilities: run the real nnU-Net pipeline many times on a tiny subject and count what its history records
# --------------------------------------------------------------------------------------------------------------

DRAWS = 2500
EXPECTED_RATES = {
    "rotation": 0.2,
    "scaling": 0.2,
    "noise": 0.1,
    "blur": 0.2 * 0.5,  # p 0.2, then 0.5 for the single channel
    "brightness": 0.15,
    "contrast": 0.15,
    "low_resolution": 0.25 * 0.5,
    "inverted_gamma": 0.1,
    "gamma": 0.3,
    "mirror_axis_0": 0.5,
    "mirror_axis_1": 0.5,
    "mirror_axis_2": 0.5,
}


@pytest.fixture(scope="module")
def pipeline_counts() -> dict[str, int]:
    torch.manual_seed(1234)
    pipeline = build_augmentation("nnunet")
    counts = dict.fromkeys(EXPECTED_RATES, 0)
    counts["rotation_and_scaling"] = 0
    subject = make_subject()
    for _ in range(DRAWS):
        out = pipeline(subject)
        spatial = applied(out, "RotationScaling")
        rotated = any(any(d != 0 for d in a["degrees"]) for a in spatial)
        scaled = any(any(s != 1 for s in a["scale"]) for a in spatial)
        counts["rotation"] += rotated
        counts["scaling"] += scaled
        counts["rotation_and_scaling"] += rotated and scaled
        counts["noise"] += bool(applied(out, "Noise"))
        counts["blur"] += bool(applied(out, "GaussianBlur"))
        counts["brightness"] += bool(applied(out, "MultiplyIntensity"))
        counts["contrast"] += bool(applied(out, "Contrast"))
        counts["low_resolution"] += bool(applied(out, "SimulateLowResolution"))
        gammas = applied(out, "RescaledGamma")
        counts["inverted_gamma"] += any(a["invert"] for a in gammas)
        counts["gamma"] += any(not a["invert"] for a in gammas)
        flipped = {int(axis) for a in applied(out, "Flip") for axis in a["axes"]}
        for axis in range(3):
            counts[f"mirror_axis_{axis}"] += axis in flipped
    return counts


@pytest.mark.parametrize("name", list(EXPECTED_RATES))
def test_probability_of_each_transform(pipeline_counts, name):
    p = EXPECTED_RATES[name]
    rate = pipeline_counts[name] / DRAWS
    tolerance = 4 * math.sqrt(p * (1 - p) / DRAWS)
    assert abs(rate - p) < tolerance, f"{name}: rate {rate:.3f}, expected {p} +/- {tolerance:.3f}"


def test_rotation_and_scaling_are_drawn_independently(pipeline_counts):
    rate = pipeline_counts["rotation_and_scaling"] / DRAWS
    assert abs(rate - 0.04) < 4 * math.sqrt(0.04 * 0.96 / DRAWS)


def test_per_channel_probability_is_independent_per_channel():
    torch.manual_seed(0)
    transform = RandomGaussianBlur(p=1, p_per_channel=0.5)
    subject = make_subject(channels=2)
    hits = np.zeros(2)
    draws = 800
    for _ in range(draws):
        for arguments in applied(transform(subject), "GaussianBlur"):
            hits[list(arguments["channels"])] += 1
    assert np.all(np.abs(hits / draws - 0.5) < 4 * math.sqrt(0.25 / draws))


def test_pipeline_order_matches_nnunet():
    assert list(nnunet_transforms()) == [
        "rotation_scaling", "noise", "blur", "brightness", "contrast", "low_resolution",
        "inverted_gamma", "gamma", "mirror",
    ]


# --------------------------------------------------------------------------------------------------------------
# effects with hand-checkable answers
# --------------------------------------------------------------------------------------------------------------


def test_brightness_scales_by_the_factor():
    subject = make_subject()
    out = MultiplyIntensity(1.2)(subject)
    torch.testing.assert_close(out.image.data, subject.image.data * 1.2)
    torch.manual_seed(0)
    for _ in range(20):
        out = RandomBrightness((0.75, 1.25), split_at_one=True, p=1)(subject)
        ratio = out.image.data / subject.image.data
        factor = applied(out, "MultiplyIntensity")[0]["factor"]
        assert 0.75 <= factor <= 1.25
        torch.testing.assert_close(ratio, torch.full_like(ratio, factor))


def test_contrast_keeps_mean_and_original_range():
    subject = make_subject(shape=(16, 16, 16))
    x = subject.image.data
    low, high = x.min(), x.max()
    flatter = Contrast(0.8)(subject).image.data  # nothing to clip: mean kept exactly
    torch.testing.assert_close(flatter, (x - x.mean()) * 0.8 + x.mean())
    assert abs(float(flatter.mean() - x.mean())) < 1e-5
    steeper = Contrast(1.25)(subject).image.data
    assert steeper.min() >= low and steeper.max() <= high
    stretched = (x - x.mean()) * 1.25 + x.mean()
    unclipped = (stretched > low) & (stretched < high)
    torch.testing.assert_close(steeper[unclipped], stretched[unclipped])
    assert torch.all(steeper[stretched >= high] == high) and torch.all(steeper[stretched <= low] == low)
    unlimited = Contrast(1.25, preserve_range=False)(subject).image.data
    assert unlimited.max() > high
    torch.manual_seed(0)
    factors = []
    for _ in range(40):
        out = RandomContrast(p=1)(subject)
        factors.append(applied(out, "Contrast")[0]["factor"])
        assert out.image.data.min() >= low and out.image.data.max() <= high
    assert 0.75 <= min(factors) < 1 < max(factors) <= 1.25


def test_gamma_hand_values_without_stats():
    x = torch.linspace(0, 1, 64).reshape(1, 4, 4, 4)
    subject = tio.Subject(image=tio.ScalarImage(tensor=x))
    out = RescaledGamma(2.0, retain_stats=False)(subject).image.data
    torch.testing.assert_close(out, x**2)
    inverted = RescaledGamma(2.0, invert=True, retain_stats=False)(subject).image.data
    torch.testing.assert_close(inverted, 1 - (1 - x) ** 2)


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("gamma", [0.7, 1.5])
def test_gamma_retains_mean_and_std(gamma, invert):
    subject = make_subject(shape=(16, 16, 16))
    x = subject.image.data
    out = RescaledGamma(gamma, invert=invert)(subject).image.data
    assert not torch.allclose(out, x, atol=1e-3)
    assert abs(float(out.mean() - x.mean())) < 1e-4
    assert abs(float(out.std() / x.std()) - 1) < 1e-4


def test_random_gamma_draws_like_nnunet():
    torch.manual_seed(0)
    subject = make_subject()
    gammas = [applied(RandomRescaledGamma(p=1, invert=True)(subject), "RescaledGamma")[0]["gamma"] for _ in range(200)]
    below = np.mean(np.array(gammas) < 1)
    assert 0.7 <= min(gammas) and max(gammas) <= 1.5
    assert abs(below - 0.5) < 0.15  # half the draws from U(0.7, 1), half from U(1, 1.5)


def test_noise_std_within_range():
    torch.manual_seed(0)
    noise = nnunet_transforms(forced=True)["noise"]  # copy=False: give it a fresh subject each time
    stds = []
    for _ in range(30):
        out = noise(tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, 24, 24, 24))))
        drawn = applied(out, "Noise")[0]["std"]["image"]
        assert 0 <= drawn <= 0.1
        measured = float(out.image.data.std())
        assert abs(measured - drawn) < 0.1 * drawn + 1e-3
        stds.append(measured)
    assert min(stds) < 0.04 and max(stds) > 0.06


def test_blur_reduces_variance_and_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    subject = make_subject(shape=(12, 12, 12))
    x = subject.image.data
    out = GaussianBlur(1.0)(subject).image.data
    assert out.var() < 0.5 * x.var()
    assert abs(float(out.mean() - x.mean())) < 0.05
    # radius ceil(3 sigma) = 3 = scipy's int(3 sigma + 0.5) with truncate=3; torch 'reflect' = scipy 'mirror'
    expected = ndimage.gaussian_filter(x[0].double().numpy(), 1.0, mode="mirror", truncate=3.0)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)
    constant = torch.full((1, 6, 6, 6), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, (0.5, 0.8, 1.0)), constant)
    torch.manual_seed(0)
    sigmas = [applied(RandomGaussianBlur(p=1, p_per_channel=1)(subject), "GaussianBlur")[0]["sigma"] for _ in range(20)]
    assert all(0.5 <= s <= 1.0 for triple in sigmas for s in triple)
    assert any(len(set(triple)) == 3 for triple in sigmas)  # drawn per axis, as nnU-Net


def test_low_resolution_keeps_shape():
    subject = make_subject(shape=(16, 12, 10))
    x = subject.image.data
    out = SimulateLowResolution(0.5)(subject).image.data
    assert out.shape == x.shape and out.dtype == torch.float32
    assert not torch.allclose(out, x)
    torch.testing.assert_close(SimulateLowResolution(1.0)(subject).image.data, x)
    constant = tio.Subject(image=tio.ScalarImage(tensor=torch.full((1, 9, 9, 9), 2.0)))
    torch.testing.assert_close(SimulateLowResolution(0.6)(constant).image.data, constant.image.data)
    torch.manual_seed(0)
    for _ in range(10):
        out = RandomLowResolution(p=1, p_per_channel=1)(subject)
        assert 0.5 <= applied(out, "SimulateLowResolution")[0]["zoom"][0] <= 1.0
        assert out.image.data.shape == x.shape


def test_mirroring_flips_image_and_label_identically():
    torch.manual_seed(0)
    label = (torch.rand(1, 6, 7, 8) < 0.5).to(torch.uint8)
    subject = tio.Subject(image=tio.ScalarImage(tensor=label.float() * 2 - 1), label=tio.LabelMap(tensor=label))
    mirror = nnunet_transforms()["mirror"]
    seen = set()
    for _ in range(30):
        out = mirror(subject)
        axes = tuple(sorted(int(a) for f in applied(out, "Flip") for a in f["axes"]))
        seen.add(axes)
        dims = [a + 1 for a in axes]
        expected = torch.flip(label, dims) if dims else label
        assert torch.equal(out.label.data, expected)
        assert torch.equal(out.image.data, expected.float() * 2 - 1)
    assert len(seen) > 4


def test_rotation_by_90_degrees_is_rot90():
    x = torch.arange(7 * 7 * 5, dtype=torch.float32).reshape(1, 7, 7, 5)
    label = (x.long() % 3 == 0).to(torch.uint8)
    subject = tio.Subject(image=tio.ScalarImage(tensor=x), label=tio.LabelMap(tensor=label))
    out = RotationScaling(degrees=(0, 0, 90))(subject)
    torch.testing.assert_close(out.image.data, torch.rot90(x, -1, dims=(1, 2)), atol=1e-3, rtol=0)
    assert torch.equal(out.label.data, torch.rot90(label, -1, dims=(1, 2)))


def test_scaling_above_one_zooms_out_and_pads_with_zero():
    shape = (21, 21, 21)
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    label[:, 5:16, 5:16, 5:16] = 1
    image = torch.ones((1, *shape))
    subject = tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label))
    out = RotationScaling(scale=2.0)(subject)
    assert out.label.data.dtype == torch.uint8
    assert 0.08 < out.label.data.sum() / label.sum() < 0.2  # about 1/8 of the volume
    assert out.image.data[0, 10, 10, 10] == 1 and out.image.data[0, 0, 0, 0] == 0  # default_pad_value 0


def test_random_rotation_scaling_keeps_label_values_and_shapes():
    torch.manual_seed(0)
    subject = make_subject(shape=(20, 18, 16))
    transform = RandomRotationScaling(p_rotation=1, p_scaling=1)
    for _ in range(5):
        out = transform(subject)
        assert out.image.data.shape == subject.image.data.shape and out.image.data.dtype == torch.float32
        assert out.label.data.shape == subject.label.data.shape and out.label.data.dtype == torch.uint8
        assert set(out.label.data.unique().tolist()) <= {0, 1}
        (arguments,) = applied(out, "RotationScaling")
        assert all(-30 <= d <= 30 for d in arguments["degrees"])
        assert len(set(arguments["scale"])) == 1 and 0.7 <= arguments["scale"][0] <= 1.4
    untouched = RandomRotationScaling(p_rotation=0, p_scaling=0)(subject)
    assert torch.equal(untouched.image.data, subject.image.data) and not applied(untouched, "RotationScaling")


INTENSITY_NAMES = ["noise", "blur", "brightness", "contrast", "low_resolution", "inverted_gamma", "gamma"]


@pytest.mark.parametrize("name", INTENSITY_NAMES)
def test_intensity_transforms_leave_the_label_alone(name):
    torch.manual_seed(0)
    subject = make_subject(shape=(10, 10, 10))
    out = nnunet_transforms(forced=True)[name](subject)
    assert not torch.equal(out.image.data, subject.image.data)
    assert out.label.data.dtype == torch.uint8
    assert torch.equal(out.label.data, subject.label.data)


def test_transforms_do_not_modify_their_input():
    torch.manual_seed(0)
    subject = make_subject(shape=(10, 10, 10))
    image, label = subject.image.data.clone(), subject.label.data.clone()
    build_augmentation("nnunet")(subject)
    for transform in nnunet_transforms(forced=True).values():
        transform(make_subject(shape=(10, 10, 10)))
        tio.Compose([transform])(subject)
    assert torch.equal(subject.image.data, image) and torch.equal(subject.label.data, label)


# --------------------------------------------------------------------------------------------------------------
# pipeline, margin, errors, timing
# --------------------------------------------------------------------------------------------------------------


def test_nnunet_pipeline_keeps_shapes_and_dtypes():
    subject = make_subject(shape=(40, 40, 30))
    pipeline = build_augmentation("nnunet")
    assert isinstance(pipeline, tio.Compose)
    for seed in range(6):
        torch.manual_seed(seed)
        out = pipeline(subject)
        assert out.image.data.shape == (1, 40, 40, 30) and out.image.data.dtype == torch.float32
        assert out.label.data.shape == (1, 40, 40, 30) and out.label.data.dtype == torch.uint8
        assert set(out.label.data.unique().tolist()) <= {0, 1}
        assert torch.isfinite(out.image.data).all()


def test_nnunet_pipeline_on_a_crop_enlarged_by_the_margin():
    """The sampler's contract (sampling.py is not imported: it is being reworked): augment a crop enlarged by
    ``spatial_margin`` per side, then centre-crop back to the patch."""
    patch = (16, 16, 12)
    margin = spatial_margin(patch)
    size = tuple(p + 2 * m for p, m in zip(patch, margin))
    pipeline = build_augmentation("nnunet")
    for seed in range(4):
        torch.manual_seed(seed)
        subject = make_subject(shape=size, seed=seed)
        subject["image"].affine = np.diag([2.0, 2.0, 3.0, 1.0])
        subject["label"].affine = np.diag([2.0, 2.0, 3.0, 1.0])
        out = pipeline(subject)
        crop = tuple(slice(m, m + p) for m, p in zip(margin, patch))
        image, label = out["image"].data[(slice(None), *crop)], out["label"].data[(slice(None), *crop)]
        assert image.shape == (1, *patch) and image.dtype == torch.float32
        assert label.shape == (1, *patch) and label.dtype == torch.uint8


@pytest.mark.parametrize("degrees, scale", [((10, -20, 25), 1.2), ((0, 0, 0), 0.8), ((0, 0, 0), 1.0)])
def test_rotation_with_crop_equals_rotation_then_crop(degrees, scale):
    subject = make_subject(shape=(20, 18, 16))
    full = RotationScaling(degrees, scale)(subject)
    centre = RotationScaling(degrees, scale, crop=(3, 2, 4))(subject)
    region = (slice(None), slice(3, 17), slice(2, 16), slice(4, 12))
    assert centre.image.data.shape == (1, 14, 14, 8) and centre.label.data.dtype == torch.uint8
    torch.testing.assert_close(centre.image.data, full.image.data[region], atol=1e-5, rtol=0)
    assert torch.equal(centre.label.data, full.label.data[region])
    np.testing.assert_allclose(centre.image.affine[:3, 3], subject.image.affine[:3, :3] @ [3, 2, 4])


@pytest.mark.parametrize("name", ["none", "basic", "nnunet"])
def test_build_augmentation_with_crop_returns_the_patch(name):
    patch = (16, 16, 12)
    margin = spatial_margin(patch)
    size = tuple(p + 2 * m for p, m in zip(patch, margin))
    transform = build_augmentation(name, crop=margin)
    for seed in range(4):
        torch.manual_seed(seed)
        subject = make_subject(shape=size, seed=seed)
        out = transform(subject)
        assert out.image.data.shape == (1, *patch) and out.image.data.dtype == torch.float32
        assert out.label.data.shape == (1, *patch) and out.label.data.dtype == torch.uint8
        if name == "none":
            region = (slice(None), *(slice(m, m + p) for m, p in zip(margin, patch)))
            assert torch.equal(out.image.data, subject.image.data[region])


def test_other_augmentation_names_still_work():
    assert build_augmentation("none") is None
    out = build_augmentation("basic")(make_subject())
    assert out.image.data.shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="augmentation"):
        build_augmentation("heavy")


def test_spatial_margin_values():
    assert spatial_margin((128, 128, 96)) == (58, 58, 55)
    assert spatial_margin((128, 128, 96), max_degrees=0) == (26, 26, 19)
    assert all(a >= b for a, b in zip(spatial_margin((128, 128, 96), all_axes_at_once=True), (58, 58, 55)))


@pytest.mark.parametrize("all_axes", [False, True])
def test_spatial_margin_keeps_padding_out_of_the_centre(all_axes):
    patch = (12, 12, 9)
    margin = spatial_margin(patch, all_axes_at_once=all_axes)
    big = tuple(p + 2 * m for p, m in zip(patch, margin))
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.ones((1, *big))))
    if all_axes:
        angles = [(a, b, c) for a in (-30, 30) for b in (-30, 30) for c in (-30, 30)]
    else:
        angles = [tuple(s * 30 if i == axis else 0 for i in range(3)) for axis in range(3) for s in (-1, 1)]
    for degrees in angles:
        out = RotationScaling(degrees=degrees, scale=1.4)(subject).image.data
        centre = out[:, margin[0]:margin[0] + patch[0], margin[1]:margin[1] + patch[1], margin[2]:margin[2] + patch[2]]
        assert torch.all(centre > 0.999), degrees


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: RandomContrast(factor=(1.2, 0.8)), "factor"),
        (lambda: RandomContrast(p_per_channel=1.5), "p_per_channel"),
        (lambda: RandomBrightness(multiplier=(0, 1)), "multiplier"),
        (lambda: RandomRescaledGamma(gamma=(-1, 1)), "gamma"),
        (lambda: RescaledGamma(0), "gamma"),
        (lambda: RandomGaussianBlur(sigma=(1.0,)), "sigma"),
        (lambda: GaussianBlur(-1), "sigma"),
        (lambda: RandomLowResolution(zoom=(0.5, 1.5)), "zoom"),
        (lambda: SimulateLowResolution(0), "zoom"),
        (lambda: SimulateLowResolution(0.5, upsampling="cubic"), "upsampling"),
        (lambda: RandomRotationScaling(p_rotation=2), "p_rotation"),
        (lambda: RandomRotationScaling(p_scaling=-0.1), "p_scaling"),
        (lambda: RandomRotationScaling(scaling=(0, 1)), "scaling"),
        (lambda: RandomRotationScaling(degrees=-5), "degrees"),
        (lambda: RandomRotationScaling(image_interpolation="cubic"), "image_interpolation"),
        (lambda: RotationScaling(scale=(1, 1)), "scale"),
        (lambda: MultiplyIntensity(1.0, channels=[-1]), "channels"),
        (lambda: spatial_margin((128, 128)), "patch_size"),
        (lambda: time_transforms((8, 8, 8), repeats=0), "repeats"),
        (lambda: build_augmentation("nnunet", crop=-1), "crop"),
        (lambda: RandomRotationScaling(crop=4, p=0.5), "p must be 1"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


@pytest.mark.parametrize("crop", [0, 2])
def test_time_transforms_reports_every_transform(crop):
    threads = torch.get_num_threads()
    timings = time_transforms((12, 12, 10), repeats=1, crop=crop)
    assert set(nnunet_transforms()) <= set(timings) and {"nnunet", "nnunet_forced"} <= set(timings)
    assert all(t > 0 for t in timings.values())
    assert torch.get_num_threads() == threads
