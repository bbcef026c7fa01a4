"""The named augmentation pipelines: 'none', 'basic' and nnU-Net's default ('nnunet')."""
from __future__ import annotations

from collections.abc import Sequence

import torchio as tio

from ._checks import _crop_margin
from .random_intensity import (
    RandomBrightness,
    RandomContrast,
    RandomGaussianBlur,
    RandomLowResolution,
    RandomRescaledGamma,
)
from .spatial import RandomRotationScaling, RotationScaling


def basic_augmentation() -> tio.Compose:
    """Mirroring on each axis (p 0.5 per axis) plus nnU-Net's noise and brightness (issue 2's basic set)."""
    return tio.Compose([
        tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
        tio.RandomNoise(mean=0, std=(0, 0.1), p=0.1),
        RandomBrightness((0.75, 1.25), p=0.15),
    ])


def nnunet_transforms(
    forced: bool = False, copy: bool = True, crop: int | Sequence[int] = 0
) -> dict[str, tio.Transform]:
    """The transforms of nnU-Net's default augmentation, by name, in nnU-Net's order.

    ``forced``: every transform always applies (probabilities 1, also per channel / per axis): for timing.
    ``crop``: the spatial transform returns only the centre (``crop`` voxels fewer per side), see
    ``build_augmentation``.
    ``copy``: TorchIO's flag; with ``False`` a transform writes its results into the subject it is given
    (``nnunet_augmentation`` uses that inside a ``Compose`` that copies the subject once: a deep copy of a
    166 x 166 x 125 patch costs about as much as the whole intensity augmentation).
    """
    def p(value: float) -> float:
        return 1.0 if forced else value

    kw = {"copy": copy}
    return {
        "rotation_scaling": RandomRotationScaling(degrees=30.0, scaling=(0.7, 1.4), p_rotation=p(0.2),
                                                  p_scaling=p(0.2), default_pad_value=0.0, crop=crop, **kw),
        "noise": tio.RandomNoise(mean=0, std=(0, 0.1), p=p(0.1), **kw),
        "blur": RandomGaussianBlur(sigma=(0.5, 1.0), p_per_channel=p(0.5), p=p(0.2), **kw),
        "brightness": RandomBrightness((0.75, 1.25), split_at_one=True, p=p(0.15), **kw),
        "contrast": RandomContrast((0.75, 1.25), preserve_range=True, p=p(0.15), **kw),
        "low_resolution": RandomLowResolution(zoom=(0.5, 1.0), p_per_channel=p(0.5), p=p(0.25), **kw),
        "inverted_gamma": RandomRescaledGamma((0.7, 1.5), invert=True, retain_stats=True, p=p(0.1), **kw),
        "gamma": RandomRescaledGamma((0.7, 1.5), invert=False, retain_stats=True, p=p(0.3), **kw),
        "mirror": tio.RandomFlip(axes=(0, 1, 2), flip_probability=p(0.5), **kw),
    }


NNUNET_INTENSITY_AND_MIRROR = ("noise", "blur", "brightness", "contrast", "low_resolution", "inverted_gamma",
                               "gamma", "mirror")


def nnunet_augmentation(crop: int | Sequence[int] = 0) -> tio.Compose:
    """nnU-Net's default augmentation (SPEC.md table), one ``Compose`` that copies the subject once.

    The sampler should crop the patch with ``spatial_margin(patch_size)`` so rotations and zoom-outs read real
    data; the other transforms are pointwise or local (blur radius 3 voxels) and unaffected by the margin.
    """
    return tio.Compose(nnunet_transforms(copy=False, crop=crop))


def build_augmentation(name: str, crop: int | Sequence[int] = 0) -> tio.Transform | None:
    """The patch augmentation called ``name``: 'none' (None), 'basic' or 'nnunet'.

    ``crop`` (voxels per side, e.g. the sampler's margin): the transform itself returns only the central part
    of its input, cut right after the spatial step (or first, where there is none), so that the intensity
    transforms and mirroring work on the patch instead of the enlarged crop, and the rotation resamples only the
    patch's voxels. With ``spatial_margin((128, 128, 96))`` that is 8x fewer voxels. A sampler using this must not
    centre-crop again. Default 0: same shape out as in.
    """
    crop = _crop_margin(crop)
    cut = RotationScaling(crop=crop, copy=False) if any(crop) else None
    if name == "none":
        return None if cut is None else tio.Compose([cut])
    if name == "basic":
        basic = basic_augmentation()
        return basic if cut is None else tio.Compose([cut, *basic.transforms])
    if name == "nnunet":
        return nnunet_augmentation(crop)
    raise ValueError(f"augmentation must be 'none', 'basic' or 'nnunet', got {name!r}")
