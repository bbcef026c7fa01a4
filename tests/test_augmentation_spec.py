"""The named augmentations' one specification (lightning_flare.augmentation.spec) and the two executors built from it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_flare.augmentation import build_augmentation, nnunet_transforms, spatial_margin, spec_transforms
from lightning_flare.augmentation.spec import (
    BASIC,
    NNUNET,
    GammaSpec,
    MirrorSpec,
    NoiseSpec,
    RotationScalingSpec,
    augmentation_spec,
    check_spec,
    forced,
    split_at_one_ranges,
)
from lightning_flare.gpu_augmentation import BatchAugmentation, build_batch_augmentation, plan_augmentation


def test_nnunet_spec_is_the_spec_md_table():
    table = {entry.name: dataclasses.asdict(entry) for entry in NNUNET}
    assert list(table) == ["rotation_scaling", "noise", "blur", "brightness", "contrast", "low_resolution",
                           "inverted_gamma", "gamma", "mirror"]
    assert table["rotation_scaling"] == {"p_rotation": 0.2, "degrees": 30.0, "p_scaling": 0.2, "scaling": (0.7, 1.4)}
    assert table["noise"] == {"p": 0.1, "std": (0.0, 0.1)}
    assert table["blur"] == {"p": 0.2, "p_per_channel": 0.5, "sigma": (0.5, 1.0)}
    assert table["brightness"] == {"p": 0.15, "multiplier": (0.75, 1.25), "split_at_one": True}
    assert table["contrast"] == {"p": 0.15, "factor": (0.75, 1.25)}
    assert table["low_resolution"] == {"p": 0.25, "p_per_channel": 0.5, "zoom": (0.5, 1.0)}
    assert table["inverted_gamma"] == {"p": 0.1, "gamma": (0.7, 1.5), "invert": True}
    assert table["gamma"] == {"p": 0.3, "gamma": (0.7, 1.5), "invert": False}
    assert table["mirror"] == {"p_per_axis": 0.5, "axes": (0, 1, 2)}
    assert [entry.name for entry in BASIC] == ["mirror", "noise", "brightness"]
    assert augmentation_spec("none") == () and augmentation_spec("nnunet") is NNUNET
    with pytest.raises(ValueError, match="augmentation must be"):
        augmentation_spec("elastic")


def test_both_executors_follow_the_spec():
    assert list(nnunet_transforms()) == [entry.name for entry in NNUNET]
    assert list(spec_transforms(BASIC)) == ["mirror", "noise", "brightness"]
    assert list(spec_transforms(BASIC, crop=2)) == ["crop", "mirror", "noise", "brightness"]
    assert BatchAugmentation(seed=0).spec == NNUNET
    assert build_batch_augmentation("basic", seed=0).spec == BASIC
    # keyword arguments change fields of the spec; one the spec lacks is an error
    augment = BatchAugmentation(seed=0, p_noise=0.5, gamma=(0.8, 1.2), mirror_axes=(2, 0))
    entries = {entry.name: entry for entry in augment.spec}
    assert entries["noise"].p == 0.5 and entries["gamma"].gamma == entries["inverted_gamma"].gamma == (0.8, 1.2)
    assert entries["mirror"].axes == (0, 2)
    with pytest.raises(ValueError, match="p_blur"):
        BatchAugmentation(seed=0, spec=BASIC, p_blur=0.1)
    with pytest.raises(TypeError, match="p_elastic"):
        BatchAugmentation(seed=0, p_elastic=0.1)


def test_forced_spec_and_draws():
    assert all(getattr(entry, field) == 1.0 for entry in forced(NNUNET) for field in entry.probabilities())
    assert split_at_one_ranges(0.75, 1.25) == (True, (0.75, 1.0), (1.0, 1.25))
    assert split_at_one_ranges(1.1, 1.5) == (False, (1.1, 1.0), (1.1, 1.5))
    assert split_at_one_ranges(0.5, 0.8) == (True, (0.5, 0.8), (0.5, 0.8))


def test_the_batched_executor_runs_the_steps_in_the_spec_order():
    """Noise after mirroring ('basic'): the output minus the flipped input is the noise field, the same field the
    other order adds unflipped."""
    image = torch.randn(1, 1, 6, 5, 4, generator=torch.Generator().manual_seed(0))
    steps = (MirrorSpec(p_per_axis=1.0, axes=(0,)), NoiseSpec(p=1.0, std=(0.1, 0.1)))
    mirrored_first = BatchAugmentation(seed=1, spec=steps)(image)[0]
    noise_first = BatchAugmentation(seed=1, spec=steps[::-1])(image)[0]
    noise = mirrored_first - image.flip(2)
    assert noise.abs().max() > 0.01
    torch.testing.assert_close(noise_first, (image + noise).flip(2))


@pytest.mark.parametrize("spec, match", [
    ((NoiseSpec(p=0.1, std=(0, 0.1)), NoiseSpec(p=0.2, std=(0, 0.1))), "once"),
    ((NoiseSpec(p=0.1, std=(0, 0.1)), NNUNET[0]), "first"),
    (("noise",), "TransformSpec"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        check_spec(spec)


@pytest.mark.parametrize("make, match", [
    (lambda: NoiseSpec(p=1.5, std=(0, 0.1)), "noise.p"),
    (lambda: GammaSpec(p=0.1, gamma=(0, 1.5), invert=True), "inverted_gamma.gamma"),
    (lambda: MirrorSpec(p_per_axis=0.5, axes=(3,)), "mirror.axes"),
    (lambda: RotationScalingSpec(p_rotation=0.2, degrees=200, p_scaling=0.2, scaling=(0.7, 1.4)), "degrees"),
])
def test_bad_entries(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_plan_augmentation():
    patch = (16, 16, 12)
    margin = spatial_margin(patch)
    plan = plan_augmentation("nnunet", patch, "cpu")
    assert plan.batch_augmentation is None and plan.sampler_patch_size == patch and plan.sampler_margin == margin
    assert [type(t) for t in plan.worker_transform.transforms] == [type(t) for t in nnunet_transforms().values()]
    plan = plan_augmentation("basic", patch, "cpu")
    assert plan.sampler_margin == (0, 0, 0) and plan.worker_transform is not None and plan.batch_augmentation is None
    assert plan_augmentation("none", patch, "cpu").worker_transform is None
    plan = plan_augmentation("nnunet", patch, "gpu", gpu_spatial=True, seed=0, rank=1)
    assert plan.worker_transform is None and plan.batch_augmentation.crop == margin
    with pytest.raises(ValueError, match="device"):
        plan_augmentation("nnunet", patch, "tpu")
    with pytest.raises(ValueError, match="augmentation must be"):
        plan_augmentation("heavy", patch, "cpu")
