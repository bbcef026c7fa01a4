"""BatchAugmentation (lightning_flare.gpu_augmentation): the batched nnU-Net augmentation, on tiny CPU batches
(and CUDA when available)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_flare.gpu_augmentation import BatchAugmentation, build_batch_augmentation, plan_gpu_augmentation

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
INTENSITY = ("noise", "blur", "brightness", "contrast", "low_resolution", "inverted_gamma", "gamma")
OFF = {f"p_{name}": 0.0 for name in ("rotation", "scaling", "mirror", *INTENSITY)}
FORCED = {**{k: 1.0 for k in OFF}, "p_blur_per_channel": 1.0, "p_low_resolution_per_channel": 1.0}


def only(name: str, p: float = 1.0, **kwargs) -> dict:
    """Keyword arguments enabling one transform (with probability ``p``, per-channel coins forced)."""
    extra = {"blur": {"p_blur_per_channel": 1.0}, "low_resolution": {"p_low_resolution_per_channel": 1.0}}
    return {**OFF, f"p_{name}": p, **(extra.get(name, {}) if p == 1.0 else {}), **kwargs}


def batch(n: int = 4, size=(8, 8, 8), device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((n, 1, *size), generator=g) * 2 + 1
    label = (torch.rand((n, 1, *size), generator=g) > 0.7).to(torch.uint8)
    return image.to(device), label.to(device)


def per_sample(x: torch.Tensor, reduce) -> torch.Tensor:
    return reduce(x.flatten(1).double(), 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{}, FORCED], ids=["default", "forced"])
def test_shapes_dtypes_labels_and_inputs_kept(device, kwargs):
    image, label = batch(6, (10, 9, 8), device)
    before = image.clone(), label.clone()
    augment = BatchAugmentation(seed=1, **kwargs)
    for _ in range(3):
        out, out_label = augment(image, label)
        assert out.shape == image.shape and out.dtype == image.dtype and out.device == image.device
        assert out_label.shape == label.shape and out_label.dtype == label.dtype
        assert set(out_label.unique().tolist()) <= {0, 1}
        assert torch.isfinite(out).all()
    assert torch.equal(image, before[0]) and torch.equal(label, before[1])  # no in-place changes
    out, none = augment(image)  # label optional
    assert none is None and out.shape == image.shape


def test_drawn_frequencies_match_the_cpu_pipeline():
    augment = BatchAugmentation(seed=2)
    draws = 12
    counts: dict[str, float] = {}
    for _ in range(draws):
        augment(*batch(64, (8, 8, 8)))
        for key, value in augment.last_params.items():
            if value.dtype == torch.bool:
                counts[key] = counts.get(key, 0) + value.double().mean().item() / draws
    expected = {"rotation": 0.2, "scaling": 0.2, "noise": 0.1, "blur": 0.1, "brightness": 0.15, "contrast": 0.15,
                "low_resolution": 0.125, "inverted_gamma": 0.1, "gamma": 0.3, "mirror": 0.5}
    for key, p in expected.items():
        n = 64 * draws * (3 if key == "mirror" else 1)
        assert abs(counts[key] - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (key, counts[key], p)
    # parameter ranges
    params = augment.last_params
    rotated = params["rotation"]
    assert (params["degrees"][rotated].abs() <= 30).all() and (params["degrees"][~rotated] == 0).all()
    assert ((params["scale"] >= 0.7) & (params["scale"] <= 1.4)).all()
    assert ((params["noise_std"] >= 0) & (params["noise_std"] <= 0.1)).all()
    assert ((params["blur_sigma"] >= 0.5) & (params["blur_sigma"] <= 1.0)).all()
    for key, (low, high) in {"brightness_factor": (0.75, 1.25), "contrast_factor": (0.75, 1.25), "zoom": (0.5, 1.0),
                             "gamma_value": (0.7, 1.5), "inverted_gamma_value": (0.7, 1.5)}.items():
        assert ((params[key] >= low) & (params[key] <= high)).all(), key
    below = (params["gamma_value"] < 1).double().mean().item()
    assert 0.3 < below < 0.7  # BGContrast: half the draws below one


@pytest.mark.parametrize("name", ["noise", "blur", "brightness", "contrast", "inverted_gamma", "gamma"])
def test_applied_frequencies(name):
    """How often a transform at its default probability actually changes a sample."""
    defaults = BatchAugmentation(seed=0).p
    p = defaults[name] * (defaults.get(f"{name}_per_channel", 1.0))
    augment = BatchAugmentation(spatial=False, seed=3, **{**OFF, f"p_{name}": defaults[name]})
    image, label = batch(64, (8, 8, 8))
    changed = 0.0
    draws = 10
    for _ in range(draws):
        out, _ = augment(image, label)
        changed += ((out - image).flatten(1).abs().amax(1) > 1e-6).double().mean().item() / draws
    assert abs(changed - p) < 4 * math.sqrt(p * (1 - p) / (64 * draws)), (name, changed, p)


def test_mirror_frequency_and_flips():
    augment = BatchAugmentation(spatial=False, seed=4, **only("mirror", 0.5))
    image, label = batch(64, (8, 8, 8))
    flipped = []
    for _ in range(5):
        out, out_label = augment(image, label)
        mirror = augment.last_params["mirror"]
        for i in range(len(image)):
            dims = [2 + a for a in range(3) if mirror[i, a]]
            expected = image[i:i + 1].flip(dims) if dims else image[i:i + 1]
            assert torch.equal(out[i:i + 1], expected)
            assert torch.equal(out_label[i:i + 1], label[i:i + 1].flip(dims) if dims else label[i:i + 1])
        flipped.append(mirror.double().mean().item())
    assert abs(np.mean(flipped) - 0.5) < 4 * math.sqrt(0.25 / (64 * 3 * 5))


@pytest.mark.parametrize("device", DEVICES)
def test_intensity_effects(device):
    image, label = batch(8, (8, 8, 8), device)
    mean, std = per_sample(image, torch.mean), per_sample(image, torch.std)
    low, high = per_sample(image, torch.amin), per_sample(image, torch.amax)

    augment = BatchAugmentation(spatial=False, seed=5, **only("brightness"))
    out, out_label = augment(image, label)
    factor = augment.last_params["brightness_factor"][:, 0].to(device, torch.float32)
    torch.testing.assert_close(out, image * factor[:, None, None, None, None])
    assert torch.equal(out_label, label)

    augment = BatchAugmentation(spatial=False, seed=6, **only("contrast"))
    out, _ = augment(image, label)
    factor = augment.last_params["contrast_factor"][:, 0].to(device)
    assert (per_sample(out, torch.amin) >= low - 1e-5).all() and (per_sample(out, torch.amax) <= high + 1e-5).all()
    expected = ((image - mean.view(-1, 1, 1, 1, 1)) * factor.view(-1, 1, 1, 1, 1) + mean.view(-1, 1, 1, 1, 1))
    expected = torch.minimum(torch.maximum(expected, low.view(-1, 1, 1, 1, 1)), high.view(-1, 1, 1, 1, 1))
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)
    shrunk = factor <= 1  # nothing clipped: the mean is kept exactly
    assert shrunk.any()
    torch.testing.assert_close(per_sample(out, torch.mean)[shrunk], mean[shrunk], atol=1e-5, rtol=0)

    for name in ("gamma", "inverted_gamma"):
        augment = BatchAugmentation(spatial=False, seed=7, **only(name))
        out, out_label = augment(image, label)
        assert not torch.allclose(out, image)
        torch.testing.assert_close(per_sample(out, torch.mean), mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(per_sample(out, torch.std), std, atol=1e-4, rtol=1e-4)
        assert torch.equal(out_label, label)

    # every intensity transform at once: the label is untouched, shapes are kept
    augment = BatchAugmentation(spatial=False, seed=8, **{**FORCED, "p_mirror": 0.0})
    out, out_label = augment(image, label)
    assert torch.equal(out_label, label) and not torch.allclose(out, image)


def test_row_transforms_match_the_cpu_transforms():
    """Blur, contrast, gamma and low resolution compute what the CPU (TorchIO) transforms compute."""
    from lightning_flare.augmentation import Contrast, RescaledGamma, SimulateLowResolution, gaussian_blur
    from lightning_flare.gpu_augmentation import _blur_rows, _contrast_rows, _gamma_rows, _low_resolution_rows

    x = torch.randn(2, 10, 9, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([[0.55, 0.8, 1.0], [0.7, 0.6, 0.95]])
    radius = [max(1, math.ceil(3 * float(sigma[:, a].max()))) for a in range(3)]
    expected = torch.stack([gaussian_blur(x[i:i + 1], sigma[i].tolist())[0] for i in range(2)])
    torch.testing.assert_close(_blur_rows(x, sigma, radius), expected, atol=1e-6, rtol=1e-5)
    f = torch.tensor([0.8, 1.2]).view(2, 1, 1, 1)
    expected = torch.stack([Contrast(float(f[i]))._apply(x[i:i + 1])[0] for i in range(2)])
    torch.testing.assert_close(_contrast_rows(x, f), expected)
    for invert in (False, True):
        expected = torch.stack([RescaledGamma(float(g), invert=invert)._apply(x[i:i + 1])[0]
                                for i, g in enumerate((0.75, 1.4))])
        torch.testing.assert_close(_gamma_rows(x, torch.tensor([0.75, 1.4]).view(2, 1, 1, 1), invert), expected)
    expected = torch.stack([SimulateLowResolution(z)._apply(x[i:i + 1])[0] for i, z in enumerate((0.6, 0.77))])
    torch.testing.assert_close(_low_resolution_rows(x, [0.6, 0.77]), expected)


@pytest.mark.parametrize("crop", [(0, 0, 0), (3, 2, 1)])
def test_rotation_scaling_matches_the_cpu_transform(crop):
    """Same geometry as the CPU ``RotationScaling`` (nnU-Net's convention): equal labels, equal image wherever
    the sample point lies inside the input (at the border grid_sample blends with the zero padding)."""
    import torchio as tio

    from lightning_flare.augmentation import RotationScaling, rotation_scaling_matrix

    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in (14, 12, 10)], indexing="ij")
    image = (torch.sin(3 * axes[0]) * torch.cos(2 * axes[1]) + axes[2] ** 2)[None, None]
    label = ((axes[0] ** 2 + (axes[1] - 0.2) ** 2 + axes[2] ** 2) < 0.4)[None, None].to(torch.uint8)
    degrees, scale = (10.0, -20.0, 25.0), 0.8
    augment = BatchAugmentation(spatial=True, crop=crop, seed=0, **{**OFF, "p_rotation": 1.0, "p_scaling": 1.0})
    params = augment.draw(1, 1)
    params["degrees"][0] = torch.tensor(degrees, dtype=torch.float64)
    params["scale"][:] = scale
    out, out_label = augment._spatial(image, label, params)

    subject = tio.Subject(image=tio.ScalarImage(tensor=image[0].clone()), label=tio.LabelMap(tensor=label[0].clone()))
    reference = RotationScaling(degrees, scale, crop=crop)(subject)
    assert out.shape[1:] == reference["image"].data.shape
    assert torch.equal(out_label[0], reference["label"].data)
    in_shape, out_shape = np.array(image.shape[2:]), np.array(out.shape[2:])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1)
    source = (index - (out_shape - 1) / 2) @ rotation_scaling_matrix(degrees, (scale,) * 3).T + (in_shape - 1) / 2
    inside = torch.from_numpy(np.all((source >= 0) & (source <= in_shape - 1), -1))
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(out[0, 0][inside], reference["image"].data[0][inside], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_spatial_crop_and_labels(device):
    image, label = batch(16, (12, 12, 12), device)
    augment = BatchAugmentation(spatial=True, crop=2, seed=9, **{**OFF, "p_rotation": 0.5, "p_scaling": 0.5})
    out, out_label = augment(image, label)
    assert out.shape == (16, 1, 8, 8, 8) and out_label.shape == (16, 1, 8, 8, 8) and out_label.dtype == torch.uint8
    assert set(out_label.unique().tolist()) <= {0, 1}
    untouched = ~(augment.last_params["rotation"] | augment.last_params["scaling"])
    assert untouched.any() and (~untouched).any()
    centre = (slice(None), slice(None), slice(2, 10), slice(2, 10), slice(2, 10))
    keep = untouched.to(device)
    assert torch.equal(out[keep], image[centre][keep]) and torch.equal(out_label[keep], label[centre][keep])
    assert not torch.equal(out[~keep], image[centre][~keep])
    # spatial=False: only the crop (and the draws are still made, so the stream does not depend on it)
    flat = BatchAugmentation(spatial=False, crop=2, seed=9, **{**OFF, "p_rotation": 1.0, "p_scaling": 1.0})
    out, out_label = flat(image, label)
    assert torch.equal(out, image[centre]) and torch.equal(out_label, label[centre])
    # augment_batch narrows the location to the returned centre
    location = torch.tensor([[0, 0, 0, 12, 12, 12]] * 16, device=device)
    result = augment.augment_batch({"image": image, "label": label, "location": location, "case_id": ["a"] * 16})
    assert result["location"][0].tolist() == [2, 2, 2, 10, 10, 10] and result["case_id"] == ["a"] * 16


@pytest.mark.parametrize("device", DEVICES)
def test_reproducible_with_the_same_seed(device):
    image, label = batch(8, (8, 8, 8), device)
    runs = []
    for seed in (11, 11, 12):
        augment = BatchAugmentation(seed=seed, **FORCED)
        runs.append([augment(image, label) for _ in range(2)])
    for (a, la), (b, lb) in zip(runs[0], runs[1]):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(runs[0][0][0], runs[2][0][0])
    assert not torch.equal(runs[0][0][0], runs[0][1][0])  # successive batches differ
    # set_epoch reseeds from (seed, epoch): a resumed run repeats the draws of that epoch
    first, second = BatchAugmentation(seed=11), BatchAugmentation(seed=11)
    first.set_epoch(3)
    first(image, label)
    first.set_epoch(3)  # same epoch: no reseed
    first_next = first(image, label)[0]
    second.set_epoch(3)
    second(image, label)
    assert torch.equal(first_next, second(image, label)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_and_bfloat16_input(device):
    image, label = batch(4, (8, 8, 8), device)
    augment = BatchAugmentation(seed=13, **FORCED)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out, out_label = augment(image, label)
        half, half_label = augment(image.bfloat16(), label)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    assert out_label.dtype == half_label.dtype == torch.uint8


def test_factories():
    assert build_batch_augmentation("none", spatial=True, seed=0) is None
    assert build_batch_augmentation("none", spatial=True, seed=0, crop=1).crop == (1, 1, 1)
    basic = build_batch_augmentation("basic", spatial=True, seed=0)
    assert {k for k, v in basic.p.items() if v > 0 and not k.endswith("per_channel")} == {"noise", "brightness", "mirror"}
    assert not basic.brightness_split_at_one
    nnunet = build_batch_augmentation("nnunet", spatial=False, seed=0)
    assert not nnunet.spatial and nnunet.p["gamma"] == 0.3
    with pytest.raises(ValueError):
        build_batch_augmentation("elastic", spatial=True, seed=0)
    with pytest.raises(ValueError):
        BatchAugmentation(crop=5)(torch.zeros(1, 1, 8, 8, 8))

    from lightning_flare.augmentation import spatial_margin

    margin = spatial_margin((16, 16, 12))
    plan = plan_gpu_augmentation("nnunet", (16, 16, 12), gpu_spatial=True, seed=0, rank=1)
    assert plan.worker_transform is None and plan.sampler_margin == (0, 0, 0)
    assert plan.sampler_patch_size == tuple(p + 2 * m for p, m in zip((16, 16, 12), margin))
    assert plan.batch_augmentation.spatial and plan.batch_augmentation.crop == margin
    assert plan.sampler_context == margin  # the uniform crops place the network's patch, not the enlarged one
    assert plan.batch_augmentation.seed != plan_gpu_augmentation("nnunet", (16, 16, 12), seed=0, rank=0).batch_augmentation.seed
    plan = plan_gpu_augmentation("nnunet", (16, 16, 12), gpu_spatial=False)
    assert plan.worker_transform is not None and plan.sampler_margin == margin and plan.sampler_patch_size == (16, 16, 12)
    assert not plan.batch_augmentation.spatial and plan.batch_augmentation.crop == (0, 0, 0)
    plan = plan_gpu_augmentation("basic", (16, 16, 12))
    assert plan.worker_transform is None and plan.sampler_patch_size == (16, 16, 12)
